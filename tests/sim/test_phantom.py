"""Tests of the synthetic spine phantom (needle_steering.sim.phantom).

Most checks run on coarse grids (2-3 mm) so the whole file stays within a few seconds per test;
the pedicle-morphometry test uses single-level 1 mm phantoms.
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

from needle_steering.errors import NeedleSteeringError
from needle_steering.perception.io import read_volume
from needle_steering.perception.labels import (
    AORTA,
    DISC,
    INFERIOR_VENA_CAVA,
    LESION,
    SKIN,
    SPINAL_CANAL,
    level_id,
)
from needle_steering.perception.volume import Volume
from needle_steering.sim.phantom import (
    Phantom,
    PhantomConfig,
    PhantomConfigError,
    generate_phantom,
    write_phantom,
)

LUMBAR = ("T12", "L1", "L2", "L3", "L4", "L5")


def _sample(vol: Volume, points: Any, order: int = 0) -> NDArray[Any]:
    pts = np.atleast_2d(np.asarray(points, dtype=np.float64))
    return np.asarray(ndimage.map_coordinates(vol.array, vol.lps_to_index(pts).T, order=order, mode="nearest"))


@pytest.fixture(scope="module")
def ph2() -> Phantom:
    """Default T12-L5 CT at 2 mm."""
    return generate_phantom(PhantomConfig(seed=7, spacing_mm=2.0))


@pytest.fixture(scope="module")
def ph3() -> Phantom:
    """Default T12-L5 CT at 3 mm, another seed."""
    return generate_phantom(PhantomConfig(seed=1, spacing_mm=3.0))


# ------------------------------------------------------------------------------------------------
def test_same_seed_is_bitwise_identical() -> None:
    cfg = PhantomConfig(seed=11, spacing_mm=3.0, lesion=True)
    a, b = generate_phantom(cfg), generate_phantom(cfg)
    assert a.ct.array.dtype == np.float32 and a.labels.array.dtype == np.uint8
    assert a.ct.array.tobytes() == b.ct.array.tobytes()
    assert a.labels.array.tobytes() == b.labels.array.tobytes()
    assert json.dumps(a.meta, sort_keys=True) == json.dumps(b.meta, sort_keys=True)


def test_different_seeds_differ(ph3: Phantom) -> None:
    other = generate_phantom(PhantomConfig(seed=2, spacing_mm=3.0))
    assert ph3.ct.shape != other.ct.shape or not np.array_equal(ph3.ct.array, other.ct.array)
    c1 = np.array(ph3.meta["vertebrae"]["L3"]["body_centre_lps_mm"])
    c2 = np.array(other.meta["vertebrae"]["L3"]["body_centre_lps_mm"])
    assert np.linalg.norm(c1 - c2) > 1.0
    w1 = ph3.meta["vertebrae"]["L3"]["pedicles"]["left"]["width_mm"]
    w2 = other.meta["vertebrae"]["L3"]["pedicles"]["left"]["width_mm"]
    assert w1 != w2


def test_anatomy_does_not_depend_on_spacing(ph3: Phantom) -> None:
    fine = generate_phantom(PhantomConfig(seed=1, spacing_mm=2.5))
    for level in LUMBAR:
        a = ph3.meta["vertebrae"][level]
        b = fine.meta["vertebrae"][level]
        assert a["body_centre_lps_mm"] == b["body_centre_lps_mm"]
        assert a["pedicles"] == b["pedicles"]


def test_levels_present_with_plausible_volume(ph2: Phantom) -> None:
    lab = ph2.labels.array
    ml = ph2.labels.voxel_volume_ml()
    assert ph2.meta["levels"] == list(LUMBAR)
    for level in LUMBAR:
        vol_ml = float(np.sum(lab == level_id(level))) * ml
        # adult T12 ~35-50 ml, L5 ~55-80 ml (whole vertebra incl. posterior elements)
        assert 25.0 < vol_ml < 100.0, (level, vol_ml)
    v = {lv: float(np.sum(lab == level_id(lv))) for lv in LUMBAR}
    assert v["L4"] > v["T12"]
    for sid in (SPINAL_CANAL, AORTA, INFERIOR_VENA_CAVA, SKIN, DISC):
        assert np.any(lab == sid), sid
    assert not np.any(lab == LESION)


def test_pedicle_centres_inside_their_vertebra(ph2: Phantom) -> None:
    for level in LUMBAR:
        info = ph2.meta["vertebrae"][level]
        for side in ("left", "right"):
            p = info["pedicles"][side]["isthmus_centre_lps_mm"]
            assert int(_sample(ph2.labels, p)[0]) == level_id(level), (level, side)
            axis = np.asarray(info["pedicles"][side]["axis_lps"])
            assert math.isclose(float(np.linalg.norm(axis)), 1.0, abs_tol=1e-4)
            # the axis runs posterior -> anterior (toward -y in LPS) and converges medially
            assert axis[1] < -0.8
            centre_x = info["body_centre_lps_mm"][0]
            sign = 1.0 if side == "left" else -1.0
            assert sign * (p[0] - centre_x) > 5.0
            assert sign * axis[0] < 0.0


def test_posterior_elements_lie_posterior_of_the_body(ph2: Phantom) -> None:
    lab = ph2.labels
    for level in LUMBAR:
        info = ph2.meta["vertebrae"][level]
        centre = np.asarray(info["body_centre_lps_mm"])
        tip = np.asarray(info["spinous_process_tip_lps_mm"])
        assert int(_sample(lab, tip)[0]) == level_id(level)
        assert tip[1] - centre[1] > info["body_depth_mm"] / 2 + 30.0
        pts = lab.index_to_lps(np.argwhere(lab.array == level_id(level)))
        post = pts[pts[:, 1] > centre[1] + info["body_depth_mm"] / 2 + 5.0]
        assert len(post) > 0.25 * len(pts)
        assert pts[:, 1].max() > centre[1] + 50.0
        assert pts[:, 1].min() > centre[1] - info["body_depth_mm"] / 2 - 4.0


def _canal_ray_hits(ph: Phantom, level: str) -> set[int]:
    info = ph.meta["vertebrae"][level]
    ex = np.asarray(info["left_direction_lps"])
    ey = np.asarray(info["posterior_direction_lps"])
    up = np.asarray(info["superior_direction_lps"])
    c = np.asarray(info["canal_centre_lps_mm"])
    ped = np.asarray(info["pedicles"]["left"]["isthmus_centre_lps_mm"])
    c = c + up * float((ped - c) @ up)
    assert int(_sample(ph.labels, c)[0]) == SPINAL_CANAL
    hits = set()
    ts = np.arange(0.0, 45.0, 0.25)
    for ang in np.linspace(0.0, 2 * np.pi, 48, endpoint=False):
        d = np.cos(ang) * ex + np.sin(ang) * ey
        values = _sample(ph.labels, c[None, :] + ts[:, None] * d[None, :])
        first = next(int(v) for v in values if int(v) != SPINAL_CANAL)
        hits.add(first)
    return hits


def test_canal_is_enclosed_and_continuous(ph2: Phantom) -> None:
    for level in LUMBAR:
        # every ray leaving the canal in the pedicle plane meets the vertebra itself
        assert _canal_ray_hits(ph2, level) == {level_id(level)}, level
    canal = ph2.labels.array == SPINAL_CANAL
    _, n = ndimage.label(canal)
    assert n == 1
    centres = [ph2.meta["vertebrae"][lv]["canal_centre_lps_mm"] for lv in LUMBAR]
    idx = np.round(ph2.labels.lps_to_index(np.asarray(centres))).astype(int)
    zs = idx[:, 2]
    # every axial slice between the top and bottom level holds canal voxels
    for k in range(zs.min(), zs.max() + 1):
        assert canal[:, :, k].any(), k


def _tissue_hu(ph: Phantom) -> dict[str, float]:
    ct, lab = ph.ct.array, ph.labels.array
    vals: dict[str, float] = {}
    body_vals = []
    for level in LUMBAR:
        c = ph.meta["vertebrae"][level]["body_centre_lps_mm"]
        offs = np.array([[dx, dy, dz] for dx in (-4, 0, 4) for dy in (-4, 0, 4) for dz in (-3, 0, 3)], float)
        body_vals.append(float(np.mean(_sample(ph.ct, np.asarray(c) + offs, order=1))))
    vals["cancellous"] = float(np.mean(body_vals))
    vert = np.isin(lab, [level_id(lv) for lv in LUMBAR])
    vals["bone_p99"] = float(np.percentile(ct[vert], 99))
    vals["disc"] = float(np.median(ct[ndimage.binary_erosion(lab == DISC)]))
    vals["aorta"] = float(np.median(ct[ndimage.binary_erosion(lab == AORTA)]))
    vals["canal"] = float(np.median(ct[lab == SPINAL_CANAL]))
    corner = ct[:8, :8, :]
    vals["air"] = float(np.median(corner))
    # subcutaneous fat: just inside the skin shell, far from muscles (anterior wall)
    skin = lab == SKIN
    inner = ndimage.binary_dilation(skin, iterations=2) & ~skin & (lab == 0)
    inner &= ct > -500
    vals["subcutaneous"] = float(np.median(ct[inner]))
    return vals


def test_hu_ranges_by_tissue(ph2: Phantom) -> None:
    v = _tissue_hu(ph2)
    assert 150.0 < v["cancellous"] < 320.0, v
    assert v["bone_p99"] > 450.0, v
    assert 55.0 < v["disc"] < 125.0, v
    assert 15.0 < v["aorta"] < 70.0, v
    assert -60.0 < v["canal"] < 50.0, v
    assert v["air"] < -950.0, v
    assert -140.0 < v["subcutaneous"] < -40.0, v
    meta_bd = ph2.meta["bone_density"]
    assert 150.0 < meta_bd["cancellous_hu"] < 300.0
    assert 700.0 < meta_bd["cortical_hu"] < 1300.0


def test_osteoporotic_bone_is_less_dense(ph3: Phantom) -> None:
    weak = generate_phantom(PhantomConfig(seed=1, spacing_mm=3.0, bone_quality=0.0))
    normal = _tissue_hu(ph3)["cancellous"]
    porotic = _tissue_hu(weak)["cancellous"]
    assert porotic < normal - 100.0
    assert 25.0 < porotic < 120.0
    assert weak.meta["bone_density"]["cancellous_hu"] < 70.0
    # same anatomy, only density changes
    assert np.array_equal(weak.labels.array, ph3.labels.array)


@pytest.mark.parametrize("kind", ["lytic", "blastic"])
def test_lesion_is_labelled_inside_its_level(kind: str) -> None:
    ph = generate_phantom(
        PhantomConfig(seed=4, spacing_mm=2.0, lesion=True, lesion_type=kind, levels=("L2", "L3", "L4"))  # type: ignore[arg-type]
    )
    les = ph.meta["lesion"]
    assert les["type"] == kind and les["label"] == LESION and les["level"] in ("L2", "L3", "L4")
    assert 3.0 <= les["radius_mm"] <= 10.5
    lab = ph.labels.array
    mask = lab == LESION
    assert mask.sum() > 0
    pts = ph.labels.index_to_lps(np.argwhere(mask))
    centre = np.asarray(les["centre_lps_mm"])
    assert np.linalg.norm(pts - centre, axis=1).max() <= max(les["radii_mm"]) + 2.0
    # the lesion sits inside its vertebra: its neighbours are that level (or the lesion)
    ring = ndimage.binary_dilation(mask, iterations=1) & ~mask
    assert set(np.unique(lab[ring]).tolist()) <= {level_id(les["level"]), LESION}
    inside = float(np.mean(ph.ct.array[ndimage.binary_erosion(mask)] if ndimage.binary_erosion(mask).any()
                           else ph.ct.array[mask]))
    if kind == "lytic":
        assert inside < 120.0
    else:
        assert inside > 500.0


def test_cbct_is_noisier_with_a_cylindrical_fov(ph3: Phantom) -> None:
    cb = generate_phantom(PhantomConfig(seed=1, spacing_mm=3.0, modality="cbct"))
    assert np.array_equal(cb.labels.array, ph3.labels.array)  # labels exact, outside the FOV too
    fov = cb.meta["fov"]
    assert fov["type"] == "cylinder" and fov["radius_mm"] == 100.0
    x = cb.ct.index_to_lps(np.argwhere(np.ones((*cb.ct.shape[:2], 1), bool)))
    r = np.hypot(x[:, 0] - fov["centre_lps_mm"][0], x[:, 1] - fov["centre_lps_mm"][1]).reshape(cb.ct.shape[:2])
    outside = r > fov["radius_mm"] + 1e-6
    assert np.all(cb.ct.array[outside] == -1000.0)
    assert np.std(cb.ct.array[~outside]) > 50.0

    # the noise alone: difference to the same phantom generated without noise
    ct0 = generate_phantom(PhantomConfig(seed=1, spacing_mm=3.0, noise_hu=0.0))
    cb0 = generate_phantom(PhantomConfig(seed=1, spacing_mm=3.0, modality="cbct", noise_hu=0.0))
    inside = ~outside[:, :, None] & np.ones(cb.ct.shape, bool)
    noise_ct = float(np.std((ph3.ct.array - ct0.ct.array)[inside]))
    noise_cb = float(np.std((cb.ct.array - cb0.ct.array)[inside]))
    assert noise_cb > 3.0 * noise_ct
    assert noise_ct == pytest.approx(ph3.meta["imaging"]["noise_sd_hu"], rel=0.1)
    # beyond noise: cupping, streaks and the grey-value scale/offset change the image itself
    assert float(np.mean(np.abs(cb0.ct.array - ct0.ct.array)[inside])) > 20.0
    im = cb.meta["imaging"]
    assert im["modality"] == "cbct" and im["noise_sd_hu"] > ph3.meta["imaging"]["noise_sd_hu"]
    for key in ("grey_scale", "grey_offset", "cupping_fraction", "streaks"):
        assert key in im


def test_ribs_at_t12_but_not_l1() -> None:
    ph = generate_phantom(PhantomConfig(seed=3, spacing_mm=2.0, levels=("T11", "T12", "L1")))
    vt = ph.meta["vertebrae"]
    assert "ribs_centreline_lps_mm" not in vt["L1"]
    for level in ("T11", "T12"):
        ribs = vt[level]["ribs_centreline_lps_mm"]
        for side in ("left", "right"):
            pts = np.asarray(ribs[side])
            assert len(pts) >= 4
            body_x = vt[level]["body_centre_lps_mm"][0]
            # the shaft runs laterally, inside the body, as unlabelled dense bone
            shaft = pts[2:]
            assert np.all(np.abs(shaft[:, 0] - body_x) > 30.0)
            hu = _sample(ph.ct, shaft, order=1)
            assert np.median(hu) > 150.0, (level, side, hu)
            assert np.all(_sample(ph.labels, shaft) == 0)
    # rib heads and necks lie beside T11/T12 (unlabelled dense bone next to the vertebra), not beside L1
    def unlabelled_bone_near(level: str) -> int:
        info = vt[level]
        c = np.asarray(info["body_centre_lps_mm"])
        idx = np.argwhere(np.ones(ph.ct.shape, bool))
        pts = ph.ct.index_to_lps(idx)
        local = (pts - c) @ np.stack([np.asarray(info["left_direction_lps"]),
                                      np.asarray(info["posterior_direction_lps"]),
                                      np.asarray(info["superior_direction_lps"])], axis=1)
        near = (np.abs(local[:, 2]) < info["body_height_mm"] / 2) & (np.abs(local[:, 0]) > 15.0)
        near &= (np.hypot(local[:, 0], local[:, 1]) < 55.0)
        flat_ct = ph.ct.array.reshape(-1)
        # unlabelled and away from the vertebrae's own (blurred) surfaces
        vertebrae = np.isin(ph.labels.array, [level_id(n) for n in ("T10", "T11", "T12", "L1", "L2")])
        free = ~ndimage.binary_dilation(vertebrae, iterations=2) & (ph.labels.array == 0)
        return int(np.sum(near & (flat_ct > 300.0) & free.reshape(-1)))

    assert unlabelled_bone_near("T12") > 50
    assert unlabelled_bone_near("L1") == 0


def test_sacrum_when_requested() -> None:
    ph = generate_phantom(PhantomConfig(seed=5, spacing_mm=3.0, levels=("L4", "L5", "S")))
    lab = ph.labels.array
    ml = float(np.sum(lab == 26)) * ph.labels.voxel_volume_ml()
    assert 80.0 < ml < 400.0
    s = ph.meta["vertebrae"]["S"]
    assert s["requested"] and s["label"] == 26
    assert s["apex_lps_mm"][2] < s["superior_endplate_centre_lps_mm"][2] - 60.0
    assert any(d["upper"] == "L5" and d["lower"] == "S" for d in ph.meta["discs"])
    # nothing below the sacrum is generated as a vertebra
    assert ph.meta["context_levels"] == ["L3"]


def test_discs_and_vessels_are_where_anatomy_puts_them(ph2: Phantom) -> None:
    for disc in ph2.meta["discs"]:
        if disc["upper"] in LUMBAR and disc["lower"] in LUMBAR:
            assert int(_sample(ph2.labels, disc["centre_lps_mm"])[0]) == DISC, disc
    info = ph2.meta["vertebrae"]["L2"]
    c = np.asarray(info["body_centre_lps_mm"])
    k = round(float(ph2.labels.lps_to_index(c)[2]))
    sl = ph2.labels.array[:, :, k]
    for sid, side in ((AORTA, 1.0), (INFERIOR_VENA_CAVA, -1.0)):
        idx = np.argwhere(sl == sid)
        assert len(idx) > 0
        p = ph2.labels.index_to_lps(np.c_[idx, np.full(len(idx), k)]).mean(axis=0)
        assert side * (p[0] - c[0]) > 0.0, sid  # aorta left (+x), IVC right
        assert p[1] < c[1] - info["body_depth_mm"] / 2 + 3.0, sid  # anterior of the body
    ao = np.asarray(ph2.meta["vessels"]["aorta"]["centreline_lps_mm"])
    assert len(ao) >= 3 and np.all(np.diff(ao[:, 2]) < 0)


def test_skin_shell_and_posterior_midline_point(ph2: Phantom) -> None:
    lab = ph2.labels
    skin = lab.array == SKIN
    assert skin.any()
    p = np.asarray(ph2.meta["skin_posterior_midline_lps_mm"])
    idx = np.round(lab.lps_to_index(p)).astype(int)
    nb = lab.array[idx[0] - 1: idx[0] + 2, idx[1] - 2: idx[1] + 2, idx[2] - 1: idx[2] + 2]
    assert np.any(nb == SKIN)
    # the skin shell encloses the body: air outside is not connected to the inside of the body
    outside, _ = ndimage.label((lab.array == 0) & (ph2.ct.array < -900))
    corner = outside[0, 0, lab.shape[2] // 2]
    centre = np.round(lab.lps_to_index(ph2.meta["vertebrae"]["L3"]["body_centre_lps_mm"])).astype(int)
    assert corner != 0 and outside[tuple(centre)] != corner


def test_pedicle_isthmus_fits_literature_screws() -> None:
    """At 1 mm the bony isthmus has the tabulated width: L1 narrow (~7-8 mm), L5 wide (~13 mm).

    The width is measured as twice the radius of the largest ball centred on the isthmus centre
    that stays inside the vertebra's label (what limits a screw).
    """
    for level, lo, hi in (("L1", 6.8, 9.0), ("L5", 11.5, 15.0)):
        ph = generate_phantom(PhantomConfig(seed=2, spacing_mm=1.0, levels=(level,), context_levels=False))
        info = ph.meta["vertebrae"][level]
        inside = ph.labels.array == level_id(level)
        edt = ndimage.distance_transform_edt(inside, sampling=ph.labels.spacing_mm)
        for side in ("left", "right"):
            ped = info["pedicles"][side]
            assert lo < ped["width_mm"] < hi
            assert 13.0 < ped["height_mm"] < 17.0
            r = float(_sample(ph.labels.with_array(edt), ped["isthmus_centre_lps_mm"], order=1)[0])
            assert abs(2.0 * r - ped["width_mm"]) < 1.5, (level, side, 2 * r, ped["width_mm"])
            # the bone continues along the axis: a screw track from the isthmus into the body
            c = np.asarray(ped["isthmus_centre_lps_mm"])
            axis = np.asarray(ped["axis_lps"])
            track = c[None, :] + np.arange(0.0, 20.0, 1.0)[:, None] * axis[None, :]
            assert np.all(_sample(ph.labels, track) == level_id(level))
        t1 = info["pedicles"]["left"]["transverse_angle_deg"]
        assert (5.0 < t1 < 16.0) if level == "L1" else (20.0 < t1 < 34.0)


def test_write_phantom_round_trip(tmp_path: Path) -> None:
    ph = generate_phantom(PhantomConfig(seed=9, spacing_mm=3.0, levels=("L3", "L4")))
    out = tmp_path / "new" / "case"
    paths = write_phantom(ph, out)
    assert set(paths) == {"ct", "labels", "meta"}
    assert [p.name for p in (paths["ct"], paths["labels"], paths["meta"])] == ["ct.nii.gz", "labels.nii.gz",
                                                                            "meta.json"]
    ct = read_volume(paths["ct"])
    lab = read_volume(paths["labels"])
    assert ct.same_grid(ph.ct) and lab.same_grid(ph.labels)
    assert np.array_equal(ct.array, ph.ct.array)
    assert np.array_equal(lab.array, ph.labels.array) and lab.array.dtype == np.uint8
    meta = json.loads(paths["meta"].read_text())
    assert meta == json.loads(json.dumps(ph.meta))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_meta_is_json_and_complete(ph3: Phantom) -> None:
    text = json.dumps(ph3.meta, allow_nan=False)
    meta = json.loads(text)
    assert meta["frame"] == "LPS" and meta["units"] == "mm" and meta["seed"] == 1
    for level in LUMBAR:
        info = meta["vertebrae"][level]
        for key in ("body_centre_lps_mm", "superior_direction_lps", "spinous_process_tip_lps_mm",
                    "skin_posterior_midline_lps_mm", "body_width_mm", "body_depth_mm", "body_height_mm"):
            assert key in info, key
        for side in ("left", "right"):
            for key in ("isthmus_centre_lps_mm", "axis_lps", "width_mm", "height_mm"):
                assert key in info["pedicles"][side]
    assert meta["fov"]["type"] == "box"
    assert meta["vessels"]["aorta"]["centreline_lps_mm"] and meta["vessels"]["inferior_vena_cava"]
    assert meta["context_levels"] == ["T11", "S"]
    origin = np.asarray(meta["grid"]["origin_lps_mm"])
    assert np.all(np.abs(origin[:2]) > 100.0)  # scanner-like origin, patient centred near x = 0
    body = np.asarray(meta["vertebrae"]["L3"]["body_centre_lps_mm"])
    assert abs(body[0]) < 20.0 and -40.0 < body[1] < 30.0


def test_config_normalises_and_validates() -> None:
    cfg = PhantomConfig(levels=["L2", "sacrum", "L3", "L4", "L5"])  # type: ignore[arg-type]
    assert cfg.levels == ("L2", "L3", "L4", "L5", "S")
    cases: list[tuple[dict[str, Any], str]] = [
        ({"levels": ("L3", "X9")}, "X9"),
        ({"levels": ()}, "levels"),
        ({"levels": ("L1", "L3")}, "contiguous"),
        ({"levels": ("C5",)}, "C5"),
        ({"spacing_mm": 0}, "spacing_mm"),
        ({"spacing_mm": float("nan")}, "spacing_mm"),
        ({"spacing_mm": 5.0}, "spacing_mm"),
        ({"bone_quality": 1.5}, "bone_quality"),
        ({"bone_quality": float("nan")}, "bone_quality"),
        ({"modality": "mri"}, "modality"),
        ({"seed": -1}, "seed"),
        ({"lesion_level": "L1", "levels": ("L3",)}, "lesion_level"),
        ({"fov_mm": (100.0, 250.0)}, "fov_mm"),
    ]
    for kwargs, word in cases:
        with pytest.raises(PhantomConfigError, match=word) as info:
            PhantomConfig(**kwargs)
        assert isinstance(info.value, ValueError) and isinstance(info.value, NeedleSteeringError)
    with pytest.raises(PhantomConfigError, match="voxels"):
        generate_phantom(PhantomConfig(spacing_mm=0.5, levels=("T1", "T2", "T3", "T4", "T5", "T6", "T7", "T8", "T9",
                                                                "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5")))
