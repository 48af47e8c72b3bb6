"""Arc replanner: direct arcs, detours around obstacles, explicit failure reasons."""

from __future__ import annotations

import math

import numpy as np

from needle_steering.control.geometry import Obstacles, rot_z
from needle_steering.control.needle_model import arc_points_tip_mm
from needle_steering.control.replanner import ArcReplanner, Path, PlanResult, Replanner


def _turning(points: np.ndarray) -> float:
    """Largest discrete curvature along a polyline (1/mm)."""
    d = np.diff(points, axis=0)
    seg = np.linalg.norm(d, axis=1)
    t = d / seg[:, None]
    ang = np.arccos(np.clip(np.einsum("ij,ij->i", t[1:], t[:-1]), -1, 1))
    return float(np.max(ang / (0.5 * (seg[1:] + seg[:-1]))))


def test_protocol_is_satisfied() -> None:
    assert isinstance(ArcReplanner(), Replanner)


def test_free_space_gives_the_direct_arc() -> None:
    target = arc_points_tip_mm(0.004, 0.7, np.array([80.0]))[0]
    res = ArcReplanner().plan(np.eye(4), target, Obstacles(), 0.009)
    assert res.ok and res.path is not None
    path = res.path
    np.testing.assert_allclose(path.points_mm[0], 0.0, atol=1e-12)
    np.testing.assert_allclose(path.target_mm, target, atol=1e-9)
    assert path.max_curvature_per_mm == np.float64(0.004) or abs(path.max_curvature_per_mm - 0.004) < 1e-9
    assert abs(path.length_mm - 80.0) < 0.05
    assert _turning(path.points_mm) < 0.0041
    # leaves the tip tangent to its axis
    first = path.points_mm[1] - path.points_mm[0]
    assert first[2] / np.linalg.norm(first) > 0.999


def test_detours_around_an_obstacle_on_the_direct_arc() -> None:
    target = np.array([0.0, 0.0, 90.0])
    obstacles = Obstacles(np.array([[1.5, 0.0, 45.0]]), np.array([2.5]))
    planner = ArcReplanner(clearance_mm=2.0)
    res = planner.plan(np.eye(4), target, obstacles, 0.01)
    assert res.path is not None, res.reason
    assert "direct arc clearance" in res.reason
    clear = obstacles.clearance_mm(res.path.points_mm)
    assert clear.min() >= 2.0
    assert res.path.min_clearance_mm >= 2.0
    np.testing.assert_allclose(res.path.target_mm, target, atol=1e-6)
    assert _turning(res.path.points_mm) <= 0.0101


def test_capsule_obstacles_are_respected() -> None:
    target = np.array([0.0, 0.0, 80.0])
    obstacles = Obstacles(
        capsule_a_mm=np.array([[-20.0, 0.0, 40.0]]),
        capsule_b_mm=np.array([[20.0, 0.0, 40.0]]),
        capsule_radii_mm=np.array([1.5]),
    )
    res = ArcReplanner(clearance_mm=1.5).plan(np.eye(4), target, obstacles, 0.012)
    assert res.path is not None, res.reason
    assert obstacles.clearance_mm(res.path.points_mm).min() >= 1.5


def test_unreachable_and_behind_targets_have_reasons() -> None:
    planner = ArcReplanner()
    far_side = np.array([40.0, 0.0, 30.0])  # needs kappa = 2*40/2500 = 0.032
    res = planner.plan(np.eye(4), far_side, Obstacles(), 0.01)
    assert res.path is None and not res.ok
    assert "no feasible path" in res.reason and "curvature" in res.reason
    behind = planner.plan(rot_z(0.3), np.array([0.0, 0.0, -10.0]), Obstacles(), 0.01)
    assert behind.path is None and "behind" in behind.reason


def test_wall_of_obstacles_gives_no_path_with_clearance_reason() -> None:
    xs, ys = np.meshgrid(np.arange(-30.0, 31.0, 6.0), np.arange(-30.0, 31.0, 6.0))
    centres = np.stack([xs.ravel(), ys.ravel(), np.full(xs.size, 40.0)], axis=1)
    wall = Obstacles(centres, np.full(len(centres), 3.5))
    res = ArcReplanner().plan(np.eye(4), np.array([0.0, 0.0, 80.0]), wall, 0.01)
    assert res.path is None
    assert "clearance" in res.reason


def test_path_from_points_and_plan_result() -> None:
    p = Path.from_points(np.array([[0.0, 0.0, 0.0], [0.0, 3.0, 4.0]]))
    assert p.length_mm == 5.0
    assert PlanResult(None, "x").ok is False
    assert math.isinf(p.min_clearance_mm)


def test_control_reuses_the_planning_path_types() -> None:
    from needle_steering.planning.steerable import SteerablePath, SteerablePlanResult

    assert Path is SteerablePath and PlanResult is SteerablePlanResult


def test_fallback_uses_the_steerable_planner_when_arcs_fail() -> None:
    from needle_steering.control.replanner import FallbackReplanner, make_replanner
    from needle_steering.planning.steerable import SteerablePlanner

    # an obstacle on the straight line; a deliberately crippled arc replanner (one bending
    # direction, a 1 % first arc) cannot pass it, the RRT can
    obstacles = Obstacles(np.array([[0.0, 0.0, 50.0]]), np.array([4.0]))
    target = np.array([0.0, 0.0, 110.0])
    weak = ArcReplanner(clearance_mm=1.0, n_bend_angles=1, first_arc_length_fractions=(0.01,))
    arc = weak.plan(np.eye(4), target, obstacles, 0.02)
    assert not arc.ok, "the scene must defeat the crippled arc replanner"
    both = FallbackReplanner(weak, SteerablePlanner(clearance_mm=1.0, seed=1, time_budget_s=2.0))
    res = both.plan(np.eye(4), target, obstacles, 0.02)
    assert res.ok and res.path is not None, res.reason
    assert obstacles.clearance_mm(res.path.points_mm).min() >= 1.0 - 1e-9
    np.testing.assert_allclose(res.path.target_mm, target, atol=1e-6)
    assert isinstance(make_replanner("arc+steerable", clearance_mm=1.0), Replanner)
