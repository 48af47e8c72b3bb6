"""One entry point for the command line, the nodes, the tests and the benchmarks: :func:`plan_case`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from needle_steering.errors import ImageError, LabelError, PlanningError
from needle_steering.perception import labels as ids
from needle_steering.perception.volume import Volume
from needle_steering.planning.anatomy import LabelIndex, VertebraAnatomy
from needle_steering.planning.biopsy import BiopsyOptions, BiopsyPlan, _Critical, _sample, plan_biopsy
from needle_steering.planning.fields import signed_distance_mm
from needle_steering.planning.pedicle import PedicleOptions, PedicleResult, plan_pedicle_screws
from needle_steering.planning.plan_document import ImageInfo, PlanDocument, Trajectory
from needle_steering.planning.steerable import FieldObstacles, SteerablePlanner, SteerablePlanResult

SOFTWARE = "needle_steering.planning 0.1.0"


@dataclass(frozen=True)
class PlanOptions:
    """Options of :func:`plan_case`.

    Attributes:
        pedicle: Pedicle-screw constraints, catalogue and density calibration.
        biopsy: Biopsy-needle constraints.
        steerable_kappa_max_per_mm: Largest curvature of the steerable needle (1/mm; radius 100 mm).
        steerable_clearance_mm: Clearance of the steerable path from the obstacles, mm.
        steerable_diameter_mm: Steerable needle diameter, mm.
        steerable_seed: Seed of the steerable planner's sampling.
        hash_images: Hash the voxel arrays for the plan document (disable only in benchmarks of
            the planner itself).
    """

    pedicle: PedicleOptions = field(default_factory=PedicleOptions)
    biopsy: BiopsyOptions = field(default_factory=BiopsyOptions)
    steerable_kappa_max_per_mm: float = 0.01
    steerable_clearance_mm: float = 1.5
    steerable_diameter_mm: float = 1.2
    steerable_seed: int = 0
    hash_images: bool = True


@dataclass(frozen=True)
class PlanResult:
    """Outcome of :func:`plan_case`.

    Attributes:
        plan_document: The hashed plan document.
        skipped: ``{"L5-left": reason}`` for every requested trajectory that is not in the plan.
        seconds: Wall time of the planning.
        pedicle: Detailed pedicle result (anatomy, bone quality) or ``None``.
        biopsy: Detailed biopsy result or ``None``.
        steerable: Steerable-needle result or ``None``.
    """

    plan_document: PlanDocument
    skipped: dict[str, str]
    seconds: float
    pedicle: PedicleResult | None = None
    biopsy: BiopsyPlan | None = None
    steerable: SteerablePlanResult | None = None


def _validate_inputs(ct: Volume, labels: Volume) -> None:
    if not isinstance(ct, Volume) or not isinstance(labels, Volume):
        raise PlanningError(f"ct and labels must be Volume objects, got {type(ct).__name__}, {type(labels).__name__}")
    if not ct.same_grid(labels):
        ct.require_same_grid(labels)
    arr = ct.array
    if arr.dtype.kind not in "iuf":
        raise ImageError(f"CT must hold numbers (HU), got dtype {arr.dtype}")
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr)
        if bad.any():
            first = np.argwhere(bad)[0].tolist()
            raise ImageError(f"CT holds {int(bad.sum())} NaN/Inf voxels (first at index {first}); refusing to plan")
    if labels.array.dtype.kind not in "iu":
        raise LabelError(f"label map must hold integer ids, got dtype {labels.array.dtype}")


def plan_case(  # noqa: PLR0917 - positional signature used by the CLI and the nodes
    ct: Volume,
    labels: Volume,
    levels: Sequence[str],
    biopsy_target_lps_mm: ArrayLike | None = None,
    steerable: bool = False,
    options: PlanOptions | None = None,
) -> PlanResult:
    """Plan pedicle screws for ``levels`` (both sides), optionally a biopsy and a steerable path.

    Args:
        ct: CT in HU (any grid; LPS geometry from the file).
        labels: Label map on the same grid (VerSe vertebra ids; canal/vessel/skin/disc ids optional,
            derived when missing and stated in ``plan_document.derived``).
        levels: Level names, e.g. ``["L1", "L2", "L3", "L4", "L5"]`` (may be empty).
        biopsy_target_lps_mm: Biopsy target ``(3,)`` LPS mm, or ``None``.
        steerable: Also plan a curved steerable-needle path to the biopsy target.
        options: Planner options.

    Returns:
        :class:`PlanResult`.

    Raises:
        GeometryError: The label map is not on the CT grid.
        ImageError: NaN/Inf CT voxels or a non-numeric CT.
        LabelError: Unknown level names, a label map without vertebrae, or no requested level usable.
        PlanningError: Invalid requests (steerable without a target) or no safe biopsy path.
    """
    t0 = time.perf_counter()
    opts = options or PlanOptions()
    _validate_inputs(ct, labels)
    names = [ids.level_name(ids.level_id(n)) for n in levels]
    if steerable and biopsy_target_lps_mm is None:
        raise PlanningError("a steerable-needle path needs a biopsy target (biopsy_target_lps_mm)")
    index = LabelIndex(labels)
    if not index.vertebra_ids():
        raise LabelError(
            f"label map holds no vertebra (VerSe ids 1-28); ids present: {index.ids() or 'none (empty map)'}"
        )
    trajectories: list[Trajectory] = []
    skipped: dict[str, str] = {}
    warnings: list[str] = []
    derived: dict[str, str] = {}
    levels_info: dict[str, dict[str, Any]] = {}
    ped: PedicleResult | None = None
    if names:
        ped = plan_pedicle_screws(ct, labels, names, opts.pedicle, index=index)
        if len(ped.unusable_levels) == len(set(names)):
            raise LabelError(
                "no requested level can be planned: " + "; ".join(f"{k}: {v}" for k, v in ped.unusable_levels.items())
            )
        skipped.update(ped.skipped)
        derived.update(ped.derived)
        for bq in ped.bone_quality.values():
            if bq.warning:
                warnings.append(bq.warning)
        for level, anat in ped.anatomy.items():
            info: dict[str, Any] = {
                "label_id": anat.label_id,
                "volume_ml": anat.volume_ml,
                "bone_quality": ped.bone_quality[level].to_dict(),
                "canal": anat.canal_source,
                "frame_superior_from": anat.frame.superior_source,
                "superior_lps": anat.frame.superior.tolist(),
                "posterior_lps": anat.frame.posterior.tolist(),
                "pedicles": {s: p.to_dict() for s, p in anat.pedicles.items()},
            }
            levels_info[level] = info
        warnings.extend(ped.warnings)
        trajectories.extend(s.to_trajectory() for s in ped.screws)
        for screw in ped.screws:
            warnings.extend(f"{screw.level} {screw.side}: {w}" for w in screw.warnings)
    bx: BiopsyPlan | None = None
    st: SteerablePlanResult | None = None
    if biopsy_target_lps_mm is not None:
        bx = plan_biopsy(
            ct, labels, biopsy_target_lps_mm, opts.biopsy, index=index, anatomy=ped.anatomy if ped else None
        )
        trajectories.append(bx.to_trajectory(opts.biopsy.needle_diameter_mm))
        derived.update(bx.derived)
        warnings.extend(bx.warnings)
        if steerable:
            st, traj = _plan_steerable(ct, labels, index, bx, ped.anatomy if ped else {}, opts=opts)
            if traj is not None:
                trajectories.append(traj)
            else:
                skipped["steerable"] = st.reason
    if not index.present(ids.SPINAL_CANAL):
        warnings.append("the label map has no spinal canal: it was derived from the vertebral arches")
    order = {"osteoporosis": 0, "pedicle": 1}
    warnings = sorted(dict.fromkeys(warnings), key=lambda w: min((v for k, v in order.items() if k in w), default=9))
    doc = PlanDocument(
        image=ImageInfo.from_volume(ct) if opts.hash_images else _unhashed(ct),
        labels=ImageInfo.from_volume(labels) if opts.hash_images else _unhashed(labels),
        trajectories=tuple(trajectories),
        skipped=skipped,
        levels=levels_info,
        warnings=tuple(warnings),
        derived=derived,
        options={
            "levels": names,
            "pedicle": opts.pedicle.to_dict(),
            "biopsy": opts.biopsy.to_dict() if biopsy_target_lps_mm is not None else None,
            "biopsy_target_lps_mm": None
            if biopsy_target_lps_mm is None
            else np.asarray(biopsy_target_lps_mm, dtype=np.float64).tolist(),
            "steerable": bool(steerable),
            "steerable_kappa_max_per_mm": opts.steerable_kappa_max_per_mm if steerable else None,
        },
        created_by=SOFTWARE,
    )
    return PlanResult(doc, skipped, time.perf_counter() - t0, ped, bx, st)


def _unhashed(volume: Volume) -> ImageInfo:
    return ImageInfo(
        sha256="0" * 64,
        shape=volume.shape,
        spacing_mm=(float(volume.spacing_mm[0]), float(volume.spacing_mm[1]), float(volume.spacing_mm[2])),
        origin_lps_mm=(float(volume.origin_lps_mm[0]), float(volume.origin_lps_mm[1]), float(volume.origin_lps_mm[2])),
        direction=tuple(float(v) for v in volume.direction.reshape(-1)),
        source=str(volume.metadata.get("source", "")) + " (not hashed)",
    )


class _CriticalObstacles:
    """Critical-structure surfaces (KD-tree) as a steerable-planner obstacle set."""

    def __init__(self, crit: _Critical) -> None:
        self.crit = crit

    @property
    def count(self) -> int:
        return len(self.crit.points)

    def clearance_mm(self, points_mm: NDArray[np.float64]) -> NDArray[np.float64]:
        d, _ = self.crit.distance(np.asarray(points_mm, dtype=np.float64).reshape(-1, 3), upper_mm=50.0)
        out: NDArray[np.float64] = np.where(np.isfinite(d), d, 50.0)
        return out


def _plan_steerable(
    ct: Volume,
    labels: Volume,
    index: LabelIndex,
    bx: BiopsyPlan,
    anatomy: dict[str, VertebraAnatomy],
    *,
    opts: PlanOptions,
) -> tuple[SteerablePlanResult, Trajectory | None]:
    """Curved path to the biopsy target.

    Vertebral-body targets: through a straight transpedicular cannula whose tip stops 5 mm past the
    pedicle isthmus; from there the needle curves inside the bone (obstacle = everything outside
    the vertebra and its lesion, clearance ``steerable_clearance_mm`` from the cortex). Other
    targets: from the biopsy skin entry, heading at the target, around the critical structures.
    """
    target = bx.best.target_lps_mm
    planner = SteerablePlanner(clearance_mm=opts.steerable_clearance_mm, seed=opts.steerable_seed)
    kmax = opts.steerable_kappa_max_per_mm
    level = bx.best.level
    if level and level in anatomy and anatomy[level].pedicles:
        anat = anatomy[level]
        vid = anat.label_id
        lab = anat.fields.labels
        bone = (lab == vid) | (lab == ids.LESION)
        sdf_bone = signed_distance_mm(bone, anat.fields.grid.spacing_mm, coarse_outside=True)
        anat.fields.add("sdf_with_lesion", sdf_bone, -1000.0)
        obstacles = FieldObstacles(anat.fields, "sdf_with_lesion")
        results: list[tuple[SteerablePlanResult, NDArray[np.float64], NDArray[np.float64], str]] = []
        for side, ped in sorted(anat.pedicles.items()):
            back = np.arange(0.0, 40.0, 0.5)
            line = ped.isthmus_centre_lps_mm[None, :] - back[:, None] * ped.axis_lps[None, :]
            outside = anat.fields.sample("sdf", line) < 0
            entry = line[int(np.argmax(outside))] if outside.any() else line[-1]
            # cannula tip: just inside the pedicle entry (most room to curve), at the isthmus, or 5 mm past it
            for start in (
                entry + 4.0 * ped.axis_lps,
                ped.isthmus_centre_lps_mm,
                ped.isthmus_centre_lps_mm + 5.0 * ped.axis_lps,
            ):
                res = planner.plan(_pose(start, ped.axis_lps), target, obstacles, kmax)
                results.append((res, entry, start, side))
                if res.ok:
                    break
        ok = [r for r in results if r[0].ok]
        if not ok:
            return results[0][0] if results else SteerablePlanResult(None, "no pedicle"), None
        res, entry, start, side = min(ok, key=lambda r: r[0].path.length_mm if r[0].path else np.inf)
        assert res.path is not None
        pts = np.vstack([entry[None, :], res.path.points_mm])
        traj = _steer_traj(
            pts, res, opts, level=level, side=side, how="transpedicular cannula then curved inside the vertebral body"
        )
        return res, traj
    crit = _Critical(labels, index, target, opts.biopsy.max_length_mm + 30.0, [])
    obstacles_c = _CriticalObstacles(crit)
    entry = bx.best.entry_lps_mm
    res = planner.plan(_pose(entry, target - entry), target, obstacles_c, kmax)
    if not res.ok or res.path is None:
        return res, None
    lab_on_path = _sample(labels, res.path.points_mm, 0, 0.0).astype(int)
    if np.any(np.isin(lab_on_path, list(ids.VERTEBRA_NAMES))):
        return SteerablePlanResult(None, "the curved path crosses a vertebra"), None
    return res, _steer_traj(
        res.path.points_mm, res, opts, level=level, side="none", how="from the skin entry around critical structures"
    )


def _pose(p: NDArray[np.float64], heading: NDArray[np.float64]) -> NDArray[np.float64]:
    z = heading / np.linalg.norm(heading)
    ref = np.array([1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x = np.cross(ref, z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = x, y, z, p
    return T


def _steer_traj(
    pts: NDArray[np.float64],
    res: SteerablePlanResult,
    opts: PlanOptions,
    *,
    level: str,
    side: str,
    how: str,
) -> Trajectory:
    assert res.path is not None
    stride = max(1, len(pts) // 400)
    keep = np.vstack([pts[::stride], pts[-1:]])
    length = float(np.sum(np.linalg.norm(np.diff(pts, axis=0), axis=1)))
    return Trajectory(
        id="steerable-1",
        kind="steerable_needle",
        level=level,
        side=side,
        entry_lps_mm=tuple(pts[0].tolist()),
        tip_lps_mm=tuple(pts[-1].tolist()),
        path_lps_mm=tuple(tuple(p) for p in keep.tolist()),
        diameter_mm=opts.steerable_diameter_mm,
        length_mm=length,
        metrics={
            "max_curvature_per_mm": res.path.max_curvature_per_mm,
            "kappa_max_per_mm": opts.steerable_kappa_max_per_mm,
            "min_clearance_mm": float(res.path.min_clearance_mm) if np.isfinite(res.path.min_clearance_mm) else 1000.0,
            "n_arcs": len(res.path.arcs),
            "approach": how,
        },
    )


__all__ = ["PlanOptions", "PlanResult", "plan_case"]
