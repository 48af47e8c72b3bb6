"""The control benchmarks are registered and return finite positive values (no timing asserts)."""

from __future__ import annotations

import math

from needle_steering.bench import registry

NAMES = ("controller_step_us", "needle_kinematics_steps_per_s", "needle_kinematics_batch_steps_per_s")


def test_control_benchmarks_are_registered_and_run() -> None:
    known = registry()
    for name in NAMES:
        assert name in known, sorted(known)
        bench = known[name]
        assert bench.target
        value = bench.run()
        assert math.isfinite(value) and value > 0
