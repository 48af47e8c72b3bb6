"""Controller with perfect state feedback: reaching, abort rules, replanning, CBCT requests."""

from __future__ import annotations

import math

import numpy as np
import pytest

from needle_steering.control.controller import ControllerParams, ControlOutput, SlidingModeController
from needle_steering.control.estimator import TipEstimate
from needle_steering.control.geometry import FloatArray, Obstacles, rot_z
from needle_steering.control.needle_model import (
    NeedleParams,
    NeedleState,
    TissueParams,
    arc_points_tip_mm,
    step_needle,
)
from needle_steering.control.replanner import ArcReplanner, PlanResult

NEEDLE = NeedleParams(0.01, 0.05, 0.02)
DT = 0.025


def _estimate(state: NeedleState, t: float, scale: float = 1.0, pos_var: float = 0.01) -> TipEstimate:
    cov = np.eye(10) * 1e-4
    cov[:3, :3] = np.eye(3) * pos_var
    return TipEstimate(t, state.T_world_from_tip, scale, np.zeros(3), cov)


def _drive(
    ctrl: SlidingModeController, state: NeedleState, tissue: TissueParams, max_steps: int = 6000
) -> tuple[ControlOutput, NeedleState, float, float]:
    t = 0.0
    out = None
    max_speed = max_rate = 0.0
    for k in range(max_steps):
        out = ctrl.step(t, _estimate(state, t), state.inserted_length_mm, 0, False)
        if out.status != "running":
            break
        max_speed = max(max_speed, out.command.insertion_speed_mm_s)
        max_rate = max(max_rate, abs(out.command.rotation_rate_rad_s))
        state = step_needle(state, out.command, DT, NEEDLE, tissue)
        t = (k + 1) * DT
    assert out is not None
    return out, state, max_speed, max_rate


class CountingReplanner:
    """A real ArcReplanner that also counts its calls (implements the Replanner protocol)."""

    def __init__(self) -> None:
        self.inner = ArcReplanner()
        self.calls = 0

    def plan(
        self, start_T_world_from_tip: FloatArray, target_mm: FloatArray, obstacles: Obstacles, kappa_max_per_mm: float
    ) -> PlanResult:
        self.calls += 1
        return self.inner.plan(start_T_world_from_tip, target_mm, obstacles, kappa_max_per_mm)


@pytest.mark.parametrize(
    ("kappa_frac", "bend", "length", "roll0", "scale"),
    [(0.5, 0.4, 90.0, 0.0, 1.0), (0.3, -2.0, 70.0, 1.5, 0.8), (0.6, 2.8, 100.0, -2.5, 1.2), (0.0, 0.0, 60.0, 0.7, 1.0)],
)
def test_reaches_targets_with_perfect_state(
    kappa_frac: float, bend: float, length: float, roll0: float, scale: float
) -> None:
    target = arc_points_tip_mm(kappa_frac * NEEDLE.kappa_per_mm, bend, np.array([length]))[0]
    # the controller only knows the nominal curvature (scale 1) while the tissue has `scale`
    ctrl = SlidingModeController(target, NEEDLE, ControllerParams(insertion_speed_mm_s=2.5, control_period_s=DT))
    out, state, vmax, wmax = _drive(ctrl, NeedleState.from_pose(rot_z(roll0)), TissueParams(scale))
    assert out.status == "reached", out.reason
    assert np.linalg.norm(state.position_mm - target) < 0.1
    assert vmax <= 2.5 + 1e-12
    assert wmax <= ControllerParams().max_rotation_rate_rad_s + 1e-12


def test_follows_a_planned_detour_and_reaches() -> None:
    target = np.array([0.0, 0.0, 90.0])
    obstacles = Obstacles(np.array([[1.5, 0.0, 45.0]]), np.array([2.5]))
    plan = ArcReplanner().plan(np.eye(4), target, obstacles, 0.007)
    assert plan.path is not None
    ctrl = SlidingModeController(target, NEEDLE, ControllerParams(), path=plan.path, obstacles=obstacles)
    t = 0.0
    state = NeedleState.from_pose(np.eye(4))
    min_clear = math.inf
    out = None
    for k in range(6000):
        out = ctrl.step(t, _estimate(state, t), state.inserted_length_mm)
        if out.status != "running":
            break
        state = step_needle(state, out.command, DT, NEEDLE, TissueParams(0.9))
        min_clear = min(min_clear, float(obstacles.clearance_mm(state.position_mm[None])[0]))
        t = (k + 1) * DT
    assert out is not None
    assert out.status == "reached", out.reason
    assert min_clear > 1.5
    assert np.linalg.norm(state.position_mm - target) < 0.1


def test_abort_target_passed() -> None:
    ctrl = SlidingModeController(np.array([5.0, 0.0, -3.0]), NEEDLE)
    out = ctrl.step(0.0, _estimate(NeedleState.from_pose(np.eye(4)), 0.0), 10.0)
    assert out.status == "aborted" and out.reason.startswith("target_passed")
    assert out.command.insertion_speed_mm_s == 0.0
    # latched: later steps keep holding with the same reason
    again = ctrl.step(1.0, _estimate(NeedleState.from_pose(np.eye(4)), 1.0), 10.0)
    assert again.status == "aborted" and again.reason == out.reason


def test_abort_depth_limit() -> None:
    ctrl = SlidingModeController(np.array([0.0, 0.0, 50.0]), NEEDLE, ControllerParams(max_depth_mm=100.0))
    out = ctrl.step(0.0, _estimate(NeedleState.from_pose(np.eye(4)), 0.0), 100.0)
    assert out.status == "aborted" and out.reason.startswith("depth_limit")


def test_abort_unreachable_calls_the_replanner_first() -> None:
    replanner = CountingReplanner()
    target = np.array([30.0, 0.0, 25.0])  # needs ~0.039/mm, far beyond 0.01/mm
    ctrl = SlidingModeController(target, NEEDLE, replanner=replanner)
    out = ctrl.step(0.0, _estimate(NeedleState.from_pose(np.eye(4)), 0.0), 0.0)
    assert replanner.calls == 1
    assert out.status == "aborted" and out.reason.startswith("unreachable")
    assert "replanner: no feasible path" in out.reason
    assert out.predicted_target_error_mm > 1.0


def test_abort_curvature_out_of_range() -> None:
    ctrl = SlidingModeController(np.array([0.0, 0.0, 50.0]), NEEDLE)
    out = ctrl.step(0.0, _estimate(NeedleState.from_pose(np.eye(4)), 0.0, scale=0.3), 0.0)
    assert out.status == "aborted" and out.reason.startswith("curvature_out_of_range")


def test_replans_when_the_tip_drifts_off_the_path() -> None:
    target = np.array([0.0, 20.0, 90.0])
    plan = ArcReplanner().plan(np.eye(4), target, Obstacles(), 0.009)
    assert plan.path is not None
    replanner = CountingReplanner()
    ctrl = SlidingModeController(target, NEEDLE, path=plan.path, replanner=replanner)
    T = np.eye(4)
    T[:3, 3] = [3.0, 0.0, 5.0]  # 3 mm beside the plan
    out = ctrl.step(0.0, TipEstimate(0.0, T, 1.0, np.zeros(3), np.eye(10) * 0.01), 5.0)
    assert out.status == "running" and out.replanned
    assert replanner.calls == 1 and ctrl.path is not plan.path
    assert ctrl.path is not None
    np.testing.assert_allclose(ctrl.path.points_mm[0], T[:3, 3])
    # the target moves (patient motion compensation): a replan is forced next step
    ctrl.update_target(target + np.array([0.5, 0.0, 0.0]))
    out2 = ctrl.step(0.1, TipEstimate(0.1, T, 1.0, np.zeros(3), np.eye(10) * 0.01), 5.0)
    assert out2.replanned and replanner.calls == 2


def test_cbct_requested_near_target_only_when_uncertain_and_budget_allows() -> None:
    target = np.array([0.0, 0.0, 20.0])
    state = NeedleState.from_pose(np.eye(4))
    ctrl = SlidingModeController(target, NEEDLE)
    assert not ctrl.step(0.0, _estimate(state, 0.0, pos_var=0.01), 0.0, 3, False).request_cbct  # certain
    assert not ctrl.step(0.1, _estimate(state, 0.1, pos_var=0.25), 0.0, 0, False).request_cbct  # no budget
    assert not ctrl.step(0.2, _estimate(state, 0.2, pos_var=0.25), 0.0, 3, True).request_cbct  # one pending
    assert ctrl.step(0.3, _estimate(state, 0.3, pos_var=0.25), 0.0, 3, False).request_cbct
    far = SlidingModeController(np.array([0.0, 0.0, 90.0]), NEEDLE)
    assert not far.step(0.0, _estimate(state, 0.0, pos_var=0.25), 0.0, 3, False).request_cbct  # too far
