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


def test_real_ct_levels_and_dice(shared_data: Path) -> None:
    """3 mm abdominal CT (T12 to sacrum): every level named right, Dice against TotalSegmentator."""
    from needle_steering.perception.io import resample_like
    from needle_steering.perception.labels import from_totalsegmentator

    folder = shared_data / "abdomen_ct_3mm"
    ct = read_volume(folder / "ct.nii.gz")
    ref = read_volume(folder / "labels_totalsegmentator_total.nii.gz")
    ref = ref.with_array(from_totalsegmentator(ref.array.astype(np.int32), vertebrae_only=True))
    if not ref.same_grid(ct):
        ref = resample_like(ref, ct, is_label=True)
    result = segment_volume(ct, backend="classical")
    # T11 is a 2 ml sliver at the top edge: evaluate levels of at least 5 ml.
    ident = level_identification(result.labels, ref, min_ref_voxels=int(5.0 / ref.voxel_volume_ml()))
    assert ident["accuracy"] == 1.0 and ident["shift"] == 0, ident["pairs"]
    scores = per_level_scores(result.labels, ref, min_ref_ml=5.0)
    # Measured (centreline-profile discs, re-fitted tilted L5/S1 disc, sacrum followed below the canal ring):
    # T12 0.74, L1 0.83, L2 0.85, L3 0.87, L4 0.89, L5 0.82, S 0.60; the 0.85 target is met for L2-L4 only.
    for level, floor in {"T12": 0.7, "L1": 0.79, "L2": 0.81, "L3": 0.83, "L4": 0.85, "L5": 0.77, "S": 0.55}.items():
        assert scores[level]["dice"] >= floor, (level, scores[level])
    # L5/S1 comes from the tilted disc, not from splitting a too-tall body.
    assert not any("tall body" in w for w in result.warnings), result.warnings
    # One anchor (sacrum, by its sacroiliac contact) only: the names are right but the result must still ask
    # for verification.
    assert result.anchors == ["sacrum"]
    assert result.level_confidence <= 0.6
    assert any("verify" in w for w in result.warnings)


def test_sacrum_found_by_shape_below_the_canal_ring() -> None:
    """L2-S phantom: the sacrum is followed below the last closed canal ring and anchors the names."""
    phantom = generate_phantom(PhantomConfig(seed=105, spacing_mm=1.5, levels=("L2", "L3", "L4", "L5", "S")))
    result = segment_volume(phantom.ct, backend="classical")
    ident = level_identification(result.labels, phantom.labels)
    assert all(ident["pairs"].get(name) == name for name in ("L2", "L3", "L4", "L5", "S")), ident["pairs"]
    assert "sacrum" in result.anchors
    scores = per_level_scores(result.labels, phantom.labels)
    # Measured: L5 0.91, S 0.77 (before: every name shifted, S 0.0).
    assert scores["S"]["dice"] >= 0.7 and scores["L5"]["dice"] >= 0.85, scores


def test_sacrum_and_rib_anchors_agree_raise_confidence() -> None:
    """T11-S phantom with ribs on T12 and above: both anchors agree, confidence 0.95."""
    phantom = generate_phantom(PhantomConfig(seed=101, spacing_mm=1.5))
    result = segment_volume(phantom.ct, backend="classical")
    ident = level_identification(result.labels, phantom.labels)
    assert ident["accuracy"] == 1.0, ident["pairs"]
    assert set(result.anchors) == {"sacrum", "ribs"}
    assert result.level_confidence >= 0.95


def _feature(volume_ml: float, rib_ml: float = 0.0, iliac_ml: float = 0.0) -> dict[str, object]:
    return {"volume_ml": volume_ml, "width_mm": 50.0, "rib_bone_ml": rib_ml, "touches_top": False,
            "touches_bottom": False, "iliac_contact_ml": iliac_ml, "sacral_checked": True}


def test_sacrum_anchor_needs_sacroiliac_contact() -> None:
    """A big caudal segment without iliac contact (L5 + debris) is not taken for the sacrum."""
    lumbar = [_feature(40.0) for _ in range(4)]
    naming = assign_levels([_feature(40.0, rib_ml=4.0), *lumbar, _feature(90.0)])
    assert "sacrum" not in naming.anchors and naming.names[0] == "T12" and naming.names[-1] == "L5"
    naming = assign_levels([*lumbar, _feature(40.0), _feature(150.0, iliac_ml=20.0)])
    assert naming.anchors == ["sacrum"] and naming.names[-2:] == ["L5", "S"]


def test_disagreeing_anchors_lower_confidence_and_warn() -> None:
    """Six mobile segments between the last rib and the sacrum (an L6, or a missed disc): never 0.95."""
    segments = [_feature(40.0, rib_ml=4.0), *[_feature(40.0) for _ in range(6)], _feature(150.0, iliac_ml=20.0)]
    naming = assign_levels(segments)
    assert set(naming.anchors) == {"sacrum", "ribs"}
    assert naming.confidence <= 0.4
    assert any("anchors disagree" in w for w in naming.warnings)
    agree = [_feature(40.0, rib_ml=4.0), *[_feature(40.0) for _ in range(5)], _feature(150.0, iliac_ml=20.0)]
    assert assign_levels(agree).confidence >= 0.95


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


def test_thin_dicom_series_t12_dice(shared_data: Path) -> None:
    """1 mm DICOM at the thoraco-lumbar junction: the vertebra overlapping T12 is found (weak name)."""
    from needle_steering.perception.io import resample_like
    from needle_steering.perception.labels import from_totalsegmentator

    folder = shared_data / "dicom_ct_1mm"
    ct = read_volume(folder / "series")
    ref = read_volume(folder / "labels_totalsegmentator_total.nii.gz")
    ref = resample_like(ref.with_array(from_totalsegmentator(ref.array.astype(np.int32), vertebrae_only=True)),
                        ct, is_label=True)
    result = segment_volume(ct, backend="classical")
    ident = level_identification(result.labels, ref, min_ref_voxels=int(5.0 / ref.voxel_volume_ml()))
    assert ident["pairs"].get("T12") == "T12", ident["pairs"]
    # Measured 0.33: the partial T11/T12 pair in 40 mm is not yet separated (known gap, issue 3).
    assert per_level_scores(result.labels, ref)["T12"]["dice"] >= 0.3


def test_partial_fov_phantom_is_named_or_flagged() -> None:
    """A phantom cut to three lumbar vertebrae (no sacrum, no ribs): never a confident shift."""
    phantom = generate_phantom(PhantomConfig(seed=21, spacing_mm=2.0, levels=("L2", "L3", "L4"), margin_mm=0.0,
                                             context_levels=False))
    result = segment_volume(phantom.ct, backend="classical")
    ident = level_identification(result.labels, phantom.labels)
    right = all(ident["pairs"].get(name) == name for name in ("L2", "L3", "L4"))
    assert right or (result.level_confidence <= 0.3 and any("verify" in w for w in result.warnings)), (
        ident["pairs"], result.level_confidence, result.warnings)
