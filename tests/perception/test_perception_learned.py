"""Learned vertebra segmentation: shipped weights, inference on a small phantom, error paths."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from needle_steering.errors import SegmentationError
from needle_steering.perception.learned import (
    CLASS_BONE,
    default_weights_path,
    load_model,
    normalise_intensity,
    predict_classes,
    target_classes,
)
from needle_steering.perception.metrics import dice
from needle_steering.perception.segment import segment_volume
from needle_steering.perception.volume import Volume
from needle_steering.sim.phantom import PhantomConfig, generate_phantom

#: Measured 0.891 (disc 0.911) on this phantom with the shipped weights; a regression below 0.85 fails here.
MIN_UNION_DICE = 0.85


@pytest.fixture(scope="module")
def small_phantom() -> tuple[Volume, Volume]:
    # Seed outside the training seeds (0..39); L2-L5 + sacrum at 2 mm: ~1 s to generate.
    phantom = generate_phantom(PhantomConfig(seed=4242, levels=("L2", "L3", "L4", "L5", "S"), spacing_mm=2.0))
    return phantom.ct, phantom.labels


def test_shipped_weights_load_on_cpu() -> None:
    path = default_weights_path()
    assert path.is_file() and path.stat().st_size < 5_000_000
    model = load_model(device="cpu")
    assert model.device == "cpu"
    assert model.config["spacing_mm"] == 2.0
    assert model.config["training"]["seed"] == 0


def test_predicted_bone_overlaps_the_truth(small_phantom: tuple[Volume, Volume]) -> None:
    ct, truth = small_phantom
    model = load_model(device="cpu")
    pred = predict_classes(ct, model, modality="ct")
    assert pred.work.same_grid(ct)  # a 2 mm LPS phantom is already on the network grid
    target = target_classes(truth.array)
    score = dice(pred.classes == CLASS_BONE, target == CLASS_BONE)
    assert score >= MIN_UNION_DICE, score


def test_learned_backend_names_levels(small_phantom: tuple[Volume, Volume]) -> None:
    ct, _ = small_phantom
    result = segment_volume(ct, backend="learned", device="cpu")
    assert result.backend == "learned" and result.device == "cpu"
    assert result.labels.same_grid(ct)
    # Named levels come out; their names are not yet reliable with the learned masks (the sacrum is often
    # split in two and the naming then loses its sacral anchor: MODEL_CARD.md, known gaps).
    assert len(result.levels) >= 4, result.levels
    assert all(1 <= entry["id"] <= 28 for entry in result.levels.values())
    assert any("weak prior" in w or "sacrum" in w or "rib" in w for w in result.warnings) or result.anchors


def test_missing_and_corrupt_weights_are_clear_errors(tmp_path: Path, small_phantom: tuple[Volume, Volume]) -> None:
    ct, _ = small_phantom
    with pytest.raises(SegmentationError, match="no weights at"):
        load_model(tmp_path / "absent.pt")
    corrupt = tmp_path / "vertebra_seg.pt"
    corrupt.write_bytes(b"not a torch file")
    shutil.copy(default_weights_path().with_suffix(".json"), corrupt.with_suffix(".json"))
    with pytest.raises(SegmentationError, match="cannot load weights"):
        segment_volume(ct, backend="learned", weights=str(corrupt))
    # auto falls back to the classical backend and says so.
    result = segment_volume(ct, backend="auto", weights=str(corrupt))
    assert result.backend == "classical"
    assert any("learned weights unavailable" in w for w in result.warnings)
    # A description that does not match the weights.
    shutil.copy(default_weights_path(), corrupt)
    spec = json.loads(corrupt.with_suffix(".json").read_text())
    spec["architecture"]["channels"] = [4, 8, 16, 32]
    corrupt.with_suffix(".json").write_text(json.dumps(spec))
    with pytest.raises(SegmentationError, match="cannot load weights"):
        load_model(corrupt)


def test_normalisation_and_bad_arguments() -> None:
    hu = np.array([-2000.0, -1000.0, 500.0, 2000.0, 3000.0])
    assert np.allclose(normalise_intensity(hu, "ct"), [-1, -1, 0, 1, 1])
    # A CBCT whose grey values are offset by +80: the soft-tissue peak returns to 40 HU.
    rng = np.random.default_rng(0)
    grey = np.concatenate([rng.normal(120.0, 10.0, 50_000), np.full(20_000, -1000.0)])
    shifted = (normalise_intensity(grey, "cbct") + 1.0) / 2.0 * 3000.0 - 1000.0
    assert abs(float(np.median(shifted[:50_000])) - 40.0) < 10.0
    with pytest.raises(SegmentationError, match="modality"):
        normalise_intensity(hu, "mri")
    with pytest.raises(SegmentationError, match="device"):
        load_model(device="tpu")
