"""Vertebra segmentation entry point: ``segment_volume`` and the ``segment`` command.

Backends: ``classical`` (:mod:`needle_steering.perception.classical` + level naming in
:mod:`needle_steering.perception.levels`) and ``learned`` (:mod:`needle_steering.perception.learned`:
a MONAI U-Net's vertebral-bone and disc masks replace the thresholded bone; canal tracking, body
separation, watershed and naming are shared with the classical backend). ``auto`` runs the learned
backend when its weights load and their description (``vertebra_seg.json``) marks them
``"auto": true``, else the classical one, and says which in the result's warnings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from needle_steering.errors import ImageError, SegmentationError
from needle_steering.perception.labels import level_id
from needle_steering.perception.volume import Volume

Backend = Literal["auto", "classical", "learned"]
Device = Literal["auto", "cpu", "cuda"]
Modality = Literal["ct", "cbct"]


@dataclass
class SegmentationResult:
    """Output of :func:`segment_volume`.

    Attributes:
        labels: uint8 VerSe label map on the input's grid.
        levels: ``{name: {"id", "voxels", "volume_ml"}}`` for each named vertebra, cranial first.
        backend: Backend that ran.
        device: Device that ran.
        seconds: Wall time.
        level_confidence: 0-1 confidence of the level names.
        anchors: Anatomical anchors used for naming (``sacrum``, ``ribs``).
        warnings: Caveats a user must see.
    """

    labels: Volume
    levels: dict[str, dict[str, Any]]
    backend: str
    device: str
    seconds: float
    level_confidence: float
    anchors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-serialisable summary (the ``--json`` output of ``needle-steering segment``)."""
        return {
            "levels": self.levels,
            "backend": self.backend,
            "device": self.device,
            "seconds": round(self.seconds, 3),
            "level_confidence": round(self.level_confidence, 3),
            "anchors": self.anchors,
            "warnings": self.warnings,
        }


def check_ct_like(volume: Volume, modality: str) -> None:
    """Refuse images that cannot be a CT/CBCT in HU-like units (MRI, label maps, single slices)."""
    source = volume.metadata.get("source", "image")
    if min(volume.shape) < 3:
        raise ImageError(f"{source}: shape {volume.shape} is a slice, not a volume; segmentation needs 3-D")
    arr = volume.array
    if arr.dtype.kind not in "iuf":
        raise ImageError(f"{source}: voxel type {arr.dtype} is not numeric")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ImageError(f"{source}: NaN/Inf voxels")
    sample = arr[:: max(1, arr.shape[0] // 96), :: max(1, arr.shape[1] // 96), :: max(1, arr.shape[2] // 96)]
    lo, hi = float(np.percentile(sample, 1)), float(np.percentile(sample, 99.9))
    if modality == "ct" and lo > -500 and hi < 300:
        raise SegmentationError(
            f"{source}: intensities {lo:.0f}..{hi:.0f} (1st-99.9th percentile) are not CT Hounsfield units "
            "(air near -1000, bone above +300): an MRI or an uncalibrated image?"
        )
    if modality == "ct" and lo > -500:
        raise SegmentationError(f"{source}: no air below -500 HU (1st percentile {lo:.0f}): not a CT in HU")
    if hi < 300:
        raise SegmentationError(f"{source}: no bone: 99.9th percentile {hi:.0f} is below 300 HU")


def _min_extent_for_network(volume: Volume, spacing_mm: float) -> None:
    """The learned backend needs at least 3 voxels of its grid along every axis."""
    lo, hi = volume.extent_lps_mm()
    span = hi - lo
    if float(span.min()) < 2 * spacing_mm:
        raise SegmentationError(
            f"learned backend: the image spans only {float(span.min()):.1f} mm along one axis "
            f"(extent {np.round(span, 1).tolist()} mm); the network needs at least {2 * spacing_mm:g} mm"
        )


def _shipped_weights_enabled_for_auto() -> bool:
    """Whether the shipped ``vertebra_seg.json`` exists, parses and says ``"auto": true``.

    An unreadable or missing description returns ``True`` so that :func:`load_model` runs and reports
    the problem in its own words.
    """
    import json

    from needle_steering.perception.learned import default_weights_path

    try:
        config = json.loads(default_weights_path().with_suffix(".json").read_text())
    except (OSError, ValueError):
        return True
    return not isinstance(config, dict) or bool(config.get("auto", False))


def segment_volume(
    volume: Volume,
    backend: Backend = "auto",
    device: Device = "auto",
    modality: Modality = "ct",
    weights: str | None = None,
) -> SegmentationResult:
    """Segment and name the vertebrae of a CT or CBCT.

    Args:
        volume: The image (any orientation; LPS geometry).
        backend: ``classical``, ``learned`` or ``auto`` (learned when its weights are shipped, else classical).
        device: ``cpu``, ``cuda`` or ``auto`` (used by the learned backend; ``auto`` = CUDA when available).
        modality: ``ct`` (calibrated HU) or ``cbct``.
        weights: Learned-backend weights (``.pt`` with its ``.json`` beside it); default: the shipped ones.

    Returns:
        :class:`SegmentationResult` with the label map on the input grid.

    Raises:
        ImageError: Not a usable 3-D image.
        SegmentationError: No bone, no spine, a backend that is not available.
    """
    from needle_steering.perception.classical import segment_spine
    from needle_steering.perception.io import resample_like
    from needle_steering.perception.levels import assign_levels

    if modality not in ("ct", "cbct"):
        raise SegmentationError(f"modality must be 'ct' or 'cbct', got {modality!r}")
    if backend not in ("auto", "classical", "learned"):
        raise SegmentationError(f"backend must be auto, classical or learned, got {backend!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise SegmentationError(f"device must be auto, cpu or cuda, got {device!r}")
    start = time.perf_counter()
    pre_warnings: list[str] = []
    model = None
    if backend == "auto" and weights is None and not _shipped_weights_enabled_for_auto():
        # The shipped description says "not for auto": do not import torch/MONAI and build the network
        # (~3 s) only to discard it.
        pre_warnings.append(
            "auto backend: ran the classical backend (the shipped learned weights are not enabled for auto; "
            "see needle_steering/models/MODEL_CARD.md)"
        )
        backend = "classical"
    if backend in ("learned", "auto"):
        from needle_steering.perception.learned import load_model

        try:
            model = load_model(weights, device=device)
        except SegmentationError as exc:
            if backend == "learned":
                raise
            pre_warnings.append(f"auto backend: learned weights unavailable ({exc}); ran the classical backend")
        if model is not None and backend == "auto" and not model.config.get("auto", False):
            pre_warnings.append(
                "auto backend: ran the classical backend (the shipped learned weights are not enabled for auto; "
                "see needle_steering/models/MODEL_CARD.md)"
            )
            model = None
        elif model is not None and backend == "auto":
            pre_warnings.append(f"auto backend: ran the learned backend ({model.path.name})")
    if model is None and device == "cuda":
        raise SegmentationError("the classical backend runs on the CPU; --device cuda needs the learned backend")
    if model is not None:
        _min_extent_for_network(volume, float(model.config.get("spacing_mm", 2.0)))
    check_ct_like(volume, modality)
    if model is not None:
        from needle_steering.perception.learned import CLASS_BONE, CLASS_DISC, predict_classes

        prediction = predict_classes(volume, model, modality=modality)
        spine = segment_spine(
            volume, modality=modality, work_spacing_mm=float(prediction.work.spacing_mm[0]),
            spine_bone=prediction.classes == CLASS_BONE, disc=prediction.classes == CLASS_DISC,
        )
        ran, ran_device = "learned", prediction.device
    else:
        spine = segment_spine(volume, modality=modality)
        ran, ran_device = "classical", "cpu"
    naming = assign_levels(spine.features)
    spine.complete_sacrum(list(naming.names))
    lut = np.zeros(int(spine.segments.max()) + 1, np.uint8)
    for index, name in enumerate(naming.names, start=1):
        lut[index] = level_id(name) if name else 0
    work_labels = spine.work.with_array(lut[spine.segments])
    labels = resample_like(work_labels, volume, is_label=True)
    labels = volume.with_array(labels.array.astype(np.uint8), source="segmentation")
    voxel_ml = labels.voxel_volume_ml()
    levels: dict[str, dict[str, Any]] = {}
    for name in naming.names:
        if not name:
            continue
        count = int((labels.array == level_id(name)).sum())
        if count:
            levels[name] = {"id": level_id(name), "voxels": count, "volume_ml": round(count * voxel_ml, 2)}
    warnings = [*pre_warnings, *spine.warnings, *naming.warnings]
    return SegmentationResult(
        labels=labels,
        levels=levels,
        backend=ran,
        device=ran_device,
        seconds=time.perf_counter() - start,
        level_confidence=naming.confidence,
        anchors=naming.anchors,
        warnings=warnings,
    )
