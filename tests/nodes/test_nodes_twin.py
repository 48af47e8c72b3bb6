"""The needle-model twin behind sim_node (TwinBackend): kinematics, refusals, tracker."""

from __future__ import annotations

import numpy as np
import pytest

from needle_steering.nodes.conversions import frame_with_z_axis
from needle_steering.nodes.twin import NeedleModelTwin, TwinConfig, TwinError


def _twin() -> NeedleModelTwin:
    return NeedleModelTwin(TwinConfig(home_T_patient_from_tip_mm=frame_with_z_axis((0.0, 0.0, 0.0), (0.0, 1.0, 0.0))))


def _run(twin: NeedleModelTwin, seconds: float, dt: float = 0.005, t0: float = 0.0) -> float:
    t = t0
    for _ in range(round(seconds / dt)):
        twin.step(t, dt)
        t += dt
    return t


def test_nodes_twin_guide_moves_then_needle_inserts_straight_and_retracts() -> None:
    twin = _twin()
    goal = frame_with_z_axis((10.0, 80.0, 0.0), (0.0, -1.0, 0.0))
    twin.move_guide(goal)
    assert twin.busy()
    _run(twin, 2.0)  # 180 deg turn at 2 rad/s
    assert not twin.busy()
    np.testing.assert_allclose(twin.tip_pose_mm(), goal, atol=1e-9)
    twin.servo_joints(10.0, 0.0, 1.0)  # spin_duty 1: straight
    _run(twin, 2.0)
    assert twin.joints().insertion_mm == pytest.approx(20.0, abs=0.06)
    np.testing.assert_allclose(twin.tip_pose_mm()[:3, 3], (10.0, 60.0, 0.0), atol=0.06)
    with pytest.raises(TwinError, match="retract it first"):
        twin.move_guide(goal)
    twin.servo_joints(-20.0, 0.0, 1.0)
    _run(twin, 1.5)
    assert twin.joints().insertion_mm == 0.0
    np.testing.assert_allclose(twin.tip_pose_mm(), goal, atol=1e-9)


def test_nodes_twin_bevel_curves_toward_plus_y_without_spinning() -> None:
    twin = _twin()
    twin.servo_joints(10.0, 0.0, 0.0)
    _run(twin, 3.0)
    p = twin.tip_pose_mm()[:3, 3]
    # home tip frame: z = patient +y, the bevel bends toward its +y axis
    bend_dir = frame_with_z_axis((0.0, 0.0, 0.0), (0.0, 1.0, 0.0))[:3, 1]
    assert float(p @ bend_dir) > 1.0


@pytest.mark.parametrize(
    "v, duty, match", [(60.0, 1.0, "beyond"), (5.0, 1.5, "spin_duty"), (float("nan"), 0.0, "non-finite")]
)
def test_nodes_twin_refuses_out_of_limit_commands(v: float, duty: float, match: str) -> None:
    with pytest.raises(TwinError, match=match):
        _twin().servo_joints(v, 0.0, duty)


def test_nodes_twin_refuses_large_servo_steps_and_samples_tracker() -> None:
    twin = _twin()
    with pytest.raises(TwinError, match="max_servo_step_mm"):
        twin.servo_guide(frame_with_z_axis((5.0, 0.0, 0.0), (0.0, 1.0, 0.0)))
    twin.servo_guide(frame_with_z_axis((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)))
    got = []
    t = 0.0
    for _ in range(40):
        got += twin.sample_tracker(t, dropout=False)
        t += 0.01
    assert len(got) >= 10 and all(np.linalg.norm(m.position_mm - (1.0, 0.0, 0.0)) < 1.5 for m in got)
    dead = _twin()
    assert all(dead.sample_tracker(0.01 * n, dropout=True) == [] for n in range(40))
