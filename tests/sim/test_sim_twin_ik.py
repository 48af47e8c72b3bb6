"""The PyBullet twin: IK to planned guide poses (verified by FK), reachability, clearance, threading."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from needle_steering.errors import SimulationError
from needle_steering.sim.twin.frames import (
    approach_T_robot_from_patient_m,
    axis_angle_deg,
    frame_from_axis,
    invert,
    make_transform,
    patient_mm_to_robot_m,
    prone_T_robot_from_patient_m,
    robot_m_to_patient_mm,
)
from needle_steering.sim.twin.twin import Twin, TwinCommandQueue


def _guide_goal(entry_robot_m: np.ndarray, axis: np.ndarray) -> np.ndarray:
    return make_transform(frame_from_axis(axis), entry_robot_m)


def test_ik_reaches_planned_guide_poses_within_tolerance() -> None:
    rng = np.random.default_rng(3)
    with Twin(seed=1) as twin:
        twin.add_table(0.12)
        for _ in range(6):
            tilt = math.radians(rng.uniform(0.0, 30.0))
            az = rng.uniform(0.0, 2.0 * math.pi)
            axis = np.array([math.sin(tilt) * math.cos(az), math.sin(tilt) * math.sin(az), -math.cos(tilt)])
            goal = _guide_goal(np.array([0.6, 0.0, 0.28]) + rng.uniform(-0.08, 0.08, 3) * [1.0, 1.5, 0.4], axis)
            sol = twin.move_cp(goal)
            assert sol.ok, sol.reason
            # Independent forward-kinematics check of the arm now holding the guide.
            T = twin.measured_cp()
            assert np.linalg.norm(T[:3, 3] - goal[:3, 3]) * 1000.0 < 0.1
            assert axis_angle_deg(T[:3, 2], goal[:3, 2]) < 0.1
            assert sol.arm_clearance_mm >= twin.config.min_arm_clearance_mm
            np.testing.assert_allclose(twin.measured_js(), sol.joints_rad, atol=1e-9)


def test_unreachable_goal_is_reported_not_faked() -> None:
    with Twin() as twin:
        q0 = twin.measured_js()
        sol = twin.move_cp(_guide_goal(np.array([1.6, 0.0, 0.3]), np.array([0.0, 0.0, -1.0])))
        assert not sol.ok
        assert sol.reason.startswith("unreachable")
        assert sol.position_error_mm > 0.1
        np.testing.assert_allclose(twin.measured_js(), q0)  # the arm did not move


def test_table_collision_is_refused() -> None:
    with Twin() as twin:
        twin.add_table(0.30)  # table top above the goal: the guide would sit inside it
        sol = twin.move_cp(_guide_goal(np.array([0.6, 0.0, 0.29]), np.array([0.0, 0.0, -1.0])))
        assert not sol.ok
        assert "collision" in sol.reason and "table" in sol.reason


def test_out_of_limit_joint_setpoint_raises_with_value() -> None:
    with Twin() as twin, pytest.raises(SimulationError, match=r"joint 2 = 3\.0000"):
        twin.set_joint_positions([0.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0])


def test_owner_thread_and_command_queue() -> None:
    queue = TwinCommandQueue()
    goal = _guide_goal(np.array([0.62, 0.05, 0.3]), np.array([0.1, 0.0, -1.0]))
    with Twin() as twin:
        errors: list[BaseException] = []
        futures = []

        def other_thread() -> None:
            try:
                twin.measured_js()
            except SimulationError as exc:
                errors.append(exc)
            futures.append(queue.move_cp(goal))
            with pytest.raises(SimulationError, match="servo_jp needs 7"):
                queue.servo_jp([0.0, 1.0])

        t = threading.Thread(target=other_thread)
        t.start()
        t.join()
        assert errors and "owner thread" in str(errors[0])
        assert len(queue) == 1
        assert twin.process_commands(queue) == 1
        sol = futures[0].result(timeout=0)
        assert sol.ok
        assert np.linalg.norm(twin.measured_cp()[:3, 3] - goal[:3, 3]) * 1000.0 < 0.1
    assert not twin.connected


def test_context_manager_disconnects_on_error() -> None:
    twin = Twin()
    with pytest.raises(RuntimeError, match="boom"), twin:
        raise RuntimeError("boom")
    assert not twin.connected


def test_patient_placements_round_trip_and_orientation() -> None:
    T = prone_T_robot_from_patient_m([10.0, -50.0, 300.0], [0.6, 0.0, 0.25])
    np.testing.assert_allclose(patient_mm_to_robot_m(T, [10.0, -50.0, 300.0]), [0.6, 0.0, 0.25], atol=1e-12)
    # Prone: patient posterior (+y LPS) points up (+z robot).
    up = patient_mm_to_robot_m(T, [10.0, -40.0, 300.0]) - patient_mm_to_robot_m(T, [10.0, -50.0, 300.0])
    np.testing.assert_allclose(up, [0.0, 0.0, 0.01], atol=1e-12)
    pts = np.random.default_rng(0).normal(size=(5, 3)) * 100
    np.testing.assert_allclose(robot_m_to_patient_mm(T, patient_mm_to_robot_m(T, pts)), pts, atol=1e-9)
    axis = np.array([0.2, 0.3, 0.9])
    Ta = approach_T_robot_from_patient_m([1.0, 2.0, 3.0], axis)
    down = Ta[:3, :3] @ (axis / np.linalg.norm(axis))
    np.testing.assert_allclose(down, [0.0, 0.0, -1.0], atol=1e-12)
    np.testing.assert_allclose(invert(Ta) @ Ta, np.eye(4), atol=1e-12)
