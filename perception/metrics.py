"""Segmentation metrics: Dice, HD95, per-level tables and level-identification accuracy.

All functions take plain arrays (or :class:`~needle_steering.perception.volume.Volume` label maps
via :func:`evaluate_labels`) indexed ``[i, j, k]``; distances are in millimetres using the voxel
spacing. Used by the tests, the benchmarks and the model card.

Conventions
-----------
* Dice of two empty masks is 1.0 (nothing to find, nothing found); Dice of one empty mask is 0.0.
* HD95 is the larger of the two directed 95th-percentile surface distances (the MONAI /
  medical-segmentation-decathlon definition); it is ``inf`` when exactly one mask is empty and
  0.0 when both are. Surfaces are the mask voxels with a 6-connected background neighbour;
  distances come from Euclidean distance transforms with anisotropic spacing, evaluated only in the
  bounding box of the two masks (plus a margin), so the cost scales with the object, not the image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from needle_steering.errors import GeometryError, LabelError
from needle_steering.perception.labels import VERTEBRA_NAMES, is_vertebra
from needle_steering.perception.volume import Volume, validate_spacing

__all__ = [
    "LevelMatch",
    "dice",
    "evaluate_labels",
    "format_level_table",
    "hd95_mm",
    "level_identification",
    "per_level_metrics",
    "per_level_scores",
    "surface_distances_mm",
]


def _as_mask(mask: ArrayLike, name: str) -> NDArray[np.bool_]:
    arr = np.asarray(mask)
    if arr.ndim != 3:
        raise GeometryError(f"{name} must be a 3-D array, got shape {arr.shape}")
    return arr.astype(bool, copy=False)


def _check_pair(a: NDArray[Any], b: NDArray[Any]) -> None:
    if a.shape != b.shape:
        raise GeometryError(f"masks have different shapes: {a.shape} vs {b.shape}")


def dice(pred: ArrayLike, ref: ArrayLike) -> float:
    """Dice coefficient ``2|A∩B| / (|A|+|B|)`` of two binary masks of shape ``(I, J, K)``.

    Returns 1.0 when both masks are empty.
    """
    a = _as_mask(pred, "pred")
    b = _as_mask(ref, "ref")
    _check_pair(a, b)
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * float(np.logical_and(a, b).sum()) / float(total)


def _surface(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    from scipy import ndimage as ndi

    eroded = ndi.binary_erosion(mask, structure=ndi.generate_binary_structure(3, 1), border_value=0)
    return mask & ~eroded


def surface_distances_mm(
    pred: ArrayLike, ref: ArrayLike, spacing_mm: ArrayLike
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Directed surface distances between two non-empty masks.

    Args:
        pred: Binary mask ``(I, J, K)``.
        ref: Binary mask ``(I, J, K)``.
        spacing_mm: Voxel spacing ``(3,)`` in millimetres.

    Returns:
        ``(d_pred_to_ref, d_ref_to_pred)``: distances (mm) from each surface voxel of ``pred`` to the
        nearest surface voxel of ``ref``, shape ``(n_pred_surface,)``, and the reverse.

    Raises:
        LabelError: Either mask is empty.
    """
    from scipy import ndimage as ndi

    a = _as_mask(pred, "pred")
    b = _as_mask(ref, "ref")
    _check_pair(a, b)
    spacing = validate_spacing(spacing_mm, "surface distance spacing")
    if not a.any() or not b.any():
        raise LabelError(f"surface distances need two non-empty masks (pred {int(a.sum())}, ref {int(b.sum())} voxels)")
    union = a | b
    idx = np.argwhere(union)
    lo = np.maximum(idx.min(axis=0) - 2, 0)
    hi = np.minimum(idx.max(axis=0) + 3, np.asarray(a.shape))
    box = tuple(slice(int(s), int(e)) for s, e in zip(lo, hi, strict=True))
    sa = _surface(a[box])
    sb = _surface(b[box])
    dist_to_b = ndi.distance_transform_edt(~sb, sampling=spacing)
    dist_to_a = ndi.distance_transform_edt(~sa, sampling=spacing)
    return np.asarray(dist_to_b[sa], np.float64), np.asarray(dist_to_a[sb], np.float64)


def hd95_mm(pred: ArrayLike, ref: ArrayLike, spacing_mm: ArrayLike, percentile: float = 95.0) -> float:
    """Symmetric 95th-percentile Hausdorff distance (mm) between two binary masks.

    Args:
        pred: Binary mask ``(I, J, K)``.
        ref: Binary mask ``(I, J, K)``.
        spacing_mm: Voxel spacing ``(3,)`` in millimetres.
        percentile: Percentile of each directed distance set (95 for HD95, 100 for Hausdorff).

    Returns:
        ``max(P95(d(pred->ref)), P95(d(ref->pred)))`` in mm; 0.0 if both masks are empty, ``inf`` if
        exactly one is.
    """
    a = _as_mask(pred, "pred")
    b = _as_mask(ref, "ref")
    _check_pair(a, b)
    if not (0.0 < percentile <= 100.0):
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    has_a, has_b = bool(a.any()), bool(b.any())
    if not has_a and not has_b:
        return 0.0
    if has_a != has_b:
        return float("inf")
    d_ab, d_ba = surface_distances_mm(a, b, spacing_mm)
    return float(max(np.percentile(d_ab, percentile), np.percentile(d_ba, percentile)))


def _check_label_pair(pred: ArrayLike, ref: ArrayLike) -> tuple[NDArray[np.integer], NDArray[np.integer]]:
    p = np.asarray(pred)
    r = np.asarray(ref)
    if p.ndim != 3 or r.ndim != 3:
        raise GeometryError(f"label maps must be 3-D, got shapes {p.shape} and {r.shape}")
    _check_pair(p, r)
    for name, arr in (("pred", p), ("ref", r)):
        if arr.dtype.kind not in "iub":
            raise LabelError(f"{name} label map must hold integers, got dtype {arr.dtype}")
    return p, r


def _vertebra_ids(arr: NDArray[np.integer]) -> list[int]:
    return [int(v) for v in np.unique(arr) if v != 0 and is_vertebra(int(v))]


def per_level_metrics(
    pred: ArrayLike,
    ref: ArrayLike,
    spacing_mm: ArrayLike,
    *,
    min_ref_voxels: int = 1,
    with_hd95: bool = True,
) -> dict[str, dict[str, float]]:
    """Dice (and HD95) per vertebra level present in the reference.

    Args:
        pred: Predicted label map ``(I, J, K)`` with VerSe ids.
        ref: Reference label map ``(I, J, K)`` with VerSe ids (other ids are ignored).
        spacing_mm: Voxel spacing ``(3,)``, mm.
        min_ref_voxels: Skip reference levels with fewer voxels (e.g. a sliver cut by the field of view).
        with_hd95: Also compute HD95 (slower).

    Returns:
        ``{level name: {"id", "dice", "hd95_mm", "ref_voxels", "pred_voxels", "ref_ml", "pred_ml"}}``,
        ordered cranial to caudal (by VerSe id; T13 after T12, L6 after L5).
    """
    p, r = _check_label_pair(pred, ref)
    spacing = validate_spacing(spacing_mm, "metrics spacing")
    voxel_ml = float(np.prod(spacing)) / 1000.0
    ref_counts = np.bincount(r.ravel().astype(np.int64), minlength=256)
    pred_counts = np.bincount(p.ravel().astype(np.int64), minlength=256)

    def order(label: int) -> float:
        return {28: 19.5, 25: 24.5}.get(label, float(label))

    table: dict[str, dict[str, float]] = {}
    for label in sorted(_vertebra_ids(r), key=order):
        n_ref = int(ref_counts[label])
        if n_ref < min_ref_voxels:
            continue
        a = p == label
        b = r == label
        row = {
            "id": float(label),
            "dice": dice(a, b),
            "ref_voxels": float(n_ref),
            "pred_voxels": float(pred_counts[label]),
            "ref_ml": n_ref * voxel_ml,
            "pred_ml": float(pred_counts[label]) * voxel_ml,
        }
        if with_hd95:
            row["hd95_mm"] = hd95_mm(a, b, spacing)
        table[VERTEBRA_NAMES[label]] = row
    return table


@dataclass(frozen=True)
class LevelMatch:
    """How one reference vertebra was labelled.

    Attributes:
        ref_name: Reference level name.
        pred_name: Name of the predicted label covering most of the reference vertebra's voxels
            (``""`` when no predicted vertebra overlaps it).
        overlap_fraction: Fraction of the reference voxels covered by that predicted label.
        correct: Whether the names agree.
    """

    ref_name: str
    pred_name: str
    overlap_fraction: float
    correct: bool


def _label_array(labels: Volume | ArrayLike) -> NDArray[Any]:
    return labels.array if isinstance(labels, Volume) else np.asarray(labels)


def level_identification(
    pred: Volume | ArrayLike,
    ref: Volume | ArrayLike,
    *,
    min_ref_voxels: int = 1,
    min_overlap_fraction: float = 0.1,
) -> dict[str, Any]:
    """Match predicted vertebrae to reference vertebrae by overlap and check their names.

    Every reference level with at least ``min_ref_voxels`` voxels is matched to the predicted
    vertebra id covering the largest part of it; the level is *found* when that part is at least
    ``min_overlap_fraction`` of the reference and *correct* when the ids agree.

    Args:
        pred: Predicted label map ``(I, J, K)`` (VerSe ids), array or :class:`Volume`.
        ref: Reference label map ``(I, J, K)`` (VerSe ids), array or :class:`Volume` on the same grid.
        min_ref_voxels: Ignore reference levels smaller than this (field-of-view slivers).
        min_overlap_fraction: Minimum covered fraction to count as found.

    Returns:
        ``{"pairs": {ref name: predicted name or ""}, "correct": int, "total": int,
        "accuracy": float (1.0 when nothing was evaluated), "shift": int (consistent offset in
        VerSe ids when every matched level is off by the same non-zero amount, else 0),
        "extra_pred": [predicted names overlapping no reference vertebra],
        "matches": [LevelMatch, ...] cranial to caudal}``.
    """
    if isinstance(pred, Volume) and isinstance(ref, Volume):
        ref.require_same_grid(pred, "predicted label map")
    p, r = _check_label_pair(_label_array(pred), _label_array(ref))
    ref_ids = [v for v in _vertebra_ids(r) if int((r == v).sum()) >= min_ref_voxels]
    pred_ids = set(_vertebra_ids(p))
    matches: list[LevelMatch] = []
    used: set[int] = set()
    offsets: list[int] = []
    for label in sorted(ref_ids):
        inside = p[r == label]
        inside = inside[np.isin(inside, list(pred_ids))] if pred_ids else inside[:0]
        if inside.size == 0:
            matches.append(LevelMatch(VERTEBRA_NAMES[label], "", 0.0, False))
            continue
        ids, counts = np.unique(inside, return_counts=True)
        best = int(ids[int(np.argmax(counts))])
        frac = float(counts.max()) / float((r == label).sum())
        if frac < min_overlap_fraction:
            matches.append(LevelMatch(VERTEBRA_NAMES[label], "", frac, False))
            continue
        used.add(best)
        offsets.append(best - label)
        matches.append(LevelMatch(VERTEBRA_NAMES[label], VERTEBRA_NAMES[best], frac, best == label))
    extra = [VERTEBRA_NAMES[v] for v in sorted(pred_ids - used) if not np.any((p == v) & (r > 0))]
    correct = sum(m.correct for m in matches)
    shift = offsets[0] if offsets and all(o == offsets[0] for o in offsets) else 0
    return {
        "pairs": {m.ref_name: m.pred_name for m in matches},
        "correct": int(correct),
        "total": len(matches),
        "accuracy": float(correct) / len(matches) if matches else 1.0,
        "shift": int(shift),
        "extra_pred": extra,
        "matches": matches,
    }


def per_level_scores(
    pred: Volume, ref: Volume, *, min_ref_ml: float = 0.0, with_hd95: bool = False
) -> dict[str, dict[str, float]]:
    """:func:`per_level_metrics` for two label volumes on the same grid (HD95 off by default).

    Raises:
        GeometryError: The label maps are on different grids.
    """
    ref.require_same_grid(pred, "predicted label map")
    min_voxels = max(1, int(np.ceil(min_ref_ml / ref.voxel_volume_ml())))
    return per_level_metrics(pred.array, ref.array, ref.spacing_mm, min_ref_voxels=min_voxels, with_hd95=with_hd95)


def evaluate_labels(
    pred: Volume, ref: Volume, *, min_ref_ml: float = 1.0, with_hd95: bool = True
) -> dict[str, Any]:
    """Per-level metrics and level identification of two label volumes on the same grid.

    Args:
        pred: Predicted label map (VerSe ids).
        ref: Reference label map (VerSe ids; convert TotalSegmentator maps first).
        min_ref_ml: Reference levels smaller than this (ml) are left out (cut by the field of view).
        with_hd95: Also compute HD95.

    Returns:
        ``{"levels": per-level table, "mean_dice", "min_dice", "level_accuracy", "level_shift",
        "level_matches": [(ref, pred, correct)], "extra_pred": [...]}``.

    Raises:
        GeometryError: The label maps are on different grids.
    """
    ref.require_same_grid(pred, "predicted label map")
    min_voxels = max(1, int(np.ceil(min_ref_ml / ref.voxel_volume_ml())))
    table = per_level_metrics(
        pred.array, ref.array, ref.spacing_mm, min_ref_voxels=min_voxels, with_hd95=with_hd95
    )
    ident = level_identification(pred.array, ref.array, min_ref_voxels=min_voxels)
    matches: list[LevelMatch] = ident["matches"]
    dices = [row["dice"] for row in table.values()]
    return {
        "levels": table,
        "mean_dice": float(np.mean(dices)) if dices else float("nan"),
        "min_dice": float(np.min(dices)) if dices else float("nan"),
        "level_accuracy": ident["accuracy"],
        "level_shift": ident["shift"],
        "level_matches": [(m.ref_name, m.pred_name, m.correct) for m in matches],
        "extra_pred": list(ident["extra_pred"]),
    }


def format_level_table(table: dict[str, dict[str, float]]) -> str:
    """Plain-text table of :func:`per_level_metrics` output (one row per level)."""
    lines = [f"{'level':<6}{'dice':>8}{'hd95_mm':>10}{'ref_ml':>9}{'pred_ml':>9}"]
    for name, row in table.items():
        hd = row.get("hd95_mm", float("nan"))
        lines.append(f"{name:<6}{row['dice']:>8.3f}{hd:>10.2f}{row['ref_ml']:>9.1f}{row['pred_ml']:>9.1f}")
    return "\n".join(lines)
