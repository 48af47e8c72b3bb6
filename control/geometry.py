"""Small rigid-body and clearance helpers shared by the control layer.

Conventions: points and translations in millimetres, angles in radians, 4x4 homogeneous
transforms named ``T_target_from_source`` (``p_target = T_target_from_source @ p_source``).
A twist is split into its translational part ``rho`` (mm) and rotational part ``phi`` (rad),
both expressed in the body (tip) frame and already multiplied by the step duration, so
``T_new = T_old @ se3_exp(rho, phi)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from needle_steering.errors import ControlError

__all__ = [
    "FloatArray",
    "Obstacles",
    "check_finite",
    "check_point",
    "check_pose",
    "polyline_distance_mm",
    "rot_z",
    "se3_exp",
    "se3_exp_batch",
    "se3_exp_rows",
    "skew",
    "so3_exp",
]

FloatArray = NDArray[np.float64]

# Below this rotation angle the closed-form coefficients use their Taylor series.
_SMALL_ANGLE_RAD = 1e-4


def _exp_coefficients(theta: float) -> tuple[float, float, float]:
    """Return ``(sin t / t, (1 - cos t) / t^2, (t - sin t) / t^3)`` for ``t = theta`` >= 0."""
    if theta < _SMALL_ANGLE_RAD:
        t2 = theta * theta
        return 1.0 - t2 / 6.0, 0.5 - t2 / 24.0, 1.0 / 6.0 - t2 / 120.0
    s = math.sin(theta)
    c = math.cos(theta)
    return s / theta, (1.0 - c) / (theta * theta), (theta - s) / (theta * theta * theta)


def se3_exp_rows(
    rho: tuple[float, float, float], phi: tuple[float, float, float]
) -> tuple[float, float, float, float, float, float, float, float, float, float, float, float]:
    """Closed-form SE(3) exponential on plain floats (the hot path of the single-needle model).

    Args:
        rho: ``(x, y, z)`` translational twist times duration, body frame (mm).
        phi: ``(x, y, z)`` rotational twist times duration, body frame (rad).

    Returns:
        ``(r00, r01, r02, r10, r11, r12, r20, r21, r22, t0, t1, t2)``: the rotation (row-major)
        and translation (mm) of ``exp([rho, phi]^)``.
    """
    rho_x, rho_y, rho_z = rho
    phi_x, phi_y, phi_z = phi
    theta = math.sqrt(phi_x * phi_x + phi_y * phi_y + phi_z * phi_z)
    a, b, c = _exp_coefficients(theta)
    t2 = theta * theta
    # R = I + a*[phi]x + b*(phi phi^T - theta^2 I)
    bxx = b * phi_x * phi_x
    byy = b * phi_y * phi_y
    bzz = b * phi_z * phi_z
    bxy = b * phi_x * phi_y
    bxz = b * phi_x * phi_z
    byz = b * phi_y * phi_z
    bt2 = b * t2
    ax = a * phi_x
    ay = a * phi_y
    az = a * phi_z
    r00 = 1.0 + bxx - bt2
    r11 = 1.0 + byy - bt2
    r22 = 1.0 + bzz - bt2
    r01 = bxy - az
    r10 = bxy + az
    r02 = bxz + ay
    r20 = bxz - ay
    r12 = byz - ax
    r21 = byz + ax
    # t = rho + b*(phi x rho) + c*(phi (phi . rho) - theta^2 rho)
    cx0 = phi_y * rho_z - phi_z * rho_y
    cx1 = phi_z * rho_x - phi_x * rho_z
    cx2 = phi_x * rho_y - phi_y * rho_x
    dot = phi_x * rho_x + phi_y * rho_y + phi_z * rho_z
    t0 = rho_x + b * cx0 + c * (phi_x * dot - t2 * rho_x)
    t1 = rho_y + b * cx1 + c * (phi_y * dot - t2 * rho_y)
    t2_ = rho_z + b * cx2 + c * (phi_z * dot - t2 * rho_z)
    return r00, r01, r02, r10, r11, r12, r20, r21, r22, t0, t1, t2_


def se3_exp(rho_mm: FloatArray, phi_rad: FloatArray) -> FloatArray:
    """Closed-form exponential of one body twist.

    Args:
        rho_mm: shape (3,), translational part times duration (mm).
        phi_rad: shape (3,), rotational part times duration (rad).

    Returns:
        shape (4, 4) homogeneous transform ``T_old_from_new``.
    """
    r = se3_exp_rows(
        (float(rho_mm[0]), float(rho_mm[1]), float(rho_mm[2])),
        (float(phi_rad[0]), float(phi_rad[1]), float(phi_rad[2])),
    )
    return np.array(
        [
            [r[0], r[1], r[2], r[9]],
            [r[3], r[4], r[5], r[10]],
            [r[6], r[7], r[8], r[11]],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )


def se3_exp_batch(rho_mm: FloatArray, phi_rad: FloatArray) -> FloatArray:
    """Vectorised closed-form SE(3) exponential.

    Args:
        rho_mm: shape (N, 3), translational parts times duration (mm).
        phi_rad: shape (N, 3), rotational parts times duration (rad).

    Returns:
        shape (N, 4, 4) transforms.
    """
    n = rho_mm.shape[0]
    theta2 = np.einsum("ij,ij->i", phi_rad, phi_rad)
    theta = np.sqrt(theta2)
    small = theta < _SMALL_ANGLE_RAD
    safe = np.where(small, 1.0, theta)
    s = np.sin(safe)
    co = np.cos(safe)
    a = np.where(small, 1.0 - theta2 / 6.0, s / safe)
    b = np.where(small, 0.5 - theta2 / 24.0, (1.0 - co) / (safe * safe))
    c = np.where(small, 1.0 / 6.0 - theta2 / 120.0, (safe - s) / (safe * safe * safe))
    px, py, pz = phi_rad[:, 0], phi_rad[:, 1], phi_rad[:, 2]
    out = np.zeros((n, 4, 4))
    bt2 = b * theta2
    out[:, 0, 0] = 1.0 + b * px * px - bt2
    out[:, 1, 1] = 1.0 + b * py * py - bt2
    out[:, 2, 2] = 1.0 + b * pz * pz - bt2
    bxy = b * px * py
    bxz = b * px * pz
    byz = b * py * pz
    out[:, 0, 1] = bxy - a * pz
    out[:, 1, 0] = bxy + a * pz
    out[:, 0, 2] = bxz + a * py
    out[:, 2, 0] = bxz - a * py
    out[:, 1, 2] = byz - a * px
    out[:, 2, 1] = byz + a * px
    cross = np.cross(phi_rad, rho_mm)
    dot = np.einsum("ij,ij->i", phi_rad, rho_mm)
    out[:, :3, 3] = rho_mm + b[:, None] * cross + c[:, None] * (phi_rad * dot[:, None] - theta2[:, None] * rho_mm)
    out[:, 3, 3] = 1.0
    return out


def so3_exp(phi_rad: FloatArray) -> FloatArray:
    """Rodrigues' formula: shape (3,) rotation vector (rad) -> shape (3, 3) rotation matrix."""
    return se3_exp(np.zeros(3), phi_rad)[:3, :3]


def skew(v: FloatArray) -> FloatArray:
    """Shape (3,) vector -> shape (3, 3) cross-product matrix ``[v]x``."""
    return np.array([[0.0, -v[2], v[1]], [v[2], 0.0, -v[0]], [-v[1], v[0], 0.0]])


def rot_z(angle_rad: float) -> FloatArray:
    """Shape (4, 4) rotation by ``angle_rad`` about the local z-axis."""
    c, s = math.cos(angle_rad), math.sin(angle_rad)
    return np.array([[c, -s, 0.0, 0.0], [s, c, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


def check_pose(T: FloatArray, name: str = "T_world_from_tip") -> FloatArray:
    """Validate a 4x4 rigid transform and return it as a float array.

    Raises:
        ControlError: wrong shape, non-finite entries, or a rotation block that is not orthonormal.
    """
    arr = np.asarray(T, dtype=float)
    if arr.shape != (4, 4):
        raise ControlError(f"{name} must have shape (4, 4), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ControlError(f"{name} contains non-finite values: {arr.tolist()}")
    R = arr[:3, :3]
    err = float(np.max(np.abs(R.T @ R - np.eye(3))))
    if err > 1e-6 or abs(float(np.linalg.det(R)) - 1.0) > 1e-6 or np.any(arr[3] != (0.0, 0.0, 0.0, 1.0)):
        raise ControlError(f"{name} is not a rigid transform (orthonormality error {err:.3g}): {arr.tolist()}")
    return arr


def check_point(p: FloatArray, name: str) -> FloatArray:
    """Validate a finite shape (3,) point (mm) and return it as a float array."""
    arr = np.asarray(p, dtype=float)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise ControlError(f"{name} must be a finite point of shape (3,), got {np.asarray(p).tolist()}")
    return arr


def check_finite(value: float, name: str) -> float:
    """Return ``float(value)`` or raise :class:`ControlError` if it is not finite."""
    v = float(value)
    if not math.isfinite(v):
        raise ControlError(f"{name} must be finite, got {value!r}")
    return v


@dataclass(frozen=True)
class Obstacles:
    """Critical structures as spheres and capsules (all in mm, world frame).

    Attributes:
        sphere_centers_mm: shape (K, 3).
        sphere_radii_mm: shape (K,).
        capsule_a_mm: shape (M, 3), first end of each capsule axis.
        capsule_b_mm: shape (M, 3), second end of each capsule axis.
        capsule_radii_mm: shape (M,).
    """

    sphere_centers_mm: FloatArray = field(default_factory=lambda: np.zeros((0, 3)))
    sphere_radii_mm: FloatArray = field(default_factory=lambda: np.zeros(0))
    capsule_a_mm: FloatArray = field(default_factory=lambda: np.zeros((0, 3)))
    capsule_b_mm: FloatArray = field(default_factory=lambda: np.zeros((0, 3)))
    capsule_radii_mm: FloatArray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        for name, shape_tail in (
            ("sphere_centers_mm", (3,)),
            ("sphere_radii_mm", ()),
            ("capsule_a_mm", (3,)),
            ("capsule_b_mm", (3,)),
            ("capsule_radii_mm", ()),
        ):
            arr = np.asarray(getattr(self, name), dtype=float)
            if arr.ndim != 1 + len(shape_tail) or arr.shape[1:] != shape_tail:
                raise ControlError(f"Obstacles.{name} has shape {arr.shape}, expected (K, *{shape_tail})")
            if not np.all(np.isfinite(arr)):
                raise ControlError(f"Obstacles.{name} contains non-finite values: {arr.tolist()}")
            object.__setattr__(self, name, arr)
        if len(self.sphere_centers_mm) != len(self.sphere_radii_mm):
            raise ControlError(f"{len(self.sphere_centers_mm)} sphere centres but {len(self.sphere_radii_mm)} radii")
        if not (len(self.capsule_a_mm) == len(self.capsule_b_mm) == len(self.capsule_radii_mm)):
            raise ControlError("capsule_a_mm, capsule_b_mm and capsule_radii_mm must have equal lengths")
        if np.any(self.sphere_radii_mm < 0) or np.any(self.capsule_radii_mm < 0):
            raise ControlError("obstacle radii must be >= 0 mm")

    @property
    def count(self) -> int:
        """Number of spheres plus capsules."""
        return len(self.sphere_radii_mm) + len(self.capsule_radii_mm)

    def shifted(self, shift_mm: FloatArray) -> Obstacles:
        """The same obstacles translated by ``shift_mm`` (shape (3,), mm)."""
        d = np.asarray(shift_mm, dtype=float)
        return Obstacles(
            self.sphere_centers_mm + d,
            self.sphere_radii_mm,
            self.capsule_a_mm + d,
            self.capsule_b_mm + d,
            self.capsule_radii_mm,
        )

    def clearance_mm(self, points_mm: FloatArray) -> FloatArray:
        """Signed surface distance of each point to the nearest obstacle (negative inside).

        Args:
            points_mm: shape (N, 3).

        Returns:
            shape (N,); ``+inf`` where there is no obstacle.
        """
        pts = np.asarray(points_mm, dtype=float).reshape(-1, 3)
        best = np.full(len(pts), np.inf)
        if len(self.sphere_radii_mm):
            diff = pts[:, None, :] - self.sphere_centers_mm[None, :, :]
            d = np.sqrt(np.einsum("nkj,nkj->nk", diff, diff)) - self.sphere_radii_mm[None, :]
            best = np.minimum(best, d.min(axis=1))
        if len(self.capsule_radii_mm):
            ab = self.capsule_b_mm - self.capsule_a_mm
            ab2 = np.maximum(np.einsum("kj,kj->k", ab, ab), 1e-12)
            ap = pts[:, None, :] - self.capsule_a_mm[None, :, :]
            u = np.clip(np.einsum("nkj,kj->nk", ap, ab) / ab2[None, :], 0.0, 1.0)
            diff = ap - u[:, :, None] * ab[None, :, :]
            d = np.sqrt(np.einsum("nkj,nkj->nk", diff, diff)) - self.capsule_radii_mm[None, :]
            best = np.minimum(best, d.min(axis=1))
        return best


def polyline_distance_mm(point_mm: FloatArray, polyline_mm: FloatArray) -> float:
    """Euclidean distance (mm) from one point (shape (3,)) to a polyline (shape (M, 3), M >= 1)."""
    pts = polyline_mm
    if len(pts) == 1:
        return float(np.linalg.norm(point_mm - pts[0]))
    a = pts[:-1]
    ab = pts[1:] - a
    ab2 = np.maximum(np.einsum("ij,ij->i", ab, ab), 1e-12)
    ap = point_mm[None, :] - a
    u = np.clip(np.einsum("ij,ij->i", ap, ab) / ab2, 0.0, 1.0)
    diff = ap - u[:, None] * ab
    return float(np.sqrt(np.min(np.einsum("ij,ij->i", diff, diff))))
