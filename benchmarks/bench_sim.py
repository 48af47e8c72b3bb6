"""Simulation benchmarks: synthetic spine phantom generation."""

from __future__ import annotations

import time

from needle_steering.bench import benchmark


@benchmark(
    "phantom_t12_l5_1mm_s",
    "s",
    "wall seconds to generate the default T12-L5 CT phantom at 1 mm (seed 0, 330 x 250 mm FOV, ~20 M voxels)",
    target="< 10 (one core)",
)
def phantom_t12_l5_1mm_s() -> float:
    """Generate ``PhantomConfig(seed=0, spacing_mm=1.0)`` once and return the wall time."""
    from needle_steering.sim.phantom import PhantomConfig, generate_phantom

    config = PhantomConfig(seed=0, spacing_mm=1.0)
    start = time.perf_counter()
    phantom = generate_phantom(config)
    elapsed = time.perf_counter() - start
    if phantom.ct.shape[2] < 150:
        raise RuntimeError(f"unexpectedly small phantom {phantom.ct.shape}")
    return elapsed
