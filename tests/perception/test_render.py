"""Tests of slice rendering (needle_steering.perception.render): orientation, windowing, overlays, PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from needle_steering.errors import GeometryError, ImageError, LabelError
from needle_steering.perception.labels import AORTA, SPINAL_CANAL
from needle_steering.perception.render import (
    ct_slice_rgb,
    extract_slice,
    label_colour,
    label_slice,
    overlay_labels,
    save_png,
    window_to_uint8,
)
from needle_steering.perception.volume import Volume

# A 40 x 30 x 20 mm volume (1 mm voxels, LPS) with three markers:
#   LEFT  at x = +15 (patient left), ANTERIOR at y = -10, SUPERIOR at z = +8, around the centre (0, 0, 0).
CENTRE = np.array([0.0, 0.0, 0.0])
LEFT = np.array([15.0, 0.0, 0.0])
ANTERIOR = np.array([0.0, -10.0, 0.0])
SUPERIOR = np.array([0.0, 0.0, 8.0])


def _volume(direction: np.ndarray) -> Volume:
    """Same physical content on a grid with the given direction (identity = LPS, diag(-1,-1,1) = RAS)."""
    shape = (41, 31, 21)
    spacing = np.ones(3)
    # choose the origin so the grid covers x,y,z in [-20, 20] x [-15, 15] x [-10, 10] whatever the direction
    corner = np.array([-20.0, -15.0, -10.0])
    flip = np.diag(direction) < 0
    origin = np.where(flip, -corner, corner)
    vol = Volume(np.zeros(shape, np.float32), spacing, origin, direction)
    idx = np.argwhere(np.ones(shape, bool))
    pts = vol.index_to_lps(idx)
    arr = np.full(shape, -1000.0, np.float32)
    for p, value in ((CENTRE, 100.0), (LEFT, 400.0), (ANTERIOR, 700.0), (SUPERIOR, 1000.0)):
        near = np.linalg.norm(pts - p, axis=1) <= 2.0
        arr.reshape(-1)[near] = value
    return vol.with_array(arr)


def _brightest(img: np.ndarray, value_grey: int) -> tuple[float, float]:
    rows, cols = np.nonzero(img[:, :, 0] == value_grey)
    assert rows.size > 0, value_grey
    return float(rows.mean()), float(cols.mean())


WINDOW = (0.0, 2000.0)  # maps -1000 -> 0, 1000 -> 255


def _grey(hu: float) -> int:
    return int(window_to_uint8(np.array([hu]), WINDOW)[0])


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, -1.0, 1.0])])
def test_axial_is_radiological(direction: np.ndarray) -> None:
    vol = _volume(direction)
    img = ct_slice_rgb(vol, "axial", CENTRE, WINDOW)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[:2] == (31, 41)  # rows = y (A->P), columns = x (R->L)
    r0, c0 = _brightest(img, _grey(100.0))
    _, c_left = _brightest(img, _grey(400.0))
    r_ant, _ = _brightest(img, _grey(700.0))
    assert c_left > c0 + 10  # patient left on the image right
    assert r_ant < r0 - 5  # anterior at the top


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, -1.0, 1.0])])
def test_sagittal_and_coronal_orientation(direction: np.ndarray) -> None:
    vol = _volume(direction)
    sag = ct_slice_rgb(vol, "sagittal", CENTRE, WINDOW)
    assert sag.shape[:2] == (21, 31)  # rows = z (S at top), columns = y (A left)
    r0, c0 = _brightest(sag, _grey(100.0))
    _, c_ant = _brightest(sag, _grey(700.0))
    r_sup, _ = _brightest(sag, _grey(1000.0))
    assert c_ant < c0 - 5  # anterior on the left
    assert r_sup < r0 - 5  # superior at the top
    cor = ct_slice_rgb(vol, "coronal", CENTRE, WINDOW)
    assert cor.shape[:2] == (21, 41)
    r0, c0 = _brightest(cor, _grey(100.0))
    _, c_left = _brightest(cor, _grey(400.0))
    r_sup, _ = _brightest(cor, _grey(1000.0))
    assert c_left > c0 + 10 and r_sup < r0 - 5


def test_lps_and_ras_grids_render_identically() -> None:
    a = ct_slice_rgb(_volume(np.eye(3)), "axial", CENTRE, WINDOW)
    b = ct_slice_rgb(_volume(np.diag([-1.0, -1.0, 1.0])), "axial", CENTRE, WINDOW)
    assert np.array_equal(a, b)


def test_anisotropic_spacing_gives_square_pixels() -> None:
    vol = Volume(np.zeros((10, 10, 5), np.float32), [1.0, 1.0, 4.0], [0.0, 0.0, 0.0], np.eye(3))
    sag = extract_slice(vol, "sagittal", [4.0, 4.0, 8.0])
    assert sag.shape == (20, 10)  # 20 mm of z at 1 mm pixels, 10 mm of y


def test_window_mapping_and_validation() -> None:
    out = window_to_uint8(np.array([-1000.0, 0.0, 1000.0, 5000.0]), (0.0, 2000.0))
    assert out.tolist() == [0, 128, 255, 255]
    with pytest.raises(ImageError, match="width"):
        window_to_uint8(np.zeros(3), (0.0, 0.0))
    with pytest.raises(GeometryError, match="axis"):
        ct_slice_rgb(_volume(np.eye(3)), "oblique", CENTRE)  # type: ignore[arg-type]
    with pytest.raises(GeometryError, match="lps_point_mm"):
        ct_slice_rgb(_volume(np.eye(3)), "axial", [0.0, float("nan"), 0.0])


def test_overlay_labels_blends_only_labelled_pixels() -> None:
    rgb = np.full((4, 5, 3), 100, np.uint8)
    labels = np.zeros((4, 5), np.int64)
    labels[1, 1] = SPINAL_CANAL
    labels[2, 3] = AORTA
    out = overlay_labels(rgb, labels, alpha=1.0)
    assert tuple(out[1, 1]) == label_colour(SPINAL_CANAL)
    assert tuple(out[2, 3]) == label_colour(AORTA)
    assert np.all(out[labels == 0] == 100)
    half = overlay_labels(rgb, labels, alpha=0.5)
    expected = np.rint(0.5 * 100 + 0.5 * np.array(label_colour(AORTA))).astype(int)
    assert np.array_equal(half[2, 3].astype(int), expected)
    assert np.array_equal(overlay_labels(rgb, labels, alpha=0.0), rgb)
    outline = overlay_labels(rgb, labels, alpha=0.3, outline=True)
    assert tuple(outline[1, 1]) == label_colour(SPINAL_CANAL)
    with pytest.raises(LabelError, match="shape"):
        overlay_labels(rgb, labels[:3], 0.5)
    with pytest.raises(ImageError, match="alpha"):
        overlay_labels(rgb, labels, 1.5)


def test_label_slice_matches_the_image_grid() -> None:
    vol = _volume(np.eye(3))
    lab = vol.with_array((vol.array > 500).astype(np.uint8) * 7)
    img = ct_slice_rgb(vol, "axial", CENTRE, WINDOW)
    ls = label_slice(lab, "axial", CENTRE)
    assert ls.shape == img.shape[:2]
    assert np.all(img[ls == 7][:, 0] >= _grey(700.0) - 1)
    with pytest.raises(LabelError, match="integers"):
        label_slice(vol, "axial", CENTRE)


def test_save_png_round_trip(tmp_path: Path) -> None:
    rgb = np.zeros((6, 7, 3), np.uint8)
    rgb[2, 3] = (10, 200, 30)
    out = save_png(rgb, tmp_path / "sub" / "slice.png")
    back = np.asarray(Image.open(out))
    assert back.shape == (6, 7, 3) and np.array_equal(back, rgb)
    assert [p.name for p in out.parent.iterdir()] == ["slice.png"]
    with pytest.raises(ImageError, match="uint8"):
        save_png(rgb.astype(np.float32), tmp_path / "x.png")
    with pytest.raises(ImageError, match=r"\.png"):
        save_png(rgb, tmp_path / "x.jpg")
