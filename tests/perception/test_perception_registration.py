"""CBCT-to-CT per-vertebra registration on real anatomy (and on the phantom once it exists).

The "CBCT" is the real abdominal CT (``shared/data/abdomen_ct_3mm``, TotalSegmentator labels),
resampled to 1.5 mm, moved by a known random rigid transform (up to 10 mm, 10 degrees) onto its
own 1.25 mm LPS grid, and degraded: HU scale and offset, cupping, streak-like shading, noise and a
cylindrical field of view padded with a constant. Accuracy is the target registration error
(TRE) at the corners of each vertebra's bounding box (for a rigid error the TRE is a convex
function of position, so the corners bound it everywhere inside the box), at the pedicles and at
the centroid.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray
from scipy import ndimage

from needle_steering.errors import GeometryError, LabelError, RegistrationError
from needle_steering.perception.io import (
    read_volume,
    resample_to_spacing,
    volume_from_sitk,
    volume_to_sitk,
    write_volume,
)
from needle_steering.perception.labels import SPINAL_CANAL, from_totalsegmentator, level_id
from needle_steering.perception.registration import (
    RegistrationOptions,
    RegistrationResult,
    invert_rigid,
    register_files,
    register_vertebrae,
    rotation_angle_deg,
    target_registration_error,
    transform_points,
    validate_rigid,
)
from needle_steering.perception.volume import Volume

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "abdomen_ct_3mm"
LEVELS = ["L1", "L2", "L3"]
TRE_LIMIT_MM = 0.5


# --------------------------------------------------------------------------------------------------
# Test data
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_ct() -> tuple[Volume, Volume]:
    """The real CT and its VerSe label map (canal included), cropped around L1-L3, at 1.5 mm."""
    return _load_real_ct()


def _load_real_ct() -> tuple[Volume, Volume]:
    ct_path = DATA / "ct.nii.gz"
    labels_path = DATA / "labels_totalsegmentator_total.nii.gz"
    if not ct_path.is_file():
        pytest.fail(f"real CT not found at {ct_path}")
    ct = read_volume(ct_path)
    labels = read_volume(labels_path)
    ours = from_totalsegmentator(labels.array)
    idx = np.argwhere(np.isin(ours, [level_id(n) for n in LEVELS]))
    margin = 8  # voxels of 3 mm
    lo = np.maximum(idx.min(axis=0) - margin, 0)
    hi = np.minimum(idx.max(axis=0) + margin + 1, ct.shape)
    crop = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    origin = ct.index_to_lps(lo)
    ct_crop = Volume(ct.array[crop].astype(np.float32), ct.spacing_mm, origin, ct.direction, {"source": "ct"})
    lab_crop = Volume(ours[crop], ct.spacing_mm, origin, ct.direction, {"source": "labels"})
    return resample_to_spacing(ct_crop, 1.5), resample_to_spacing(lab_crop, 1.5, is_label=True)


def _rotation(axis: NDArray[np.float64], angle_deg: float) -> NDArray[np.float64]:
    a = axis / np.linalg.norm(axis)
    K = np.array([[0.0, -a[2], a[1]], [a[2], 0.0, -a[0]], [-a[1], a[0], 0.0]])
    ang = math.radians(angle_deg)
    return np.eye(3) + math.sin(ang) * K + (1.0 - math.cos(ang)) * K @ K


def _rigid_about(center: NDArray[np.float64], R: NDArray[np.float64], t: NDArray[np.float64]) -> NDArray[np.float64]:
    """Rotation ``R`` about ``center`` followed by translation ``t`` (mm), as a 4x4."""
    T = np.eye(4)
    T[:3, :3] = R
    T[:3, 3] = center - R @ center + t
    return T


def _random_rigid(
    rng: np.random.Generator, center: NDArray[np.float64], max_mm: float = 10.0, max_deg: float = 10.0
) -> NDArray[np.float64]:
    """A random rigid motion about ``center``: rotation 0.5-1 x ``max_deg``, translation 0.5-1 x ``max_mm``."""
    R = _rotation(rng.normal(size=3), rng.uniform(0.5, 1.0) * max_deg)
    t = rng.normal(size=3)
    t *= rng.uniform(0.5, 1.0) * max_mm / np.linalg.norm(t)
    return _rigid_about(center, R, t)


def _spine_center(labels: Volume) -> NDArray[np.float64]:
    return labels.index_to_lps(np.argwhere(np.isin(labels.array, [level_id(n) for n in LEVELS])).mean(axis=0))


def _resample_through(
    volume: Volume, T_src_from_out: NDArray[np.float64], spacing_mm: float, *, nearest: bool = False
) -> Volume:
    """``volume`` seen through a rigid motion: ``out(x) = volume(T_src_from_out x)`` on an LPS grid."""
    import SimpleITK as sitk

    lo, hi = volume.extent_lps_mm()
    size = np.ceil((hi - lo) / spacing_mm).astype(int) + 1
    f = sitk.ResampleImageFilter()
    f.SetOutputOrigin([float(v) for v in lo])
    f.SetOutputSpacing([spacing_mm] * 3)
    f.SetSize([int(v) for v in size])
    f.SetOutputDirection([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    tx = sitk.Euler3DTransform()
    tx.SetMatrix([float(v) for v in T_src_from_out[:3, :3].reshape(-1)])
    tx.SetTranslation([float(v) for v in T_src_from_out[:3, 3]])
    f.SetTransform(tx)
    f.SetInterpolator(sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear)
    f.SetDefaultPixelValue(0.0 if nearest else -1000.0)
    if not nearest:
        f.SetOutputPixelType(sitk.sitkFloat32)
    return volume_from_sitk(f.Execute(volume_to_sitk(volume)), "simulated CBCT")


def _degrade(
    cbct: Volume,
    rng: np.random.Generator,
    fov_center_lps_mm: NDArray[np.float64],
    *,
    fov_radius_mm: float = 80.0,
    z_min_mm: float = -math.inf,
    noise: float = 25.0,
    pad: float = 0.0,
) -> Volume:
    """CBCT artefacts: HU scale 0.8 and offset +150, cupping, angular streak shading, Gaussian noise,
    and a cylindrical field of view (axis along S, cut below ``z_min_mm``) padded with ``pad``."""
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in cbct.shape], indexing="ij"), axis=-1)
    lps = cbct.index_to_lps(ijk)
    dx, dy = lps[..., 0] - fov_center_lps_mm[0], lps[..., 1] - fov_center_lps_mm[1]
    r = np.hypot(dx, dy)
    theta = np.arctan2(dy, dx)
    arr = 0.8 * cbct.array.astype(np.float64) + 150.0
    arr -= 60.0 * np.clip(1.0 - (r / fov_radius_mm) ** 2, 0.0, 1.0)
    arr += 20.0 * np.cos(14.0 * theta) * np.exp(-r / 60.0)
    arr += rng.normal(0.0, noise, arr.shape)
    inside = (r <= fov_radius_mm) & (lps[..., 2] >= z_min_mm)
    return cbct.with_array(np.where(inside, arr, pad).astype(np.float32), modality="CBCT")


def _simulate(
    ct: Volume, labels: Volume, seed: int, **degrade: float
) -> tuple[Volume, NDArray[np.float64], NDArray[np.float64]]:
    """CBCT of ``ct`` under a random rigid motion; returns (cbct, T_ct_from_cbct, spine centre in CT)."""
    rng = np.random.default_rng(seed)
    center = _spine_center(labels)
    T_true = _random_rigid(rng, center)
    moved = _resample_through(ct, T_true, 1.25)
    fov_center = transform_points(invert_rigid(T_true), center)
    return _degrade(moved, rng, fov_center, **degrade), T_true, center


def _targets_ct(labels: Volume, level: str) -> NDArray[np.float64]:
    """TRE targets of a level in CT LPS mm, ``(11, 3)``: 8 box corners, 2 pedicles, centroid."""
    lps = labels.index_to_lps(np.argwhere(labels.array == level_id(level)))
    lo, hi = lps.min(axis=0), lps.max(axis=0)
    corners = np.array(np.meshgrid(*[[lo[a], hi[a]] for a in range(3)], indexing="ij")).reshape(3, -1).T
    canal = labels.index_to_lps(np.argwhere(labels.array == SPINAL_CANAL))
    canal = canal[(canal[:, 2] >= lo[2]) & (canal[:, 2] <= hi[2])]
    assert len(canal) > 0, f"no canal at {level}"
    c = canal.mean(axis=0)
    # Pedicles: vertebra voxels beside the canal at its antero-posterior and cranio-caudal position.
    near = (np.abs(lps[:, 1] - c[1]) <= 5.0) & (np.abs(lps[:, 2] - c[2]) <= 8.0)
    left = lps[near & (lps[:, 0] - c[0] > 5.0) & (lps[:, 0] - c[0] <= 25.0)]
    right = lps[near & (c[0] - lps[:, 0] > 5.0) & (c[0] - lps[:, 0] <= 25.0)]
    assert len(left) and len(right), f"no pedicle voxels found at {level}"
    return np.vstack([corners, left.mean(axis=0), right.mean(axis=0), lps.mean(axis=0)])


def _tre_mm(result: RegistrationResult, labels: Volume, level: str, T_true: NDArray[np.float64]) -> float:
    """Largest TRE (mm) over the level's targets, evaluated at the targets' true CBCT positions."""
    targets_cbct = transform_points(invert_rigid(T_true), _targets_ct(labels, level))
    return float(target_registration_error(result.transform(level), T_true, targets_cbct).max())


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------
def test_transform_points_inverse_and_tre() -> None:
    rng = np.random.default_rng(1)
    T = _random_rigid(rng, np.array([10.0, -20.0, 30.0]))
    pts = rng.normal(0.0, 50.0, (20, 3))
    back = transform_points(invert_rigid(T), transform_points(T, pts))
    np.testing.assert_allclose(back, pts, atol=1e-9)
    np.testing.assert_allclose(transform_points(T, pts[0]), transform_points(T, pts[:1])[0])
    assert transform_points(T, pts[0]).shape == (3,)
    # A pure 1 mm shift has TRE 1 mm everywhere; a rotation's TRE grows with distance from its axis.
    shift = np.eye(4)
    shift[:3, 3] = [0.6, 0.0, 0.8]
    np.testing.assert_allclose(target_registration_error(shift @ T, T, pts), 1.0, atol=1e-9)
    rot = _rigid_about(np.zeros(3), _rotation(np.array([0.0, 0.0, 1.0]), 1.0), np.zeros(3))
    tre = target_registration_error(rot, np.eye(4), np.array([[10.0, 0, 0], [100.0, 0, 0]]))
    np.testing.assert_allclose(tre, [10.0, 100.0] * np.array(2 * math.sin(math.radians(0.5))), rtol=1e-9)
    assert rotation_angle_deg(rot) == pytest.approx(1.0)


def test_helpers_refuse_non_rigid_input() -> None:
    scaled = np.diag([1.01, 1.0, 1.0, 1.0])
    with pytest.raises(GeometryError, match="rotation"):
        transform_points(scaled, np.zeros(3))
    mirrored = np.diag([-1.0, 1.0, 1.0, 1.0])
    with pytest.raises(GeometryError, match="det"):
        validate_rigid(mirrored)
    with pytest.raises(GeometryError, match="shape"):
        transform_points(np.eye(4), np.zeros((4, 2)))
    with pytest.raises(GeometryError, match="4x4"):
        invert_rigid(np.eye(3))
    with pytest.raises(RegistrationError, match="min_fitness"):
        RegistrationOptions(min_fitness=1.5)
    with pytest.raises(RegistrationError, match="icp_distances_mm"):
        RegistrationOptions(icp_distances_mm=())


def test_register_refuses_bad_inputs(real_ct: tuple[Volume, Volume]) -> None:
    ct, labels = real_ct
    shifted = Volume(labels.array, labels.spacing_mm, labels.origin_lps_mm + 5.0, labels.direction)
    with pytest.raises(GeometryError, match="fixed_labels"):
        register_vertebrae(ct, ct, shifted)
    with pytest.raises(LabelError, match="Q7"):
        register_vertebrae(ct, ct, labels, levels=["Q7"])
    nan_ct = ct.with_array(np.where(labels.array > 0, np.nan, ct.array).astype(np.float32))
    with pytest.raises(RegistrationError, match="NaN"):
        register_vertebrae(ct, nan_ct, labels)


# --------------------------------------------------------------------------------------------------
# Accuracy on real anatomy
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [11, 12, 13])
def test_real_ct_random_rigid_motion_tre(real_ct: tuple[Volume, Volume], seed: int) -> None:
    ct, labels = real_ct
    cbct, T_true, center = _simulate(ct, labels, seed)
    assert rotation_angle_deg(T_true) <= 10.0
    result = register_vertebrae(ct, cbct, labels, levels=LEVELS)
    assert result.status == "ok", result.refused()
    for level in LEVELS:
        lvl = result.levels[level]
        tre = _tre_mm(result, labels, level, T_true)
        assert tre <= TRE_LIMIT_MM, f"{level}: TRE {tre:.3f} mm (fitness {lvl.fitness:.2f}, rmse {lvl.rmse_mm:.2f})"
        assert lvl.fitness >= 0.8 and lvl.rmse_mm <= 0.5 and lvl.n_correspondences >= 1000
        assert lvl.T_ct_from_cbct is not None
        validate_rigid(lvl.T_ct_from_cbct)
    T_global = result.T_ct_from_cbct_global
    assert T_global is not None
    assert float(target_registration_error(T_global, T_true, transform_points(invert_rigid(T_true), center))[0]) < 0.5


def test_each_vertebra_gets_its_own_transform(real_ct: tuple[Volume, Volume]) -> None:
    """L2 moves 3 mm / 4 degrees relative to L1 and L3: each level must recover its own motion."""
    ct, labels = real_ct
    rng = np.random.default_rng(21)
    center = _spine_center(labels)
    T_spine = _random_rigid(rng, center)
    l2_center = labels.index_to_lps(np.argwhere(labels.array == level_id("L2")).mean(axis=0))
    T_extra = _rigid_about(l2_center, _rotation(np.array([1.0, 0.3, 0.0]), 4.0), np.array([2.0, -1.5, 1.5]))
    T_l2 = T_extra @ T_spine
    spine_view = _resample_through(ct, T_spine, 1.25)
    l2_view = _resample_through(ct, T_l2, 1.25)
    # L2's region: voxels within 4 mm of its label and nearer to it than to any other vertebra, so
    # all of its bone (label boundaries are approximate) moves with it.
    vertebrae = np.where(np.isin(labels.array, [level_id(n) for n in ("T12", *LEVELS, "L4")]), labels.array, 0)
    dist, nearest = ndimage.distance_transform_edt(vertebrae == 0, sampling=labels.spacing_mm, return_indices=True)
    l2_mask = labels.with_array(((vertebrae[tuple(nearest)] == level_id("L2")) & (dist <= 4.0)).astype(np.uint8))
    l2_region = _resample_through(l2_mask, T_l2, 1.25, nearest=True).array > 0
    composite = spine_view.with_array(np.where(l2_region, l2_view.array, spine_view.array))
    cbct = _degrade(composite, rng, transform_points(invert_rigid(T_spine), center))
    result = register_vertebrae(ct, cbct, labels, levels=LEVELS)
    assert result.status == "ok", result.refused()
    truth = {"L1": T_spine, "L2": T_l2, "L3": T_spine}
    for level, T_true in truth.items():
        tre = _tre_mm(result, labels, level, T_true)
        assert tre <= TRE_LIMIT_MM, f"{level}: TRE {tre:.3f} mm"
    # The whole-spine transform is wrong for L2 by millimetres: the per-level step is what fixes it.
    global_reg = result.global_registration
    assert global_reg.T_ct_from_cbct is not None
    targets = transform_points(invert_rigid(T_l2), _targets_ct(labels, "L2"))
    assert float(target_registration_error(global_reg.T_ct_from_cbct, T_l2, targets).max()) > 2.0


def test_moving_labels_select_the_cbct_surface(real_ct: tuple[Volume, Volume]) -> None:
    ct, labels = real_ct
    cbct, T_true, _ = _simulate(ct, labels, 31)
    moving_labels = _resample_through(labels, T_true, 1.25, nearest=True)
    moving_labels = cbct.with_array(moving_labels.array.astype(np.uint8))
    result = register_vertebrae(ct, cbct, labels, moving_labels, levels=["L2"])
    assert result.levels["L2"].ok, result.refused()
    assert _tre_mm(result, labels, "L2", T_true) <= TRE_LIMIT_MM


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------
def test_pure_noise_cbct_is_refused(real_ct: tuple[Volume, Volume]) -> None:
    ct, labels = real_ct
    cbct, _, _ = _simulate(ct, labels, 41)
    rng = np.random.default_rng(41)
    noise = cbct.with_array(np.where(cbct.array != 0.0, rng.normal(100.0, 200.0, cbct.shape), 0.0).astype(np.float32))
    result = register_vertebrae(ct, noise, labels, levels=["L2"], raise_if_all_refused=False)
    assert result.status == "refused"
    assert not result.global_registration.ok and result.T_ct_from_cbct_global is None
    lvl = result.levels["L2"]
    assert lvl.status == "refused" and lvl.T_ct_from_cbct is None and lvl.reason
    with pytest.raises(RegistrationError, match="L2: registration refused"):
        result.transform("L2")
    with pytest.raises(RegistrationError, match="refused"):
        lvl.require()


def test_vertebra_outside_field_of_view_is_refused_others_kept(real_ct: tuple[Volume, Volume]) -> None:
    ct, labels = real_ct
    rng = np.random.default_rng(51)
    center = _spine_center(labels)
    T_true = _rigid_about(center, _rotation(np.array([0.2, 1.0, 0.1]), 6.0), np.array([4.0, -6.0, 5.0]))
    moved = _resample_through(ct, T_true, 1.25)
    # Cut the field of view 6 mm below L2's lowest voxel (in the CBCT frame): L1 and L2 are in view,
    # only L3's upper end (its superior facets reach up beside L2's) is.
    l2_cbct = transform_points(invert_rigid(T_true), labels.index_to_lps(np.argwhere(labels.array == level_id("L2"))))
    z_min = float(l2_cbct[:, 2].min()) - 6.0
    cbct = _degrade(moved, rng, transform_points(invert_rigid(T_true), center), z_min_mm=z_min)
    result = register_vertebrae(ct, cbct, labels, levels=LEVELS)
    assert result.status == "partial"
    assert result.levels["L3"].status == "refused"
    assert "field of view" in result.levels["L3"].reason
    with pytest.raises(RegistrationError, match="field of view"):
        result.transform("L3")
    for level in ("L1", "L2"):
        assert result.levels[level].ok, result.refused()
        assert _tre_mm(result, labels, level, T_true) <= TRE_LIMIT_MM
    # Nothing usable at all: an error naming every level's reason.
    with pytest.raises(RegistrationError, match=r"every level: L3: vertebra outside the CBCT field of view"):
        register_vertebrae(ct, cbct, labels, levels=["L3"])


def test_implausibly_large_motion_is_refused(real_ct: tuple[Volume, Volume]) -> None:
    ct, labels = real_ct
    cbct, T_true, _ = _simulate(ct, labels, 61)
    opts = RegistrationOptions(max_translation_mm=2.0, max_rotation_deg=2.0)
    with pytest.raises(RegistrationError, match="implausibly large"):
        register_vertebrae(ct, cbct, labels, levels=["L2"], options=opts)
    # The same motion is accepted when the prior says where to expect it.
    opts_prior = RegistrationOptions(max_translation_mm=2.0, max_rotation_deg=2.0, T_ct_from_cbct_init=T_true)
    result = register_vertebrae(ct, cbct, labels, levels=["L2"], options=opts_prior)
    assert _tre_mm(result, labels, "L2", T_true) <= TRE_LIMIT_MM


# --------------------------------------------------------------------------------------------------
# Command-line entry point
# --------------------------------------------------------------------------------------------------
def test_register_files_returns_json_and_writes_nothing(real_ct: tuple[Volume, Volume], tmp_path: Path) -> None:
    ct, labels = real_ct
    cbct, T_true, _ = _simulate(ct, labels, 71)
    paths = {
        "ct": write_volume(ct, tmp_path / "ct.nii.gz"),
        "cbct": write_volume(cbct, tmp_path / "cbct.nii.gz"),
        "labels": write_volume(labels, tmp_path / "labels.nii.gz"),
    }
    before = sorted(p.name for p in tmp_path.iterdir())
    out = register_files(paths["ct"], paths["cbct"], paths["labels"], levels=["L2", "L3"])
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    text = json.dumps(out)
    assert "NaN" not in text
    assert out["seconds"] > 0
    assert set(out["levels"]) == {"L2", "L3"}
    for level, entry in out["levels"].items():
        assert entry["status"] == "ok", entry["reason"]
        T = np.asarray(entry["T_ct_from_cbct"])
        assert T.shape == (4, 4)
        assert 0.0 < entry["fitness"] <= 1.0 and entry["rmse_mm"] < 0.5
        targets = transform_points(invert_rigid(T_true), _targets_ct(labels, level))
        assert float(target_registration_error(T, T_true, targets).max()) <= TRE_LIMIT_MM


# --------------------------------------------------------------------------------------------------
# Phantom
# --------------------------------------------------------------------------------------------------
def test_phantom_ct_cbct_pair_random_rigid_motion() -> None:
    """The phantom's CT and CBCT of one seeded patient (CBCT: streaks, cupping, rim, blur, noise,
    grey-value offset, cylindrical field of view), the CBCT moved by a known random rigid motion."""
    from needle_steering.sim import phantom as phantom_mod

    seed = 5
    levels = ["L1", "L2"]
    common: dict[str, Any] = {"seed": seed, "spacing_mm": 1.0, "levels": tuple(levels), "fov_mm": (200.0, 200.0),
                              "table": False}
    ct_ph = phantom_mod.generate_phantom(phantom_mod.PhantomConfig(modality="ct", **common))
    cb_ph = phantom_mod.generate_phantom(phantom_mod.PhantomConfig(modality="cbct", **common))
    labels = ct_ph.labels
    assert labels.same_grid(cb_ph.labels) and np.array_equal(labels.array, cb_ph.labels.array)
    center = labels.index_to_lps(np.argwhere(np.isin(labels.array, [level_id(n) for n in levels])).mean(axis=0))
    T_true = _random_rigid(np.random.default_rng(seed), center)
    cbct = _resample_through(cb_ph.ct, T_true, 1.0)
    result = register_vertebrae(ct_ph.ct, cbct, labels, levels=levels)
    assert result.status == "ok", result.refused()
    for level in levels:
        lps = labels.index_to_lps(np.argwhere(labels.array == level_id(level)))
        lo, hi = lps.min(axis=0), lps.max(axis=0)
        corners = np.array(np.meshgrid(*[[lo[a], hi[a]] for a in range(3)], indexing="ij")).reshape(3, -1).T
        targets = transform_points(invert_rigid(T_true), corners)
        tre = float(target_registration_error(result.transform(level), T_true, targets).max())
        assert tre <= TRE_LIMIT_MM, f"{level}: TRE {tre:.3f} mm"
