"""Perception benchmarks: segmentation time on a 1 mm 256 x 256 x 200 CT."""

from __future__ import annotations

import time

import numpy as np

from needle_steering.bench import benchmark


@benchmark(
    "segment_1mm_256x256x200_s",
    unit="s",
    description="segment_volume (auto backend) on a 1 mm phantom CT cropped to 256 x 256 x 200 voxels",
    target="<= 20",
)
def segment_1mm_256x256x200_s() -> float:
    """Wall seconds to segment a 256 x 256 x 200, 1 mm CT (a phantom cropped around the spine)."""
    from needle_steering.perception.segment import segment_volume
    from needle_steering.perception.volume import Volume
    from needle_steering.sim.phantom import PhantomConfig, generate_phantom

    phantom = generate_phantom(PhantomConfig(seed=0, spacing_mm=1.0))
    ct = phantom.ct
    centre = np.array(ct.shape) // 2
    size = np.array([256, 256, 200])
    lo = np.clip(centre - size // 2, 0, None)
    crop = np.full(tuple(size), -1024.0, np.float32)
    part = ct.array[lo[0] : lo[0] + 256, lo[1] : lo[1] + 256, lo[2] : lo[2] + 200]
    crop[: part.shape[0], : part.shape[1], : part.shape[2]] = part
    volume = Volume(crop, ct.spacing_mm, ct.index_to_lps(lo), ct.direction, {"source": "phantom crop"})
    start = time.perf_counter()
    segment_volume(volume, backend="auto")
    return time.perf_counter() - start
