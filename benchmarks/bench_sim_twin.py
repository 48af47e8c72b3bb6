"""Digital-twin benchmarks: real-time factor of steering episodes and IK solve time."""

from __future__ import annotations

import time

import numpy as np

from needle_steering.bench import benchmark


@benchmark(
    "twin_realtime_factor",
    "x",
    "simulated / wall seconds of 6 complete twin episodes (fresh twin, arm alignment with IK, control loop, "
    "PyBullet needle contact replay)",
    target=">= 10",
)
def twin_realtime_factor() -> float:
    """Real-time factor over six nominal steering scenarios (seeds 0-5), each in a new twin."""
    from needle_steering.control.closed_loop import random_scenario
    from needle_steering.sim.twin.episode import TwinEpisodeConfig, run_twin_episode
    from needle_steering.sim.twin.twin import Twin

    sim_s = 0.0
    wall0 = time.perf_counter()
    for seed in range(6):
        with Twin(seed=seed) as twin:
            result = run_twin_episode(random_scenario(seed), seed, TwinEpisodeConfig(), twin)
        if result.status != "reached":
            raise RuntimeError(f"benchmark episode {seed} ended {result.status}: {result.reason}")
        sim_s += result.sim_seconds
    return sim_s / (time.perf_counter() - wall0)


@benchmark(
    "twin_ik_solve_ms",
    "ms",
    "mean wall time of Twin.solve_ik (PyBullet IK + DLS refinement + FK check + clearance) for tilted guide goals",
    target="<= 50",
)
def twin_ik_solve_ms() -> float:
    """Mean milliseconds per verified IK solve over 40 random guide goals."""
    from needle_steering.sim.twin.frames import frame_from_axis, make_transform
    from needle_steering.sim.twin.twin import Twin

    rng = np.random.default_rng(0)
    goals = []
    for _ in range(40):
        tilt = np.radians(rng.uniform(0.0, 30.0))
        az = rng.uniform(0.0, 2.0 * np.pi)
        axis = np.array([np.sin(tilt) * np.cos(az), np.sin(tilt) * np.sin(az), -np.cos(tilt)])
        goals.append(make_transform(frame_from_axis(axis), np.array([0.6, 0.0, 0.28]) + rng.uniform(-0.08, 0.08, 3)))
    with Twin() as twin:
        twin.add_table(0.12)
        t0 = time.perf_counter()
        for goal in goals:
            sol = twin.solve_ik(goal)
            if not sol.ok:
                raise RuntimeError(f"benchmark IK goal failed: {sol.reason}")
        return (time.perf_counter() - t0) * 1000.0 / len(goals)
