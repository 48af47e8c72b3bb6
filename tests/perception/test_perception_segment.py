"""Classical vertebra segmentation and level naming on phantoms and real CT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from needle_steering.errors import ImageError, SegmentationError
from needle_steering.perception.canal import untracked_extent_mm
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
    # Measured 0.94-0.96 for L1-L5 (facet clefts not crossed, local half-contrast surface, field-of-view edges
    # kept); before: 0.89-0.92. The remaining error: inferior articular processes that touch the vertebra
    # below through partial volume, and the one-voxel surface shell.
    for level in ("L1", "L2", "L3", "L4", "L5"):
        assert scores[level]["dice"] >= 0.92, (level, scores[level])
    # T11, cut by the top of the field of view, is not thinned at the cut (before: 0.83).
    assert scores["T11"]["dice"] >= 0.92, scores["T11"]
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


def test_cbct_sacrum_and_dice() -> None:
    """CBCT phantom 103 (cupping, grey drift, streaks, 200 mm FOV): every level named from both anchors, Dice per level.

    Before the spine-local grey calibration the sacrum was missed (S Dice 0.0, named from the ribs alone at 0.6)
    and the vertebrae scored 0.70-0.78. Facet clefts on the calibrated CBCT took L1-L5 from 0.90-0.92 to 0.91-0.93.
    """
    phantom = generate_phantom(PhantomConfig(seed=103, modality="cbct", spacing_mm=1.5))
    result = segment_volume(phantom.ct, backend="classical", modality="cbct")
    ident = level_identification(result.labels, phantom.labels,
                                 min_ref_voxels=int(5.0 / phantom.labels.voxel_volume_ml()))
    assert ident["accuracy"] == 1.0 and ident["shift"] == 0, ident["pairs"]
    assert set(result.anchors) == {"sacrum", "ribs"} and result.level_confidence >= 0.9, result.warnings
    scores = per_level_scores(result.labels, phantom.labels, min_ref_ml=2.0)
    # Measured: T11 0.89, T12 0.89, L1 0.93, L2 0.91, L3 0.91, L4 0.93, L5 0.93, S 0.83 (without the facet clefts
    # L1 0.907, L2 0.898, L4 0.909).
    for level, floor in {"T11": 0.86, "T12": 0.87, "L1": 0.915, "L2": 0.89, "L3": 0.89, "L4": 0.915, "L5": 0.91,
                         "S": 0.80}.items():
        assert scores[level]["dice"] >= floor, (level, scores[level])


def test_cbct_2mm_peel_keeps_the_bone_layer() -> None:
    """CBCT phantom 104 on a 2 mm grid: one rim layer peeled at the local half maximum (no global floor).

    Without a peel the thresholded surface lies a voxel outside the bone (L1-L5 0.84-0.87); the 1.5 mm peel (floor
    at the mapped cortex mid-level, two passes) took a whole bone layer (mean 0.72). Measured: L1-L5 0.90-0.91.
    """
    phantom = generate_phantom(PhantomConfig(seed=104, modality="cbct", spacing_mm=2.0))
    result = segment_volume(phantom.ct, backend="classical", modality="cbct")
    ident = level_identification(result.labels, phantom.labels)
    assert ident["accuracy"] == 1.0 and ident["shift"] == 0, ident["pairs"]
    scores = per_level_scores(result.labels, phantom.labels)
    for level in ("L1", "L2", "L3", "L4", "L5"):
        assert scores[level]["dice"] >= 0.885, (level, scores[level])


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
    # Measured: T12 0.86, L1 0.88, L2 0.87, L3 0.90, L4 0.90, L5 0.86, S 0.81 (vertebral-body marrow holes
    # filled in sagittal/coronal planes, and in-plane where the canal track took a marrow hole for the canal;
    # the top slice kept by an edge-aware closing, fatty sacral marrow inside a 15 mm closing and the alae up to
    # the ilium); the 0.85 target is met for T12-L5.
    for level, floor in {"T12": 0.84, "L1": 0.85, "L2": 0.84, "L3": 0.87, "L4": 0.87, "L5": 0.83, "S": 0.78}.items():
        assert scores[level]["dice"] >= floor, (level, scores[level])
    # L5/S1 comes from the tilted disc, not from splitting a too-tall body.
    assert not any("tall body" in w for w in result.warnings), result.warnings
    # Both anchors: the sacrum (sacroiliac contact) and the last rib-bearing vertebra (the 12th ribs articulate
    # with T12, partly inside the spine ROI) agree.
    assert set(result.anchors) == {"sacrum", "ribs"}
    assert result.level_confidence >= 0.95
    assert not any("anchors disagree" in w for w in result.warnings)


def test_real_ct_lumbosacral_field_of_view(shared_data: Path) -> None:
    """The lower half of the real CT (part of L4, L5, sacrum, pubic bones): the canal rings close in 3 lumbar slices
    only, and the pubic symphysis encloses dark holes in 6. Those lie in the front of the trunk, not the canal.
    Before, the pubis was tracked as the canal and the names were all wrong (confidence 0.6)."""
    from needle_steering.perception.labels import from_totalsegmentator

    folder = shared_data / "abdomen_ct_3mm"
    ct = read_volume(folder / "ct.nii.gz")
    ref = read_volume(folder / "labels_totalsegmentator_total.nii.gz")
    n_k = ct.shape[2] // 2 + 5
    lower = Volume(ct.array[:, :, :n_k], ct.spacing_mm, ct.origin_lps_mm, ct.direction, {"source": "lower half"})
    ref_ids = from_totalsegmentator(ref.array[:, :, :n_k].astype(np.int32), vertebrae_only=True)
    result = segment_volume(lower, backend="classical")
    truth = lower.with_array(ref_ids)
    ident = level_identification(result.labels, truth, min_ref_voxels=int(5.0 / truth.voxel_volume_ml()))
    assert ident["accuracy"] == 1.0 and ident["shift"] == 0, ident["pairs"]
    scores = per_level_scores(result.labels, truth, min_ref_ml=5.0)
    # Measured: L4 (partial) 0.82, L5 0.83, S 0.75.
    assert {"L5", "S"} <= set(scores) and min(float(s["dice"]) for s in scores.values()) >= 0.72, scores


@pytest.mark.parametrize(("spacing_mm", "floor"), [(1.5, 0.68), (2.0, 0.66)])
def test_real_ct_on_a_fine_grid_with_unresolved_cortex(shared_data: Path, spacing_mm: float, floor: float) -> None:
    """The 3 mm CT interpolated to a finer grid: its cortex stays blurred (spine cortex level 390-450 HU).
    At 1.5 mm the 200 HU threshold leaves the canal's ring open: before, "no spinal canal found"; now the 120 HU
    threshold. At 2 mm the surface peel took whole cortices (Dice 0.49-0.70). Neither peel nor clefts run now."""
    from needle_steering.perception.io import resample_like, resample_to_spacing
    from needle_steering.perception.labels import from_totalsegmentator

    folder = shared_data / "abdomen_ct_3mm"
    ct = resample_to_spacing(read_volume(folder / "ct.nii.gz"), [spacing_mm] * 3)
    ref = read_volume(folder / "labels_totalsegmentator_total.nii.gz")
    ref = resample_like(ref.with_array(from_totalsegmentator(ref.array.astype(np.int32), vertebrae_only=True)), ct,
                        is_label=True)
    result = segment_volume(ct, backend="classical")
    if spacing_mm <= 1.6:
        assert any("cortex is not resolved" in w for w in result.warnings), result.warnings
    ident = level_identification(result.labels, ref, min_ref_voxels=int(5.0 / ref.voxel_volume_ml()))
    assert ident["accuracy"] == 1.0 and ident["shift"] == 0, ident["pairs"]
    scores = per_level_scores(result.labels, ref, min_ref_ml=5.0)
    # Measured at 1.5 mm: T12 0.84, L1 0.80, L2 0.79, L3 0.83, L4 0.85, L5 0.72, S 0.72;
    # at 2 mm: 0.86, 0.83, 0.82, 0.85, 0.84, 0.77, 0.70.
    assert min(float(s["dice"]) for s in scores.values()) >= floor, scores


@pytest.mark.parametrize(("sigma_hu", "seed"), [(20.0, 2), (30.0, 0), (40.0, 2)])
def test_real_ct_with_image_noise_is_named(shared_data: Path, sigma_hu: float, seed: int) -> None:
    """The 3 mm CT with white noise added (a low-dose / large-patient scan): every level named right.

    Before: (20 HU, seed 2) L5/S1 lost and a dip inside L1 taken for a disc, all names shifted at confidence 0.95;
    (30 HU, seed 0) L5/S1 lost, and L3 split as "too tall" against the short parts of bodies that the noise broke
    up; (40 HU, seed 2) L5/S1 lost; both flagged 0.4. The body column ended at L5's endplate, so the L5/S1 disc lay
    beyond the centreline profile.
    """
    from needle_steering.perception.labels import from_totalsegmentator

    folder = shared_data / "abdomen_ct_3mm"
    ct = read_volume(folder / "ct.nii.gz")
    ref = read_volume(folder / "labels_totalsegmentator_total.nii.gz")
    ref = ref.with_array(from_totalsegmentator(ref.array.astype(np.int32), vertebrae_only=True))
    rng = np.random.default_rng(seed)
    noisy = ct.with_array((ct.array + rng.normal(0.0, sigma_hu, ct.shape)).astype(np.float32))
    result = segment_volume(noisy, backend="classical")
    ident = level_identification(result.labels, ref, min_ref_voxels=int(5.0 / ref.voxel_volume_ml()))
    assert ident["accuracy"] == 1.0 and ident["shift"] == 0, ident["pairs"]
    assert result.level_confidence >= 0.95
    scores = per_level_scores(result.labels, ref, min_ref_ml=5.0)
    # Measured: min Dice 0.81 (20 HU), 0.80 (30 HU), 0.79 (40 HU); clean 0.81.
    assert min(float(s["dice"]) for s in scores.values()) >= 0.75, scores
    assert not any("tall body" in w for w in result.warnings), result.warnings


def test_close_clear_discs_keep_the_level_rhythm() -> None:
    """Of two clear discs half a level apart, the one off the levels' rhythm goes (a dip inside a body)."""
    from needle_steering.perception.discs import DiscPlane, without_close_discs

    def plane(k: int, prominence: float = 80.0) -> DiscPlane:
        return DiscPlane(k, np.array([30.0, 30.0, float(k)]), np.array([0.0, 0.0, 1.0]), prominence)

    ks = [p.k for p in without_close_discs([plane(k) for k in (10, 22, 34, 46, 52, 58)], 3.0)]
    assert ks == [10, 22, 34, 46, 58], ks
    # Regular levels are kept, the shorter thoracic ones included.
    ks = [p.k for p in without_close_discs([plane(k) for k in (10, 23, 35, 47, 57, 66)], 3.0)]
    assert ks == [10, 23, 35, 47, 57, 66], ks


def test_real_ct_ribs_articulate_with_t12_only(shared_data: Path) -> None:
    """3 mm CT: the articulation test finds the 12th ribs on T12 (both sides) and nothing on L1-S.

    The iliac crest beside L4/L5 and the lumbar transverse processes are not ribs.
    """
    from needle_steering.perception.classical import segment_spine

    spine = segment_spine(read_volume(shared_data / "abdomen_ct_3mm" / "ct.nii.gz"))
    sides = [f["rib_sides"] for f in spine.features]
    # Measured: T12 both sides (3.2 ml outside the spine, reaching 96 mm from the canal); 0 elsewhere.
    assert sides[0] == 2 and spine.features[0]["rib_reach_mm"] >= 80.0, spine.features[0]
    assert all(s == 0 for s in sides[1:]), sides


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


@pytest.mark.parametrize("seed", [204, 210])
def test_steep_lumbosacral_disc_is_found(seed: int) -> None:
    """Held-out phantoms whose body centreline ends above a steep L5/S1 disc (210: L4/L5 shallow as well).

    At the start of session 3, L5 was merged into the sacrum (204, at confidence 0.95) or every name was
    shifted (210). The caudal-most profile minimum now needs only L5's endplate above it (when as dark as
    the clear discs), and thick discs are found. Measured: all names right, lowest level Dice 0.92 / 0.90.
    """
    phantom = generate_phantom(PhantomConfig(seed=seed, spacing_mm=1.5))
    result = segment_volume(phantom.ct, backend="classical")
    ident = level_identification(result.labels, phantom.labels)
    assert ident["accuracy"] == 1.0, ident["pairs"]
    scores = per_level_scores(result.labels, phantom.labels)
    assert scores["L5"]["dice"] >= 0.85 and scores["S"]["dice"] >= 0.85, scores


def test_dip_inside_a_body_is_not_a_disc_and_lumbar_body_not_split() -> None:
    """Held-out phantom 200 (1.5 mm): a 49 HU dip inside T12 (minimum 241 HU, the discs 73-80 HU).

    Before: the dip counted as a clear disc (prominence >= 40 HU) and cut T12 in two; L4 (the tallest body) was
    then split as "a disc not visible" against a median height lowered by the partial bodies at the ends of the
    field of view: every name shifted, flagged at 0.4. Measured after: 8/8 names at 0.95, Dice 0.87-0.96.
    """
    phantom = generate_phantom(PhantomConfig(seed=200, spacing_mm=1.5))
    result = segment_volume(phantom.ct, backend="classical")
    ident = level_identification(result.labels, phantom.labels)
    assert ident["accuracy"] == 1.0, ident["pairs"]
    assert result.level_confidence >= 0.95
    assert not any("split" in w for w in result.warnings), result.warnings
    scores = per_level_scores(result.labels, phantom.labels)
    assert min(s["dice"] for s in scores.values()) >= 0.84, scores


def test_sacral_rim_kept_only_inside_half_contrast_surface() -> None:
    """Phantom 102 (1.5 mm): the peeled sacral rim facing soft tissue is given back only above half contrast.

    Before, the whole peeled rim went back with the sacrum: a one-voxel shell outside it (1,715 false-positive
    voxels). Measured: S 0.896 -> 0.909, the other levels unchanged.
    """
    phantom = generate_phantom(PhantomConfig(seed=102, spacing_mm=1.5))
    result = segment_volume(phantom.ct, backend="classical")
    scores = per_level_scores(result.labels, phantom.labels)
    assert scores["S"]["dice"] >= 0.90, scores


def test_clear_disc_must_be_disc_dark_on_ct(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 50 HU deep dip at the cancellous level is a shallow minimum on CT, a disc-dark minimum stays a disc."""
    from needle_steering.perception import discs
    from needle_steering.perception.discs import DISC_DARK_FRACTION, profile_discs

    spacing = 1.5
    body, endplate, disc = 245.0, 550.0, 76.0
    profile = body + 3.0 * np.cos(np.arange(120) / 2.0)
    for lo in (10, 31, 52, 73, 94, 115):  # 31.5 mm disc spacing, 4.5 mm discs
        profile[lo:lo + 3] = disc + np.arange(3)
        profile[lo - 1] = profile[lo + 3] = endplate
        profile[lo - 3:lo - 1] = profile[lo + 4:lo + 6] = 320.0  # the endplates' cortical rim
    profile[105:108] = body - 50.0 + np.arange(3)  # a dip inside the top body, flanked by its endplates
    centre = np.column_stack([np.full(120, 50.0), np.full(120, 40.0)])
    tangent = np.tile([0.0, 0.0, 1.0], (120, 1))
    # Half a level from both discs, the dip is also dropped by the level rhythm (without_close_discs); without that
    # rule, the disc-dark check alone rejects it.
    ks = [p.k for p in profile_discs(profile, centre, tangent, spacing)]
    assert len(ks) == 6 and not any(100 <= k <= 110 for k in ks), ks
    monkeypatch.setattr(discs, "CLOSE_DISC_FRACTION", 0.0)
    assert any(105 <= p.k <= 107 for p in profile_discs(profile, centre, tangent, spacing))
    ks = [p.k for p in profile_discs(profile, centre, tangent, spacing, dark_fraction=DISC_DARK_FRACTION)]
    assert len(ks) == 6 and not any(100 <= k <= 110 for k in ks), ks


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
    # L5 whose transverse processes touch the iliac crests (1.7 ml on the real CT cropped above L5/S1) is no sacrum:
    # alone, that anchor would shift every name at confidence 0.6. Without anchors the names are flagged (0.3).
    naming = assign_levels([*lumbar, _feature(60.0, iliac_ml=1.7)])
    assert "sacrum" not in naming.anchors and naming.confidence <= 0.3


def _rib_feature(sides: int, *, top: bool = False, bottom: bool = False, body_mm: float = 25.0,
                 cut: int = 0) -> dict[str, object]:
    return {"volume_ml": 40.0, "width_mm": 50.0, "rib_bone_ml": 3.0 * sides, "rib_sides": sides,
            "rib_cut_sides": cut, "touches_top": top, "touches_bottom": bottom, "body_height_mm": body_mm}


def test_rib_anchor_is_the_last_articulated_rib() -> None:
    """The last segment with an articulated rib is T12, however short (floating) its rib is."""
    # T11 with a long rib, T12 with a short one (an order of magnitude less bone): still T12.
    feats = [_rib_feature(2), _rib_feature(1), *[_rib_feature(0) for _ in range(3)]]
    feats[1]["rib_bone_ml"] = 0.3
    naming = assign_levels(feats)
    assert naming.anchors == ["ribs"] and naming.names[:3] == ["T11", "T12", "L1"] and naming.confidence == 0.6


def test_rib_anchor_skips_a_partial_top_segment() -> None:
    """A top segment cut by the field of view shows no rib (its rib heads lie above): it does not break the run."""
    feats = [_rib_feature(0, top=True), _rib_feature(2), _rib_feature(0), _rib_feature(0)]
    naming = assign_levels(feats)
    assert naming.anchors == ["ribs"] and naming.names == ["T11", "T12", "L1", "L2"]


def test_rib_anchor_needs_the_next_vertebra_in_view() -> None:
    """Partial FOV: ribs on the lowest segments and only a sliver below them: no T12 anchor, weak prior."""
    # Both vertebrae bear ribs, nothing below: the lowest is taken as T12 by a weak prior (confidence 0.3).
    naming = assign_levels([_rib_feature(0, top=True), _rib_feature(2, bottom=True)])
    assert naming.anchors == [] and naming.confidence <= 0.3 and naming.names == ["T11", "T12"]
    # A rib stub leaving the bottom of the image is enough for that prior, not for an anchor.
    naming = assign_levels([_rib_feature(0, top=True), _rib_feature(0, bottom=True, cut=1)])
    assert naming.anchors == [] and naming.confidence <= 0.3 and naming.names == ["T11", "T12"]
    # A rib-free segment below the ribs that shows only 5 mm of its body cannot prove it has no ribs.
    naming = assign_levels([_rib_feature(2), _rib_feature(2), _rib_feature(0, bottom=True, body_mm=5.0)])
    assert "ribs" not in naming.anchors and naming.confidence <= 0.3
    naming = assign_levels([_rib_feature(2), _rib_feature(2), _rib_feature(0, bottom=True, body_mm=20.0)])
    assert naming.anchors == ["ribs"] and naming.names == ["T11", "T12", "L1"]


def test_rib_evidence_needs_articulation_and_lateral_run() -> None:
    """Synthetic: a bar touching a vertebra and running 90 mm laterally is a rib; a short process or a detached
    bar is not."""
    from needle_steering.perception.classical import _rib_evidence

    shape = (240, 120, 80)  # 1 mm voxels; canal at i = 120, j = 60
    seg = np.zeros(shape, np.int32)
    seg[100:141, 40:80, 45:75] = 1  # upper vertebra
    seg[100:141, 40:80, 5:35] = 2  # lower vertebra
    bone = seg > 0
    bone[141:211, 70:76, 60:66] = True  # rib: from the upper vertebra's side to 90 mm lateral
    bone[70:100, 70:76, 20:26] = True  # transverse-process tip of the lower one: 50 mm from the canal
    bone[5:60, 70:76, 10:16] = True  # detached bar beside the lower one (the iliac crest, another rib's shaft)
    track = np.tile([120.0, 60.0], (shape[2], 1))
    ribs = _rib_evidence(seg, bone, track, 1.0)
    assert ribs[0]["rib_sides"] == 1 and ribs[0]["rib_reach_mm"] >= 89.0, ribs[0]
    assert ribs[1]["rib_sides"] == 0 and ribs[1]["rib_cut_sides"] == 0, ribs[1]


def test_phantom_rib_and_sacrum_anchors_t10_to_l5() -> None:
    """T10-L5 phantom at 2 mm: a shallow dip inside a body is not a disc (it has no endplates); both anchors agree."""
    levels = ("T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5")
    phantom = generate_phantom(PhantomConfig(seed=106, spacing_mm=2.0, levels=levels))
    result = segment_volume(phantom.ct, backend="classical")
    ident = level_identification(result.labels, phantom.labels)
    # Measured: 10/10 (context T9 and S included) at 0.95; before: 4/10 flagged 0.4 (a false disc in L2).
    assert ident["accuracy"] == 1.0, ident["pairs"]
    assert set(result.anchors) == {"sacrum", "ribs"} and result.level_confidence >= 0.95


def test_phantom_sacrum_not_split_by_a_dip_inside_it() -> None:
    """T12-S phantom at 2 mm: the darker sacrum is one segment (no disc without endplates), the sacrum anchor fires."""
    levels = ("T12", "L1", "L2", "L3", "L4", "L5", "S")
    phantom = generate_phantom(PhantomConfig(seed=107, spacing_mm=2.0, levels=levels))
    result = segment_volume(phantom.ct, backend="classical")
    ident = level_identification(result.labels, phantom.labels)
    assert ident["accuracy"] == 1.0, ident["pairs"]
    assert set(result.anchors) == {"sacrum", "ribs"} and result.level_confidence >= 0.95
    # Measured: S 0.91 (before: split in two, 0.76, sacrum anchor silent).
    assert per_level_scores(result.labels, phantom.labels)["S"]["dice"] >= 0.85


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
    # The T11/T12 disc (one clear disc in 40 mm) separates the two; both are named (weak prior: no vertebra
    # below T12 is in view, so "last rib-bearing" cannot be checked).
    assert list(result.levels) == ["T11", "T12"], result.levels
    # Measured 0.69 (0.33 as one merged segment; 0.47 before the sagittal/coronal marrow-hole fill and the
    # edge-aware closing). T11's laminae and spinous process in T12's slices still go to T12.
    assert per_level_scores(result.labels, ref)["T12"]["dice"] >= 0.64


def test_partial_fov_phantom_is_named_or_flagged() -> None:
    """A phantom cut to three lumbar vertebrae (no sacrum, no ribs): never a confident shift."""
    phantom = generate_phantom(PhantomConfig(seed=21, spacing_mm=2.0, levels=("L2", "L3", "L4"), margin_mm=0.0,
                                             context_levels=False))
    result = segment_volume(phantom.ct, backend="classical")
    ident = level_identification(result.labels, phantom.labels)
    right = all(ident["pairs"].get(name) == name for name in ("L2", "L3", "L4"))
    assert right or (result.level_confidence <= 0.3 and any("verify" in w for w in result.warnings)), (
        ident["pairs"], result.level_confidence, result.warnings)


def test_fov_closing_keeps_the_edge_slices() -> None:
    """Bone cut by the array's edge is not eroded there by the closing (scipy's closing erodes the edges)."""
    from needle_steering.perception.classical import _closing_fov

    mask = np.zeros((12, 12, 6), bool)
    mask[3:9, 3:9, :] = True
    mask[5, 5, 2] = False  # a one-voxel hole is closed
    closed = _closing_fov(mask, 1)
    assert closed[3:9, 3:9, :].all()
    assert not closed[:3].any() and not closed[9:].any()


def test_alar_envelope_reaches_the_ilium_not_the_canal() -> None:
    """The ala between the sacrum's cortices and the ilium is enclosed; the ilium's marrow and the canal are not."""
    from needle_steering.perception.classical import _alar_envelope

    spacing = 3.0
    sacrum = np.zeros((40, 20, 3), bool)
    iliac = np.zeros(sacrum.shape, bool)
    sacrum[15:25, 5:15] = True          # body (i 15-24, 30 mm wide)
    sacrum[17:23, 9:12] = False         # canal, enclosed by the body itself
    sacrum[4:15, 5] = sacrum[25:36, 5] = True     # anterior alar cortices
    sacrum[4:14, 14] = sacrum[26:36, 14] = True   # posterior alar cortices, short of the ilium
    for i0 in (0, 36):                   # the ilia: hollow plates lateral of the alae
        iliac[i0:i0 + 4, 2:18] = True
        iliac[i0 + 1:i0 + 3, 4:16] = False
    alar = _alar_envelope(sacrum, iliac, spacing)
    assert alar[8:13, 7:13].all() and alar[27:32, 7:13].all()
    assert not alar[17:23, 9:12].any()   # the canal
    assert not (alar & iliac).any() and not alar[1:3, 4:16].any() and not alar[37:39, 4:16].any()


def test_joint_cleft_between_two_processes_not_inside_one() -> None:
    """A dark one-voxel gap between two cortical blocks is a cleft; the dark core of one thin plate is not."""
    from needle_steering.perception.classical import _joint_clefts

    hu = np.full((16, 9, 9), 40.0, np.float32)
    bone = np.zeros(hu.shape, bool)
    # Two blocks (cortex 1000 HU around a 250 HU core) along i, separated by a 250 HU joint voxel at i = 7.
    for i0 in (2, 8):
        hu[i0:i0 + 5, 2:7, 2:7] = 1000.0
        hu[i0 + 1:i0 + 4, 3:6, 3:6] = 250.0
        bone[i0:i0 + 5, 2:7, 2:7] = True
    hu[7, 2:7, 2:7] = 250.0
    bone[7, 2:7, 2:7] = True
    cleft = _joint_clefts(hu, bone, cortex_hu=370.0)
    assert cleft[7, 3:6, 3:6].all()
    assert not cleft[:6].any() and not cleft[9:].any()
    # One thin plate: cortex | core | cortex with soft tissue beyond.
    plate_hu = np.full((9, 9, 9), 40.0, np.float32)
    plate_hu[3:6, 1:8, 1:8] = 1000.0
    plate_hu[4, 1:8, 1:8] = 250.0
    assert not _joint_clefts(plate_hu, plate_hu > 200.0, cortex_hu=370.0)[4].any()


def test_thick_disc_is_found_between_distant_endplates() -> None:
    """A 10 mm disc whose darkest sample is >8 mm from one endplate is still a disc; a body's middle is not."""
    from needle_steering.perception.discs import profile_discs

    spacing = 1.0
    body, endplate, disc = 200.0, 520.0, 78.0
    profile = body + 3.0 * np.cos(np.arange(200) / 2.0)  # cancellous texture, no flat plateau
    # Thin discs (5 mm) at k = 20, 55, 125, 160 and a thick one (10 mm, darkest at its lower edge) at k = 86-95.
    for lo, hi in ((18, 23), (53, 58), (86, 96), (123, 128), (158, 163)):
        profile[lo:hi] = disc + 0.5 * np.arange(hi - lo)  # no flat plateau
        profile[lo - 2:lo] = endplate
        profile[hi:hi + 2] = endplate
    profile[86] = disc - 3.0
    centre = np.column_stack([np.full(200, 50.0), np.full(200, 40.0)])
    tangent = np.tile([0.0, 0.0, 1.0], (200, 1))
    ks = [p.k for p in profile_discs(profile, centre, tangent, spacing)]
    assert len(ks) == 5 and 86 <= ks[2] <= 95, ks
    # A dark body (osteoporotic, disc-dark cancellous bone) between its endplates is no disc.
    profile[128:158] = disc + 3.0 * np.cos(np.arange(30) / 2.0)
    ks = [p.k for p in profile_discs(profile, centre, tangent, spacing)]
    assert not any(128 < k < 158 for k in ks), ks


def test_thick_disc_found_when_few_clear_discs_are_in_view() -> None:
    """Three clear discs, one thick disc between two of them: the typical spacing counts the double gap as two bodies,
    so the thick disc does not "cut a body short"."""
    from needle_steering.perception.discs import profile_discs, typical_disc_spacing

    assert typical_disc_spacing(np.array([51.0, 27.0]), 1.5) == pytest.approx(27.0)  # 76 mm: two levels
    assert typical_disc_spacing(np.array([17.0, 25.0]), 1.5) == pytest.approx(21.0)  # thoracic vs lumbar: both single
    # A false short gap (a dip inside a body taken for a clear disc) does not shrink the typical spacing.
    assert typical_disc_spacing(np.array([12.0, 12.0, 12.0, 12.0, 5.0]), 3.0) == pytest.approx(12.0)
    spacing = 1.5
    body, endplate, disc = 220.0, 500.0, 75.0
    profile = body + 3.0 * np.cos(np.arange(200) / 2.0)
    # Thin discs at k = 104, 155, 182 (wlen sees both endplates); thick (10.5 mm) at 125-131, endplates 9 mm apart.
    for lo, hi in ((102, 106), (153, 157), (180, 184), (125, 132)):
        profile[lo:hi] = disc + 0.5 * np.arange(hi - lo)
        profile[lo - 2:lo] = endplate
        profile[hi:hi + 2] = endplate
    profile[:60] = np.nan
    centre = np.column_stack([np.full(200, 50.0), np.full(200, 40.0)])
    tangent = np.tile([0.0, 0.0, 1.0], (200, 1))
    ks = [p.k for p in profile_discs(profile, centre, tangent, spacing, dark_fraction=0.5)]
    assert any(125 <= k <= 131 for k in ks) and len(ks) == 4, ks


def test_lumbosacral_phantom_with_a_thick_disc_is_named() -> None:
    """L3-S phantom (seed 500, 1.5 mm): its L4/L5 disc is 10 mm thick, and only three clear discs are in view.
    Before, L4 and L5 merged and every name above the sacrum shifted by one at confidence 0.6."""
    phantom = generate_phantom(PhantomConfig(seed=500, spacing_mm=1.5, levels=("L3", "L4", "L5", "S")))
    result = segment_volume(phantom.ct, backend="classical")
    ident = level_identification(result.labels, phantom.labels)
    assert ident["accuracy"] == 1.0, ident["pairs"]
    # Measured: min 0.92, mean 0.94.
    assert min(float(s["dice"]) for s in per_level_scores(result.labels, phantom.labels).values()) >= 0.88


def test_tilted_spine_canal_chains_are_joined() -> None:
    """A tilted phantom (seed 502, sd 6 degrees) closes the canal ring in only 7-10 slices per level: the anchor
    chains more than 20 mm apart are joined (they continue each other), so T10-S are all segmented and named."""
    phantom = generate_phantom(PhantomConfig(seed=502, spacing_mm=1.5, tilt_sd_deg=6.0,
                                             levels=("T11", "T12", "L1", "L2", "L3", "L4", "L5", "S")))
    result = segment_volume(phantom.ct, backend="classical")
    assert not any("spinal canal was lost" in w for w in result.warnings), result.warnings
    ident = level_identification(result.labels, phantom.labels)
    assert ident["accuracy"] == 1.0, ident["pairs"]
    # Measured: min 0.92, mean 0.94 (before the join: T10-L1 missing).
    assert min(float(s["dice"]) for s in per_level_scores(result.labels, phantom.labels).values()) >= 0.85


def test_untracked_extent_measures_spine_beyond_the_track() -> None:
    """Spine-like bone continuing beyond the tracked canal is measured (the "canal was lost" warning)."""
    bone = np.zeros((80, 80, 100), bool)
    bone[25:55, 25:55, :] = True  # a 45 x 45 mm column at 1.5 mm: 2,025 mm^2 per slice
    track = np.full((100, 2), np.nan)
    track[:60] = (40.0, 40.0)
    below, above = untracked_extent_mm(bone, track, 1.5)
    assert below == 0.0 and above == pytest.approx(40 * 1.5)
