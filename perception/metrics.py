"""Segmentation metrics: Dice, 95th-percentile Hausdorff distance, per-level tables.

Used by the tests, the benchmarks and the ``segment`` command's evaluation mode. Distances are in
millimetres and honour anisotropic spacing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from needle_steering.errors import LabelError
from needle_steering.perception.labels import VERTEBRA_NAMES
from needle_steering.perception.volume import Volume


def dice(a: NDArray[np.bool_], b: NDArray[np.bool_]) -> float:
    """Dice coefficient of two boolean masks of one shape (1.0 when both are empty)."""
    if a.shape != b.shape:
        raise LabelError(f"masks differ in shape: {a.shape} vs {b.shape}")
    total = int(a.sum()) + int(b.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / total


def _surface(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def hd95_mm(a: NDArray[np.bool_], b: NDArray[np.bool_], spacing_mm: NDArray[np.float64]) -> float:
    """Symmetric 95th-percentile surface distance (mm); ``inf`` when exactly one mask is empty."""
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float("inf")
    sa, sb = _surface(a), _surface(b)
    dist_to_b = ndimage.distance_transform_edt(~sb, sampling=spacing_mm)
    dist_to_a = ndimage.distance_transform_edt(~sa, sampling=spacing_mm)
    distances = np.concatenate([dist_to_b[sa], dist_to_a[sb]])
    return float(np.percentile(distances, 95))


def per_level_scores(predicted: Volume, reference: Volume, with_hd95: bool = False) -> dict[str, dict[str, Any]]:
    """Dice (and optionally HD95) for every vertebra present in either map.

    Args:
        predicted: Label map with VerSe ids.
        reference: Reference label map with VerSe ids, on the same grid.
        with_hd95: Also compute HD95 (slower).

    Returns:
        ``{level: {"id", "dice", "hd95_mm"?, "predicted_voxels", "reference_voxels"}}``.
    """
    predicted.require_same_grid(reference, "reference label map")
    pred = predicted.array
    ref = reference.array
    ids = sorted({int(v) for v in np.unique(pred)} | {int(v) for v in np.unique(ref)})
    scores: dict[str, dict[str, Any]] = {}
    for label_id in ids:
        if label_id not in VERTEBRA_NAMES:
            continue
        p, r = pred == label_id, ref == label_id
        entry: dict[str, Any] = {
            "id": label_id,
            "dice": dice(p, r),
            "predicted_voxels": int(p.sum()),
            "reference_voxels": int(r.sum()),
        }
        if with_hd95:
            entry["hd95_mm"] = hd95_mm(p, r, predicted.spacing_mm)
        scores[VERTEBRA_NAMES[label_id]] = entry
    return scores


def level_identification(predicted: Volume, reference: Volume, min_overlap: float = 0.5) -> dict[str, Any]:
    """Match predicted vertebrae to reference vertebrae by overlap and check the names agree.

    A reference vertebra counts as identified when the predicted label covering most of it (at
    least ``min_overlap`` of its voxels) carries the same id.

    Returns:
        ``{"correct": n, "total": m, "accuracy": n/m, "pairs": {reference_level: predicted_level|None}}``.
    """
    predicted.require_same_grid(reference, "reference label map")
    pred, ref = predicted.array, reference.array
    pairs: dict[str, str | None] = {}
    correct = 0
    ref_ids = [int(v) for v in np.unique(ref) if int(v) in VERTEBRA_NAMES]
    for label_id in ref_ids:
        inside = pred[ref == label_id]
        votes = inside[np.isin(inside, list(VERTEBRA_NAMES))]
        match: str | None = None
        if votes.size:
            values, counts = np.unique(votes, return_counts=True)
            best = int(values[np.argmax(counts)])
            if counts.max() >= min_overlap * inside.size:
                match = VERTEBRA_NAMES[best]
        pairs[VERTEBRA_NAMES[label_id]] = match
        correct += int(match == VERTEBRA_NAMES[label_id])
    total = len(ref_ids)
    return {"correct": correct, "total": total, "accuracy": correct / total if total else 1.0, "pairs": pairs}
