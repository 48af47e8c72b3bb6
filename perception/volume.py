"""The :class:`Volume`: a voxel array on a physical grid in LPS millimetres.

A volume maps the integer index ``ijk`` (the ITK index, ``array[i, j, k]``) to the patient's LPS
coordinates (DICOM/ITK convention: +x toward the patient's Left, +y Posterior, +z Superior) by::

    lps_mm = origin_lps_mm + direction @ (spacing_mm * ijk)

``direction`` holds the unit axis vectors of i, j and k as its columns. Label maps are volumes of
integer dtype on the same grid as the image they label.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from needle_steering.errors import GeometryError, ImageError

#: Largest accepted voxel spacing (mm); anything larger is a unit error (metres or cm read as mm).
MAX_SPACING_MM = 50.0
#: Smallest accepted voxel spacing (mm): below this, it is not a clinical CT or CBCT.
MIN_SPACING_MM = 0.01
_ORTHONORMAL_TOL = 1e-4


def _as_vector3(value: ArrayLike, name: str) -> NDArray[np.float64]:
    vec = np.asarray(value, dtype=np.float64).reshape(-1)
    if vec.shape != (3,):
        raise GeometryError(f"{name} must have 3 components, got {np.asarray(value).tolist()!r}")
    if not np.all(np.isfinite(vec)):
        raise GeometryError(f"{name} must be finite, got {vec.tolist()!r}")
    return vec


def validate_spacing(spacing_mm: ArrayLike, source: str = "volume") -> NDArray[np.float64]:
    """Return spacing as a float array, raising :class:`GeometryError` when unusable.

    Args:
        spacing_mm: Voxel spacing ``(3,)`` in millimetres.
        source: Name of the file or object, for the message.
    """
    spacing = _as_vector3(spacing_mm, f"{source}: spacing")
    if np.any(spacing <= 0):
        raise GeometryError(f"{source}: spacing must be positive, got {spacing.tolist()} mm")
    if np.any(spacing < MIN_SPACING_MM) or np.any(spacing > MAX_SPACING_MM):
        raise GeometryError(
            f"{source}: spacing {spacing.tolist()} mm is outside the plausible range "
            f"[{MIN_SPACING_MM}, {MAX_SPACING_MM}] mm (unit error?)"
        )
    return spacing


def validate_direction(direction: ArrayLike, source: str = "volume") -> NDArray[np.float64]:
    """Return the 3x3 direction matrix, raising :class:`GeometryError` unless it is a rotation or reflection."""
    mat = np.asarray(direction, dtype=np.float64)
    if mat.size != 9:
        raise GeometryError(f"{source}: direction must have 9 entries, got {mat.size}")
    mat = mat.reshape(3, 3)
    if not np.all(np.isfinite(mat)):
        raise GeometryError(f"{source}: direction must be finite, got {mat.tolist()}")
    err = float(np.max(np.abs(mat.T @ mat - np.eye(3))))
    if err > _ORTHONORMAL_TOL:
        raise GeometryError(
            f"{source}: direction matrix is not orthonormal (max |D^T D - I| = {err:.3g}): {mat.tolist()}"
        )
    # Files store directions in single precision (NIfTI quaternions): snap to the nearest exact
    # orthonormal matrix so index <-> LPS transforms invert exactly.
    u, _, vt = np.linalg.svd(mat)
    return np.asarray(u @ vt, dtype=np.float64)


class Volume:
    """A 3-D voxel array with its physical grid. Treat it as immutable.

    Attributes:
        array: Voxel values, shape ``(I, J, K)``, indexed like the ITK index ``[i, j, k]``.
        spacing_mm: Voxel size along i, j, k, shape ``(3,)``, millimetres.
        origin_lps_mm: LPS position of voxel ``(0, 0, 0)``'s centre, shape ``(3,)``, millimetres.
        direction: Unit axis vectors of i, j, k as columns, shape ``(3, 3)``, orthonormal.
        metadata: Free-form provenance (source path, modality, series UID, ...).
    """

    __slots__ = ("array", "direction", "metadata", "origin_lps_mm", "spacing_mm")

    array: NDArray[Any]
    spacing_mm: NDArray[np.float64]
    origin_lps_mm: NDArray[np.float64]
    direction: NDArray[np.float64]
    metadata: dict[str, Any]

    def __init__(
        self,
        array: ArrayLike,
        spacing_mm: ArrayLike,
        origin_lps_mm: ArrayLike,
        direction: ArrayLike,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.metadata = dict(metadata or {})
        source = str(self.metadata.get("source", "volume"))
        arr = np.asarray(array)
        if arr.ndim != 3:
            raise ImageError(f"{source}: a volume needs 3 dimensions, got shape {arr.shape}")
        if min(arr.shape) < 1:
            raise ImageError(f"{source}: volume has an empty dimension, shape {arr.shape}")
        self.array = arr
        self.spacing_mm = validate_spacing(spacing_mm, source)
        self.origin_lps_mm = _as_vector3(origin_lps_mm, f"{source}: origin")
        self.direction = validate_direction(direction, source)

    # --- geometry -------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(I, J, K)``."""
        i, j, k = self.array.shape
        return int(i), int(j), int(k)

    @property
    def T_lps_from_index(self) -> NDArray[np.float64]:
        """Homogeneous 4x4 transform from continuous index ``(i, j, k, 1)`` to LPS millimetres."""
        T = np.eye(4)
        T[:3, :3] = self.direction @ np.diag(self.spacing_mm)
        T[:3, 3] = self.origin_lps_mm
        return T

    @property
    def T_index_from_lps(self) -> NDArray[np.float64]:
        """Inverse of :attr:`T_lps_from_index`."""
        T = np.eye(4)
        R_inv = np.diag(1.0 / self.spacing_mm) @ self.direction.T
        T[:3, :3] = R_inv
        T[:3, 3] = -R_inv @ self.origin_lps_mm
        return T

    def index_to_lps(self, ijk: ArrayLike) -> NDArray[np.float64]:
        """Map continuous indices ``(..., 3)`` to LPS millimetres ``(..., 3)``."""
        pts = np.asarray(ijk, dtype=np.float64)
        return pts @ (self.direction @ np.diag(self.spacing_mm)).T + self.origin_lps_mm

    def lps_to_index(self, lps_mm: ArrayLike) -> NDArray[np.float64]:
        """Map LPS millimetres ``(..., 3)`` to continuous indices ``(..., 3)``."""
        pts = np.asarray(lps_mm, dtype=np.float64)
        return ((pts - self.origin_lps_mm) @ self.direction) / self.spacing_mm

    def contains_lps(self, lps_mm: ArrayLike, margin_voxels: float = 0.0) -> NDArray[np.bool_]:
        """Whether LPS points ``(..., 3)`` lie inside the grid (voxel centres span ``[0, n-1]``)."""
        idx = self.lps_to_index(lps_mm)
        upper = np.asarray(self.shape, dtype=np.float64) - 1.0
        return np.all((idx >= -0.5 + margin_voxels) & (idx <= upper + 0.5 - margin_voxels), axis=-1)

    def extent_lps_mm(self) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Axis-aligned LPS bounding box ``(min (3,), max (3,))`` of the voxel centres."""
        corners = np.array(np.meshgrid(*[[0, n - 1] for n in self.shape], indexing="ij")).reshape(3, -1).T
        lps = self.index_to_lps(corners)
        return lps.min(axis=0), lps.max(axis=0)

    def orientation_code(self) -> str:
        """Three-letter orientation code of the array axes in the direction each index increases.

        ``"LPS"`` means i increases toward Left, j toward Posterior, k toward Superior (DICOM
        axial order); ``"RAS"`` is the NIfTI/Slicer-style flipped one.
        """
        letters = (("L", "R"), ("P", "A"), ("S", "I"))
        code = []
        for axis in range(3):
            col = self.direction[:, axis]
            dominant = int(np.argmax(np.abs(col)))
            positive, negative = letters[dominant]
            code.append(positive if col[dominant] > 0 else negative)
        return "".join(code)

    def same_grid(self, other: Volume, tol_mm: float = 1e-3) -> bool:
        """Whether ``other`` has the same shape and physical grid (within ``tol_mm``)."""
        return (
            self.shape == other.shape
            and bool(np.allclose(self.spacing_mm, other.spacing_mm, atol=tol_mm))
            and bool(np.allclose(self.origin_lps_mm, other.origin_lps_mm, atol=tol_mm))
            and bool(np.allclose(self.direction, other.direction, atol=1e-5))
        )

    def require_same_grid(self, other: Volume, what: str = "label map") -> None:
        """Raise :class:`GeometryError` describing the mismatch unless ``other`` is on this grid."""
        if self.same_grid(other):
            return
        raise GeometryError(
            f"{what} is not on the image grid: shape {other.shape} vs {self.shape}, "
            f"spacing {np.round(other.spacing_mm, 4).tolist()} vs {np.round(self.spacing_mm, 4).tolist()} mm, "
            f"origin {np.round(other.origin_lps_mm, 3).tolist()} vs {np.round(self.origin_lps_mm, 3).tolist()} mm"
        )

    def with_array(self, array: NDArray[Any], **metadata: Any) -> Volume:
        """A volume on this grid holding ``array`` (same shape), e.g. a label map."""
        arr = np.asarray(array)
        if arr.shape != self.shape:
            raise GeometryError(f"array shape {arr.shape} does not match grid shape {self.shape}")
        return Volume(arr, self.spacing_mm, self.origin_lps_mm, self.direction, {**self.metadata, **metadata})

    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres."""
        return float(np.prod(self.spacing_mm)) / 1000.0

    def __repr__(self) -> str:
        return (
            f"Volume(shape={self.shape}, dtype={self.array.dtype}, spacing_mm={np.round(self.spacing_mm, 4).tolist()}, "
            f"origin_lps_mm={np.round(self.origin_lps_mm, 3).tolist()}, orientation={self.orientation_code()})"
        )
