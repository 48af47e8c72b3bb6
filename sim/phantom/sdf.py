"""Vectorised signed-distance primitives (negative inside, millimetres) and grid helpers.

The distances are exact for boxes and capsules and first-order estimates (value divided by the
gradient norm) for ellipses and superellipses: accurate within a fraction of a millimetre near the
surface, which is all the partial-volume and cortical-shell model needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

F32 = NDArray[np.float32]
#: A size parameter: a number or an array broadcastable against the coordinates.
Size = float | np.floating[Any] | NDArray[Any]
_EPS = np.float32(1e-6)
FAR_MM = np.float32(50.0)


def rotation_xyz(rx_deg: float, ry_deg: float, rz_deg: float) -> NDArray[np.float64]:
    """Rotation matrix ``Rz @ Ry @ Rx`` (angles in degrees, right-handed about LPS axes)."""
    ax, ay, az = np.deg2rad([rx_deg, ry_deg, rz_deg])
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    Rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return np.asarray(Rz @ Ry @ Rx, dtype=np.float64)


def frame_from_axis(axis: ArrayLike, up_hint: ArrayLike = (0.0, 0.0, 1.0)) -> NDArray[np.float64]:
    """Orthonormal frame whose second column is ``axis`` (u), first ``v`` ⟂ u in the hint plane, third ``w``.

    Returns:
        ``(3, 3)`` matrix with columns ``(v, u, w)``, right-handed.
    """
    u = np.asarray(axis, dtype=np.float64)
    u = u / np.linalg.norm(u)
    hint = np.asarray(up_hint, dtype=np.float64)
    w = hint - np.dot(hint, u) * u
    if np.linalg.norm(w) < 1e-6:
        w = np.array([1.0, 0.0, 0.0]) - u[0] * u
    w = w / np.linalg.norm(w)
    v = np.cross(u, w)
    return np.stack([v, u, w], axis=1)


@dataclass(frozen=True)
class Grid:
    """Axis-aligned output grid (direction = identity, LPS).

    Attributes:
        origin_lps_mm: Centre of voxel (0, 0, 0), ``(3,)``.
        spacing_mm: Isotropic voxel size.
        shape: ``(I, J, K)``.
    """

    origin_lps_mm: NDArray[np.float64]
    spacing_mm: float
    shape: tuple[int, int, int]

    def axis_mm(self, axis: int, start: int = 0, stop: int | None = None) -> F32:
        """World coordinates (mm) of voxel centres along one axis, ``[start, stop)``."""
        stop = self.shape[axis] if stop is None else stop
        return np.asarray(
            self.origin_lps_mm[axis] + self.spacing_mm * np.arange(start, stop, dtype=np.float64), dtype=np.float32
        )

    def box_slices(self, lo_mm: ArrayLike, hi_mm: ArrayLike) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels whose centres lie in the world box ``[lo, hi]`` (None if empty)."""
        lo = (np.asarray(lo_mm, dtype=np.float64) - self.origin_lps_mm) / self.spacing_mm
        hi = (np.asarray(hi_mm, dtype=np.float64) - self.origin_lps_mm) / self.spacing_mm
        start = np.maximum(np.ceil(lo - 1e-9).astype(int), 0)
        stop = np.minimum(np.floor(hi + 1e-9).astype(int) + 1, np.asarray(self.shape))
        if np.any(stop <= start):
            return None
        return slice(start[0], stop[0]), slice(start[1], stop[1]), slice(start[2], stop[2])

    def box_coords(self, sl: tuple[slice, slice, slice]) -> tuple[F32, F32, F32]:
        """Broadcastable world coordinates ``(X[:,1,1], Y[1,:,1], Z[1,1,:])`` of a box."""
        x = self.axis_mm(0, sl[0].start, sl[0].stop)[:, None, None]
        y = self.axis_mm(1, sl[1].start, sl[1].stop)[None, :, None]
        z = self.axis_mm(2, sl[2].start, sl[2].stop)[None, None, :]
        return x, y, z


def to_local(
    x: F32, y: F32, z: F32, R: NDArray[np.float64], centre: ArrayLike
) -> tuple[F32, F32, F32]:
    """World coordinates -> local ``R^T (p - centre)`` (R's columns are the local axes in world)."""
    c = np.asarray(centre, dtype=np.float64)
    dx, dy, dz = x - np.float32(c[0]), y - np.float32(c[1]), z - np.float32(c[2])
    Rf = R.astype(np.float32)
    lx = Rf[0, 0] * dx + Rf[1, 0] * dy + Rf[2, 0] * dz
    ly = Rf[0, 1] * dx + Rf[1, 1] * dy + Rf[2, 1] * dz
    lz = Rf[0, 2] * dx + Rf[1, 2] * dy + Rf[2, 2] * dz
    return lx, ly, lz


def world_aabb(R: NDArray[np.float64], centre: ArrayLike, lo: ArrayLike, hi: ArrayLike) -> tuple[
    NDArray[np.float64], NDArray[np.float64]
]:
    """World axis-aligned bounds of the local box ``[lo, hi]`` of frame ``(R, centre)``."""
    lo_a, hi_a = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
    corners = np.array(np.meshgrid(*[[lo_a[i], hi_a[i]] for i in range(3)], indexing="ij")).reshape(3, -1)
    world = R @ corners + np.asarray(centre, dtype=np.float64)[:, None]
    return world.min(axis=1), world.max(axis=1)


def combine(d_radial: F32, d_axial: F32) -> F32:
    """Intersection distance of two extrusions (e.g. a cross-section and a slab), exact outside corners."""
    outside = np.sqrt(np.maximum(d_radial, 0) ** 2 + np.maximum(d_axial, 0) ** 2)
    return np.asarray(outside + np.minimum(np.maximum(d_radial, d_axial), 0), dtype=np.float32)


def ellipse2(x: F32, y: F32, a: Size, b: Size) -> F32:
    """Approximate signed distance to the ellipse ``(x/a)^2 + (y/b)^2 = 1``."""
    xa, yb = x / a, y / b
    rho = np.sqrt(xa * xa + yb * yb)
    grad = np.sqrt((xa / a) ** 2 + (yb / b) ** 2)
    return np.asarray((rho - 1) * rho / np.maximum(grad, _EPS), dtype=np.float32)


def superellipse2(x: F32, y: F32, a: Size, b: Size, n: Size) -> F32:
    """Approximate signed distance to ``|x/a|^n + |y/b|^n = 1`` (n=2 ellipse, larger is boxier)."""
    ax_ = np.abs(x) / a
    ay_ = np.abs(y) / b
    s = ax_**n + ay_**n
    rho = s ** (1.0 / n)
    # d rho / d x = rho^(1-n) * |x/a|^(n-1) / a
    scale = np.maximum(rho, _EPS) ** (1.0 - n)
    gx = scale * ax_ ** (n - 1) / a
    gy = scale * ay_ ** (n - 1) / b
    grad = np.sqrt(gx * gx + gy * gy)
    return np.asarray((rho - 1) / np.maximum(grad, _EPS), dtype=np.float32)


def rounded_box(x: F32, y: F32, z: F32, half: ArrayLike, radius: float = 0.0) -> F32:
    """Exact signed distance to a box of half sizes ``half`` with edges rounded by ``radius``."""
    h = np.asarray(half, dtype=np.float32) - np.float32(radius)
    qx = np.abs(x) - h[0]
    qy = np.abs(y) - h[1]
    qz = np.abs(z) - h[2]
    outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2 + np.maximum(qz, 0) ** 2)
    inside = np.minimum(np.maximum(np.maximum(qx, qy), qz), 0)
    return np.asarray(outside + inside - np.float32(radius), dtype=np.float32)


def ellipsoid(x: F32, y: F32, z: F32, radii: tuple[float, float, float]) -> F32:
    """Approximate signed distance to an axis-aligned ellipsoid of semi-axes ``radii = (a, b, c)``."""
    a, b, c = (float(r) for r in radii)
    xa, yb, zc = x / a, y / b, z / c
    rho = np.sqrt(xa * xa + yb * yb + zc * zc)
    grad = np.sqrt((xa / a) ** 2 + (yb / b) ** 2 + (zc / c) ** 2)
    return np.asarray((rho - 1) * rho / np.maximum(grad, _EPS), dtype=np.float32)


def smooth_min(a: F32, b: F32, k: float) -> F32:
    """Polynomial smooth minimum (union with a fillet of size ~k mm)."""
    if k <= 0:
        return np.minimum(a, b)
    h = np.maximum(k - np.abs(a - b), 0) / k
    return np.asarray(np.minimum(a, b) - h * h * k * 0.25, dtype=np.float32)


def segment_distance(
    x: F32, y: F32, z: F32, p0: ArrayLike, p1: ArrayLike
) -> tuple[F32, F32]:
    """Distance from points to the segment ``p0-p1`` and the clamped parameter ``t`` in ``[0, 1]``."""
    a = np.asarray(p0, dtype=np.float64)
    b = np.asarray(p1, dtype=np.float64)
    ab = b - a
    L2 = float(ab @ ab)
    px, py, pz = x - np.float32(a[0]), y - np.float32(a[1]), z - np.float32(a[2])
    if L2 < 1e-12:
        t = np.zeros_like(px + py + pz)
    else:
        t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / np.float32(L2), 0, 1).astype(np.float32)
    dx = px - t * np.float32(ab[0])
    dy = py - t * np.float32(ab[1])
    dz = pz - t * np.float32(ab[2])
    return np.asarray(np.sqrt(dx * dx + dy * dy + dz * dz), dtype=np.float32), np.asarray(t, dtype=np.float32)


def occupancy(sdf: F32, spacing_mm: float) -> F32:
    """Fraction of a voxel inside the surface (linear ramp over one voxel): partial-volume weight."""
    return np.asarray(np.clip(0.5 - sdf / np.float32(spacing_mm), 0, 1), dtype=np.float32)


__all__ = [
    "FAR_MM",
    "Grid",
    "Size",
    "combine",
    "ellipse2",
    "ellipsoid",
    "frame_from_axis",
    "occupancy",
    "rotation_xyz",
    "rounded_box",
    "segment_distance",
    "smooth_min",
    "superellipse2",
    "to_local",
    "world_aabb",
]
