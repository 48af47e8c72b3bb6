"""Rigid per-vertebra registration of an intra-operative CBCT to the pre-operative CT.

The plan lives in the CT; the robot works in the CBCT. Each vertebra is rigid, the spine is not, so
every level gets its own transform ``T_ct_from_cbct`` (4x4, maps CBCT LPS mm to CT LPS mm:
``p_ct = T_ct_from_cbct @ p_cbct``). Method (``docs/registration.md`` gives the reasoning):

1. **Coarse, whole spine**: a rigid Mattes mutual-information registration (SimpleITK) of the
   CBCT to the CT on a downsampled crop around the requested vertebrae, masked to the spine and to
   the CBCT field of view. MI needs no HU calibration, so CBCT offset/scale errors do not matter.
2. **Surfaces**, per level, on a shared isotropic working grid in CT coordinates: the CT and the
   CBCT (resampled through the coarse transform) are smoothed identically and their bone
   isosurfaces extracted with marching cubes. The CT uses a HU threshold; the CBCT threshold is
   the CBCT intensity at the same quantile of the crop's histogram (robust to any monotonic
   intensity error: offset, scale, gamma). Points are assigned to a vertebra by the nearest CT
   label (a Voronoi partition of the label map), or by the CBCT's own labels when given.
3. **Fine**: Open3D point-to-plane ICP with a Tukey kernel, coarse-to-fine correspondence
   distances; first on all levels together (the whole-spine transform), then per level from it.
4. **Gates**: a level is refused (status ``"refused"`` with a reason, no transform) when it lies
   outside the CBCT field of view, has too few surface points, fits poorly (fitness, RMSE,
   coverage) or moved implausibly far. Refused levels never expose a transform.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from needle_steering.errors import GeometryError, LabelError, RegistrationError
from needle_steering.perception.labels import is_vertebra, level_id, level_name
from needle_steering.perception.volume import Volume

if TYPE_CHECKING:
    import SimpleITK as sitk

Status = Literal["ok", "refused"]
OverallStatus = Literal["ok", "partial", "refused"]

_RIGID_TOL = 1e-4


# --------------------------------------------------------------------------------------------------
# Rigid-transform helpers
# --------------------------------------------------------------------------------------------------
def validate_rigid(T: ArrayLike, name: str = "T") -> NDArray[np.float64]:
    """Return ``T`` as a float 4x4 array, raising :class:`GeometryError` unless it is rigid.

    Args:
        T: Homogeneous transform, shape ``(4, 4)``; rotation block orthonormal with determinant +1,
            last row ``[0, 0, 0, 1]``, translation in millimetres.
        name: Name used in the error message.
    """
    mat = np.asarray(T, dtype=np.float64)
    if mat.shape != (4, 4):
        raise GeometryError(f"{name} must be a 4x4 matrix, got shape {mat.shape}")
    if not np.all(np.isfinite(mat)):
        raise GeometryError(f"{name} must be finite, got {mat.tolist()}")
    if not np.allclose(mat[3], [0.0, 0.0, 0.0, 1.0], atol=_RIGID_TOL):
        raise GeometryError(f"{name} last row must be [0, 0, 0, 1], got {mat[3].tolist()}")
    R = mat[:3, :3]
    err = float(np.max(np.abs(R.T @ R - np.eye(3))))
    if err > _RIGID_TOL or np.linalg.det(R) < 0:
        raise GeometryError(
            f"{name} rotation block is not a proper rotation (max |R^T R - I| = {err:.3g}, "
            f"det = {np.linalg.det(R):.4f}): {R.tolist()}"
        )
    return mat


def invert_rigid(T: ArrayLike) -> NDArray[np.float64]:
    """Inverse of a rigid 4x4 transform (``T_b_from_a`` -> ``T_a_from_b``)."""
    mat = validate_rigid(T)
    inv = np.eye(4)
    inv[:3, :3] = mat[:3, :3].T
    inv[:3, 3] = -mat[:3, :3].T @ mat[:3, 3]
    return inv


def transform_points(T: ArrayLike, points: ArrayLike) -> NDArray[np.float64]:
    """Apply a rigid 4x4 transform to points.

    Args:
        T: ``T_target_from_source``, shape ``(4, 4)``, millimetres.
        points: Points in the source frame, shape ``(3,)`` or ``(N, 3)``, millimetres.

    Returns:
        The points in the target frame, same shape as ``points``, millimetres.

    Raises:
        GeometryError: ``T`` is not rigid or ``points`` is not ``(3,)``/``(N, 3)`` and finite.
    """
    mat = validate_rigid(T)
    pts = np.asarray(points, dtype=np.float64)
    single = pts.ndim == 1
    pts2 = pts.reshape(1, -1) if single else pts
    if pts2.ndim != 2 or pts2.shape[1] != 3:
        raise GeometryError(f"points must have shape (3,) or (N, 3), got {pts.shape}")
    if not np.all(np.isfinite(pts2)):
        raise GeometryError("points must be finite")
    out = pts2 @ mat[:3, :3].T + mat[:3, 3]
    return out[0] if single else out


def rotation_angle_deg(T: ArrayLike) -> float:
    """Rotation angle (degrees, in ``[0, 180]``) of the rotation block of a rigid 4x4 transform."""
    R = validate_rigid(T)[:3, :3]
    cos = (float(np.trace(R)) - 1.0) / 2.0
    return math.degrees(math.acos(min(1.0, max(-1.0, cos))))


def target_registration_error(T_est: ArrayLike, T_true: ArrayLike, points: ArrayLike) -> NDArray[np.float64]:
    """Target registration error at given points.

    Args:
        T_est: Estimated ``T_ct_from_cbct``, shape ``(4, 4)``.
        T_true: True ``T_ct_from_cbct``, shape ``(4, 4)``.
        points: Targets in the source (CBCT) frame, shape ``(N, 3)`` or ``(3,)``, millimetres.

    Returns:
        ``|T_est p - T_true p|`` per point, shape ``(N,)`` (``(1,)`` for a single point), millimetres.
    """
    diff = np.atleast_2d(transform_points(T_est, points) - transform_points(T_true, points))
    return np.asarray(np.linalg.norm(diff, axis=1), dtype=np.float64)


# --------------------------------------------------------------------------------------------------
# Options and results
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegistrationOptions:
    """Parameters of :func:`register_vertebrae` (defaults tuned for lumbar/thoracic CT vs CBCT).

    Attributes:
        T_ct_from_cbct_init: Prior guess of ``T_ct_from_cbct`` (4x4 array or nested sequence; ``None`` =
            identity, i.e. both scans in one patient frame). Plausibility limits are measured from it.
        coarse: ``"mi"`` runs the mutual-information coarse step; ``"none"`` trusts the prior.
        coarse_spacing_mm: Grid spacing of the coarse MI registration.
        coarse_iterations: Optimiser iterations per MI pyramid level.
        coarse_sampling: Fraction of fixed-mask voxels sampled by the MI metric.
        surface_spacing_mm: Isotropic working-grid spacing for surface extraction.
        smoothing_sigma_mm: Gaussian smoothing applied identically to CT and CBCT before marching cubes.
        ct_bone_threshold_hu: Bone isosurface level in the CT (HU).
        cbct_bone_threshold: Override for the CBCT isosurface level (CBCT units); ``None`` estimates it.
        crop_margin_mm: Margin around each vertebra's label box for its working crop.
        label_margin_mm: Surface points farther than this from the vertebra's label are not used.
        fov_erosion_mm: Surface points this close to the CBCT field-of-view edge are not used.
        icp_distances_mm: Coarse-to-fine maximum correspondence distances of the ICP stages.
        icp_iterations: Maximum ICP iterations per stage.
        inlier_distance_mm: Correspondence distance for the reported fitness/RMSE/coverage.
        max_normal_angle_deg: A correspondence whose surface normals differ more is no inlier.
        min_surface_points: Fewest CT or CBCT surface points (and inliers) to accept a level.
        min_fov_fraction: Fewest share of the CT vertebra surface inside the CBCT field of view.
        min_fitness: Fewest share of CBCT surface points with an inlier correspondence.
        min_coverage: Fewest share of in-view CT surface points matched by a CBCT inlier.
        max_rmse_mm: Largest accepted point-to-plane RMSE of the inliers.
        max_translation_mm: Largest accepted displacement of the vertebra centroid from the prior.
        max_rotation_deg: Largest accepted rotation from the prior.
        max_level_deviation_mm: Largest accepted displacement of a level from the whole-spine transform.
        max_level_deviation_deg: Largest accepted rotation of a level from the whole-spine transform.
        moving_padding_value: CBCT value outside its field of view; ``None`` detects it.
        n_threads: Threads for SimpleITK (Open3D follows ``OMP_NUM_THREADS``).
        seed: Seed of the MI metric's random sampling.
    """

    T_ct_from_cbct_init: ArrayLike | None = None
    coarse: Literal["mi", "none"] = "mi"
    coarse_spacing_mm: float = 3.0
    coarse_iterations: int = 60
    coarse_sampling: float = 0.3
    surface_spacing_mm: float = 1.0
    smoothing_sigma_mm: float = 1.0
    ct_bone_threshold_hu: float = 200.0
    cbct_bone_threshold: float | None = None
    crop_margin_mm: float = 12.0
    label_margin_mm: float = 4.0
    fov_erosion_mm: float = 3.0
    icp_distances_mm: tuple[float, ...] = (6.0, 3.0, 1.5, 0.75)
    icp_iterations: int = 40
    inlier_distance_mm: float = 1.5
    max_normal_angle_deg: float = 45.0
    min_surface_points: int = 300
    min_fov_fraction: float = 0.7
    min_fitness: float = 0.7
    min_coverage: float = 0.6
    max_rmse_mm: float = 1.0
    max_translation_mm: float = 25.0
    max_rotation_deg: float = 15.0
    max_level_deviation_mm: float = 10.0
    max_level_deviation_deg: float = 10.0
    moving_padding_value: float | None = None
    n_threads: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        positive = {
            "coarse_spacing_mm": self.coarse_spacing_mm,
            "surface_spacing_mm": self.surface_spacing_mm,
            "smoothing_sigma_mm": self.smoothing_sigma_mm,
            "crop_margin_mm": self.crop_margin_mm,
            "label_margin_mm": self.label_margin_mm,
            "inlier_distance_mm": self.inlier_distance_mm,
            "max_rmse_mm": self.max_rmse_mm,
            "max_translation_mm": self.max_translation_mm,
            "max_rotation_deg": self.max_rotation_deg,
            "max_level_deviation_mm": self.max_level_deviation_mm,
            "max_level_deviation_deg": self.max_level_deviation_deg,
        }
        for key, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise RegistrationError(f"option {key} must be a positive finite number, got {value!r}")
        if self.coarse not in ("mi", "none"):
            raise RegistrationError(f"option coarse must be 'mi' or 'none', got {self.coarse!r}")
        if not self.icp_distances_mm or any(not (math.isfinite(d) and d > 0) for d in self.icp_distances_mm):
            raise RegistrationError(f"option icp_distances_mm must be positive, got {self.icp_distances_mm!r}")
        for key, frac in (
            ("min_fov_fraction", self.min_fov_fraction),
            ("min_fitness", self.min_fitness),
            ("min_coverage", self.min_coverage),
            ("coarse_sampling", self.coarse_sampling),
        ):
            if not (0.0 <= frac <= 1.0):
                raise RegistrationError(f"option {key} must lie in [0, 1], got {frac!r}")
        if self.icp_iterations < 1 or self.coarse_iterations < 1 or self.min_surface_points < 3:
            raise RegistrationError(
                "options icp_iterations, coarse_iterations must be >= 1 and min_surface_points >= 3, got "
                f"{self.icp_iterations}, {self.coarse_iterations}, {self.min_surface_points}"
            )
        if self.fov_erosion_mm < 0 or self.crop_margin_mm < self.label_margin_mm:
            raise RegistrationError(
                f"option fov_erosion_mm must be >= 0 ({self.fov_erosion_mm}) and crop_margin_mm "
                f"({self.crop_margin_mm}) >= label_margin_mm ({self.label_margin_mm})"
            )
        if self.T_ct_from_cbct_init is not None:
            prior = validate_rigid(self.T_ct_from_cbct_init, "T_ct_from_cbct_init")
            # Stored as nested tuples so the options stay hashable and comparable.
            object.__setattr__(self, "T_ct_from_cbct_init", tuple(tuple(float(v) for v in row) for row in prior))

    def initial_transform(self) -> NDArray[np.float64]:
        """The prior ``T_ct_from_cbct`` as a 4x4 array (identity when not given)."""
        if self.T_ct_from_cbct_init is None:
            return np.eye(4)
        return validate_rigid(self.T_ct_from_cbct_init, "T_ct_from_cbct_init")


@dataclass(frozen=True)
class LevelRegistration:
    """Result for one vertebra.

    Attributes:
        level: Level name (``"L1"``).
        status: ``"ok"`` or ``"refused"``.
        reason: Why it was refused (empty when ok).
        T_ct_from_cbct: 4x4 transform mapping CBCT LPS mm to CT LPS mm; ``None`` when refused.
        fitness: Share of the vertebra's CBCT surface points with an inlier CT correspondence.
        rmse_mm: Point-to-plane RMSE of the inliers, millimetres.
        n_correspondences: Number of inlier correspondences.
        coverage: Share of the in-view CT surface points matched by a CBCT inlier.
        fov_fraction: Share of the CT vertebra surface inside the CBCT field of view.
        translation_mm: Displacement of the vertebra centroid relative to the prior transform.
        rotation_deg: Rotation relative to the prior transform.
        cbct_threshold: CBCT isosurface level used (CBCT intensity units).
        n_ct_points: CT surface points of the vertebra.
        n_cbct_points: CBCT surface points assigned to the vertebra.
        seconds: Wall time of this level (surface extraction and ICP), seconds.
    """

    level: str
    status: Status
    reason: str = ""
    T_ct_from_cbct: NDArray[np.float64] | None = None
    fitness: float = float("nan")
    rmse_mm: float = float("nan")
    n_correspondences: int = 0
    coverage: float = float("nan")
    fov_fraction: float = float("nan")
    translation_mm: float = float("nan")
    rotation_deg: float = float("nan")
    cbct_threshold: float = float("nan")
    n_ct_points: int = 0
    n_cbct_points: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether the level was accepted."""
        return self.status == "ok"

    def require(self) -> NDArray[np.float64]:
        """``T_ct_from_cbct`` of an accepted level; raises :class:`RegistrationError` if refused."""
        if self.status != "ok" or self.T_ct_from_cbct is None:
            raise RegistrationError(f"{self.level}: registration refused: {self.reason}")
        return self.T_ct_from_cbct.copy()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (NaN becomes ``None``)."""
        out: dict[str, Any] = {}
        for key, value in asdict(self).items():
            if key == "T_ct_from_cbct":
                out[key] = None if value is None else np.asarray(value).tolist()
            elif isinstance(value, float):
                out[key] = value if math.isfinite(value) else None
            else:
                out[key] = value
        return out


@dataclass(frozen=True)
class RegistrationResult:
    """Per-level and whole-spine registration of a CBCT to a CT.

    Attributes:
        levels: Level name -> :class:`LevelRegistration`, in cranio-caudal label order.
        global_registration: Whole-spine rigid fit (level ``"spine"``) over every level's surfaces.
        T_ct_from_cbct_coarse: 4x4 result of the coarse (MI) step, for diagnostics only.
        seconds: Total wall time, seconds.
    """

    levels: dict[str, LevelRegistration]
    global_registration: LevelRegistration
    T_ct_from_cbct_coarse: NDArray[np.float64]
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def status(self) -> OverallStatus:
        """``"ok"`` when every level is accepted, ``"refused"`` when none is, else ``"partial"``."""
        n_ok = sum(level.ok for level in self.levels.values())
        if self.levels and n_ok == len(self.levels):
            return "ok"
        return "refused" if n_ok == 0 else "partial"

    @property
    def T_ct_from_cbct_global(self) -> NDArray[np.float64] | None:
        """Whole-spine ``T_ct_from_cbct`` (``None`` when that fit was refused)."""
        return self.global_registration.T_ct_from_cbct

    def transform(self, level: str) -> NDArray[np.float64]:
        """``T_ct_from_cbct`` of ``level``; raises :class:`RegistrationError` when refused or absent."""
        name = level_name(level_id(level))
        if name not in self.levels:
            raise RegistrationError(f"level {level!r} was not registered; registered: {list(self.levels)}")
        return self.levels[name].require()

    def refused(self) -> dict[str, str]:
        """Refused level -> reason."""
        return {name: lvl.reason for name, lvl in self.levels.items() if not lvl.ok}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary."""
        return {
            "status": self.status,
            "levels": {name: lvl.to_dict() for name, lvl in self.levels.items()},
            "global": self.global_registration.to_dict(),
            "T_ct_from_cbct_coarse": self.T_ct_from_cbct_coarse.tolist(),
            "seconds": self.seconds,
            "notes": list(self.notes),
        }


# --------------------------------------------------------------------------------------------------
# Internal data
# --------------------------------------------------------------------------------------------------
@dataclass
class _Grid:
    """Axis-aligned (LPS) isotropic working grid: ``lps = origin + spacing * ijk``."""

    origin_lps_mm: NDArray[np.float64]
    spacing_mm: float
    shape: tuple[int, int, int]

    @classmethod
    def around(cls, lo_mm: NDArray[np.float64], hi_mm: NDArray[np.float64], spacing_mm: float) -> _Grid:
        n = np.maximum(2, np.ceil((hi_mm - lo_mm) / spacing_mm).astype(int) + 1)
        return cls(np.asarray(lo_mm, dtype=np.float64), float(spacing_mm), (int(n[0]), int(n[1]), int(n[2])))

    def lookup(self, values: NDArray[Any], points_lps_mm: NDArray[np.float64], outside: Any) -> NDArray[Any]:
        """Nearest-voxel values at points ``(N, 3)``; ``outside`` beyond the grid."""
        idx = np.rint((points_lps_mm - self.origin_lps_mm) / self.spacing_mm).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < np.asarray(self.shape)), axis=1)
        out = np.full(points_lps_mm.shape[0], outside, dtype=values.dtype)
        good = idx[inside]
        out[inside] = values[good[:, 0], good[:, 1], good[:, 2]]
        return out


@dataclass
class _Surface:
    """Surface points and unit normals ``(N, 3)`` in the working (CT) frame, millimetres."""

    points: NDArray[np.float64]
    normals: NDArray[np.float64]


@dataclass
class _LevelData:
    """Everything ICP and the gates need for one level, in the working (CT) frame."""

    name: str
    label: int
    grid: _Grid
    ct: _Surface  # CT surface of this level (target)
    cbct_all: _Surface  # every CBCT surface point of the crop, mapped through the prior (source pool)
    nearest_label: NDArray[np.int32]  # CT Voronoi partition of vertebra labels on the grid
    label_dist_mm: NDArray[np.float32]  # distance to the nearest vertebra label voxel
    moving_selected: NDArray[np.bool_] | None  # CBCT points assigned to this level by moving labels
    fov: NDArray[np.bool_]  # CBCT field of view (eroded) on the grid, in the prior-mapped frame
    centroid_lps_mm: NDArray[np.float64]
    cbct_threshold: float
    fov_fraction: float
    setup_seconds: float


def _sitk() -> Any:
    import SimpleITK

    SimpleITK.ProcessObject.SetGlobalWarningDisplay(False)
    return SimpleITK


def _to_sitk(volume: Volume, dtype: Any = None) -> sitk.Image:
    """SimpleITK copy of ``volume``, cast to ``dtype`` when given (the native type otherwise: no
    float copy of a large integer CBCT; resampling outputs float32 anyway)."""
    from needle_steering.perception.io import volume_to_sitk

    if dtype is None or volume.array.dtype == dtype:
        return volume_to_sitk(volume)
    return volume_to_sitk(volume.with_array(np.asarray(volume.array, dtype=dtype)))


def _affine(T_src_from_out: NDArray[np.float64]) -> Any:
    """SimpleITK transform mapping output-space points to input-space points."""
    sitk_mod = _sitk()
    tx = sitk_mod.AffineTransform(3)
    tx.SetMatrix([float(v) for v in T_src_from_out[:3, :3].reshape(-1)])
    tx.SetTranslation([float(v) for v in T_src_from_out[:3, 3]])
    return tx


def _resample(
    image: Any, grid: _Grid, T_src_from_grid: NDArray[np.float64], *, nearest: bool, default: float
) -> NDArray[Any]:
    """Resample a SimpleITK image onto ``grid``; returns an array indexed ``[i, j, k]``."""
    sitk_mod = _sitk()
    f = sitk_mod.ResampleImageFilter()
    f.SetOutputOrigin([float(v) for v in grid.origin_lps_mm])
    f.SetOutputSpacing([grid.spacing_mm] * 3)
    f.SetOutputDirection([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    f.SetSize([int(v) for v in grid.shape])
    f.SetTransform(_affine(T_src_from_grid))
    f.SetInterpolator(sitk_mod.sitkNearestNeighbor if nearest else sitk_mod.sitkLinear)
    f.SetDefaultPixelValue(float(default))
    f.SetNumberOfThreads(1)
    if not nearest:
        f.SetOutputPixelType(sitk_mod.sitkFloat32)
    out = f.Execute(image)
    return np.ascontiguousarray(sitk_mod.GetArrayFromImage(out).transpose(2, 1, 0))


def _detect_padding(array: NDArray[Any]) -> float | None:
    """The constant a CBCT holds outside its field of view, or ``None`` when there is none.

    A value counts as padding when it fills >= 2 % of the image exactly and forms a region
    (>= 80 % of its voxels survive a morphological opening), not scattered noise coincidences.
    """
    from scipy import ndimage

    step = max(1, round((array.size / 2e6) ** (1 / 3)))
    sub = np.asarray(array[::step, ::step, ::step])
    values, counts = np.unique(sub, return_counts=True)
    best = int(np.argmax(counts))
    if counts[best] < 0.02 * sub.size:
        return None
    value = float(values[best])
    same = sub == values[best]
    if ndimage.binary_opening(same).sum() < 0.8 * same.sum():
        return None
    return value


def _resample_in_view(
    image: Any, grid: _Grid, T_src_from_grid: NDArray[np.float64], pad: float | None
) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """Linear resampling onto ``grid`` and the mask of voxels inside the image and its field of view.

    Outside the image extent the value is NaN; inside, the padding region is where the
    interpolated value equals ``pad`` exactly (interpolating between padding voxels returns the
    padding value), cleaned by an opening so scattered coincidences stay inside. The one-voxel
    band of mixed values at the edge counts as inside: callers erode the mask by millimetres.
    """
    from scipy import ndimage

    values = _resample(image, grid, T_src_from_grid, nearest=False, default=float("nan"))
    inside = np.isfinite(values)
    if pad is not None:
        inside &= ~ndimage.binary_opening(values == np.float32(pad))
    return values, inside


def _label_box_lps(labels: Volume, label: int) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.float64]]:
    """LPS bounding box (min, max) of a label's voxels (corners included) and its centroid, mm."""
    idx = np.argwhere(labels.array == label)
    lo_i, hi_i = idx.min(axis=0) - 0.5, idx.max(axis=0) + 0.5
    corners = np.array(np.meshgrid(*[[lo_i[a], hi_i[a]] for a in range(3)], indexing="ij")).reshape(3, -1).T
    lps = labels.index_to_lps(corners)
    centroid = labels.index_to_lps(idx.mean(axis=0))
    return lps.min(axis=0), lps.max(axis=0), centroid


def _smooth(array: NDArray[Any], sigma_vox: float) -> NDArray[np.float32]:
    from scipy import ndimage

    return np.asarray(ndimage.gaussian_filter(np.asarray(array, dtype=np.float32), sigma_vox), dtype=np.float32)


def _erode_mm(mask: NDArray[np.bool_], distance_mm: float, spacing_mm: float) -> NDArray[np.bool_]:
    from scipy import ndimage

    if distance_mm <= 0:
        return mask
    padded = np.pad(mask, 1, constant_values=False)
    dist = ndimage.distance_transform_edt(padded, sampling=spacing_mm)[1:-1, 1:-1, 1:-1]
    return np.asarray(dist > distance_mm)


def _isosurface(values: NDArray[np.float32], level: float, mask: NDArray[np.bool_], grid: _Grid) -> _Surface:
    """Marching-cubes isosurface of ``values`` at ``level``, vertices kept where ``mask`` holds."""
    from skimage.measure import marching_cubes

    lo, hi = float(values.min()), float(values.max())
    if not (lo < level < hi) or not mask.any():
        return _Surface(np.zeros((0, 3)), np.zeros((0, 3)))
    verts, _faces, normals, _vals = marching_cubes(
        values, level=level, spacing=(grid.spacing_mm,) * 3, allow_degenerate=False
    )
    points = np.asarray(verts, dtype=np.float64) + grid.origin_lps_mm
    keep = grid.lookup(mask, points, outside=False)
    nrm = np.asarray(normals, dtype=np.float64)[keep]
    norm = np.linalg.norm(nrm, axis=1)
    good = norm > 1e-6
    return _Surface(points[keep][good], nrm[good] / norm[good, None])


# --------------------------------------------------------------------------------------------------
# Coarse step: mutual information
# --------------------------------------------------------------------------------------------------
def _coarse_spine_mask(
    vert_labels: Volume,
    requested: list[int],
    moving_cbct: Volume,
    *,
    pad: float | None,
    T_ct_from_cbct_prior: NDArray[np.float64],
    opts: RegistrationOptions,
) -> NDArray[np.bool_]:
    """CT vertebra voxels the coarse step matches on.

    Every labelled vertebra near the CBCT field of view (its box mapped through the prior and
    grown by ``max_translation_mm``), so that a requested level outside the view does not leave
    the MI metric with nothing to match; the requested levels alone when none is near.
    """
    step = max(1, round((moving_cbct.array.size / 2e6) ** (1 / 3)))
    sub = np.asarray(moving_cbct.array[::step, ::step, ::step])
    inside = np.ones(sub.shape, bool) if pad is None else sub != np.asarray(pad, dtype=sub.dtype)
    ijk = np.argwhere(inside) * step
    if len(ijk):
        view_ct = transform_points(T_ct_from_cbct_prior, moving_cbct.index_to_lps(ijk))
        lo = view_ct.min(axis=0) - opts.max_translation_mm
        hi = view_ct.max(axis=0) + opts.max_translation_mm
        all_vertebrae = vert_labels.array > 0
        lps = vert_labels.index_to_lps(np.argwhere(all_vertebrae))
        near = np.all((lps >= lo) & (lps <= hi), axis=1)
        if near.sum() >= 500:
            mask = np.zeros(vert_labels.shape, bool)
            mask[tuple(np.argwhere(all_vertebrae)[near].T)] = True
            return mask
    return np.isin(vert_labels.array, requested)


def _coarse_mi(
    ct_img: Any,
    cbct_img: Any,
    *,
    fixed_mask_labels: Volume,
    pad: float | None,
    box: tuple[NDArray[np.float64], NDArray[np.float64]],
    T_ct_from_cbct_init: NDArray[np.float64],
    opts: RegistrationOptions,
) -> NDArray[np.float64]:
    """Rigid Mattes-MI registration of the CBCT to the CT on a coarse crop; returns ``T_ct_from_cbct``."""
    from scipy import ndimage

    sitk_mod = _sitk()
    s = opts.coarse_spacing_mm
    lo, hi = box
    grid = _Grid.around(lo - 25.0, hi + 25.0, s)
    ct_arr, ct_in = _resample_in_view(ct_img, grid, np.eye(4), None)
    ct_arr = _smooth(np.where(ct_in, ct_arr, -1024.0), 0.5)
    spine = _resample(_to_sitk(fixed_mask_labels, np.uint8), grid, np.eye(4), nearest=True, default=0) > 0
    spine = ndimage.binary_dilation(spine, iterations=max(1, round(10.0 / s)))
    # The moving image on its own coarse grid around the prior-mapped crop.
    T_cbct_from_ct = invert_rigid(T_ct_from_cbct_init)
    corners = np.array(np.meshgrid(*[[lo[a] - 40.0, hi[a] + 40.0] for a in range(3)], indexing="ij")).reshape(3, -1).T
    mcorners = transform_points(T_cbct_from_ct, corners)
    mgrid = _Grid.around(mcorners.min(axis=0), mcorners.max(axis=0), s)
    cb_arr, fov_arr = _resample_in_view(cbct_img, mgrid, np.eye(4), pad)
    fov_arr = _erode_mm(fov_arr, 2.0 * s, s)
    if fov_arr.sum() < 100 or spine.sum() < 100:
        raise RegistrationError(
            f"coarse registration impossible: {int(fov_arr.sum())} CBCT voxels in view and "
            f"{int(spine.sum())} spine voxels on the {s} mm grid near the requested levels"
        )
    fill = float(np.median(cb_arr[fov_arr]))
    cb_arr = np.where(fov_arr, cb_arr, fill).astype(np.float32)
    cb_arr = _smooth(cb_arr, 0.5)

    def to_img(arr: NDArray[Any], g: _Grid) -> Any:
        img = sitk_mod.GetImageFromArray(np.ascontiguousarray(arr.transpose(2, 1, 0)))
        img.SetOrigin([float(v) for v in g.origin_lps_mm])
        img.SetSpacing([g.spacing_mm] * 3)
        return img

    fixed = to_img(ct_arr, grid)
    moving = to_img(cb_arr, mgrid)
    fixed_mask = to_img(spine.astype(np.uint8), grid)
    moving_mask = to_img(fov_arr.astype(np.uint8), mgrid)

    center = grid.origin_lps_mm + s * np.argwhere(spine).mean(axis=0)
    tx = sitk_mod.Euler3DTransform()
    tx.SetCenter([float(v) for v in center])
    R = T_cbct_from_ct[:3, :3]
    tx.SetMatrix([float(v) for v in R.reshape(-1)])
    tx.SetTranslation([float(v) for v in T_cbct_from_ct[:3, 3] + R @ center - center])

    reg = sitk_mod.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(opts.coarse_sampling, opts.seed)
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetMetricMovingMask(moving_mask)
    reg.SetInterpolator(sitk_mod.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0,
        minStep=0.01,
        numberOfIterations=opts.coarse_iterations,
        relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0 * s, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(tx, inPlace=True)
    reg.SetNumberOfThreads(opts.n_threads)
    try:
        reg.Execute(fixed, moving)
    except RuntimeError as exc:
        raise RegistrationError(f"coarse MI registration failed: {str(exc).strip().splitlines()[-1]}") from None
    Rf = np.asarray(tx.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.asarray(tx.GetCenter(), dtype=np.float64)
    t = np.asarray(tx.GetTranslation(), dtype=np.float64)
    T_cbct_from_ct_est = np.eye(4)
    T_cbct_from_ct_est[:3, :3] = Rf
    T_cbct_from_ct_est[:3, 3] = t + c - Rf @ c
    # Re-orthonormalise (the optimiser works in Euler angles, so this only removes round-off).
    u, _, vt = np.linalg.svd(T_cbct_from_ct_est[:3, :3])
    T_cbct_from_ct_est[:3, :3] = u @ vt
    return invert_rigid(T_cbct_from_ct_est)


# --------------------------------------------------------------------------------------------------
# Per-level surfaces
# --------------------------------------------------------------------------------------------------
def _prepare_level(
    name: str,
    label: int,
    *,
    fixed_labels: Volume,
    vertebra_labels_img: Any,
    ct_img: Any,
    cbct_img: Any,
    pad: float | None,
    moving_labels_img: Any | None,
    T_ct_from_cbct_init: NDArray[np.float64],
    opts: RegistrationOptions,
) -> _LevelData:
    """Working grid, CT/CBCT surfaces and partition for one level (CBCT mapped through the prior)."""
    from scipy import ndimage

    t0 = time.perf_counter()
    lo, hi, centroid = _label_box_lps(fixed_labels, label)
    s = opts.surface_spacing_mm
    grid = _Grid.around(lo - opts.crop_margin_mm, hi + opts.crop_margin_mm, s)
    T_cbct_from_ct = invert_rigid(T_ct_from_cbct_init)

    ct, ct_in = _resample_in_view(ct_img, grid, np.eye(4), None)
    labels = _resample(vertebra_labels_img, grid, np.eye(4), nearest=True, default=0).astype(np.int32)
    cb, fov = _resample_in_view(cbct_img, grid, T_cbct_from_ct, pad)

    sigma_vox = opts.smoothing_sigma_mm / s
    edge_mm = opts.fov_erosion_mm + 2.0 * opts.smoothing_sigma_mm
    fov_core = _erode_mm(fov, edge_mm, s)
    ct_core = _erode_mm(ct_in, 2.0 * opts.smoothing_sigma_mm + s, s)

    # Voronoi partition of the vertebra labels: nearest label id and distance to it.
    if labels.any():
        dist, nearest_idx = ndimage.distance_transform_edt(labels == 0, sampling=s, return_indices=True)
        nearest = labels[tuple(nearest_idx)]
    else:
        dist = np.full(labels.shape, np.inf)
        nearest = labels
    region = (nearest == label) & (dist <= opts.label_margin_mm)

    ct_s = _smooth(np.where(ct_in, ct, -1024.0), sigma_vox)
    ct_surface = _isosurface(ct_s, opts.ct_bone_threshold_hu, region & ct_core, grid)
    in_view = grid.lookup(fov_core, ct_surface.points, outside=False)
    fov_fraction = float(in_view.mean()) if len(in_view) else 0.0

    cbct_threshold = float("nan")
    cbct_surface = _Surface(np.zeros((0, 3)), np.zeros((0, 3)))
    joint = fov_core & ct_core
    if joint.sum() >= 1000:
        fill = float(np.median(cb[fov]))
        cb_s = _smooth(np.where(fov, cb, fill), sigma_vox)
        if opts.cbct_bone_threshold is not None:
            cbct_threshold = float(opts.cbct_bone_threshold)
        else:
            # Quantile matching: the CBCT level at the CT bone threshold's quantile in the same crop.
            quantile = float(np.mean(ct_s[joint] < opts.ct_bone_threshold_hu))
            cbct_threshold = float(np.quantile(cb_s[joint], quantile))
        near = (dist <= opts.label_margin_mm + max(opts.icp_distances_mm)) & fov_core
        cbct_surface = _isosurface(cb_s, cbct_threshold, near, grid)

    moving_selected: NDArray[np.bool_] | None = None
    if moving_labels_img is not None and len(cbct_surface.points):
        mlab = _resample(moving_labels_img, grid, T_cbct_from_ct, nearest=True, default=0).astype(np.int32)
        if (mlab == label).sum() > 0:
            mdist, midx = ndimage.distance_transform_edt(mlab == 0, sampling=s, return_indices=True)
            mregion = (mlab[tuple(midx)] == label) & (mdist <= opts.label_margin_mm)
            moving_selected = grid.lookup(mregion, cbct_surface.points, outside=False)

    return _LevelData(
        name=name,
        label=label,
        grid=grid,
        ct=ct_surface,
        cbct_all=cbct_surface,
        nearest_label=nearest.astype(np.int32),
        label_dist_mm=dist.astype(np.float32),
        moving_selected=moving_selected,
        fov=fov_core,
        centroid_lps_mm=centroid,
        cbct_threshold=cbct_threshold,
        fov_fraction=fov_fraction,
        setup_seconds=time.perf_counter() - t0,
    )


def _select_source(data: _LevelData, T_delta: NDArray[np.float64], margin_mm: float) -> NDArray[np.bool_]:
    """CBCT points that belong to this level under the current estimate ``T_delta`` (prior-mapped frame)."""
    if data.moving_selected is not None:
        return data.moving_selected
    moved = transform_points(T_delta, data.cbct_all.points) if len(data.cbct_all.points) else data.cbct_all.points
    nearest = data.grid.lookup(data.nearest_label, moved, outside=0)
    dist = data.grid.lookup(data.label_dist_mm, moved, outside=np.float32(np.inf))
    return np.asarray((nearest == data.label) & (dist <= margin_mm))


# --------------------------------------------------------------------------------------------------
# ICP and fit metrics
# --------------------------------------------------------------------------------------------------
def _icp(
    source: _Surface,
    target: _Surface,
    T_init: NDArray[np.float64],
    max_distance_mm: float,
    *,
    iterations: int,
    voxel_mm: float,
) -> NDArray[np.float64]:
    """One point-to-plane ICP stage (Open3D, Tukey kernel); returns ``T_target_from_source``.

    The source is thinned to one point per ``max_distance_mm / 3`` voxel when that is coarser
    than ``voxel_mm`` (the working-grid spacing): coarse stages need no dense sampling.
    """
    import open3d as o3d

    reg = o3d.pipelines.registration
    src = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(source.points))
    if max_distance_mm / 3.0 > 1.5 * voxel_mm:
        src = src.voxel_down_sample(max_distance_mm / 3.0)
    tgt = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(target.points))
    tgt.normals = o3d.utility.Vector3dVector(target.normals)
    result = reg.registration_icp(
        src,
        tgt,
        max_distance_mm,
        T_init,
        reg.TransformationEstimationPointToPlane(reg.TukeyLoss(k=max_distance_mm)),
        reg.ICPConvergenceCriteria(relative_fitness=1e-7, relative_rmse=1e-7, max_iteration=iterations),
    )
    T = np.asarray(result.transformation, dtype=np.float64).copy()
    u, _, vt = np.linalg.svd(T[:3, :3])
    T[:3, :3] = u @ vt
    return T


@dataclass
class _Fit:
    fitness: float
    rmse_mm: float
    n_inliers: int
    coverage: float
    n_source: int


def _fit_metrics(
    source: _Surface,
    target: _Surface,
    T_target_from_source: NDArray[np.float64],
    target_in_view: NDArray[np.bool_],
    opts: RegistrationOptions,
) -> _Fit:
    """Inlier share, point-to-plane RMSE and target coverage of a fit.

    An inlier is a source point whose nearest target point lies within ``inlier_distance_mm`` and
    whose surface normal agrees with the target's within ``max_normal_angle_deg`` (sign ignored).
    """
    from scipy.spatial import cKDTree

    n_src = len(source.points)
    if n_src == 0 or len(target.points) == 0:
        return _Fit(0.0, float("inf"), 0, 0.0, n_src)
    R = T_target_from_source[:3, :3]
    moved = source.points @ R.T + T_target_from_source[:3, 3]
    moved_n = source.normals @ R.T
    tree = cKDTree(target.points)
    dist, idx = tree.query(moved, k=1, distance_upper_bound=opts.inlier_distance_mm)
    close = np.isfinite(dist)
    idx_c = np.where(close, idx, 0)
    cos = np.abs(np.sum(moved_n * target.normals[idx_c], axis=1))
    inlier = close & (cos >= math.cos(math.radians(opts.max_normal_angle_deg)))
    n_in = int(inlier.sum())
    if n_in == 0:
        return _Fit(0.0, float("inf"), 0, 0.0, n_src)
    plane = np.sum((moved[inlier] - target.points[idx[inlier]]) * target.normals[idx[inlier]], axis=1)
    rmse = float(np.sqrt(np.mean(plane**2)))
    src_tree = cKDTree(moved[inlier])
    view_pts = target.points[target_in_view]
    if len(view_pts):
        d_t, _ = src_tree.query(view_pts, k=1, distance_upper_bound=opts.inlier_distance_mm)
        coverage = float(np.mean(np.isfinite(d_t)))
    else:
        coverage = 0.0
    return _Fit(n_in / n_src, rmse, n_in, coverage, n_src)


def _motion(T_delta: NDArray[np.float64], centroid: NDArray[np.float64]) -> tuple[float, float]:
    """Displacement of ``centroid`` (mm) and rotation angle (deg) of a transform near identity."""
    return float(np.linalg.norm(transform_points(T_delta, centroid) - centroid)), rotation_angle_deg(T_delta)


def _gate(
    fit: _Fit,
    n_target: int,
    fov_fraction: float,
    opts: RegistrationOptions,
) -> str:
    """Reason to refuse a fit, or ``""`` when it passes the fit-quality gates."""
    if n_target < opts.min_surface_points:
        return f"too few CT bone surface points ({n_target} < {opts.min_surface_points})"
    if fov_fraction < opts.min_fov_fraction:
        return (
            f"vertebra outside the CBCT field of view ({100 * fov_fraction:.0f}% of its surface in view "
            f"< {100 * opts.min_fov_fraction:.0f}%)"
        )
    if fit.n_source < opts.min_surface_points:
        return f"too few CBCT bone surface points ({fit.n_source} < {opts.min_surface_points})"
    if fit.n_inliers < opts.min_surface_points:
        return f"too few correspondences ({fit.n_inliers} < {opts.min_surface_points})"
    if fit.fitness < opts.min_fitness:
        return f"low fitness {fit.fitness:.2f} < {opts.min_fitness:.2f}"
    if fit.coverage < opts.min_coverage:
        return f"low coverage of the CT surface {fit.coverage:.2f} < {opts.min_coverage:.2f}"
    if fit.rmse_mm > opts.max_rmse_mm:
        return f"high RMSE {fit.rmse_mm:.2f} mm > {opts.max_rmse_mm:.2f} mm"
    return ""


def _run_icp_schedule(
    source_of: Any,
    target: _Surface,
    T_start: NDArray[np.float64],
    opts: RegistrationOptions,
) -> NDArray[np.float64]:
    """Coarse-to-fine ICP; ``source_of(T)`` gives the source surface selected under estimate ``T``."""
    T = T_start
    for distance in opts.icp_distances_mm:
        source = source_of(T)
        if len(source.points) < opts.min_surface_points:
            break
        T = _icp(source, target, T, distance, iterations=opts.icp_iterations, voxel_mm=opts.surface_spacing_mm)
    return T


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------
def _vertebra_label_volume(labels: Volume) -> Volume:
    arr = np.asarray(labels.array)
    keep = np.zeros(int(arr.max(initial=0)) + 1, dtype=bool)
    for value in np.unique(arr):
        if value > 0 and is_vertebra(int(value)):
            keep[int(value)] = True
    return labels.with_array(np.where(keep[arr], arr, 0).astype(np.uint8))


def _check_inputs(fixed_ct: Volume, moving_cbct: Volume, fixed_labels: Volume, moving_labels: Volume | None) -> None:
    for name, vol in (("fixed_ct", fixed_ct), ("moving_cbct", moving_cbct)):
        if not isinstance(vol, Volume):
            raise RegistrationError(f"{name} must be a Volume, got {type(vol).__name__}")
        if vol.array.dtype.kind not in "iuf":
            raise RegistrationError(f"{name} must hold numbers, got dtype {vol.array.dtype}")
        if vol.array.dtype.kind == "f" and not np.all(np.isfinite(vol.array)):
            raise RegistrationError(f"{name} holds NaN/Inf voxels")
        if min(vol.shape) < 8:
            raise RegistrationError(f"{name} is too small to register: shape {vol.shape}")
    fixed_ct.require_same_grid(fixed_labels, "fixed_labels")
    if fixed_labels.array.dtype.kind not in "iu":
        raise LabelError(f"fixed_labels must hold integers, got dtype {fixed_labels.array.dtype}")
    if moving_labels is not None:
        moving_cbct.require_same_grid(moving_labels, "moving_labels")
        if moving_labels.array.dtype.kind not in "iu":
            raise LabelError(f"moving_labels must hold integers, got dtype {moving_labels.array.dtype}")


def _resolve_levels(vert_labels: Volume, levels: list[str] | None, min_voxels: int = 20) -> list[tuple[str, int]]:
    present, counts = np.unique(vert_labels.array, return_counts=True)
    count_of = {int(v): int(c) for v, c in zip(present, counts, strict=True) if v > 0}
    if levels is None:
        chosen = sorted(label for label, c in count_of.items() if c >= min_voxels)
        if not chosen:
            raise LabelError(f"fixed_labels hold no vertebra with >= {min_voxels} voxels (ids {sorted(count_of)})")
        return [(level_name(label), label) for label in chosen]
    if not levels:
        raise LabelError("levels is empty; pass None for every labelled vertebra")
    out = []
    for name in levels:
        label = level_id(name)
        out.append((level_name(label), label))
    return list(dict.fromkeys(out))


def register_vertebrae(
    fixed_ct: Volume,
    moving_cbct: Volume,
    fixed_labels: Volume,
    moving_labels: Volume | None = None,
    levels: list[str] | None = None,
    *,
    options: RegistrationOptions | None = None,
    raise_if_all_refused: bool = True,
) -> RegistrationResult:
    """Rigidly register a CBCT to a CT, vertebra by vertebra, on bone surfaces.

    Args:
        fixed_ct: Pre-operative CT in HU (any grid, LPS mm).
        moving_cbct: Intra-operative CBCT (any grid and intensity scale; offsets/scale errors,
            cupping, noise and a padded cylindrical field of view are tolerated).
        fixed_labels: Vertebra label map (VerSe ids) on ``fixed_ct``'s grid; other ids are ignored.
        moving_labels: Optional VerSe label map on ``moving_cbct``'s grid; when it holds a level,
            that level's CBCT surface points are taken from its region instead of the CT partition.
        levels: Level names to register (``["L1", "L2"]``); ``None`` = every labelled vertebra.
        options: :class:`RegistrationOptions`; ``None`` = defaults.
        raise_if_all_refused: Raise :class:`RegistrationError` (listing every reason) when no
            level is accepted, instead of returning an all-refused result.

    Returns:
        :class:`RegistrationResult`: per level ``T_ct_from_cbct`` (maps CBCT LPS mm to CT LPS mm)
        or the reason it was refused, fit metrics, and the whole-spine transform.

    Raises:
        RegistrationError: Invalid options or volumes, a failed coarse step, or (with
            ``raise_if_all_refused``) no acceptable level.
        GeometryError: A label map is not on its image's grid.
        LabelError: Unknown level names, or no vertebra in ``fixed_labels``.
    """
    t_start = time.perf_counter()
    opts = options if options is not None else RegistrationOptions()
    if not isinstance(opts, RegistrationOptions):
        raise RegistrationError(f"options must be RegistrationOptions, got {type(opts).__name__}")
    _check_inputs(fixed_ct, moving_cbct, fixed_labels, moving_labels)
    vert_labels = _vertebra_label_volume(fixed_labels)
    chosen = _resolve_levels(vert_labels, levels)
    notes: list[str] = []
    present = set(np.unique(vert_labels.array).tolist())

    ct_img = _to_sitk(fixed_ct)
    cbct_img = _to_sitk(moving_cbct)
    pad = opts.moving_padding_value
    if pad is None:
        pad = _detect_padding(moving_cbct.array)
    if pad is not None:
        notes.append(f"CBCT padding value {pad:g} treated as outside the field of view")
    vert_img = _to_sitk(vert_labels, np.uint8)
    moving_img = None if moving_labels is None else _to_sitk(_vertebra_label_volume(moving_labels), np.uint8)

    T_prior = opts.initial_transform()
    usable = [(n, lab) for n, lab in chosen if lab in present]
    T_coarse = T_prior
    coarse_failure = ""
    if opts.coarse == "mi" and usable:
        mask_arr = _coarse_spine_mask(
            vert_labels, [lab for _, lab in usable], moving_cbct, pad=pad, T_ct_from_cbct_prior=T_prior, opts=opts
        )
        ijk = np.argwhere(mask_arr)
        lo_i, hi_i = ijk.min(axis=0) - 0.5, ijk.max(axis=0) + 0.5
        box_ijk = np.array(np.meshgrid(*[[lo_i[a], hi_i[a]] for a in range(3)], indexing="ij")).reshape(3, -1).T
        box_lps = vert_labels.index_to_lps(box_ijk)
        lo, hi = box_lps.min(axis=0), box_lps.max(axis=0)
        mask_vol = vert_labels.with_array(mask_arr.astype(np.uint8))
        try:
            T_coarse = _coarse_mi(
                ct_img,
                cbct_img,
                fixed_mask_labels=mask_vol,
                pad=pad,
                box=(lo, hi),
                T_ct_from_cbct_init=T_prior,
                opts=opts,
            )
        except RegistrationError as exc:
            coarse_failure = str(exc)
    if coarse_failure:
        refused = {name: LevelRegistration(level=name, status="refused", reason=coarse_failure) for name, _ in chosen}
        return _finish(
            refused,
            LevelRegistration(level="spine", status="refused", reason=coarse_failure),
            T_coarse=T_coarse,
            t_start=t_start,
            notes=notes,
            raise_if_all_refused=raise_if_all_refused,
        )

    # Surfaces per level, the CBCT mapped through the coarse estimate.
    data: dict[str, _LevelData] = {}
    for name, label in usable:
        data[name] = _prepare_level(
            name,
            label,
            fixed_labels=vert_labels,
            vertebra_labels_img=vert_img,
            ct_img=ct_img,
            cbct_img=cbct_img,
            pad=pad,
            moving_labels_img=moving_img,
            T_ct_from_cbct_init=T_coarse,
            opts=opts,
        )

    # Whole spine (every in-view level together), then each level from it.
    global_reg, T_delta_global = _register_global(list(data.values()), T_coarse=T_coarse, T_prior=T_prior, opts=opts)

    results: dict[str, LevelRegistration] = {}
    for name, label in chosen:
        if name not in data:
            results[name] = LevelRegistration(
                level=name, status="refused", reason=f"{name} (id {label}) not in fixed_labels"
            )
            continue
        results[name] = _register_level(
            data[name], T_delta_global, T_coarse=T_coarse, T_prior=T_prior, global_reg=global_reg, opts=opts
        )

    return _finish(
        results,
        global_reg,
        T_coarse=T_coarse,
        t_start=t_start,
        notes=notes,
        raise_if_all_refused=raise_if_all_refused,
    )


def _finish(
    levels: dict[str, LevelRegistration],
    global_reg: LevelRegistration,
    *,
    T_coarse: NDArray[np.float64],
    t_start: float,
    notes: list[str],
    raise_if_all_refused: bool,
) -> RegistrationResult:
    result = RegistrationResult(
        levels=levels,
        global_registration=global_reg,
        T_ct_from_cbct_coarse=T_coarse,
        seconds=time.perf_counter() - t_start,
        notes=notes,
    )
    if raise_if_all_refused and result.status == "refused":
        listing = "; ".join(f"{k}: {v}" for k, v in result.refused().items())
        raise RegistrationError(f"registration refused for every level: {listing}")
    return result


def _motion_gate(translation_mm: float, rotation_deg: float, opts: RegistrationOptions) -> str:
    """Reason to refuse a motion this far from the prior, or ``""``."""
    if translation_mm > opts.max_translation_mm or rotation_deg > opts.max_rotation_deg:
        return (
            f"implausibly large motion from the prior ({translation_mm:.1f} mm, {rotation_deg:.1f} deg > "
            f"{opts.max_translation_mm:g} mm, {opts.max_rotation_deg:g} deg)"
        )
    return ""


def _register_global(
    levels: list[_LevelData],
    *,
    T_coarse: NDArray[np.float64],
    T_prior: NDArray[np.float64],
    opts: RegistrationOptions,
) -> tuple[LevelRegistration, NDArray[np.float64]]:
    """Whole-spine ICP over every level in view; returns the fit (level ``"spine"``) and its
    ``T_delta`` (prior-mapped frame to CT; identity when refused)."""
    t0 = time.perf_counter()
    good = [
        d for d in levels if len(d.ct.points) >= opts.min_surface_points and d.fov_fraction >= opts.min_fov_fraction
    ]
    if not good:
        reason = "no level has a CT bone surface in the CBCT field of view"
        return LevelRegistration(level="spine", status="refused", reason=reason), np.eye(4)
    target = _Surface(np.concatenate([d.ct.points for d in good]), np.concatenate([d.ct.normals for d in good]))

    def source_of(T: NDArray[np.float64]) -> _Surface:
        masks = [_select_source(d, T, opts.label_margin_mm) for d in good]
        return _Surface(
            np.concatenate([d.cbct_all.points[m] for d, m in zip(good, masks, strict=True)]),
            np.concatenate([d.cbct_all.normals[m] for d, m in zip(good, masks, strict=True)]),
        )

    T_delta = _run_icp_schedule(source_of, target, np.eye(4), opts)
    T_from_delta = invert_rigid(T_delta)
    in_view = np.concatenate(
        [d.grid.lookup(d.fov, transform_points(T_from_delta, d.ct.points), outside=False) for d in good]
    )
    fov_fraction = float(np.mean(in_view))
    fit = _fit_metrics(source_of(T_delta), target, T_delta, in_view, opts)
    T_global = T_delta @ T_coarse
    centroid = np.mean([d.centroid_lps_mm for d in good], axis=0)
    trans, rot = _motion(T_global @ invert_rigid(T_prior), centroid)
    reason = _gate(fit, len(target.points), fov_fraction, opts) or _motion_gate(trans, rot, opts)
    result = LevelRegistration(
        level="spine",
        status="refused" if reason else "ok",
        reason=reason,
        T_ct_from_cbct=None if reason else T_global,
        fitness=fit.fitness,
        rmse_mm=fit.rmse_mm,
        n_correspondences=fit.n_inliers,
        coverage=fit.coverage,
        fov_fraction=fov_fraction,
        translation_mm=trans,
        rotation_deg=rot,
        n_ct_points=len(target.points),
        n_cbct_points=fit.n_source,
        seconds=time.perf_counter() - t0,
    )
    return result, (np.eye(4) if reason else T_delta)


def _register_level(
    d: _LevelData,
    T_delta_start: NDArray[np.float64],
    *,
    T_coarse: NDArray[np.float64],
    T_prior: NDArray[np.float64],
    global_reg: LevelRegistration,
    opts: RegistrationOptions,
) -> LevelRegistration:
    """ICP of one level from the whole-spine estimate, then the gates."""
    t0 = time.perf_counter()
    common: dict[str, Any] = {
        "level": d.name,
        "fov_fraction": d.fov_fraction,
        "cbct_threshold": d.cbct_threshold,
        "n_ct_points": len(d.ct.points),
    }
    if len(d.ct.points) < opts.min_surface_points or d.fov_fraction < opts.min_fov_fraction:
        reason = _gate(_Fit(0.0, float("inf"), 0, 0.0, 0), len(d.ct.points), d.fov_fraction, opts)
        return LevelRegistration(status="refused", reason=reason, seconds=d.setup_seconds, **common)
    margin = opts.label_margin_mm

    def source_of(T: NDArray[np.float64]) -> _Surface:
        mask = _select_source(d, T, margin)
        return _Surface(d.cbct_all.points[mask], d.cbct_all.normals[mask])

    T_delta = _run_icp_schedule(source_of, d.ct, T_delta_start, opts)
    T_final = T_delta @ T_coarse
    in_view = d.grid.lookup(d.fov, transform_points(invert_rigid(T_delta), d.ct.points), outside=False)
    fov_fraction = float(np.mean(in_view))
    fit = _fit_metrics(source_of(T_delta), d.ct, T_delta, in_view, opts)
    trans, rot = _motion(T_final @ invert_rigid(T_prior), d.centroid_lps_mm)
    reason = _gate(fit, len(d.ct.points), fov_fraction, opts) or _motion_gate(trans, rot, opts)
    if not reason and global_reg.ok and global_reg.T_ct_from_cbct is not None:
        dev_t, dev_r = _motion(T_final @ invert_rigid(global_reg.T_ct_from_cbct), d.centroid_lps_mm)
        if dev_t > opts.max_level_deviation_mm or dev_r > opts.max_level_deviation_deg:
            reason = (
                f"implausibly far from the whole-spine fit ({dev_t:.1f} mm, {dev_r:.1f} deg > "
                f"{opts.max_level_deviation_mm:g} mm, {opts.max_level_deviation_deg:g} deg)"
            )
    common["fov_fraction"] = fov_fraction
    return LevelRegistration(
        status="refused" if reason else "ok",
        reason=reason,
        T_ct_from_cbct=None if reason else T_final,
        fitness=fit.fitness,
        rmse_mm=fit.rmse_mm,
        n_correspondences=fit.n_inliers,
        coverage=fit.coverage,
        translation_mm=trans,
        rotation_deg=rot,
        n_cbct_points=fit.n_source,
        seconds=d.setup_seconds + time.perf_counter() - t0,
        **common,
    )


def register_files(
    fixed_path: str | os.PathLike[str],
    moving_path: str | os.PathLike[str],
    labels_path: str | os.PathLike[str],
    moving_labels_path: str | os.PathLike[str] | None = None,
    *,
    levels: list[str] | None = None,
    options: RegistrationOptions | None = None,
) -> dict[str, Any]:
    """Register image files for the command line; reads only, writes nothing.

    Args:
        fixed_path: Pre-operative CT (file or DICOM folder).
        moving_path: Intra-operative CBCT (file or DICOM folder).
        labels_path: Vertebra label map (VerSe ids) on the CT grid.
        moving_labels_path: Optional VerSe label map on the CBCT grid.
        levels: Level names to register; ``None`` = every labelled vertebra.
        options: :class:`RegistrationOptions`.

    Returns:
        JSON-serialisable ``{"status", "levels": {name: {"status", "reason", "T_ct_from_cbct"
        (4x4 list or None), "fitness", "rmse_mm", ...}}, "global": {...}, "seconds"}``. Refused
        levels are reported, not raised.
    """
    from needle_steering.perception.io import read_volume

    t0 = time.perf_counter()
    fixed = read_volume(fixed_path)
    moving = read_volume(moving_path)
    labels = read_volume(labels_path)
    moving_labels = None if moving_labels_path is None else read_volume(moving_labels_path)
    result = register_vertebrae(
        fixed, moving, labels, moving_labels, levels, options=options, raise_if_all_refused=False
    )
    out = result.to_dict()
    out["seconds"] = time.perf_counter() - t0
    return out


__all__ = [
    "LevelRegistration",
    "RegistrationError",
    "RegistrationOptions",
    "RegistrationResult",
    "invert_rigid",
    "register_files",
    "register_vertebrae",
    "rotation_angle_deg",
    "target_registration_error",
    "transform_points",
    "validate_rigid",
]
