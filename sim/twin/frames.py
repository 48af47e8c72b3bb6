"""Rigid transforms, unit conversion and the placement of the patient in the robot's workspace.

Frames of the digital twin
--------------------------
``patient``
    The planning CT's LPS frame (+x Left, +y Posterior, +z Superior). The core layers and plans
    use it in **millimetres** (``*_lps_mm``); the steering scenarios of the control layer use
    the same frame (their "world", mm).
``robot``
    The PyBullet world = the base frame of the KUKA iiwa (z up), in **metres** (``*_m``).
``guide``
    The needle/drill guide's tool frame: origin at the guide's distal tip (tool centre point),
    **+z along the insertion direction** (the same convention as the needle tip frame of
    :mod:`needle_steering.control.needle_model`).
``flange``
    The iiwa's last link (``lbr_iiwa_link_7``) frame.

Transforms are 4x4 homogeneous matrices named ``T_<to>_from_<from>_<unit>``: ``p_to =
T_to_from_from @ p_from``. A transform's unit is the unit of its translation and of the points
it maps. :data:`T_robot_from_patient_m` maps patient points **in metres** (LPS mm / 1000) to
robot metres; :func:`patient_mm_to_robot_m` and :func:`robot_m_to_patient_mm` do the unit
change and the transform in one call, so the factor 1000 lives only here.

Default placement (prone patient)
---------------------------------
:func:`prone_T_robot_from_patient_m` lays the patient prone on the table in front of the robot:
patient Posterior -> robot +z (up, the back faces the robot's tool), patient Superior -> robot
+y, patient Left -> robot -x, and a chosen patient point (the ``anchor``, e.g. the centre of the
instrumented levels) at a chosen robot point (:data:`DEFAULT_ANCHOR_ROBOT_M`).
"""

from __future__ import annotations

import math
from typing import Final

import numpy as np
from numpy.typing import ArrayLike, NDArray

from needle_steering.errors import SimulationError

FloatArray = NDArray[np.float64]

#: Millimetres per metre (the twin's only unit factor).
MM_PER_M: Final = 1000.0
#: Rotation of the prone placement: columns are the patient L, P, S axes expressed in robot axes.
R_ROBOT_FROM_PATIENT_PRONE: Final = np.array([[-1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
#: Robot point (m) where the anchor of the patient (entry point or level centre) is placed.
DEFAULT_ANCHOR_ROBOT_M: Final = np.array([0.60, 0.0, 0.25])
_RIGID_TOL: Final = 1e-6


def check_transform(T: ArrayLike, name: str) -> FloatArray:
    """Return ``T`` as a float (4, 4) rigid transform; raise :class:`SimulationError` otherwise."""
    M = np.asarray(T, dtype=np.float64)
    if M.shape != (4, 4) or not np.all(np.isfinite(M)):
        raise SimulationError(f"{name} must be a finite 4x4 matrix, got {np.asarray(T).tolist()!r}")
    R = M[:3, :3]
    err = float(np.max(np.abs(R.T @ R - np.eye(3))))
    if err > _RIGID_TOL or abs(float(np.linalg.det(R)) - 1.0) > _RIGID_TOL or np.any(M[3] != (0, 0, 0, 1)):
        raise SimulationError(f"{name} is not a rigid transform (|R^T R - I| = {err:.3g}): {M.tolist()}")
    return M


def check_points(points: ArrayLike, name: str) -> FloatArray:
    """Return points as a finite float array of shape ``(..., 3)`` or raise :class:`SimulationError`."""
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim < 1 or pts.shape[-1] != 3 or not np.all(np.isfinite(pts)):
        raise SimulationError(f"{name} must be finite points of shape (..., 3), got shape {pts.shape}")
    return pts


def unit(v: ArrayLike, name: str) -> FloatArray:
    """Unit vector of ``v`` (shape (3,)); raise :class:`SimulationError` for zero or non-finite input."""
    vec = check_points(v, name).reshape(3)
    n = float(np.linalg.norm(vec))
    if not n > 1e-12:
        raise SimulationError(f"{name} must be a non-zero vector, got {vec.tolist()}")
    return vec / n


def make_transform(R: ArrayLike, t: ArrayLike) -> FloatArray:
    """4x4 transform from a rotation (3, 3) and a translation (3,)."""
    T = np.eye(4)
    T[:3, :3] = np.asarray(R, dtype=np.float64)
    T[:3, 3] = np.asarray(t, dtype=np.float64).reshape(3)
    return T


def invert(T: ArrayLike) -> FloatArray:
    """Inverse of a rigid 4x4 transform."""
    M = np.asarray(T, dtype=np.float64)
    out = np.eye(4)
    out[:3, :3] = M[:3, :3].T
    out[:3, 3] = -M[:3, :3].T @ M[:3, 3]
    return out


def transform_points(T: ArrayLike, points: ArrayLike) -> FloatArray:
    """Apply a 4x4 transform to points of shape ``(..., 3)`` (same unit as ``T``'s translation)."""
    M = np.asarray(T, dtype=np.float64)
    pts = np.asarray(points, dtype=np.float64)
    return pts @ M[:3, :3].T + M[:3, 3]


def scale_transform(T: ArrayLike, factor: float) -> FloatArray:
    """The same rigid transform with its translation multiplied by ``factor`` (unit change)."""
    out = np.array(T, dtype=np.float64)
    out[:3, 3] *= factor
    return out


def patient_mm_to_robot_m(T_robot_from_patient_m: ArrayLike, points_lps_mm: ArrayLike) -> FloatArray:
    """Map patient LPS millimetres ``(..., 3)`` to robot metres ``(..., 3)``."""
    return transform_points(T_robot_from_patient_m, np.asarray(points_lps_mm, dtype=np.float64) / MM_PER_M)


def robot_m_to_patient_mm(T_robot_from_patient_m: ArrayLike, points_robot_m: ArrayLike) -> FloatArray:
    """Map robot metres ``(..., 3)`` to patient LPS millimetres ``(..., 3)``."""
    return transform_points(invert(T_robot_from_patient_m), points_robot_m) * MM_PER_M


def pose_patient_mm_to_robot_m(T_robot_from_patient_m: ArrayLike, T_patient_from_x_mm: ArrayLike) -> FloatArray:
    """``T_robot_from_x_m`` from a pose given in patient millimetres."""
    return np.asarray(T_robot_from_patient_m, dtype=np.float64) @ scale_transform(T_patient_from_x_mm, 1.0 / MM_PER_M)


def pose_robot_m_to_patient_mm(T_robot_from_patient_m: ArrayLike, T_robot_from_x_m: ArrayLike) -> FloatArray:
    """``T_patient_from_x_mm`` from a pose given in robot metres."""
    return scale_transform(invert(T_robot_from_patient_m) @ np.asarray(T_robot_from_x_m, dtype=np.float64), MM_PER_M)


def frame_from_axis(axis: ArrayLike, roll_rad: float = 0.0) -> FloatArray:
    """Rotation (3, 3) whose z-column is ``axis`` (normalised), rolled by ``roll_rad`` about it.

    The x-column at zero roll is the component of a fixed helper axis (world x, or y when the
    axis is nearly parallel to x) orthogonal to ``axis``, so the result is deterministic.
    """
    z = unit(axis, "axis")
    helper = np.array([1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x = np.cross(helper, z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    c, s = math.cos(roll_rad), math.sin(roll_rad)
    return np.column_stack([x, y, z]) @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def rotation_about_axis(axis: ArrayLike, angle_rad: float) -> FloatArray:
    """Rotation (3, 3) by ``angle_rad`` about the unit ``axis`` (Rodrigues)."""
    k = unit(axis, "axis")
    K = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + math.sin(angle_rad) * K + (1.0 - math.cos(angle_rad)) * (K @ K)


def rotation_angle_deg(R_a: ArrayLike, R_b: ArrayLike) -> float:
    """Angle (deg) of the relative rotation between two rotations (3, 3)."""
    R = np.asarray(R_a, dtype=np.float64).T @ np.asarray(R_b, dtype=np.float64)
    c = (float(np.trace(R)) - 1.0) / 2.0
    return math.degrees(math.acos(min(1.0, max(-1.0, c))))


def axis_angle_deg(a: ArrayLike, b: ArrayLike) -> float:
    """Angle (deg) between two direction vectors (3,), robust near 0."""
    ua, ub = unit(a, "a"), unit(b, "b")
    return math.degrees(math.atan2(float(np.linalg.norm(np.cross(ua, ub))), float(ua @ ub)))


def quaternion_xyzw(R: ArrayLike) -> FloatArray:
    """Unit quaternion ``(x, y, z, w)`` (PyBullet and ROS order) of a rotation (3, 3)."""
    M = np.asarray(R, dtype=np.float64)
    tr = float(np.trace(M))
    if tr > 0.0:
        s = math.sqrt(tr + 1.0) * 2.0
        q = np.array([(M[2, 1] - M[1, 2]) / s, (M[0, 2] - M[2, 0]) / s, (M[1, 0] - M[0, 1]) / s, 0.25 * s])
    elif M[0, 0] > M[1, 1] and M[0, 0] > M[2, 2]:
        s = math.sqrt(1.0 + M[0, 0] - M[1, 1] - M[2, 2]) * 2.0
        q = np.array([0.25 * s, (M[0, 1] + M[1, 0]) / s, (M[0, 2] + M[2, 0]) / s, (M[2, 1] - M[1, 2]) / s])
    elif M[1, 1] > M[2, 2]:
        s = math.sqrt(1.0 + M[1, 1] - M[0, 0] - M[2, 2]) * 2.0
        q = np.array([(M[0, 1] + M[1, 0]) / s, 0.25 * s, (M[1, 2] + M[2, 1]) / s, (M[0, 2] - M[2, 0]) / s])
    else:
        s = math.sqrt(1.0 + M[2, 2] - M[0, 0] - M[1, 1]) * 2.0
        q = np.array([(M[0, 2] + M[2, 0]) / s, (M[1, 2] + M[2, 1]) / s, 0.25 * s, (M[1, 0] - M[0, 1]) / s])
    return q / np.linalg.norm(q)


def rotation_from_quaternion_xyzw(q: ArrayLike) -> FloatArray:
    """Rotation (3, 3) of a quaternion ``(x, y, z, w)`` (normalised first)."""
    x, y, z, w = (float(v) for v in np.asarray(q, dtype=np.float64) / np.linalg.norm(q))
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def prone_T_robot_from_patient_m(
    anchor_lps_mm: ArrayLike, anchor_robot_m: ArrayLike = DEFAULT_ANCHOR_ROBOT_M
) -> FloatArray:
    """Prone placement: ``T_robot_from_patient_m`` putting ``anchor_lps_mm`` at ``anchor_robot_m``.

    Args:
        anchor_lps_mm: Patient point (3,), LPS mm (e.g. the centre of the instrumented levels).
        anchor_robot_m: Robot point (3,), metres.

    Returns:
        ``T_robot_from_patient_m`` (4, 4): maps patient metres to robot metres.
    """
    a_p = check_points(anchor_lps_mm, "anchor_lps_mm").reshape(3) / MM_PER_M
    a_r = check_points(anchor_robot_m, "anchor_robot_m").reshape(3)
    R = R_ROBOT_FROM_PATIENT_PRONE
    return make_transform(R, a_r - R @ a_p)


def approach_T_robot_from_patient_m(
    entry_mm: ArrayLike,
    insertion_axis: ArrayLike,
    anchor_robot_m: ArrayLike = DEFAULT_ANCHOR_ROBOT_M,
) -> FloatArray:
    """Placement for a steering scenario: entry at ``anchor_robot_m``, insertion axis pointing down.

    The control layer's random scenarios live in an abstract patient frame (mm) whose insertion
    direction is near +z. The patient (phantom block) is positioned so that the entry point lands
    at the workspace anchor and the insertion axis points along robot -z (the guide approaches
    from above, as for a prone patient). Of all rotations doing that, the one closest to the
    prone placement is used, so a posterior (+y LPS) insertion gives exactly the prone placement.

    Args:
        entry_mm: Entry point (3,), patient mm.
        insertion_axis: Insertion direction (3,), patient frame.
        anchor_robot_m: Robot point (3,), metres, where the entry is placed.

    Returns:
        ``T_robot_from_patient_m`` (4, 4).
    """
    e = check_points(entry_mm, "entry_mm").reshape(3) / MM_PER_M
    a = unit(insertion_axis, "insertion_axis")
    R0 = R_ROBOT_FROM_PATIENT_PRONE
    down = np.array([0.0, 0.0, -1.0])
    # Minimal rotation taking R0 @ a onto -z.
    v = R0 @ a
    cross = np.cross(v, down)
    s = float(np.linalg.norm(cross))
    c = float(v @ down)
    if s < 1e-12:
        R_fix = np.eye(3) if c > 0 else rotation_about_axis([1.0, 0.0, 0.0], math.pi)
    else:
        R_fix = rotation_about_axis(cross / s, math.atan2(s, c))
    R = R_fix @ R0
    return make_transform(R, check_points(anchor_robot_m, "anchor_robot_m").reshape(3) - R @ e)


def rigid_error_transform(
    rng: np.random.Generator, translation_mm: float, rotation_deg: float, centre_mm: ArrayLike
) -> FloatArray:
    """A random rigid error ``E`` (4, 4, mm) of fixed magnitude, rotating about ``centre_mm``.

    ``E`` rotates by exactly ``rotation_deg`` about a uniformly random axis through ``centre_mm``
    and then translates by exactly ``translation_mm`` in a uniformly random direction. Applied
    as ``p' = E @ p`` (patient mm).
    """
    if not (math.isfinite(translation_mm) and translation_mm >= 0):
        raise SimulationError(f"translation_mm must be finite and >= 0, got {translation_mm!r}")
    if not (math.isfinite(rotation_deg) and rotation_deg >= 0):
        raise SimulationError(f"rotation_deg must be finite and >= 0, got {rotation_deg!r}")
    c = check_points(centre_mm, "centre_mm").reshape(3)
    axis = rng.standard_normal(3)
    direction = rng.standard_normal(3)
    R = rotation_about_axis(axis, math.radians(rotation_deg))
    t = translation_mm * direction / np.linalg.norm(direction)
    return make_transform(R, c - R @ c + t)


__all__ = [
    "DEFAULT_ANCHOR_ROBOT_M",
    "MM_PER_M",
    "R_ROBOT_FROM_PATIENT_PRONE",
    "FloatArray",
    "approach_T_robot_from_patient_m",
    "axis_angle_deg",
    "check_points",
    "check_transform",
    "frame_from_axis",
    "invert",
    "make_transform",
    "patient_mm_to_robot_m",
    "pose_patient_mm_to_robot_m",
    "pose_robot_m_to_patient_mm",
    "prone_T_robot_from_patient_m",
    "quaternion_xyzw",
    "rigid_error_transform",
    "robot_m_to_patient_mm",
    "rotation_about_axis",
    "rotation_angle_deg",
    "rotation_from_quaternion_xyzw",
    "scale_transform",
    "transform_points",
    "unit",
]
