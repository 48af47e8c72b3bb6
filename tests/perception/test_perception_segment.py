"""Classical vertebra segmentation and level naming on phantoms and real CT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from needle_steering.errors import ImageError, SegmentationError
from needle_steering.perception.io import read_volume
from needle_steering.perception.levels import assign_levels
from needle_steering.perception.metrics import dice, level_identification, per_level_scores
from needle_steering.perception.segment import segment_volume
from needle_steering.perception.volume import Volume
from needle_steering.sim.phantom import PhantomConfig, generate_phantom


@pytest.fixture(scope="module")
def phantom_ct() -> tuple[Volume, Volume]:
    phantom = generate_phantom(PhantomConfig(seed=11, spacing_mm=1.5))
    return phantom.ct, phantom.labels


def test_phantom_levels_are_named_correctly(phantom_ct: tuple[Volume, Volume]) -> None:
    ct, truth = phantom_ct
    result = segment_volume(ct, backend="classical")
    assert result.labels.same_grid(ct)
    ident = level_identification(result.labels, truth)
    named = {k: v for k, v in ident["pairs"].items() if k in {"T12", "L1", "L2", "L3", "L4", "L5"}}
    assert all(named[k] == k for k in named), ident["pairs"]
    assert result.anchors and result.level_confidence >= 0.6
    scores = per_level_scores(result.labels, truth)
    # Measured floor of the classical backend (posterior elements split at facet joints are
    # the main error); the 0.95 target is not met yet.
    for level in ("L1", "L2", "L3", "L4", "L5"):
        assert scores[level]["dice"] >= 0.75, (level, scores[level])
    assert set(result.levels) >= {"L1", "L2", "L3", "L4", "L5"}


@pytest.mark.parametrize("seed", [5, 8])
def test_cbct_names_are_right_or_flagged(seed: int) -> None:
    phantom = generate_phantom(PhantomConfig(seed=seed, modality="cbct", spacing_mm=1.5))
    result = segment_volume(phantom.ct, backend="classical", modality="cbct")
    ident = level_identification(result.labels, phantom.labels)
    lumbar = [ident["pairs"].get(name) == name for name in ("L1", "L2", "L3", "L4")]
    # Never a confident wrong shift: either every lumbar level is right, or the confidence says
    # the names must be checked.
    assert all(lumbar) or (result.level_confidence <= 0.5 and result.warnings), (ident, result.warnings)


def test_real_ct_segments_with_stated_uncertainty(shared_data: Path) -> None:
    ct = read_volume(shared_data / "abdomen_ct_3mm" / "ct.nii.gz")
    result = segment_volume(ct, backend="classical")
    assert len(result.levels) >= 5
    # Only the sacrum anchors the names here, and the L5/S1 disc is not resolved at 3 mm:
    # the result must say it is unsure rather than claim confident names.
    assert result.level_confidence <= 0.6
    assert any("verify" in w for w in result.warnings)


def test_naming_without_anchors_is_flagged() -> None:
    features = [{"volume_ml": 60.0, "width_mm": 45.0, "rib_bone_ml": 0.0, "touches_top": False,
                 "touches_bottom": False} for _ in range(3)]
    naming = assign_levels(features)
    assert naming.confidence <= 0.3 and "weak prior" in naming.warnings[0]


def test_metrics_on_known_shapes() -> None:
    a = np.zeros((10, 10, 10), bool)
    b = np.zeros((10, 10, 10), bool)
    a[2:6, 2:6, 2:6] = True
    b[3:7, 2:6, 2:6] = True
    assert dice(a, b) == pytest.approx(0.75)
    assert dice(a, a) == 1.0


def test_no_bone_is_refused() -> None:
    array = np.full((60, 60, 30), -1000.0, np.float32)
    array[10:50, 10:50, :] = 40.0
    array[0, 0, 0] = 400.0  # a single bright voxel is not a skeleton
    volume = Volume(array, [2, 2, 2], [0, 0, 0], np.eye(3))
    with pytest.raises(SegmentationError, match=r"no bone|no spinal canal"):
        segment_volume(volume, backend="classical")


def test_mri_like_intensities_are_refused() -> None:
    rng = np.random.default_rng(0)
    volume = Volume(rng.uniform(0, 250, (40, 40, 30)).astype(np.float32), [1, 1, 1], [0, 0, 0], np.eye(3))
    with pytest.raises(SegmentationError, match="not CT Hounsfield"):
        segment_volume(volume)


def test_single_slice_and_unavailable_backend() -> None:
    slab = Volume(np.zeros((64, 64, 1), np.int16), [1, 1, 1], [0, 0, 0], np.eye(3))
    with pytest.raises(ImageError, match="not a volume"):
        segment_volume(slab)
    with pytest.raises(SegmentationError, match="learned backend"):
        segment_volume(slab, backend="learned")


def test_thin_dicom_series_segments_with_a_weak_name(shared_data: Path) -> None:
    ct = read_volume(shared_data / "dicom_ct_1mm" / "series")
    result = segment_volume(ct)
    assert result.levels, "the T12 in view must be found"
    # 40 mm of spine, no sacrum, no lumbar transition: the name is a guess and must say so.
    assert result.level_confidence <= 0.3
    assert any("weak prior" in w for w in result.warnings)
