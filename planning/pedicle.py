"""Pedicle-screw planning: density-maximising trajectories under hard safety constraints.

Objective
---------
The *density score* of a screw is the bone mineral integrated over the screw's volume
(mg of hydroxyapatite equivalent): the cylinder (conical over its last ``r`` mm, a 45 deg tip) is
sampled every 1 mm along the axis on an axis point and three equal-area rings of 8 points
(radii 0.45, 0.72, 0.92 r), each sample weighted by its share of the cross-section; HU are
converted with :class:`~needle_steering.planning.fields.DensityCalibration` and clipped at 0
(soft tissue and air add nothing).

Hard constraints (all measured on the vertebra's signed distance field ``sdf``, + inside)
---------------------------------------------------------------------------------------
* Shaft in bone: beyond the entry zone (the first mm, until the screw is fully inside), every
  axis point satisfies ``sdf - rad >= bone_clearance_mm`` (1 mm): the distance from the axis to
  the nearest outer cortex minus the local screw radius, a conservative surface clearance.
* Medial wall: five surface points facing the canal centreline (+-60 deg) keep
  ``sdf >= medial_clearance_mm`` (2 mm) along the whole shaft.
* Tip: ``sdf(tip) >= anterior_clearance_mm`` (3 mm from the anterior and every other cortex).
* Canal, neighbouring vertebrae, discs, aorta and vena cava: distance from the screw surface
  ``>= structure_clearance_mm`` (1 mm) everywhere, entry zone included; lesions
  ``>= lesion_clearance_mm`` (2 mm).
* Entry on the posterior bone surface: the outward surface normal at the entry points
  posteriorly and the entry lies posterior to the canal's anterior edge.
* Angles: transverse (medial convergence) and sagittal angles, in the vertebra's own frame,
  within the per-level ranges of :data:`ANGLE_RANGES`.
* The two screws of a level keep ``screw_gap_mm`` between their surfaces.

Size: the largest catalogue diameter with ``d <= isthmus width - bone - medial clearance`` is
tried first, then smaller ones; the length is the longest catalogue length meeting every
constraint (tip >= 3 mm inside the anterior cortex).

Search (deterministic)
----------------------
Trajectories are lines through a point of the isthmus section (offset ``a`` lateral, ``b``
superior of the isthmus centre) with anatomical angles ``(transverse, sagittal)``; the entry is
where the line leaves the bone going backwards from the isthmus. A coarse grid (``search_grid``)
over the isthmus window and the cone of ``cone_half_angle_deg`` around the pedicle axis (within the
level's range) fixes the longest feasible length; the ``n_starts`` best distinct grid points at that
length are each refined by a compass pattern search (batched, step halving) on
``(a, b, transverse, sagittal)`` maximising the density score at the chosen size.

The *straight-ahead baseline* is the pedicle axis through the isthmus centre with the same size.
The *straight-ahead screw* is what a surgeon would place on that line: the same catalogue rules
(largest diameter, then longest length, with every clearance) applied to the straight-ahead line alone.
Its density score is the "more bone than a surgeon's straight-ahead trajectory" comparison; it is
undefined (no safe size) on sides where the straight-ahead line breaches at every catalogue size.

Pull-out estimate
-----------------
``F_est [N] = k * BMD_screw [mg/cm^3] * d [mm] * L [mm]`` with ``k = 0.0228 N/(mg/cm^3 mm^2)``.
It follows the proportionality of pull-out strength to bone density (Halvorson et al., Spine
1994;19:2415-20; Okuyama et al., Spine 1993;18:2240-5) and to the thread-engaged area ``pi d L``
(Chapman et al., J Biomech Eng 1996;118:391-8). ``k`` is set so that a 6.5 x 45 mm screw in bone
of 150 mg/cm^3 gives about 1000 N, the order of cadaveric pull-out forces reported for normal
lumbar bone (about 1 kN; 0.2-0.4 kN in osteoporotic bone, Varghese et al., Asian Spine J
2018;12:398-406). It is a relative *estimate* for comparing options, not a validated prediction.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Final

import numpy as np
from numpy.typing import NDArray

from needle_steering.errors import LabelError, PlanningError
from needle_steering.perception import labels as ids
from needle_steering.perception.volume import Volume
from needle_steering.planning.anatomy import LabelIndex, Pedicle, VertebraAnatomy, analyze_vertebra
from needle_steering.planning.fields import DensityCalibration, distance_to_mm, signed_distance_mm
from needle_steering.planning.plan_document import Trajectory

SCREW_DIAMETERS_MM: Final = (4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5)
SCREW_LENGTHS_MM: Final = (30.0, 35.0, 40.0, 45.0, 50.0, 55.0)
PULLOUT_K_N_PER_MG_CM3_MM2: Final = 0.0228
#: Trabecular HU thresholds (Pickhardt et al., Ann Intern Med 2013;158:588-95, L1 ROI):
#: <= 110 HU: > 90 % specific for osteoporosis; <= 160 HU: 90 % sensitive (osteopenia or worse).
OSTEOPOROSIS_HU: Final = 110.0
OSTEOPENIA_HU: Final = 160.0


@dataclass(frozen=True)
class AngleRange:
    """Allowed screw angles for a level (degrees, in the vertebra's own frame)."""

    transverse_deg: tuple[float, float]
    sagittal_deg: tuple[float, float]


#: Allowed transverse (medial convergence) and sagittal (cranial tilt) angles per level.
#: Transverse: mean pedicle transverse angles of about 11 (L1), 12 (L2), 14 (L3), 18 (L4) and
#: 30 deg (L5) (Zindrick et al., Spine 1987;12:160-6; CT series in Stockton et al., BMC
#: Musculoskelet Disord 2019;20:114 are similar), widened by about +-12 deg (2-3 SD of the
#: reported variation). Sagittal: within +-20 deg of the endplate-parallel "straight-forward"
#: trajectory (the anatomic trajectory is about 20 deg caudal, Lehman et al., Spine 2003).
ANGLE_RANGES: Final[dict[str, AngleRange]] = {
    **{f"T{n}": AngleRange((-5.0, 25.0), (-25.0, 20.0)) for n in range(1, 13)},
    "T13": AngleRange((-5.0, 25.0), (-25.0, 20.0)),
    "L1": AngleRange((-2.0, 24.0), (-20.0, 20.0)),
    "L2": AngleRange((-1.0, 25.0), (-20.0, 20.0)),
    "L3": AngleRange((1.0, 27.0), (-20.0, 20.0)),
    "L4": AngleRange((5.0, 31.0), (-20.0, 20.0)),
    "L5": AngleRange((12.0, 42.0), (-20.0, 20.0)),
    "L6": AngleRange((12.0, 42.0), (-20.0, 20.0)),
}

_RING_FRACTIONS: Final = np.sqrt((1.0 + 8.0 * (np.arange(3) + 0.5)) / 25.0)
_MEDIAL_ANGLES: Final = np.radians([-60.0, -30.0, 0.0, 30.0, 60.0])


@dataclass(frozen=True)
class PedicleOptions:
    """Constraints, catalogue and search settings of the pedicle-screw planner (mm, degrees)."""

    bone_clearance_mm: float = 1.0
    medial_clearance_mm: float = 2.0
    anterior_clearance_mm: float = 3.0
    structure_clearance_mm: float = 1.0
    lesion_clearance_mm: float = 2.0
    screw_gap_mm: float = 1.0
    max_entry_zone_mm: float = 10.0
    diameters_mm: tuple[float, ...] = SCREW_DIAMETERS_MM
    lengths_mm: tuple[float, ...] = SCREW_LENGTHS_MM
    cone_half_angle_deg: float = 20.0
    max_lateral_offset_mm: float = 3.0
    max_cranial_offset_mm: float = 6.0
    search_grid: tuple[int, int, int, int] = (4, 5, 6, 5)
    n_starts: int = 3
    station_step_mm: float = 0.5
    sampling_margin_mm: float = 0.1
    grid_spacing_mm: float = 1.0
    calibration: DensityCalibration = field(default_factory=DensityCalibration)
    pullout_k: float = PULLOUT_K_N_PER_MG_CM3_MM2
    osteoporosis_hu: float = OSTEOPOROSIS_HU
    osteopenia_hu: float = OSTEOPENIA_HU
    angle_ranges: dict[str, AngleRange] = field(default_factory=lambda: dict(ANGLE_RANGES))

    def __post_init__(self) -> None:
        for name in (
            "bone_clearance_mm",
            "medial_clearance_mm",
            "anterior_clearance_mm",
            "structure_clearance_mm",
            "lesion_clearance_mm",
            "screw_gap_mm",
        ):
            value = float(getattr(self, name))
            if not (np.isfinite(value) and value >= 0.0):
                raise PlanningError(f"pedicle options: {name} must be finite and >= 0, got {value!r}")
        if not self.diameters_mm or not self.lengths_mm:
            raise PlanningError("pedicle options: the screw catalogue is empty")
        if any(not (np.isfinite(d) and 2.0 <= d <= 12.0) for d in self.diameters_mm):
            raise PlanningError(f"pedicle options: implausible diameters {self.diameters_mm}")
        if any(not (np.isfinite(v) and 15.0 <= v <= 100.0) for v in self.lengths_mm):
            raise PlanningError(f"pedicle options: implausible lengths {self.lengths_mm}")
        if not 0.1 <= self.station_step_mm <= 1.0:
            raise PlanningError(f"pedicle options: station_step_mm must lie in [0.1, 1], got {self.station_step_mm}")

    def to_dict(self) -> dict[str, object]:
        """Settings for the plan document."""
        return {
            "bone_clearance_mm": self.bone_clearance_mm,
            "medial_clearance_mm": self.medial_clearance_mm,
            "anterior_clearance_mm": self.anterior_clearance_mm,
            "structure_clearance_mm": self.structure_clearance_mm,
            "lesion_clearance_mm": self.lesion_clearance_mm,
            "screw_gap_mm": self.screw_gap_mm,
            "diameters_mm": list(self.diameters_mm),
            "lengths_mm": list(self.lengths_mm),
            "calibration": self.calibration.to_dict(),
            "pullout_k_n_per_mg_cm3_mm2": self.pullout_k,
        }


@dataclass(frozen=True)
class ScrewPlan:
    """One planned pedicle screw with its metrics (LPS mm, degrees)."""

    level: str
    side: str
    entry_lps_mm: NDArray[np.float64]
    tip_lps_mm: NDArray[np.float64]
    diameter_mm: float
    length_mm: float
    transverse_deg: float
    sagittal_deg: float
    mean_hu: float
    density_score_mg: float
    baseline_density_score_mg: float
    baseline_feasible: bool
    straight_ahead_diameter_mm: float
    straight_ahead_length_mm: float
    straight_ahead_density_score_mg: float
    min_bone_clearance_mm: float
    min_medial_clearance_mm: float
    min_structure_clearance_mm: float
    tip_depth_mm: float
    breach_depth_mm: float
    grade: str
    pullout_force_n: float
    mean_bmd_mg_cm3: float
    entry_zone_mm: float
    warnings: tuple[str, ...] = ()

    @property
    def direction(self) -> NDArray[np.float64]:
        """Unit vector from entry to tip (LPS)."""
        d = self.tip_lps_mm - self.entry_lps_mm
        out: NDArray[np.float64] = d / np.linalg.norm(d)
        return out

    @property
    def density_gain(self) -> float:
        """Relative density-score gain over the straight-ahead baseline of the same size."""
        if self.baseline_density_score_mg <= 0:
            return float("inf") if self.density_score_mg > 0 else 0.0
        return self.density_score_mg / self.baseline_density_score_mg - 1.0

    @property
    def density_gain_vs_straight_ahead(self) -> float:
        """Relative density-score gain over the sized straight-ahead screw; NaN when that line has no safe size."""
        if self.straight_ahead_density_score_mg <= 0:
            return float("nan")
        return self.density_score_mg / self.straight_ahead_density_score_mg - 1.0

    def to_trajectory(self) -> Trajectory:
        """As a plan-document :class:`Trajectory` (``kind="pedicle_screw"``)."""
        gain = self.density_gain
        return Trajectory(
            id=f"{self.level}-{self.side}",
            kind="pedicle_screw",
            level=self.level,
            side=self.side,
            entry_lps_mm=tuple(self.entry_lps_mm.tolist()),
            tip_lps_mm=tuple(self.tip_lps_mm.tolist()),
            path_lps_mm=(tuple(self.entry_lps_mm.tolist()), tuple(self.tip_lps_mm.tolist())),
            diameter_mm=self.diameter_mm,
            length_mm=self.length_mm,
            metrics={
                "mean_hu": self.mean_hu,
                "mean_bmd_mg_cm3": self.mean_bmd_mg_cm3,
                "density_score_mg": self.density_score_mg,
                "baseline_density_score_mg": self.baseline_density_score_mg,
                "baseline_feasible": self.baseline_feasible,
                "density_gain": gain if np.isfinite(gain) else 0.0,
                "straight_ahead_diameter_mm": self.straight_ahead_diameter_mm,
                "straight_ahead_length_mm": self.straight_ahead_length_mm,
                "straight_ahead_density_score_mg": self.straight_ahead_density_score_mg,
                "min_bone_clearance_mm": self.min_bone_clearance_mm,
                "min_medial_clearance_mm": self.min_medial_clearance_mm,
                "min_structure_clearance_mm": self.min_structure_clearance_mm,
                "tip_depth_mm": self.tip_depth_mm,
                "breach_depth_mm": self.breach_depth_mm,
                "predicted_grade": self.grade,
                "pullout_force_n_estimate": self.pullout_force_n,
                "transverse_deg": self.transverse_deg,
                "sagittal_deg": self.sagittal_deg,
                "entry_zone_mm": self.entry_zone_mm,
            },
            warnings=self.warnings,
        )


@dataclass(frozen=True)
class BoneQuality:
    """Trabecular density of one vertebral body and what it implies."""

    level: str
    trabecular_hu: float | None
    trabecular_bmd_mg_cm3: float | None
    category: str
    warning: str

    def to_dict(self) -> dict[str, object]:
        """Plain dictionary for the plan document."""
        return {
            "trabecular_hu": self.trabecular_hu,
            "trabecular_bmd_mg_cm3": self.trabecular_bmd_mg_cm3,
            "category": self.category,
            "warning": self.warning,
        }


@dataclass
class PedicleResult:
    """Screws, skipped trajectories (``"L5-left": reason``), bone quality and per-level anatomy.

    ``unusable_levels`` lists requested levels that could not be analysed at all (absent from the
    label map, a fragment, no canal).
    """

    screws: list[ScrewPlan]
    skipped: dict[str, str]
    bone_quality: dict[str, BoneQuality]
    anatomy: dict[str, VertebraAnatomy]
    warnings: list[str]
    derived: dict[str, str]
    unusable_levels: dict[str, str] = field(default_factory=dict)


def gertzbein_robbins_grade(breach_depth_mm: float) -> str:
    """Gertzbein-Robbins grade from the cortical breach depth (A none, B < 2, C < 4, D < 6, E >= 6 mm)."""
    if not np.isfinite(breach_depth_mm):
        raise PlanningError(f"breach depth must be finite, got {breach_depth_mm!r}")
    if breach_depth_mm <= 0.0:
        return "A"
    if breach_depth_mm < 2.0:
        return "B"
    if breach_depth_mm < 4.0:
        return "C"
    if breach_depth_mm < 6.0:
        return "D"
    return "E"


def bone_quality(
    level: str,
    trabecular_hu: float | None,
    calibration: DensityCalibration,
    osteoporosis_hu: float = OSTEOPOROSIS_HU,
    osteopenia_hu: float = OSTEOPENIA_HU,
) -> BoneQuality:
    """Classify a body's mean trabecular HU (Pickhardt thresholds, validated at L1)."""
    if trabecular_hu is None:
        return BoneQuality(level, None, None, "unknown", f"{level}: trabecular density could not be measured")
    bmd = float(calibration.bmd_mg_cm3(trabecular_hu))
    if trabecular_hu < osteoporosis_hu:
        return BoneQuality(
            level,
            trabecular_hu,
            bmd,
            "osteoporosis likely",
            f"{level}: trabecular bone {trabecular_hu:.0f} HU < {osteoporosis_hu:.0f} HU: osteoporosis likely "
            "(opportunistic CT screening, Pickhardt 2013); high pull-out risk: use the largest safe diameter, "
            "consider cement augmentation or additional fixation points",
        )
    if trabecular_hu < osteopenia_hu:
        return BoneQuality(
            level,
            trabecular_hu,
            bmd,
            "osteopenia possible",
            f"{level}: trabecular bone {trabecular_hu:.0f} HU < {osteopenia_hu:.0f} HU: reduced bone density "
            "possible; prefer the largest safe screw diameter",
        )
    return BoneQuality(level, trabecular_hu, bmd, "normal", "")


# --------------------------------------------------------------------------------------------------
# candidate evaluation
# --------------------------------------------------------------------------------------------------
@dataclass
class _Eval:
    """Batch evaluation of candidate lines (arrays over the batch ``B``)."""

    entry: NDArray[np.float64]  # (B, 3)
    dirs: NDArray[np.float64]  # (B, 3)
    length: NDArray[np.float64]  # (B,) longest feasible catalogue length, 0 if none
    entry_zone: NDArray[np.float64]  # (B,)
    fail: dict[str, NDArray[np.bool_]]  # constraint -> failed at the shortest length (B,)


class _ScrewSearch:
    """Evaluates screw candidates for one vertebra side on the vertebra's fields."""

    def __init__(
        self,
        anat: VertebraAnatomy,
        side: str,
        pedicle: Pedicle,
        opts: PedicleOptions,
        avoid: tuple[NDArray[np.float64], NDArray[np.float64], float] | None = None,
    ) -> None:
        self.anat = anat
        self.side = side
        self.ped = pedicle
        self.opts = opts
        self.avoid = avoid
        self.fields = anat.fields
        self.has_lesion = bool(np.any(anat.fields.fields["lesion"] < 50.0))
        self.lengths = np.array(sorted(opts.lengths_mm))
        self.s = np.arange(0.0, self.lengths.max() + opts.station_step_mm / 2, opts.station_step_mm)
        rng = opts.angle_ranges.get(anat.level)
        if rng is None:
            raise PlanningError(f"{anat.level}: no angle range for this level (pedicle screws need T1-L5)")
        self.range = rng
        frame = anat.frame
        self.t0, self.g0 = frame.angles(side, pedicle.axis_lps)

    # -- geometry ---------------------------------------------------------------------------------
    def lines(self, x: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Points on the isthmus section and directions of parameter rows ``(a, b, transverse, sagittal)``."""
        p = self.ped
        pts = p.isthmus_centre_lps_mm + x[:, 0:1] * p.plane_lateral_lps + x[:, 1:2] * p.plane_superior_lps
        dirs = self.anat.frame.direction(self.side, x[:, 2], x[:, 3])
        return pts, dirs

    def in_range(self, x: NDArray[np.float64]) -> NDArray[np.bool_]:
        """Whether the angles of parameter rows lie within the level's anatomical range."""
        tr, sg = self.range.transverse_deg, self.range.sagittal_deg
        return (x[:, 2] >= tr[0]) & (x[:, 2] <= tr[1]) & (x[:, 3] >= sg[0]) & (x[:, 3] <= sg[1])

    def _entries(
        self, pts: NDArray[np.float64], dirs: NDArray[np.float64]
    ) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
        """Where each line leaves the bone going backwards from its isthmus point."""
        t = np.arange(0.0, 45.0, 0.5)
        back = pts[:, None, :] - t[None, :, None] * dirs[:, None, :]
        sdf = self.fields.sample("sdf", back)
        outside = sdf < 0.0
        ok = ~outside[:, 0] & outside.any(axis=1)
        k = np.argmax(outside, axis=1)
        k = np.clip(k, 1, len(t) - 1)
        rows = np.arange(len(pts))
        s0, s1 = sdf[rows, k - 1], sdf[rows, k]
        frac = np.where(s0 - s1 > 1e-9, s0 / np.maximum(s0 - s1, 1e-9), 0.0)
        t_exit = t[k - 1] + frac * (t[k] - t[k - 1])
        return pts - t_exit[:, None] * dirs, ok

    def _perp_basis(self, dirs: NDArray[np.float64]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        sup = self.anat.frame.superior
        e1 = sup[None, :] - (dirs @ sup)[:, None] * dirs
        e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
        e2 = np.asarray(np.cross(dirs, e1), dtype=np.float64)
        return e1, e2

    def evaluate(self, x: NDArray[np.float64], radius: float) -> _Eval:
        """Longest feasible catalogue length for each parameter row (0 when infeasible).

        Cheap axis checks run first; the medial-wall ring, lesion and other-screw checks only for
        the rows that pass them at the shortest length.
        """
        o = self.opts
        tol = o.sampling_margin_mm
        n = len(x)
        pts, dirs = self.lines(x)
        entry, ok_entry = self._entries(pts, dirs)
        s = self.s
        axis = entry[:, None, :] + s[None, :, None] * dirs[:, None, :]  # (B, S, 3)
        sdf, forb = self.fields.sample_many(("sdf", "forbidden"), axis)
        inside = sdf - radius >= o.bone_clearance_mm + tol
        first_in = np.where(inside.any(axis=1), np.argmax(inside, axis=1), len(s) - 1)
        entry_zone = s[first_in]
        ok_zone = inside.any(axis=1) & (entry_zone <= o.max_entry_zone_mm)
        after_in = s[None, :] >= entry_zone[:, None]
        # outward normal at the entry, from the sdf gradient
        offs = np.vstack([np.eye(3), -np.eye(3)]) * 0.5
        g = self.fields.sample("sdf", entry[:, None, :] + offs[None, :, :])
        normal = -(g[:, :3] - g[:, 3:])
        post = self.anat.frame.posterior
        v_entry = (entry - self.anat.frame.origin_lps_mm) @ post
        ok_surface = (normal @ post > 0.0) & (v_entry >= self.anat.canal_anterior_v_mm)
        in_range = self.in_range(x)
        lengths = self.lengths[::-1]
        ok_len = np.zeros((len(lengths), n), bool)
        fails: dict[str, NDArray[np.bool_]] = {}
        for li, length in enumerate(lengths):
            within = s[None, :] <= length + 1e-9
            rad = np.clip(length - s, 0.0, radius)[None, :]
            shaft = within & after_in
            ok_bone = np.all(~shaft | (sdf - rad >= o.bone_clearance_mm + tol), axis=1)
            tip_idx = int(np.searchsorted(s, length - 1e-9))
            ok_tip = sdf[:, tip_idx] >= o.anterior_clearance_mm + tol
            ok_struct = np.all(~within | (forb - rad >= o.structure_clearance_mm + tol), axis=1)
            ok_len[li] = ok_entry & ok_zone & ok_surface & in_range & ok_bone & ok_tip & ok_struct
            fails = {"bone clearance": ~ok_bone, "tip clearance": ~ok_tip, "structures": ~ok_struct}
        alive = ok_len.any(axis=0)
        ok_medial = np.ones(n, bool)
        ok_lesion = np.ones(n, bool)
        ok_avoid = np.ones(n, bool)
        if alive.any():
            idx = np.nonzero(alive)[0]
            ax_a = axis[idx]
            d_a = dirs[idx]
            shaft_a = after_in[idx]
            # medial surface points (toward the canal centreline), full radius (conservative at the
            # conical tip, which lies far from the canal)
            m = self.anat.canal_point_lps(ax_a) - ax_a
            m -= np.sum(m * d_a[:, None, :], axis=2, keepdims=True) * d_a[:, None, :]
            m /= np.maximum(np.linalg.norm(m, axis=2, keepdims=True), 1e-9)
            m2 = np.cross(d_a[:, None, :], m)
            ring = ax_a[:, :, None, :] + radius * (
                np.cos(_MEDIAL_ANGLES)[None, None, :, None] * m[:, :, None, :]
                + np.sin(_MEDIAL_ANGLES)[None, None, :, None] * m2[:, :, None, :]
            )
            med = self.fields.sample("sdf", ring).min(axis=2)
            lesion = self.fields.sample("lesion", ax_a) if self.has_lesion else None
            d_other = None
            if self.avoid is not None:
                a_pt, b_pt, r_other = self.avoid
                ab = b_pt - a_pt
                tt = np.clip(((ax_a - a_pt) @ ab) / float(ab @ ab), 0.0, 1.0)
                d_other = np.linalg.norm(ax_a - (a_pt + tt[..., None] * ab), axis=2) - r_other
            for li, length in enumerate(lengths):
                within = s[None, :] <= length + 1e-9
                rad = np.clip(length - s, 0.0, radius)[None, :]
                om = np.all(~(within & shaft_a) | (med >= o.medial_clearance_mm + tol), axis=1)
                ok = om.copy()
                ol = np.ones(len(idx), bool)
                oa = np.ones(len(idx), bool)
                if lesion is not None:
                    ol = np.all(~within | (lesion - rad >= o.lesion_clearance_mm + tol), axis=1)
                    ok &= ol
                if d_other is not None:
                    oa = np.all(~within | (d_other - rad >= o.screw_gap_mm + tol), axis=1)
                    ok &= oa
                ok_len[li, idx] &= ok
                if li == len(lengths) - 1:
                    ok_medial[idx], ok_lesion[idx], ok_avoid[idx] = om, ol, oa
        best = np.zeros(n)
        for li, length in enumerate(lengths):
            best = np.where((best == 0) & ok_len[li], length, best)
        fail = {
            "entry": ~(ok_entry & ok_zone),
            "entry surface": ~ok_surface,
            "angle range": ~in_range,
            **fails,
            "medial wall": ~ok_medial,
            "lesion": ~ok_lesion,
            "other screw": ~ok_avoid,
        }
        return _Eval(entry, dirs, best, entry_zone, fail)

    def density(
        self, entry: NDArray[np.float64], dirs: NDArray[np.float64], radius: float, length: float
    ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Integrated BMD (mg) and mean HU over the screw volume for each row."""
        s = np.arange(0.5, length, 1.0)
        rad = np.minimum(radius, length - s)  # (S,)
        e1, e2 = self._perp_basis(dirs)
        offsets = [np.zeros((len(dirs), 3))]
        weights = [np.ones(1)]
        for k, frac in enumerate(_RING_FRACTIONS):
            ang = 2.0 * np.pi * (np.arange(8) + 0.5 * (k % 2)) / 8.0
            ring = np.cos(ang)[None, :, None] * e1[:, None, :] + np.sin(ang)[None, :, None] * e2[:, None, :]
            offsets.append(frac * ring)  # (B, 8, 3) in units of the radius
            weights.append(np.ones(8))
        unit = np.concatenate([offsets[0][:, None, :], *offsets[1:]], axis=1)  # (B, 25, 3)
        pts = (
            entry[:, None, None, :]
            + s[None, :, None, None] * dirs[:, None, None, :]
            + rad[None, :, None, None] * unit[:, None, :, :]
        )  # (B, S, 25, 3)
        hu = self.fields.sample("hu", pts)
        bmd = np.maximum(self.opts.calibration.bmd_mg_cm3(hu), 0.0)
        area = np.pi * rad**2 / 25.0  # mm^2 per sample, 1 mm thick slices
        score_mg = np.einsum("bsk,s->b", bmd, area) / 1000.0
        mean_hu = np.einsum("bsk,s->b", hu, area) / (float(area.sum()) * 25.0)
        return score_mg, mean_hu

    def metrics(
        self, entry: NDArray[np.float64], d: NDArray[np.float64], radius: float, length: float, entry_zone: float
    ) -> dict[str, float]:
        """Clearances and breach depth of one screw."""
        s = np.arange(0.0, length + 1e-9, 0.25)
        axis = entry[None, :] + s[:, None] * d[None, :]
        rad = np.clip(length - s, 0.0, radius)
        sdf = self.fields.sample("sdf", axis)
        forb = self.fields.sample("forbidden", axis)
        shaft = s >= entry_zone
        clear = sdf - rad
        canal_pts = self.anat.canal_point_lps(axis)
        m = canal_pts - axis
        m -= (m @ d)[:, None] * d[None, :]
        m /= np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-9)
        m2 = np.cross(d[None, :], m)
        ring = axis[:, None, :] + rad[:, None, None] * (
            np.cos(_MEDIAL_ANGLES)[None, :, None] * m[:, None, :]
            + np.sin(_MEDIAL_ANGLES)[None, :, None] * m2[:, None, :]
        )
        med = self.fields.sample("sdf", ring).min(axis=1)
        return {
            "min_bone_clearance_mm": float(clear[shaft].min()),
            "min_medial_clearance_mm": float(med[shaft].min()),
            "min_structure_clearance_mm": float((forb - rad).min()),
            "tip_depth_mm": float(sdf[-1]),
            "breach_depth_mm": float(max(0.0, -(clear[shaft].min()))),
        }


def _grid(lo: float, hi: float, n: int) -> NDArray[np.float64]:
    return np.array([0.5 * (lo + hi)]) if n <= 1 or hi - lo < 1e-6 else np.linspace(lo, hi, n)


def _straight_ahead_screw(
    search: _ScrewSearch, base_x: NDArray[np.float64], diameters: Sequence[float]
) -> tuple[float, float, float]:
    """The screw a surgeon would size on the straight-ahead line: ``(diameter_mm, length_mm, density_score_mg)``.

    The largest catalogue diameter with a safe length on that line, at its longest safe length; zeros when
    the line breaches at every size.
    """
    for diameter in sorted(diameters, reverse=True):
        ev = search.evaluate(base_x, diameter / 2.0)
        length = float(ev.length[0])
        if length > 0:
            score, _ = search.density(ev.entry, ev.dirs, diameter / 2.0, length)
            return float(diameter), length, float(score[0])
    return 0.0, 0.0, 0.0


def _plan_side(
    anat: VertebraAnatomy,
    side: str,
    opts: PedicleOptions,
    avoid: tuple[NDArray[np.float64], NDArray[np.float64], float] | None = None,
) -> ScrewPlan | str:
    """Best screw for one side, or the reason why none is safe."""
    ped = anat.pedicles.get(side)
    if ped is None:
        return anat.pedicle_failures.get(side, "pedicle not found")
    search = _ScrewSearch(anat, side, ped, opts, avoid)
    rng = search.range
    cone = opts.cone_half_angle_deg
    tr_lo, tr_hi = max(rng.transverse_deg[0], search.t0 - cone), min(rng.transverse_deg[1], search.t0 + cone)
    sg_lo, sg_hi = max(rng.sagittal_deg[0], search.g0 - cone), min(rng.sagittal_deg[1], search.g0 + cone)
    notes: list[str] = []
    if tr_lo > tr_hi or sg_lo > sg_hi:
        notes.append(
            f"pedicle axis ({search.t0:.0f} deg transverse, {search.g0:.0f} deg sagittal) lies outside the "
            f"anatomical range for {anat.level}; searched the whole range"
        )
        tr_lo, tr_hi = rng.transverse_deg
        sg_lo, sg_hi = rng.sagittal_deg
    admitted = ped.width_mm - opts.bone_clearance_mm - opts.medial_clearance_mm
    diameters = sorted(opts.diameters_mm, reverse=True)
    first = [d for d in diameters if d <= admitted + 1e-9]
    tried = first if first else diameters[-1:]
    fail_counts: dict[str, int] = {}
    n_last = 0
    for diameter in tried:
        radius = diameter / 2.0
        half_w = max(0.0, ped.width_mm / 2.0 - radius - opts.bone_clearance_mm)
        half_h = max(0.0, ped.height_mm / 2.0 - radius - opts.bone_clearance_mm)
        na, nb, nt, ng = opts.search_grid
        a_max, b_max = min(half_w, opts.max_lateral_offset_mm), min(half_h, opts.max_cranial_offset_mm)
        aa = _grid(-a_max, a_max, na)
        bb = _grid(-b_max, b_max, nb)
        tt = _grid(tr_lo, tr_hi, nt)
        gg = _grid(sg_lo, sg_hi, ng)
        x = np.array(np.meshgrid(aa, bb, tt, gg, indexing="ij")).reshape(4, -1).T
        x = np.vstack([[0.0, 0.0, search.t0, search.g0], x])
        ev = search.evaluate(x, radius)
        n_last = len(x)
        fail_counts = {k: int(v.sum()) for k, v in ev.fail.items()}
        if not np.any(ev.length > 0):
            continue
        l_star = float(ev.length.max())
        cand = np.nonzero(ev.length >= l_star)[0]
        score, _ = search.density(ev.entry[cand], ev.dirs[cand], radius, l_star)
        # multi-start local refinement: the feasible set at the longest length is often a few
        # disconnected pockets of the grid, so the best few distinct grid points are each refined
        cell = np.array(
            [max(float(np.ptp(v)), 1.0) / max(len(v) - 1, 1) for v in (aa, bb, tt, gg)], dtype=np.float64
        )
        starts = _distinct_starts(x[cand], score, cell, opts.n_starts)
        x_best, f_best = x[cand[starts[0]]], -np.inf
        for k0 in starts:
            x_k, f_k = _pattern_search(search, x[cand[k0]], float(score[k0]), radius=radius, length=l_star)
            if f_k > f_best + 1e-9:
                x_best, f_best = x_k, f_k
        final = search.evaluate(x_best[None, :], radius)
        length = float(final.length[0])
        if length <= 0:  # cannot happen: pattern search only accepts feasible points
            raise PlanningError(f"{anat.level} {side}: internal error, optimum became infeasible")
        entry = final.entry[0]
        d = final.dirs[0]
        score_arr, hu_arr = search.density(final.entry, final.dirs, radius, length)
        base_x = np.array([[0.0, 0.0, search.t0, search.g0]])
        base = search.evaluate(base_x, radius)
        base_score, _ = search.density(base.entry, base.dirs, radius, length)
        sa_diameter, sa_length, sa_score = _straight_ahead_screw(search, base_x, diameters)
        met = search.metrics(entry, d, radius, length, float(final.entry_zone[0]))
        grade = gertzbein_robbins_grade(met["breach_depth_mm"])
        mean_bmd = float(opts.calibration.bmd_mg_cm3(float(hu_arr[0])))
        pullout = opts.pullout_k * max(mean_bmd, 0.0) * diameter * length
        transverse, sagittal = anat.frame.angles(side, d)
        warns = list(notes)
        if diameter < diameters[0] and first and diameter < first[0]:
            warns.append(f"diameter reduced to {diameter} mm: no safe trajectory for {first[0]} mm")
        if grade not in ("A", "B"):
            raise PlanningError(f"{anat.level} {side}: internal error, planned screw has grade {grade}")
        return ScrewPlan(
            level=anat.level,
            side=side,
            entry_lps_mm=entry,
            tip_lps_mm=entry + length * d,
            diameter_mm=float(diameter),
            length_mm=length,
            transverse_deg=transverse,
            sagittal_deg=sagittal,
            mean_hu=float(hu_arr[0]),
            density_score_mg=float(score_arr[0]),
            baseline_density_score_mg=float(base_score[0]),
            baseline_feasible=bool(base.length[0] >= length),
            straight_ahead_diameter_mm=sa_diameter,
            straight_ahead_length_mm=sa_length,
            straight_ahead_density_score_mg=sa_score,
            min_bone_clearance_mm=met["min_bone_clearance_mm"],
            min_medial_clearance_mm=met["min_medial_clearance_mm"],
            min_structure_clearance_mm=met["min_structure_clearance_mm"],
            tip_depth_mm=met["tip_depth_mm"],
            breach_depth_mm=met["breach_depth_mm"],
            grade=grade,
            pullout_force_n=float(pullout),
            mean_bmd_mg_cm3=mean_bmd,
            entry_zone_mm=float(final.entry_zone[0]),
            warnings=tuple(warns),
        )
    smallest = min(opts.diameters_mm)
    if admitted < smallest:
        return (
            f"pedicle too narrow: isthmus width {ped.width_mm:.1f} mm admits at most {max(admitted, 0):.1f} mm "
            f"with {opts.bone_clearance_mm:g} mm lateral and {opts.medial_clearance_mm:g} mm medial clearance; "
            f"smallest screw {smallest} mm"
        )
    lesion_blocks = fail_counts.get("lesion", 0)
    if lesion_blocks and anat.fields.fields["lesion"].min() < 50.0:
        return (
            f"lesion in the way: {lesion_blocks} of {n_last} candidate trajectories pass within "
            f"{opts.lesion_clearance_mm:g} mm of the lesion and no other is safe"
        )
    worst = sorted(((v, k) for k, v in fail_counts.items() if v), reverse=True)[:3]
    detail = ", ".join(f"{k} ({v}/{n_last})" for v, k in worst)
    return f"no safe trajectory with a {min(tried)} mm screw; failing constraints: {detail}"


def _distinct_starts(
    x: NDArray[np.float64], score: NDArray[np.float64], cell: NDArray[np.float64], n: int
) -> list[int]:
    """Indices of up to ``n`` best-scoring rows of ``x`` (B, 4), pairwise more than one grid ``cell`` apart.

    ``cell`` (4,) is the grid step of ``(a mm, b mm, transverse deg, sagittal deg)``; two rows are
    neighbours when every parameter differs by at most one step (Chebyshev distance <= 1 cell).
    Ties keep the lower index (deterministic).
    """
    order = np.argsort(-score, kind="stable")
    chosen: list[int] = []
    for k in order:
        if all(np.max(np.abs(x[k] - x[j]) / cell) > 1.0 + 1e-9 for j in chosen):
            chosen.append(int(k))
            if len(chosen) >= n:
                break
    return chosen


def _pattern_search(
    search: _ScrewSearch,
    x0: NDArray[np.float64],
    f0: float,
    *,
    radius: float,
    length: float,
    max_iter: int = 25,
) -> tuple[NDArray[np.float64], float]:
    """Compass search maximising the density score among trajectories feasible at ``length``."""
    step = np.array([1.0, 1.0, 4.0, 4.0])
    min_step = np.array([0.25, 0.25, 0.5, 0.5])
    x, f = x0.copy(), f0
    for _ in range(max_iter):
        moves = np.vstack([np.diag(step), -np.diag(step)])
        cand = x[None, :] + moves
        ev = search.evaluate(cand, radius)
        ok = ev.length >= length
        improved = False
        if ok.any():
            idx = np.nonzero(ok)[0]
            score, _ = search.density(ev.entry[idx], ev.dirs[idx], radius, length)
            k = int(np.argmax(score))
            if score[k] > f + 1e-6:
                x, f = cand[idx[k]], float(score[k])
                improved = True
        if not improved:
            step = step / 2.0
            if np.all(step < min_step):
                break
    return x, f


def _segment_distance(
    p1: NDArray[np.float64], q1: NDArray[np.float64], p2: NDArray[np.float64], q2: NDArray[np.float64]
) -> float:
    """Smallest distance between segments ``p1q1`` and ``p2q2`` (sampled, 0.25 mm)."""
    n = max(2, int(np.linalg.norm(q1 - p1) / 0.25) + 1)
    s = np.linspace(0.0, 1.0, n)[:, None]
    pts = p1 + s * (q1 - p1)
    ab = q2 - p2
    t = np.clip(((pts - p2) @ ab) / float(ab @ ab), 0.0, 1.0)
    return float(np.min(np.linalg.norm(pts - (p2 + t[:, None] * ab), axis=1)))


def plan_level(
    anat: VertebraAnatomy, options: PedicleOptions | None = None, sides: Sequence[str] = ("left", "right")
) -> tuple[dict[str, ScrewPlan], dict[str, str]]:
    """Plan the screws of one vertebra; returns ``(screws by side, reasons by side)``."""
    opts = options or PedicleOptions()
    return _resolve_level(anat, opts, {side: _plan_side(anat, side, opts) for side in sides})


def _resolve_level(
    anat: VertebraAnatomy, opts: PedicleOptions, outcomes: dict[str, ScrewPlan | str]
) -> tuple[dict[str, ScrewPlan], dict[str, str]]:
    """Split per-side outcomes into screws and reasons; re-plan one side if the two screws collide."""
    screws: dict[str, ScrewPlan] = {}
    reasons: dict[str, str] = {}
    for side, out in outcomes.items():
        if isinstance(out, str):
            reasons[side] = out
        else:
            screws[side] = out
    if "left" in screws and "right" in screws:
        a, b = screws["left"], screws["right"]
        gap = (
            _segment_distance(a.entry_lps_mm, a.tip_lps_mm, b.entry_lps_mm, b.tip_lps_mm)
            - (a.diameter_mm + b.diameter_mm) / 2.0
        )
        if gap < opts.screw_gap_mm:
            keep, redo = (a, b) if a.density_score_mg >= b.density_score_mg else (b, a)
            out = _plan_side(anat, redo.side, opts, avoid=(keep.entry_lps_mm, keep.tip_lps_mm, keep.diameter_mm / 2))
            if isinstance(out, str):
                del screws[redo.side]
                reasons[redo.side] = f"no safe trajectory that clears the {keep.side} screw ({out})"
            else:
                screws[redo.side] = replace(out, warnings=(*out.warnings, f"re-planned to clear the {keep.side} screw"))
    return screws, reasons


def _n_workers(n_tasks: int) -> int:
    """Worker threads for per-level planning (scipy.ndimage and large numpy operations release the GIL)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 4, n_tasks))


def plan_pedicle_screws(
    ct: Volume,
    labels: Volume,
    levels: Sequence[str],
    options: PedicleOptions | None = None,
    *,
    index: LabelIndex | None = None,
) -> PedicleResult:
    """Plan bilateral pedicle screws for ``levels`` (e.g. ``["L1", ..., "L5"]``).

    Args:
        ct: CT in HU.
        labels: Label map on the CT grid (VerSe ids; canal/vessel/disc ids optional).
        levels: Level names.
        options: Constraints and catalogue.
        index: Precomputed :class:`LabelIndex` of ``labels``.

    Returns:
        A :class:`PedicleResult`; levels or sides without a safe screw are in ``skipped`` with the reason.

    Raises:
        GeometryError: ``labels`` is not on the CT grid.
        LabelError: Unknown level names or an unusable label map.
    """
    opts = options or PedicleOptions()
    ct.require_same_grid(labels)
    index = index or LabelIndex(labels)
    result = PedicleResult([], {}, {}, {}, [], {})
    # every level is independent (its own grid and fields): levels and sides run on a thread pool,
    # the results are merged in the requested order, so the outcome equals the serial one
    todo: list[tuple[str, int]] = []
    for name in levels:
        vid = ids.level_id(name)
        todo.append((ids.level_name(vid), vid))
    n_analyse = sum(1 for level, vid in todo if level != "S" and index.present(vid))
    with ThreadPoolExecutor(max_workers=_n_workers(2 * n_analyse)) as pool:

        def analyse(vid: int) -> VertebraAnatomy:
            return analyze_vertebra(
                ct, labels, vid, index=index, calibration=opts.calibration, spacing_mm=opts.grid_spacing_mm
            )

        anat_futures: list[Future[VertebraAnatomy] | None] = [
            pool.submit(analyse, vid) if level != "S" and index.present(vid) else None for level, vid in todo
        ]
        side_futures: list[dict[str, Future[ScrewPlan | str]] | None] = []
        anats: list[VertebraAnatomy | Exception | None] = []
        for fut in anat_futures:
            if fut is None:
                anats.append(None)
                side_futures.append(None)
                continue
            try:
                anat_k = fut.result()
            except Exception as exc:  # re-raised (or reported as skipped) below, in level order
                anats.append(exc)
                side_futures.append(None)
                continue
            anats.append(anat_k)
            side_futures.append({side: pool.submit(_plan_side, anat_k, side, opts) for side in ("left", "right")})
        for (level, vid), anat_or_exc, sides_fut in zip(todo, anats, side_futures, strict=True):
            if level == "S":
                result.skipped[f"{level}-left"] = result.skipped[f"{level}-right"] = "sacral screws are not supported"
                continue
            if not index.present(vid):
                reason = f"{level} is not in the label map"
                result.skipped[f"{level}-left"] = result.skipped[f"{level}-right"] = reason
                result.unusable_levels[level] = reason
                continue
            if isinstance(anat_or_exc, LabelError):
                result.skipped[f"{level}-left"] = result.skipped[f"{level}-right"] = str(anat_or_exc)
                result.unusable_levels[level] = str(anat_or_exc)
                continue
            if isinstance(anat_or_exc, Exception):
                raise anat_or_exc
            assert anat_or_exc is not None and sides_fut is not None
            anat = anat_or_exc
            result.anatomy[level] = anat
            result.warnings.extend(anat.warnings)
            result.derived[f"{level}.spinal_canal"] = anat.canal_source
            bq = bone_quality(level, anat.trabecular_hu, opts.calibration, opts.osteoporosis_hu, opts.osteopenia_hu)
            result.bone_quality[level] = bq
            screws, reasons = _resolve_level(anat, opts, {side: f.result() for side, f in sides_fut.items()})
            for side in ("left", "right"):
                if side in screws:
                    screw = screws[side]
                    if bq.category == "osteoporosis likely":
                        screw = replace(
                            screw,
                            warnings=(
                                *screw.warnings,
                                f"low bone density ({bq.trabecular_hu:.0f} HU): "
                                "pull-out risk; consider cement augmentation",
                            ),
                        )
                    result.screws.append(screw)
                else:
                    result.skipped[f"{level}-{side}"] = reasons.get(side, "not planned")
    return result


# --------------------------------------------------------------------------------------------------
# evaluation against a reference mask (ground truth)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScrewCheck:
    """A screw measured against a reference vertebra mask."""

    breach_depth_mm: float
    min_clearance_mm: float
    grade: str
    enters_structures: tuple[str, ...]


def check_screw_against_mask(
    labels: Volume,
    label_id: int,
    entry_lps_mm: NDArray[np.float64],
    tip_lps_mm: NDArray[np.float64],
    diameter_mm: float,
    *,
    entry_zone_mm: float = 0.0,
) -> ScrewCheck:
    """Grade a screw against the reference mask of vertebra ``label_id`` (independent of the planner).

    The breach depth is how far the screw surface (axis distance to the mask surface minus the
    local radius, 45 deg conical tip) extends outside the mask beyond the entry zone; the grade
    follows Gertzbein-Robbins. ``enters_structures`` lists other labelled structures the screw
    volume touches (canal, neighbour vertebrae, vessels, discs, lesions).
    """
    from scipy import ndimage

    entry = np.asarray(entry_lps_mm, dtype=np.float64)
    tip = np.asarray(tip_lps_mm, dtype=np.float64)
    length = float(np.linalg.norm(tip - entry))
    d = (tip - entry) / length
    radius = diameter_mm / 2.0
    lo = np.minimum(entry, tip) - radius - 12.0
    hi = np.maximum(entry, tip) + radius + 12.0
    corners = np.array(np.meshgrid(*[[lo[i], hi[i]] for i in range(3)], indexing="ij")).reshape(3, -1).T
    idx = labels.lps_to_index(corners)
    i0 = np.clip(np.floor(idx.min(axis=0)).astype(int), 0, np.array(labels.shape) - 1)
    i1 = np.clip(np.ceil(idx.max(axis=0)).astype(int) + 1, 1, np.array(labels.shape))
    crop = np.asarray(labels.array[i0[0] : i1[0], i0[1] : i1[1], i0[2] : i1[2]])
    sdf = signed_distance_mm(crop == label_id, labels.spacing_mm)
    s = np.arange(0.0, length + 1e-9, 0.25)
    axis = entry + s[:, None] * d
    rad = np.clip(length - s, 0.0, radius)
    ijk = labels.lps_to_index(axis) - i0
    vals = ndimage.map_coordinates(sdf, ijk.T, order=1, mode="nearest")
    shaft = s >= entry_zone_mm
    clear = vals - rad
    min_clear = float(clear[shaft].min()) if shaft.any() else float(clear.min())
    breach = max(0.0, -min_clear)
    entered: list[str] = []
    for sid, name in (
        (ids.SPINAL_CANAL, "spinal_canal"),
        (ids.AORTA, "aorta"),
        (ids.INFERIOR_VENA_CAVA, "inferior_vena_cava"),
        (ids.DISC, "disc"),
        (ids.LESION, "lesion"),
    ):
        if np.any(crop == sid):
            dist = distance_to_mm(crop == sid, labels.spacing_mm)
            dv = ndimage.map_coordinates(dist, ijk.T, order=1, mode="nearest")
            if np.any(dv - rad < 0.0):
                entered.append(name)
    others = [v for v in np.unique(crop) if ids.is_vertebra(int(v)) and int(v) != label_id]
    if others:
        dist = distance_to_mm(np.isin(crop, others), labels.spacing_mm)
        dv = ndimage.map_coordinates(dist, ijk.T, order=1, mode="nearest")
        if np.any(dv - rad < 0.0):
            entered.append("neighbouring_vertebra")
    return ScrewCheck(breach, min_clear, gertzbein_robbins_grade(breach), tuple(entered))


__all__ = [
    "ANGLE_RANGES",
    "SCREW_DIAMETERS_MM",
    "SCREW_LENGTHS_MM",
    "AngleRange",
    "BoneQuality",
    "PedicleOptions",
    "PedicleResult",
    "ScrewCheck",
    "ScrewPlan",
    "bone_quality",
    "check_screw_against_mask",
    "gertzbein_robbins_grade",
    "plan_level",
    "plan_pedicle_screws",
]
