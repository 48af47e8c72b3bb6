"""Density and distance fields for planning, computed on small vertebra-aligned grids.

Density
-------
CT numbers (HU) are converted to an equivalent bone mineral density (BMD, mg/cm^3 of calcium
hydroxyapatite) by a linear calibration ``BMD = slope * HU + intercept``. The default
(``slope = 0.8``, ``intercept = 0``) is the usual *phantomless* approximation for clinical MDCT at
120 kVp (vertebral trabecular HU and QCT BMD are close to proportional, with slopes of 0.7-0.9
reported); it is an approximation, not a QCT measurement. When reference regions of known density
are available (a calibration phantom in the scan, or asynchronous calibration against fat/muscle
values), :meth:`DensityCalibration.fit` fits slope and intercept by least squares.

Distances
---------
All distance fields are in millimetres and computed with :func:`scipy.ndimage.distance_transform_edt`
on a regular grid (``sampling`` = voxel size, so anisotropic grids are handled):

* :func:`signed_distance_mm`: signed distance to a mask's surface, positive inside, negative
  outside. The surface is placed half a voxel beyond the last inside voxel centre, so trilinear
  interpolation crosses zero on the surface.
* :func:`distance_to_mm`: distance to a structure's surface (``-0.5 voxel`` inside it); a structure
  absent from the grid gives :data:`FAR_MM` everywhere.

Every field lives on a :class:`LocalGrid`, an oriented regular grid (typically aligned with a
vertebra's anatomical frame and cropped around it). Sampling at arbitrary LPS points is trilinear
(:func:`scipy.ndimage.map_coordinates`, ``order=1``) and vectorised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike, NDArray

from needle_steering.errors import GeometryError, PlanningError
from needle_steering.perception.volume import Volume

#: Distance reported for a structure that is absent from a grid (mm).
FAR_MM = 1000.0


@dataclass(frozen=True)
class DensityCalibration:
    """Linear HU -> BMD calibration: ``bmd_mg_cm3 = slope * hu + intercept``.

    Attributes:
        slope_mg_cm3_per_hu: Slope, mg/cm^3 per HU (default 0.8, phantomless approximation).
        intercept_mg_cm3: Intercept, mg/cm^3.
        source: How the calibration was obtained (written into the plan).
    """

    slope_mg_cm3_per_hu: float = 0.8
    intercept_mg_cm3: float = 0.0
    source: str = "default phantomless approximation BMD = 0.8 * HU"

    def __post_init__(self) -> None:
        for name in ("slope_mg_cm3_per_hu", "intercept_mg_cm3"):
            value = float(getattr(self, name))
            if not np.isfinite(value):
                raise PlanningError(f"density calibration: {name} must be finite, got {value!r}")
        if not 0.05 <= float(self.slope_mg_cm3_per_hu) <= 5.0:
            raise PlanningError(
                f"density calibration: slope {self.slope_mg_cm3_per_hu!r} mg/cm^3 per HU is implausible "
                "(expected 0.05-5)"
            )

    def bmd_mg_cm3(self, hu: ArrayLike) -> NDArray[np.float64]:
        """Equivalent BMD (mg/cm^3) of CT numbers ``hu`` (any shape)."""
        return np.asarray(hu, dtype=np.float64) * self.slope_mg_cm3_per_hu + self.intercept_mg_cm3

    def hu_of_bmd(self, bmd_mg_cm3: ArrayLike) -> NDArray[np.float64]:
        """Inverse mapping: CT number (HU) of an equivalent BMD."""
        return (np.asarray(bmd_mg_cm3, dtype=np.float64) - self.intercept_mg_cm3) / self.slope_mg_cm3_per_hu

    @classmethod
    def fit(cls, hu: Sequence[float], bmd_mg_cm3: Sequence[float], source: str = "fitted") -> DensityCalibration:
        """Least-squares fit from reference regions (mean HU and known BMD of each region).

        Args:
            hu: Mean CT number of each reference region, shape ``(n,)``, ``n >= 2``.
            bmd_mg_cm3: Known equivalent density of each region, shape ``(n,)``.
            source: Description stored with the calibration.

        Raises:
            PlanningError: Fewer than two regions, non-finite values or regions of equal HU.
        """
        x = np.asarray(hu, dtype=np.float64).reshape(-1)
        y = np.asarray(bmd_mg_cm3, dtype=np.float64).reshape(-1)
        if x.shape != y.shape or x.size < 2:
            raise PlanningError(f"density calibration: need >= 2 paired regions, got {x.size} HU and {y.size} BMD")
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
            raise PlanningError(f"density calibration: values must be finite, got HU {x.tolist()} BMD {y.tolist()}")
        if float(np.ptp(x)) < 1.0:
            raise PlanningError(f"density calibration: reference regions need different HU, got {x.tolist()}")
        slope, intercept = np.polyfit(x, y, 1)
        return cls(float(slope), float(intercept), f"{source} (least squares over {x.size} regions)")

    def to_dict(self) -> dict[str, float | str]:
        """Plain dictionary for the plan document."""
        return {
            "slope_mg_cm3_per_hu": float(self.slope_mg_cm3_per_hu),
            "intercept_mg_cm3": float(self.intercept_mg_cm3),
            "source": self.source,
        }


@dataclass(frozen=True, eq=False)
class LocalGrid:
    """An oriented regular grid: ``lps = origin + axes @ (spacing * ijk)``.

    Attributes:
        origin_lps_mm: LPS position of grid index ``(0, 0, 0)``, shape ``(3,)``, mm.
        axes: Unit axis vectors of i, j, k as columns, shape ``(3, 3)``, orthonormal.
        spacing_mm: Isotropic grid spacing, mm.
        shape: Grid shape ``(I, J, K)``.
    """

    origin_lps_mm: NDArray[np.float64]
    axes: NDArray[np.float64]
    spacing_mm: float
    shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        axes = np.asarray(self.axes, dtype=np.float64).reshape(3, 3)
        if float(np.max(np.abs(axes.T @ axes - np.eye(3)))) > 1e-6:
            raise GeometryError(f"local grid axes are not orthonormal: {axes.tolist()}")
        if not (np.isfinite(self.spacing_mm) and self.spacing_mm > 0):
            raise GeometryError(f"local grid spacing must be positive, got {self.spacing_mm!r}")
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise GeometryError(f"local grid shape must have 3 positive sizes, got {self.shape!r}")
        object.__setattr__(self, "axes", axes)
        object.__setattr__(self, "origin_lps_mm", np.asarray(self.origin_lps_mm, dtype=np.float64).reshape(3))
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        # axes that are a signed permutation (image-aligned grids, the usual case): lps_to_index
        # then needs no matrix product (the product with exact 0/+-1 entries gives the same numbers)
        perm: tuple[NDArray[np.intp], NDArray[np.float64]] | None = None
        if np.all((axes == 0.0) | (np.abs(axes) == 1.0)) and np.all(np.sum(axes != 0.0, axis=0) == 1):
            perm = (np.argmax(axes != 0.0, axis=0), axes[np.argmax(axes != 0.0, axis=0), np.arange(3)])
        object.__setattr__(self, "_perm", perm)

    def index_to_lps(self, ijk: ArrayLike) -> NDArray[np.float64]:
        """Continuous grid indices ``(..., 3)`` -> LPS mm ``(..., 3)``."""
        return np.asarray(ijk, dtype=np.float64) @ (self.axes.T * self.spacing_mm) + self.origin_lps_mm

    def lps_to_index(self, lps_mm: ArrayLike) -> NDArray[np.float64]:
        """LPS mm ``(..., 3)`` -> continuous grid indices ``(..., 3)``."""
        # einsum, not ``@``: a (N, 3) x (3, 3) product through BLAS is about 2x slower here
        rel = np.asarray(lps_mm, dtype=np.float64) - self.origin_lps_mm
        perm = getattr(self, "_perm", None)
        if perm is not None:
            # + 0.0 turns -0.0 into +0.0, as the sum of the product does
            out: NDArray[np.float64] = (rel[..., perm[0]] * perm[1] + 0.0) / self.spacing_mm
            return out
        return np.einsum("...i,ij->...j", rel, self.axes) / self.spacing_mm

    def resample(self, volume: Volume, *, order: int, cval: float) -> NDArray[np.float32] | NDArray[np.uint8]:
        """Resample ``volume`` onto this grid (``order`` 0 for labels, 1 for intensities).

        Points outside ``volume`` get ``cval``. Labels come back as ``uint8``-compatible integers
        (ids above 255 are refused), intensities as ``float32``.
        """
        from scipy import ndimage

        inv = np.diag(1.0 / volume.spacing_mm) @ volume.direction.T
        matrix = inv @ self.axes * self.spacing_mm
        offset = inv @ (self.origin_lps_mm - volume.origin_lps_mm)
        src = volume.array
        if order == 0:
            if src.dtype.kind not in "iub":
                raise PlanningError(f"label map must hold integers, got dtype {src.dtype}")
            out = ndimage.affine_transform(
                src,
                matrix,
                offset,
                output_shape=self.shape,
                order=0,
                cval=cval,
                mode="constant",
                output=src.dtype,
            )
            return out.astype(np.uint8, copy=False)
        if src.dtype != np.float32:
            src = src.astype(np.float32)
        out_f: NDArray[np.float32] = ndimage.affine_transform(
            src,
            matrix,
            offset,
            output_shape=self.shape,
            order=order,
            cval=cval,
            mode="constant",
            output=np.float32,
            prefilter=False,
        )
        return out_f

    def sample(
        self, array: NDArray[np.floating] | NDArray[np.integer], lps_mm: ArrayLike, *, cval: float, order: int = 1
    ) -> NDArray[np.float64]:
        """Sample a field on this grid at LPS points ``(..., 3)`` (trilinear by default).

        Points outside the grid get ``cval``.
        """
        from scipy import ndimage

        pts = np.asarray(lps_mm, dtype=np.float64)
        idx = self.lps_to_index(pts.reshape(-1, 3))
        vals = ndimage.map_coordinates(array, idx.T, order=order, mode="constant", cval=cval, prefilter=False)
        return np.asarray(vals, dtype=np.float64).reshape(pts.shape[:-1])

    def as_volume(self, array: NDArray[np.generic]) -> Volume:
        """Wrap an array on this grid as a :class:`Volume` (for export and debugging)."""
        return Volume(array, np.full(3, self.spacing_mm), self.origin_lps_mm, self.axes, {"source": "local grid"})


def signed_distance_mm(
    mask: NDArray[np.bool_], spacing_mm: float | Sequence[float] | NDArray[np.float64], *, coarse_outside: bool = False
) -> NDArray[np.float32]:
    """Signed distance to the surface of ``mask`` (mm): positive inside, negative outside.

    Args:
        mask: Boolean array ``(I, J, K)``.
        spacing_mm: Voxel size (scalar or ``(3,)``), mm.
        coarse_outside: Compute the outside (negative) part on a grid twice as coarse (about 8x
            faster; outside values are then accurate to about one voxel, the sign and the inside
            values stay exact). Planning only needs the outside values as breach depths.

    Returns:
        ``float32`` array like ``mask``. An empty mask gives ``-FAR_MM`` everywhere, a full one
        ``+FAR_MM``.
    """
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    sampling = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    half = 0.5 * float(np.min(sampling))
    if not m.any():
        return np.full(m.shape, -FAR_MM, np.float32)
    if m.all():
        return np.full(m.shape, FAR_MM, np.float32)
    inside = ndimage.distance_transform_edt(m, sampling=sampling)
    if coarse_outside and min(m.shape) >= 8:
        # a coarse cell is "inside" if any of its voxels is: outside distances are then <= true ones
        shape2 = tuple((n + 1) // 2 for n in m.shape)
        pad = [(0, 2 * n2 - n) for n, n2 in zip(m.shape, shape2, strict=True)]
        coarse = np.pad(m, pad).reshape(shape2[0], 2, shape2[1], 2, shape2[2], 2).any(axis=(1, 3, 5))
        out2 = ndimage.distance_transform_edt(~coarse, sampling=2.0 * sampling)
        outside = np.repeat(np.repeat(np.repeat(out2, 2, 0), 2, 1), 2, 2)[: m.shape[0], : m.shape[1], : m.shape[2]]
        outside = np.maximum(outside, 2.0 * half)
    else:
        outside = ndimage.distance_transform_edt(~m, sampling=sampling)
    return np.where(m, inside - half, -(outside - half)).astype(np.float32)


def distance_to_mm(
    mask: NDArray[np.bool_], spacing_mm: float | Sequence[float] | NDArray[np.float64]
) -> NDArray[np.float32]:
    """Distance to the surface of structure ``mask`` (mm); ``-half voxel`` inside, ``FAR_MM`` if absent."""
    from scipy import ndimage

    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return np.full(m.shape, FAR_MM, np.float32)
    sampling = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    half = 0.5 * float(np.min(sampling))
    outside = ndimage.distance_transform_edt(~m, sampling=sampling)
    return np.where(m, -half, outside - half).astype(np.float32)


@dataclass(eq=False)
class FieldSet:
    """Named fields on one :class:`LocalGrid` with per-field out-of-grid values.

    ``hu`` (CT numbers) and ``labels`` (our ids) are always present; distance fields are added by
    the planners (e.g. ``"sdf"`` of the target vertebra, ``"canal"``, ``"other"``).
    """

    grid: LocalGrid
    hu: NDArray[np.float32]
    labels: NDArray[np.uint8]
    fields: dict[str, NDArray[np.float32]] = field(default_factory=dict)
    outside_value: dict[str, float] = field(default_factory=dict)
    masks: dict[str, NDArray[np.bool_]] = field(default_factory=dict)

    def add(self, name: str, array: NDArray[np.float32], outside_value: float) -> None:
        """Register field ``name`` (same shape as the grid); ``outside_value`` is used off-grid."""
        if array.shape != self.grid.shape:
            raise GeometryError(f"field {name!r} has shape {array.shape}, grid is {self.grid.shape}")
        self.fields[name] = np.ascontiguousarray(array, dtype=np.float32)
        self.outside_value[name] = float(outside_value)

    def sample(self, name: str, lps_mm: ArrayLike) -> NDArray[np.float64]:
        """Trilinear sample of field ``name`` (or ``"hu"``) at LPS points ``(..., 3)``."""
        if name == "hu":
            return self.grid.sample(self.hu, lps_mm, cval=-1000.0)
        try:
            arr = self.fields[name]
        except KeyError:
            raise PlanningError(f"unknown field {name!r}; have {sorted(self.fields)}") from None
        return self.grid.sample(arr, lps_mm, cval=self.outside_value[name])

    def sample_many(self, names: Sequence[str], lps_mm: ArrayLike) -> list[NDArray[np.float64]]:
        """Trilinear samples of several fields at the same LPS points (grid indices computed once)."""
        from scipy import ndimage

        pts = np.asarray(lps_mm, dtype=np.float64)
        idx = self.grid.lps_to_index(pts.reshape(-1, 3)).T
        out = []
        for name in names:
            arr, cval = (self.hu, -1000.0) if name == "hu" else (self.fields.get(name), self.outside_value.get(name))
            if arr is None or cval is None:
                raise PlanningError(f"unknown field {name!r}; have {sorted(self.fields)}")
            vals = ndimage.map_coordinates(arr, idx, order=1, mode="constant", cval=cval, prefilter=False)
            out.append(np.asarray(vals, dtype=np.float64).reshape(pts.shape[:-1]))
        return out

    def label_at(self, lps_mm: ArrayLike) -> NDArray[np.int64]:
        """Nearest-neighbour label ids at LPS points ``(..., 3)`` (0 outside the grid)."""
        return self.grid.sample(self.labels, lps_mm, cval=0.0, order=0).astype(np.int64)


def make_local_grid(
    points_lps_mm: NDArray[np.float64], axes: NDArray[np.float64], spacing_mm: float, margin_mm: float
) -> LocalGrid:
    """Grid with the given axes tightly covering ``points`` ``(N, 3)`` plus ``margin_mm``."""
    local = points_lps_mm @ axes
    lo = local.min(axis=0) - margin_mm
    hi = local.max(axis=0) + margin_mm
    shape = tuple(int(n) for n in np.ceil((hi - lo) / spacing_mm).astype(int) + 1)
    origin = axes @ lo
    return LocalGrid(origin, axes, spacing_mm, (shape[0], shape[1], shape[2]))


__all__ = [
    "FAR_MM",
    "DensityCalibration",
    "FieldSet",
    "LocalGrid",
    "distance_to_mm",
    "make_local_grid",
    "signed_distance_mm",
]
