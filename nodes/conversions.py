"""The ONE place where LPS millimetres (files, plans, core layers) meet metres (ROS topics).

Frames
------
``patient``
    The planning CT's LPS frame (DICOM/ITK: +x patient Left, +y Posterior, +z Superior), in
    **metres** on every ROS topic. Files, plan documents and the pure layers use the same axes
    in millimetres; this module is the only place the factor 1000 appears.
``robot_base``
    The robot driver's base frame (metres). ``T_patient_from_robot_base`` maps points given in
    ``robot_base`` to ``patient``: ``p_patient = T_patient_from_robot_base @ p_robot_base``.

The pure functions here take and return numpy arrays; the ``*_msg`` helpers build and read
``geometry_msgs`` messages (imported inside the functions, so the numeric part is testable
without ROS message packages on the path).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from needle_steering.errors import NeedleSteeringError
from needle_steering.sim.twin import frames

if TYPE_CHECKING:
    from geometry_msgs.msg import Point, Pose, PoseStamped, Quaternion, TransformStamped

FloatArray = NDArray[np.float64]

#: Millimetres per metre.
MM_PER_M = 1000.0
#: Frame id of all clinical data on topics (CT LPS, metres).
PATIENT_FRAME = "patient"
#: Frame id of the robot driver's base.
ROBOT_BASE_FRAME = "robot_base"
_ROTATION_TOL = 1e-6
_QUATERNION_NORM_TOL = 1e-3


class ConversionError(NeedleSteeringError, ValueError):
    """A pose, point or transform cannot be converted (non-finite, not a rotation, wrong frame)."""


# --------------------------------------------------------------------------------------------------
# units
# --------------------------------------------------------------------------------------------------
def lps_mm_to_patient_m(points_lps_mm: ArrayLike) -> FloatArray:
    """LPS millimetres ``(..., 3)`` -> ``patient`` metres ``(..., 3)`` (same axes)."""
    pts = np.asarray(points_lps_mm, dtype=np.float64)
    _check_points(pts, "points_lps_mm")
    return pts / MM_PER_M


def patient_m_to_lps_mm(points_patient_m: ArrayLike) -> FloatArray:
    """``patient`` metres ``(..., 3)`` -> LPS millimetres ``(..., 3)`` (same axes)."""
    pts = np.asarray(points_patient_m, dtype=np.float64)
    _check_points(pts, "points_patient_m")
    return pts * MM_PER_M


def transform_mm_to_m(T_mm: ArrayLike) -> FloatArray:
    """4x4 rigid transform with translation in mm -> the same transform with translation in m."""
    T = check_rigid(T_mm, "T_mm")
    out = T.copy()
    out[:3, 3] /= MM_PER_M
    return out


def transform_m_to_mm(T_m: ArrayLike) -> FloatArray:
    """4x4 rigid transform with translation in m -> the same transform with translation in mm."""
    T = check_rigid(T_m, "T_m")
    out = T.copy()
    out[:3, 3] *= MM_PER_M
    return out


def _check_points(pts: FloatArray, name: str) -> None:
    if pts.ndim == 0 or pts.shape[-1] != 3:
        raise ConversionError(f"{name}: expected shape (..., 3), got {pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise ConversionError(f"{name}: coordinates must be finite, got {pts.tolist()!r}")


# --------------------------------------------------------------------------------------------------
# rotations
# --------------------------------------------------------------------------------------------------
def check_rigid(T: ArrayLike, name: str = "T") -> FloatArray:
    """Validate a 4x4 rigid transform (finite, orthonormal rotation with det +1, last row 0 0 0 1)."""
    arr = np.asarray(T, dtype=np.float64)
    if arr.shape != (4, 4):
        raise ConversionError(f"{name}: expected shape (4, 4), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ConversionError(f"{name}: entries must be finite, got {arr.tolist()!r}")
    R = arr[:3, :3]
    err = float(np.max(np.abs(R.T @ R - np.eye(3))))
    if err > _ROTATION_TOL or abs(float(np.linalg.det(R)) - 1.0) > _ROTATION_TOL:
        raise ConversionError(f"{name}: rotation block is not a proper rotation (error {err:.3g})")
    if not np.allclose(arr[3], (0.0, 0.0, 0.0, 1.0)):
        raise ConversionError(f"{name}: last row must be 0 0 0 1, got {arr[3].tolist()!r}")
    return arr


def quaternion_xyzw_from_matrix(R: ArrayLike) -> FloatArray:
    """Unit quaternion ``(x, y, z, w)`` with ``w >= 0`` of a 3x3 rotation matrix."""
    q = frames.quaternion_xyzw(R)
    return -q if q[3] < 0 else q


def matrix_from_quaternion_xyzw(q_xyzw: ArrayLike) -> FloatArray:
    """3x3 rotation of a quaternion ``(x, y, z, w)``.

    Raises:
        ConversionError: non-finite entries or a norm farther than 1e-3 from 1 (a quaternion that
            is not a rotation is refused, never silently normalised from garbage).
    """
    q = np.asarray(q_xyzw, dtype=np.float64)
    if q.shape != (4,) or not np.all(np.isfinite(q)):
        raise ConversionError(f"quaternion must be 4 finite numbers, got {np.asarray(q_xyzw).tolist()!r}")
    norm = float(np.linalg.norm(q))
    if abs(norm - 1.0) > _QUATERNION_NORM_TOL:
        raise ConversionError(f"quaternion norm is {norm:.6g}, expected 1 (x, y, z, w = {q.tolist()})")
    return frames.rotation_from_quaternion_xyzw(q)


def pose_matrix(position: ArrayLike, q_xyzw: ArrayLike) -> FloatArray:
    """4x4 transform from a position ``(3,)`` and a quaternion ``(x, y, z, w)`` (units kept)."""
    p = np.asarray(position, dtype=np.float64)
    _check_points(p, "position")
    T = np.eye(4)
    T[:3, :3] = matrix_from_quaternion_xyzw(q_xyzw)
    T[:3, 3] = p
    return T


def invert_rigid(T: ArrayLike) -> FloatArray:
    """Inverse of a rigid 4x4 transform (``T_b_from_a`` -> ``T_a_from_b``)."""
    return frames.invert(check_rigid(T))


def frame_with_z_axis(origin: ArrayLike, z_axis: ArrayLike) -> FloatArray:
    """4x4 pose at ``origin`` whose +z axis is ``z_axis`` (any roll; x chosen deterministically).

    Used for tool poses: the needle's insertion direction is the tip frame's +z axis.
    """
    z = np.asarray(z_axis, dtype=np.float64)
    norm = float(np.linalg.norm(z))
    if not math.isfinite(norm) or norm < 1e-9:
        raise ConversionError(f"z_axis must be a finite non-zero vector, got {np.asarray(z_axis).tolist()!r}")
    z = z / norm
    helper = np.array([1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x = helper - z * float(helper @ z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2] = x, y, z
    p = np.asarray(origin, dtype=np.float64)
    _check_points(p, "origin")
    T[:3, 3] = p
    return T


# --------------------------------------------------------------------------------------------------
# messages (metres on the wire)
# --------------------------------------------------------------------------------------------------
def point_msg_from_lps_mm(point_lps_mm: ArrayLike) -> Point:
    """``geometry_msgs/Point`` in ``patient`` metres from an LPS millimetre point."""
    from geometry_msgs.msg import Point

    p = lps_mm_to_patient_m(np.asarray(point_lps_mm, dtype=np.float64).reshape(3))
    return Point(x=float(p[0]), y=float(p[1]), z=float(p[2]))


def lps_mm_from_point_msg(point: Any) -> FloatArray:
    """LPS millimetres ``(3,)`` from a ``geometry_msgs/Point`` in ``patient`` metres."""
    return patient_m_to_lps_mm(np.array([point.x, point.y, point.z], dtype=np.float64))


def quaternion_msg(R: ArrayLike) -> Quaternion:
    """``geometry_msgs/Quaternion`` of a 3x3 rotation."""
    from geometry_msgs.msg import Quaternion

    q = quaternion_xyzw_from_matrix(R)
    return Quaternion(x=float(q[0]), y=float(q[1]), z=float(q[2]), w=float(q[3]))


def pose_msg_from_T_mm(T_frame_from_body_mm: ArrayLike) -> Pose:
    """``geometry_msgs/Pose`` (metres) from a 4x4 pose whose translation is in millimetres."""
    from geometry_msgs.msg import Pose

    T = check_rigid(T_frame_from_body_mm, "T_frame_from_body_mm")
    pose = Pose()
    p = T[:3, 3] / MM_PER_M
    pose.position.x, pose.position.y, pose.position.z = float(p[0]), float(p[1]), float(p[2])
    pose.orientation = quaternion_msg(T[:3, :3])
    return pose


def T_mm_from_pose_msg(pose: Any) -> FloatArray:
    """4x4 pose with translation in millimetres from a ``geometry_msgs/Pose`` in metres.

    Raises:
        ConversionError: non-finite values or a quaternion that is not unit length.
    """
    q = (pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w)
    p_m = np.array([pose.position.x, pose.position.y, pose.position.z], dtype=np.float64)
    return pose_matrix(p_m * MM_PER_M, q)


def pose_stamped_msg(T_frame_from_body_mm: ArrayLike, frame_id: str, stamp: Any) -> PoseStamped:
    """``geometry_msgs/PoseStamped`` (metres) in ``frame_id`` at ``stamp``."""
    from geometry_msgs.msg import PoseStamped

    msg = PoseStamped()
    msg.header.frame_id = frame_id
    msg.header.stamp = stamp
    msg.pose = pose_msg_from_T_mm(T_frame_from_body_mm)
    return msg


def T_mm_from_pose_stamped(msg: Any, expected_frame: str) -> FloatArray:
    """Validate the frame of a ``PoseStamped`` and return its pose (translation in mm)."""
    if msg.header.frame_id != expected_frame:
        raise ConversionError(f"pose is in frame {msg.header.frame_id!r}, expected {expected_frame!r}")
    return T_mm_from_pose_msg(msg.pose)


def transform_stamped_msg(T_parent_from_child_mm: ArrayLike, parent: str, child: str, stamp: Any) -> TransformStamped:
    """``geometry_msgs/TransformStamped`` (metres): ``header.frame_id = parent``, ``child_frame_id = child``.

    As in tf2, the transform maps points expressed in ``child`` into ``parent``.
    """
    from geometry_msgs.msg import TransformStamped

    T = check_rigid(T_parent_from_child_mm, "T_parent_from_child_mm")
    msg = TransformStamped()
    msg.header.frame_id = parent
    msg.header.stamp = stamp
    msg.child_frame_id = child
    t = T[:3, 3] / MM_PER_M
    msg.transform.translation.x, msg.transform.translation.y, msg.transform.translation.z = (
        float(t[0]),
        float(t[1]),
        float(t[2]),
    )
    msg.transform.rotation = quaternion_msg(T[:3, :3])
    return msg


def T_mm_from_transform_stamped(msg: Any, parent: str, child: str) -> FloatArray:
    """Validate frames of a ``TransformStamped`` and return ``T_parent_from_child`` (translation in mm)."""
    if msg.header.frame_id != parent or msg.child_frame_id != child:
        raise ConversionError(
            f"transform is {msg.header.frame_id!r} <- {msg.child_frame_id!r}, expected {parent!r} <- {child!r}"
        )
    tr = msg.transform
    q = (tr.rotation.x, tr.rotation.y, tr.rotation.z, tr.rotation.w)
    t_m = np.array([tr.translation.x, tr.translation.y, tr.translation.z], dtype=np.float64)
    return pose_matrix(t_m * MM_PER_M, q)


def path_points_m(path_lps_mm: ArrayLike) -> FloatArray:
    """Path ``(N, 3)`` in ``patient`` metres from LPS millimetres."""
    return lps_mm_to_patient_m(np.asarray(path_lps_mm, dtype=np.float64).reshape(-1, 3))


__all__ = [
    "MM_PER_M",
    "PATIENT_FRAME",
    "ROBOT_BASE_FRAME",
    "ConversionError",
    "T_mm_from_pose_msg",
    "T_mm_from_pose_stamped",
    "T_mm_from_transform_stamped",
    "check_rigid",
    "frame_with_z_axis",
    "invert_rigid",
    "lps_mm_from_point_msg",
    "lps_mm_to_patient_m",
    "matrix_from_quaternion_xyzw",
    "path_points_m",
    "patient_m_to_lps_mm",
    "point_msg_from_lps_mm",
    "pose_matrix",
    "pose_msg_from_T_mm",
    "pose_stamped_msg",
    "quaternion_msg",
    "quaternion_xyzw_from_matrix",
    "transform_m_to_mm",
    "transform_mm_to_m",
    "transform_stamped_msg",
]
