"""The one LPS-mm <-> patient-metres conversion module (pure numbers and message round trips)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from needle_steering.nodes.conversions import (
    ConversionError,
    T_mm_from_pose_stamped,
    T_mm_from_transform_stamped,
    check_rigid,
    frame_with_z_axis,
    invert_rigid,
    lps_mm_to_patient_m,
    matrix_from_quaternion_xyzw,
    patient_m_to_lps_mm,
    point_msg_from_lps_mm,
    pose_matrix,
    pose_stamped_msg,
    quaternion_xyzw_from_matrix,
    transform_stamped_msg,
)


def _random_pose_mm(rng: np.random.Generator) -> np.ndarray:
    return pose_matrix(rng.uniform(-300, 300, 3), Rotation.random(random_state=rng).as_quat())


def test_nodes_conversions_units_are_a_factor_1000_on_the_same_axes() -> None:
    lps_mm = np.array([[12.5, -40.0, 300.0], [0.0, 0.0, 0.0]])
    m = lps_mm_to_patient_m(lps_mm)
    np.testing.assert_allclose(m, [[0.0125, -0.04, 0.3], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(patient_m_to_lps_mm(m), lps_mm)
    p = point_msg_from_lps_mm([10.0, 20.0, -30.0])
    assert (p.x, p.y, p.z) == pytest.approx((0.01, 0.02, -0.03))


@pytest.mark.parametrize("bad", [[np.nan, 0, 0], [0, np.inf, 0], [1, 2]])
def test_nodes_conversions_refuse_non_finite_or_misshaped_points(bad: list[float]) -> None:
    with pytest.raises(ConversionError):
        lps_mm_to_patient_m(bad)


def test_nodes_conversions_quaternion_round_trip_matches_scipy() -> None:
    rng = np.random.default_rng(3)
    for _ in range(200):
        R = Rotation.random(random_state=rng).as_matrix()
        q = quaternion_xyzw_from_matrix(R)
        assert q[3] >= 0
        np.testing.assert_allclose(matrix_from_quaternion_xyzw(q), R, atol=1e-12)
        ref = Rotation.from_matrix(R).as_quat()
        assert min(np.abs(q - ref).max(), np.abs(q + ref).max()) < 1e-9


def test_nodes_conversions_refuse_a_quaternion_that_is_not_a_rotation() -> None:
    with pytest.raises(ConversionError, match="norm"):
        matrix_from_quaternion_xyzw([0.0, 0.0, 0.0, 0.5])
    with pytest.raises(ConversionError, match="finite"):
        matrix_from_quaternion_xyzw([0.0, np.nan, 0.0, 1.0])


def test_nodes_conversions_pose_and_transform_messages_round_trip_in_metres() -> None:
    rng = np.random.default_rng(5)
    T = _random_pose_mm(rng)
    msg = pose_stamped_msg(T, "patient", stamp=pose_stamped_msg(np.eye(4), "x", None).header.stamp)
    assert msg.pose.position.x == pytest.approx(T[0, 3] / 1000.0)
    np.testing.assert_allclose(T_mm_from_pose_stamped(msg, "patient"), T, atol=1e-9)
    with pytest.raises(ConversionError, match="frame"):
        T_mm_from_pose_stamped(msg, "robot_base")
    tf = transform_stamped_msg(T, "patient", "robot_base", msg.header.stamp)
    np.testing.assert_allclose(T_mm_from_transform_stamped(tf, "patient", "robot_base"), T, atol=1e-9)
    with pytest.raises(ConversionError):
        T_mm_from_transform_stamped(tf, "robot_base", "patient")


def test_nodes_conversions_rigid_helpers() -> None:
    rng = np.random.default_rng(11)
    T = _random_pose_mm(rng)
    np.testing.assert_allclose(invert_rigid(T) @ T, np.eye(4), atol=1e-9)
    F = frame_with_z_axis([1.0, 2.0, 3.0], [0.0, 0.0, -2.0])
    np.testing.assert_allclose(F[:3, 2], [0.0, 0.0, -1.0])
    check_rigid(F)
    scaled = T.copy()
    scaled[:3, :3] *= 1.01
    with pytest.raises(ConversionError, match="rotation"):
        check_rigid(scaled)
    with pytest.raises(ConversionError):
        frame_with_z_axis([0, 0, 0], [0, 0, 0])
