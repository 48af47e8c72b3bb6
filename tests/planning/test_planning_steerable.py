"""Steerable-needle planner: curvature and clearance respected, or a reason; Replanner compatibility."""

from __future__ import annotations

import numpy as np
import pytest

from needle_steering.control.geometry import Obstacles
from needle_steering.control.replanner import Replanner
from needle_steering.errors import PlanningError
from needle_steering.planning.steerable import SphereObstacles, SteerablePlanner, path_curvature_per_mm


def _check(path: object, target: np.ndarray, kmax: float, obstacles: SphereObstacles, clearance: float) -> None:
    pts = path.points_mm  # type: ignore[attr-defined]
    assert np.linalg.norm(pts[-1] - target) < 1e-6
    assert np.all(np.linalg.norm(np.diff(pts, axis=0), axis=1) <= 1.0 + 1e-6)
    assert path_curvature_per_mm(pts).max() <= kmax * 1.02 + 1e-9
    assert float(np.min(obstacles.clearance_mm(pts))) >= clearance - 1e-9
    assert path.max_curvature_per_mm <= kmax + 1e-12  # type: ignore[attr-defined]


def test_direct_arc_and_curved_paths_respect_bounds() -> None:
    kmax = 1.0 / 60.0
    planner = SteerablePlanner(clearance_mm=2.0, seed=1)
    free = planner.plan(np.eye(4), np.array([8.0, 0.0, 90.0]), SphereObstacles(np.zeros((0, 3)), np.zeros(0)), kmax)
    assert free.ok and "direct" in free.reason
    obstacles = SphereObstacles(np.array([[0.0, 0.0, 45.0]]), np.array([4.0]))
    target = np.array([0.0, 0.0, 120.0])
    res = planner.plan(np.eye(4), target, obstacles, kmax)
    assert res.ok, res.reason
    assert res.path is not None and len(res.path.arcs) >= 2
    _check(res.path, target, kmax, obstacles, 2.0)
    again = SteerablePlanner(clearance_mm=2.0, seed=1).plan(np.eye(4), target, obstacles, kmax)
    assert again.path is not None and np.allclose(again.path.points_mm, res.path.points_mm)


def test_random_scenes_meet_constraints_or_say_why() -> None:
    rng = np.random.default_rng(7)
    kmax = 1.0 / 60.0
    n_ok = 0
    for i in range(12):
        target = np.array([rng.uniform(-20, 20), rng.uniform(-20, 20), rng.uniform(80, 120)])
        c = np.column_stack([rng.uniform(-15, 15, 6), rng.uniform(-15, 15, 6), rng.uniform(25, 75, 6)])
        r = rng.uniform(4, 8, 6)
        keep = (np.linalg.norm(c - target, axis=1) > r + 3) & (np.linalg.norm(c, axis=1) > r + 3)
        obstacles = SphereObstacles(c[keep], r[keep])
        res = SteerablePlanner(clearance_mm=2.0, seed=i).plan(np.eye(4), target, obstacles, kmax)
        if res.ok:
            n_ok += 1
            _check(res.path, target, kmax, obstacles, 2.0)
        else:
            assert res.path is None and "no feasible path" in res.reason
    assert n_ok >= 9


def test_infeasible_requests_give_reasons() -> None:
    planner = SteerablePlanner(clearance_mm=2.0, time_budget_s=0.02)
    none = SphereObstacles(np.zeros((0, 3)), np.zeros(0))
    behind = planner.plan(np.eye(4), np.array([0.0, 0.0, -30.0]), none, 0.01)
    assert not behind.ok and "no feasible path" in behind.reason
    walled = SphereObstacles(np.array([[0.0, 0.0, 60.0]]), np.array([5.0]))
    inside = planner.plan(np.eye(4), np.array([0.0, 0.0, 60.0]), walled, 0.01)
    assert not inside.ok and "target" in inside.reason
    ball = SphereObstacles(np.zeros((1, 3)), np.array([3.0]))
    start_in = planner.plan(np.eye(4), np.array([0.0, 0.0, 60.0]), ball, 0.01)
    assert not start_in.ok and "inside an obstacle" in start_in.reason
    with pytest.raises(PlanningError, match="kappa_max"):
        planner.plan(np.eye(4), np.array([0.0, 0.0, 60.0]), none, float("nan"))
    with pytest.raises(PlanningError, match="rotation"):
        planner.plan(np.diag([1.0, 1.0, -1.0, 1.0]), np.array([0.0, 0.0, 60.0]), none, 0.01)


def test_compatible_with_the_control_replanner_protocol() -> None:
    planner = SteerablePlanner(clearance_mm=2.0)
    assert isinstance(planner, Replanner)
    obstacles = Obstacles(sphere_centers_mm=np.array([[0.0, 0.0, 50.0]]), sphere_radii_mm=np.array([5.0]))
    res = planner.plan(np.eye(4), np.array([0.0, 0.0, 100.0]), obstacles, 1.0 / 60.0)
    assert res.ok and res.path is not None
    assert float(np.min(obstacles.clearance_mm(res.path.points_mm))) >= 2.0
    assert res.path.length_mm == pytest.approx(res.path.arc_length_mm[-1])
    assert np.allclose(res.path.target_mm, [0.0, 0.0, 100.0])
