"""Slice rendering of CT/CBCT volumes and label maps for figures and reports.

Slices are resampled in LPS millimetres (so any grid direction and anisotropic spacing display
correctly) and shown in the radiological orientation:

* ``"axial"``: viewed from the feet; patient left (+x) on the image right, anterior (-y) at the top.
* ``"coronal"``: viewed from the front; patient left on the image right, superior (+z) at the top.
* ``"sagittal"``: viewed from the patient's left; anterior (-y) on the image left, superior at the top.

Every image pixel is square, with the volume's smallest spacing as its size. The functions are pure
(no global state) and return ``uint8`` RGB arrays shaped ``(H, W, 3)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from needle_steering.atomic import atomic_path
from needle_steering.errors import GeometryError, ImageError, LabelError
from needle_steering.perception.labels import (
    AORTA,
    DISC,
    INFERIOR_VENA_CAVA,
    LESION,
    SKIN,
    SPINAL_CANAL,
)
from needle_steering.perception.volume import Volume

SliceAxis = Literal["axial", "coronal", "sagittal"]
SLICE_AXES: tuple[str, ...] = ("axial", "coronal", "sagittal")

#: LPS unit vectors of (image column direction, image row direction, slice normal) per view.
_VIEW_AXES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float], int]] = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), 2),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0), 1),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0), 0),
}

#: Fixed colours (RGB) of the non-vertebra structures.
STRUCTURE_COLOURS: dict[int, tuple[int, int, int]] = {
    SPINAL_CANAL: (255, 230, 0),
    AORTA: (230, 30, 30),
    INFERIOR_VENA_CAVA: (40, 90, 255),
    LESION: (255, 0, 255),
    SKIN: (240, 170, 120),
    DISC: (0, 220, 220),
}
_VERTEBRA_PALETTE: tuple[tuple[int, int, int], ...] = (
    (60, 200, 60),
    (255, 140, 0),
    (150, 90, 255),
    (0, 170, 120),
    (255, 90, 140),
    (180, 200, 40),
    (90, 160, 255),
)


def label_colour(label_id: int) -> tuple[int, int, int]:
    """RGB colour of a label id: fixed for the structures, a cycling palette for vertebrae/others."""
    lid = int(label_id)
    if lid in STRUCTURE_COLOURS:
        return STRUCTURE_COLOURS[lid]
    return _VERTEBRA_PALETTE[lid % len(_VERTEBRA_PALETTE)]


def _check_axis(axis: str) -> str:
    if axis not in _VIEW_AXES:
        raise GeometryError(f"slice axis must be one of {SLICE_AXES}, got {axis!r}")
    return axis


def slice_grid_lps_mm(
    volume: Volume, axis: SliceAxis, lps_point_mm: ArrayLike
) -> tuple[NDArray[np.float64], float]:
    """LPS positions of the display pixels of a slice through ``lps_point_mm``.

    The slice covers the volume's axis-aligned LPS bounding box in the two in-plane directions.

    Args:
        volume: The volume to slice.
        axis: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        lps_point_mm: A point ``(3,)`` on the slice plane, LPS millimetres.

    Returns:
        ``(points, pixel_mm)``: pixel centres ``(H, W, 3)`` in LPS millimetres and the pixel size.
    """
    _check_axis(axis)
    point = np.asarray(lps_point_mm, dtype=np.float64).reshape(-1)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise GeometryError(f"lps_point_mm must be 3 finite numbers, got {np.asarray(lps_point_mm).tolist()!r}")
    col_dir, row_dir, normal_axis = _VIEW_AXES[axis]
    col = np.asarray(col_dir)
    row = np.asarray(row_dir)
    lo, hi = volume.extent_lps_mm()
    half = volume.spacing_mm / 2.0
    lo = lo - np.abs(volume.direction) @ half
    hi = hi + np.abs(volume.direction) @ half
    pixel_mm = float(np.min(volume.spacing_mm))
    # start corner of each in-plane direction (the end the direction points away from)
    col_axis = int(np.argmax(np.abs(col)))
    row_axis = int(np.argmax(np.abs(row)))
    col_start = lo[col_axis] if col[col_axis] > 0 else hi[col_axis]
    row_start = lo[row_axis] if row[row_axis] > 0 else hi[row_axis]
    n_cols = max(1, round((hi[col_axis] - lo[col_axis]) / pixel_mm))
    n_rows = max(1, round((hi[row_axis] - lo[row_axis]) / pixel_mm))
    origin = np.zeros(3)
    origin[normal_axis] = point[normal_axis]
    origin[col_axis] = col_start
    origin[row_axis] = row_start
    cols = (np.arange(n_cols) + 0.5) * pixel_mm
    rows = (np.arange(n_rows) + 0.5) * pixel_mm
    pts = origin + rows[:, None, None] * row[None, None, :] + cols[None, :, None] * col[None, None, :]
    return pts, pixel_mm


def extract_slice(
    volume: Volume,
    axis: SliceAxis,
    lps_point_mm: ArrayLike,
    *,
    order: int = 1,
    fill_value: float | None = None,
) -> NDArray[np.float64]:
    """Resample a display-oriented 2-D slice of ``volume``.

    Args:
        volume: Image or label volume.
        axis: ``"axial"``, ``"coronal"`` or ``"sagittal"`` (orientation in the module docstring).
        lps_point_mm: A point ``(3,)`` on the slice plane, LPS millimetres.
        order: Interpolation order (1 linear for images, 0 nearest for label maps).
        fill_value: Value outside the volume (default: the array minimum, 0 for integer arrays).

    Returns:
        Slice ``(H, W)`` as float64 (cast back to int for labels with ``np.rint``).
    """
    from scipy import ndimage

    if order not in (0, 1, 3):
        raise ImageError(f"interpolation order must be 0, 1 or 3, got {order}")
    pts, _ = slice_grid_lps_mm(volume, axis, lps_point_mm)
    idx = volume.lps_to_index(pts)
    arr = volume.array
    if fill_value is None:
        fill_value = 0.0 if arr.dtype.kind in "iub" else float(np.min(arr))
    coords = np.moveaxis(idx, -1, 0)
    source = arr.astype(np.float32) if arr.dtype.kind in "bf" and arr.dtype != np.float64 else arr
    out = ndimage.map_coordinates(
        source, coords, order=order, mode="constant", cval=float(fill_value), prefilter=order > 1
    )
    return np.asarray(out, dtype=np.float64)


def window_to_uint8(values: ArrayLike, window: tuple[float, float]) -> NDArray[np.uint8]:
    """Map values through a display window ``(center, width)`` to 0..255."""
    center, width = (float(w) for w in window)
    if not np.isfinite(center) or not np.isfinite(width) or width <= 0:
        raise ImageError(f"window must be (center, width) with finite center and width > 0, got {window!r}")
    arr = np.asarray(values, dtype=np.float64)
    scaled = (arr - (center - width / 2.0)) / width
    return np.asarray(np.clip(np.rint(scaled * 255.0), 0, 255), dtype=np.uint8)


def ct_slice_rgb(
    volume: Volume,
    axis: SliceAxis,
    lps_point_mm: ArrayLike,
    window: tuple[float, float] = (400.0, 1800.0),
) -> NDArray[np.uint8]:
    """Grey RGB image of a CT/CBCT slice in radiological orientation.

    Args:
        volume: Intensity volume (HU or grey values).
        axis: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        lps_point_mm: A point ``(3,)`` on the slice plane, LPS millimetres.
        window: Display window ``(center, width)``, e.g. bone ``(400, 1800)``, soft tissue ``(40, 400)``.

    Returns:
        ``uint8`` image ``(H, W, 3)``.
    """
    values = extract_slice(volume, axis, lps_point_mm, order=1)
    grey = window_to_uint8(values, window)
    return np.repeat(grey[:, :, None], 3, axis=2)


def label_slice(volume: Volume, axis: SliceAxis, lps_point_mm: ArrayLike) -> NDArray[np.int64]:
    """Nearest-neighbour label slice matching :func:`ct_slice_rgb` pixel for pixel (same grid)."""
    if volume.array.dtype.kind not in "iub":
        raise LabelError(f"label volume must hold integers, got dtype {volume.array.dtype}")
    values = extract_slice(volume, axis, lps_point_mm, order=0, fill_value=0.0)
    return np.rint(values).astype(np.int64)


def overlay_labels(
    rgb: ArrayLike,
    label_slice: ArrayLike,
    alpha: float = 0.4,
    *,
    outline: bool = False,
) -> NDArray[np.uint8]:
    """Blend label colours over an RGB slice.

    Args:
        rgb: Image ``(H, W, 3)``, uint8.
        label_slice: Integer labels ``(H, W)`` (0 = background, left untouched).
        alpha: Opacity of the label colours, in ``[0, 1]``.
        outline: Draw only the 1-pixel borders of each label (opaque) instead of a filled blend.

    Returns:
        New ``uint8`` image ``(H, W, 3)``.
    """
    image = np.asarray(rgb)
    labels = np.asarray(label_slice)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"rgb must have shape (H, W, 3), got {image.shape}")
    if labels.shape != image.shape[:2]:
        raise LabelError(f"label slice shape {labels.shape} does not match image shape {image.shape[:2]}")
    if not 0.0 <= float(alpha) <= 1.0:
        raise ImageError(f"alpha must lie in [0, 1], got {alpha}")
    ids = np.unique(labels)
    ids = ids[ids != 0]
    lut = np.zeros((int(max(ids.max(initial=0), 0)) + 1, 3), dtype=np.float64)
    for lid in ids:
        lut[int(lid)] = label_colour(int(lid))
    out = image.astype(np.float64)
    if outline:
        border = np.zeros(labels.shape, dtype=bool)
        border[:-1, :] |= labels[:-1, :] != labels[1:, :]
        border[1:, :] |= labels[1:, :] != labels[:-1, :]
        border[:, :-1] |= labels[:, :-1] != labels[:, 1:]
        border[:, 1:] |= labels[:, 1:] != labels[:, :-1]
        mask = border & (labels > 0)
        out[mask] = lut[labels[mask]]
    else:
        mask = labels > 0
        out[mask] = (1.0 - alpha) * out[mask] + alpha * lut[labels[mask]]
    return np.asarray(np.clip(np.rint(out), 0, 255), dtype=np.uint8)


def save_png(rgb: ArrayLike, path: str | os.PathLike[str]) -> Path:
    """Write an RGB (or grey) image as PNG atomically, creating the folder if needed.

    Args:
        rgb: ``uint8`` image ``(H, W, 3)`` or ``(H, W)``.
        path: Output ``.png`` path.

    Returns:
        The written path.
    """
    from PIL import Image

    image = np.asarray(rgb)
    if image.dtype != np.uint8:
        raise ImageError(f"PNG needs a uint8 image, got dtype {image.dtype}")
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ImageError(f"PNG needs an (H, W) or (H, W, 3) image, got shape {image.shape}")
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ImageError(f"{out}: save_png writes .png files only")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, suffix=".png") as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return out


__all__ = [
    "SLICE_AXES",
    "STRUCTURE_COLOURS",
    "SliceAxis",
    "ct_slice_rgb",
    "extract_slice",
    "label_colour",
    "label_slice",
    "overlay_labels",
    "save_png",
    "slice_grid_lps_mm",
    "window_to_uint8",
]
