"""Control-layer benchmarks: controller step latency and needle-kinematics throughput.

Each benchmark times several repeats and reports the best one (as ``timeit`` does), so that
other processes sharing the core inflate the number less.
"""

from __future__ import annotations

import time

import numpy as np

from needle_steering.bench import benchmark
from needle_steering.control.controller import ControllerParams, SlidingModeController
from needle_steering.control.estimator import TipEstimate
from needle_steering.control.geometry import Obstacles
from needle_steering.control.needle_model import (
    NeedleCommand,
    NeedleParams,
    NeedleState,
    TissueParams,
    step_needle,
    step_needles_batch,
)
from needle_steering.control.replanner import ArcReplanner

_NEEDLE = NeedleParams(kappa_per_mm=0.01, torsion_time_constant_s=0.05, torsion_deadband_rad=0.02)
_REPEATS = 5


@benchmark(
    "controller_step_us",
    "us",
    "mean wall time of one SlidingModeController.step (path following, no replan)",
    target="<= 1000",
)
def controller_step_us() -> float:
    """Mean microseconds per controller step on a 100 mm two-obstacle scenario."""
    obstacles = Obstacles(np.array([[6.0, 0.0, 50.0], [-5.0, 8.0, 70.0]]), np.array([3.0, 2.0]))
    target = np.array([0.0, 25.0, 95.0])
    plan = ArcReplanner().plan(np.eye(4), target, obstacles, 0.007)
    if plan.path is None:
        raise RuntimeError(f"benchmark scenario has no plan: {plan.reason}")
    controller = SlidingModeController(
        target, _NEEDLE, ControllerParams(), path=plan.path, replanner=ArcReplanner(), obstacles=obstacles
    )
    # Tip 30 mm along the plan, tangent to it, 0.3 mm off to the side.
    pts = plan.path.points_mm
    z = pts[31] - pts[29]
    z /= np.linalg.norm(z)
    x = np.cross([0.0, 1.0, 0.0], z)
    x /= np.linalg.norm(x)
    T = np.eye(4)
    T[:3, :3] = np.stack([x, np.cross(z, x), z], axis=1)
    T[:3, 3] = pts[30] + 0.3 * x
    estimate = TipEstimate(0.0, T, 1.0, np.zeros(3), np.eye(10) * 0.01)
    n = 5000
    for i in range(200):  # warm-up
        controller.step(i * 0.025, estimate, 30.0, 3, False)
    best = float("inf")
    for _ in range(_REPEATS):
        t0 = time.perf_counter()
        for i in range(n):
            out = controller.step(i * 0.025, estimate, 30.0, 3, False)
        best = min(best, time.perf_counter() - t0)
    if out.status != "running" or out.command.insertion_speed_mm_s <= 0:
        raise RuntimeError(f"benchmark controller stopped ({out.reason}); the timing would be meaningless")
    return best / n * 1e6


@benchmark(
    "needle_kinematics_steps_per_s",
    "steps/s",
    "single-needle exact SE(3) steps per second (torsion lag + dead-band on), one core",
    target=">= 1e5",
)
def needle_kinematics_steps_per_s() -> float:
    """Single-needle :func:`step_needle` throughput."""
    state = NeedleState.from_pose(np.eye(4))
    cmd = NeedleCommand(2.0, 1.5, 0.3)
    tissue = TissueParams(1.1)
    n = 40_000
    best = float("inf")
    for _ in range(_REPEATS):
        t0 = time.perf_counter()
        for _ in range(n):
            state = step_needle(state, cmd, 0.001, _NEEDLE, tissue)
        best = min(best, time.perf_counter() - t0)
    return n / best


@benchmark(
    "needle_kinematics_batch_steps_per_s",
    "needle-steps/s",
    "vectorised step_needles_batch throughput over 10000 needles (torsion lag + dead-band on)",
    target=">= 1e6",
)
def needle_kinematics_batch_steps_per_s() -> float:
    """Batch :func:`step_needles_batch` throughput, counting needle-steps."""
    rng = np.random.default_rng(0)
    n_needles, n_steps = 10_000, 20
    T = np.broadcast_to(np.eye(4), (n_needles, 4, 4)).copy()
    windup = np.zeros(n_needles)
    v = rng.uniform(1.0, 5.0, n_needles)
    omega = rng.normal(0.0, 2.0, n_needles)
    duty = rng.uniform(0.0, 1.0, n_needles)
    scale = rng.uniform(0.8, 1.2, n_needles)
    best = float("inf")
    for _ in range(_REPEATS):
        t0 = time.perf_counter()
        for _ in range(n_steps):
            T, windup = step_needles_batch(
                T, v, omega, duty, dt_s=0.01, needle=_NEEDLE, curvature_scale=scale, torsion_windup_rad=windup
            )
        best = min(best, time.perf_counter() - t0)
    return n_needles * n_steps / best
