"""Render the phantom figures of ``docs/phantom.md`` into ``docs/img/``.

Usage (from the repository root)::

    .venv/bin/python docs/make_phantom_figures.py [--seed 0] [--out docs/img]

Writes ``phantom_axial_pedicle.png`` (axial through the left L3 pedicle, bone window, labels
overlaid on the right half), ``phantom_sagittal_midline.png`` (midline sagittal, plain and
labelled) and ``phantom_cbct_axial.png`` (the same axial slice as CT and as CBCT).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from needle_steering.perception.render import (
    SliceAxis,
    ct_slice_rgb,
    label_slice,
    overlay_labels,
    save_png,
    slice_grid_lps_mm,
)
from needle_steering.perception.volume import Volume
from needle_steering.sim.phantom import PhantomConfig, generate_phantom

BONE = (400.0, 1800.0)
SOFT = (40.0, 400.0)


def _crop(rgb: NDArray[np.uint8], vol: Volume, axis: SliceAxis, point: list[float], half_mm: tuple[float, float], *,
          centre_mm: list[float] | None = None) -> NDArray[np.uint8]:
    """Crop ``rgb`` (a slice of ``vol``) to ``2 * half_mm`` (rows, cols) around ``centre_mm``."""
    pts, px = slice_grid_lps_mm(vol, axis, point)
    c = np.asarray(centre_mm if centre_mm is not None else point)
    d = np.linalg.norm(pts - c, axis=-1)
    r, col = np.unravel_index(int(np.argmin(d)), d.shape)
    hr, hc = round(half_mm[0] / px), round(half_mm[1] / px)
    return rgb[max(0, r - hr): r + hr, max(0, col - hc): col + hc]


def _zoom(rgb: NDArray[np.uint8], factor: int) -> NDArray[np.uint8]:
    return np.asarray(np.kron(rgb, np.ones((factor, factor, 1), np.uint8)), dtype=np.uint8)


def _hstack(*tiles: NDArray[np.uint8], gap: int = 6) -> NDArray[np.uint8]:
    height = max(t.shape[0] for t in tiles)
    padded = []
    for i, t in enumerate(tiles):
        pad_bottom = height - t.shape[0]
        pad_right = gap if i < len(tiles) - 1 else 0
        padded.append(np.pad(t, ((0, pad_bottom), (0, pad_right), (0, 0)), constant_values=255))
    return np.concatenate(padded, axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "img")
    args = parser.parse_args(argv)

    ct = generate_phantom(PhantomConfig(seed=args.seed, spacing_mm=1.0))
    cbct = generate_phantom(PhantomConfig(seed=args.seed, spacing_mm=1.0, modality="cbct"))
    l3 = ct.meta["vertebrae"]["L3"]
    pedicle = l3["pedicles"]["left"]["isthmus_centre_lps_mm"]
    body = l3["body_centre_lps_mm"]

    # axial through the left L3 pedicle: whole slice (soft-tissue window) + spine zoom, labels on the right
    axial_soft = ct_slice_rgb(ct.ct, "axial", pedicle, SOFT)
    axial_bone = ct_slice_rgb(ct.ct, "axial", pedicle, BONE)
    labels_ax = label_slice(ct.labels, "axial", pedicle)
    overlay = overlay_labels(axial_bone, labels_ax, 0.45)
    zoom_c = [body[0], body[1] + 28.0, pedicle[2]]
    zoom_plain = _zoom(_crop(axial_bone, ct.ct, "axial", pedicle, (55.0, 60.0), centre_mm=zoom_c), 3)
    zoom_lab = _zoom(_crop(overlay, ct.ct, "axial", pedicle, (55.0, 60.0), centre_mm=zoom_c), 3)
    save_png(_hstack(_zoom(axial_soft, 1), zoom_plain, zoom_lab), args.out / "phantom_axial_pedicle.png")

    # midline sagittal (x = mean of the body centres and spinous tips): plain and labelled
    vt = [ct.meta["vertebrae"][name] for name in ct.meta["levels"]]
    mid_x = float(np.mean([0.5 * (v["body_centre_lps_mm"][0] + v["spinous_process_tip_lps_mm"][0]) for v in vt]))
    midline = [mid_x, body[1], body[2]]
    sag = ct_slice_rgb(ct.ct, "sagittal", midline, BONE)
    sag_lab = overlay_labels(sag, label_slice(ct.labels, "sagittal", midline), 0.4)
    sag_c = [mid_x, body[1] + 20.0, body[2]]
    half = (0.5 * ct.ct.shape[2] * ct.ct.spacing_mm[2], 85.0)
    tiles = [_zoom(_crop(img, ct.ct, "sagittal", midline, half, centre_mm=sag_c), 2) for img in (sag, sag_lab)]
    save_png(_hstack(*tiles), args.out / "phantom_sagittal_midline.png")

    # CT vs CBCT, same axial slice (CBCT grey values shown with the same window)
    ct_ax = ct_slice_rgb(ct.ct, "axial", pedicle, BONE)
    cb_ax = ct_slice_rgb(cbct.ct, "axial", pedicle, BONE)
    save_png(_hstack(_zoom(ct_ax, 2), _zoom(cb_ax, 2)), args.out / "phantom_cbct_axial.png")
    print(f"wrote {sorted(p.name for p in args.out.glob('phantom_*.png'))} to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
