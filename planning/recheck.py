"""Re-check and re-grade a trajectory whose entry the surgeon moved during plan review.

The tip (the target) stays where it was planned; the entry moves; the screw or needle is graded
again against the label map exactly as the planner grades its own trajectories. An unsafe
proposal is refused with the reason, never clamped back into a safe one: the surgeon decides.
The returned plan has a new hash, so every approval bound to the old plan is void.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from needle_steering.errors import PlanningError
from needle_steering.perception import labels as ids
from needle_steering.perception.volume import Volume
from needle_steering.planning.pedicle import PedicleOptions, check_screw_against_mask
from needle_steering.planning.plan_document import PlanDocument, volume_sha256

#: Shortest and longest straight trajectory a drag may produce (mm).
MIN_LENGTH_MM = 15.0
MAX_LENGTH_MM = 200.0
#: Clearance a biopsy needle keeps to critical structures (canal, aorta, vena cava), mm.
BIOPSY_MARGIN_MM = 3.0
#: Metrics that describe the planner's own trajectory and no longer hold after a drag.
_STALE_METRICS = ("density_score_mg", "density_gain", "mean_hu", "mean_bmd_mg_cm3", "pullout_force_n_estimate",
                  "baseline_density_score_mg", "baseline_feasible", "transverse_deg", "sagittal_deg",
                  "straight_ahead_diameter_mm", "straight_ahead_length_mm", "straight_ahead_density_score_mg")


def _critical_clearance_mm(labels: Volume, entry: np.ndarray, tip: np.ndarray) -> tuple[float, str]:
    """Smallest distance (mm) from the needle axis to a critical structure, sampled every 0.5 mm."""
    from scipy import ndimage

    length = float(np.linalg.norm(tip - entry))
    points = entry + np.outer(np.linspace(0.0, 1.0, max(2, int(length / 0.5) + 1)), tip - entry)
    best, name = float("inf"), ""
    for label_id, structure in ids.CRITICAL_STRUCTURES.items():
        mask = labels.array == label_id
        if not mask.any():
            continue
        distance = ndimage.distance_transform_edt(~mask, sampling=labels.spacing_mm)
        idx = labels.lps_to_index(points).T
        values = ndimage.map_coordinates(distance, idx, order=1, mode="nearest")
        if float(values.min()) < best:
            best, name = float(values.min()), structure
    return best, name


def recheck_trajectory(
    plan: PlanDocument,
    trajectory_id: str,
    entry_lps_mm: Sequence[float],
    *,
    ct: Volume,
    labels: Volume,
) -> PlanDocument:
    """Move ``trajectory_id``'s entry to ``entry_lps_mm`` (LPS mm), re-grade it, return the new plan.

    Raises:
        PlanningError: Unknown trajectory, a curved path, images other than the planning ones, an
            entry outside the image, or an adjusted trajectory that breaches (grade C or worse),
            enters another structure, or passes closer than the margin to a critical structure.
    """
    if volume_sha256(labels) != plan.labels.sha256 or volume_sha256(ct) != plan.image.sha256:
        raise PlanningError("re-check refused: the CT/labels given are not the ones this plan was made on")
    trajectory = plan.trajectory(trajectory_id)
    if trajectory.kind == "steerable_needle":
        raise PlanningError(f"{trajectory_id}: a curved steerable path cannot be adjusted by its entry; replan it")
    entry = np.asarray(entry_lps_mm, dtype=np.float64).reshape(-1)
    if entry.shape != (3,) or not np.all(np.isfinite(entry)):
        raise PlanningError(f"{trajectory_id}: entry must be 3 finite LPS mm values, got {list(entry_lps_mm)!r}")
    if not bool(labels.contains_lps(entry)):
        raise PlanningError(f"{trajectory_id}: entry {entry.round(2).tolist()} mm lies outside the image")
    tip = np.asarray(trajectory.tip_lps_mm, dtype=np.float64)
    length = float(np.linalg.norm(tip - entry))
    if not MIN_LENGTH_MM <= length <= MAX_LENGTH_MM:
        raise PlanningError(
            f"{trajectory_id}: adjusted length {length:.1f} mm outside [{MIN_LENGTH_MM}, {MAX_LENGTH_MM}] mm"
        )
    metrics = {k: v for k, v in trajectory.metrics.items() if k not in _STALE_METRICS}
    if trajectory.kind == "pedicle_screw":
        check = check_screw_against_mask(labels, ids.level_id(trajectory.level), entry, tip, trajectory.diameter_mm,
                                         entry_zone_mm=float(trajectory.metrics.get("entry_zone_mm", 0.0)))
        if check.grade not in ("A", "B"):
            raise PlanningError(
                f"{trajectory_id}: adjusted screw breaches the cortex by {check.breach_depth_mm:.1f} mm "
                f"(Gertzbein-Robbins {check.grade}); refused"
            )
        if check.enters_structures:
            raise PlanningError(f"{trajectory_id}: adjusted screw enters {', '.join(check.enters_structures)}; refused")
        metrics.update(predicted_grade=check.grade, breach_depth_mm=check.breach_depth_mm,
                       min_bone_clearance_mm=check.min_clearance_mm)
    clearance, structure = _critical_clearance_mm(labels, entry, tip)
    # a pedicle screw keeps the planner's own hard rule (>= 2 mm of medial wall, so its surface stays
    # >= 2 mm from the canal); 3 mm would refuse freshly planned screws that hug the medial wall
    surface_margin = PedicleOptions().medial_clearance_mm if trajectory.kind == "pedicle_screw" else BIOPSY_MARGIN_MM
    margin = surface_margin + trajectory.diameter_mm / 2.0
    if clearance < margin:
        raise PlanningError(
            f"{trajectory_id}: adjusted path passes {clearance:.1f} mm from the {structure} "
            f"(< {margin:.1f} mm); refused"
        )
    if np.isfinite(clearance):
        metrics["min_critical_clearance_mm"] = clearance
    metrics["adjusted_in_review"] = True
    adjusted = dataclasses.replace(
        trajectory,
        entry_lps_mm=(float(entry[0]), float(entry[1]), float(entry[2])),
        length_mm=length,
        path_lps_mm=(
            (float(entry[0]), float(entry[1]), float(entry[2])),
            (float(tip[0]), float(tip[1]), float(tip[2])),
        ),
        metrics=metrics,
        warnings=(*trajectory.warnings, "entry adjusted in review; density metrics no longer apply"),
    )
    trajectories = tuple(adjusted if t.id == trajectory_id else t for t in plan.trajectories)
    return dataclasses.replace(plan, trajectories=trajectories)


__all__ = ["recheck_trajectory"]
