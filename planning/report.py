"""Self-contained HTML planning report (images embedded as base64 PNG, charts as inline SVG).

Order of the page: identification and hashes, **warnings**, skipped trajectories with reasons,
the screw table, bone quality per level, then one block per trajectory with two oblique
reformats that contain the tool axis (an *axial-oblique* view: the plane through the axis closest
to the axial plane; a *sagittal-oblique* view: the plane through the axis and the superior
direction) with the tool drawn over the CT and the labelled structures outlined, and the CT
profile (mean HU over the tool's cross-section) along the tool.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from needle_steering.atomic import write_text_atomic
from needle_steering.errors import PlanningError
from needle_steering.perception import labels as ids
from needle_steering.perception.volume import Volume
from needle_steering.planning.plan_document import PlanDocument, Trajectory

_PIXEL_MM = 0.5
_WINDOW = (400.0, 1800.0)  # bone window (centre, width), HU
_COLOURS = {
    ids.SPINAL_CANAL: (60, 200, 80),
    ids.AORTA: (220, 60, 60),
    ids.INFERIOR_VENA_CAVA: (80, 120, 230),
    ids.LESION: (240, 150, 30),
    ids.DISC: (170, 120, 200),
}


def _unit(v: ArrayLike) -> NDArray[np.float64]:
    arr = np.asarray(v, dtype=np.float64)
    out: NDArray[np.float64] = arr / np.linalg.norm(arr)
    return out


def _sample(volume: Volume, pts: NDArray[np.float64], order: int, cval: float) -> NDArray[np.float64]:
    from scipy import ndimage

    arr = volume.array if volume.array.dtype.kind == "f" or order == 0 else volume.array.astype(np.float32)
    idx = volume.lps_to_index(pts.reshape(-1, 3))
    vals = ndimage.map_coordinates(arr, idx.T, order=order, mode="constant", cval=cval, prefilter=False)
    return np.asarray(vals, dtype=np.float64).reshape(pts.shape[:-1])


def _view_axes(d: NDArray[np.float64], superior: NDArray[np.float64]) -> dict[str, NDArray[np.float64]]:
    """Second in-plane axis of the two oblique views containing the tool axis ``d``."""
    up = _unit(superior - (superior @ d) * d) if abs(float(superior @ d)) < 0.99 else _unit(np.cross(d, [1.0, 0, 0]))
    lateral = _unit(np.cross(up, d))
    return {"axial-oblique": lateral, "sagittal-oblique": up}


def _render_view(
    ct: Volume,
    labels: Volume,
    pts_path: NDArray[np.float64],
    radius: float,
    *,
    d: NDArray[np.float64],
    v_axis: NDArray[np.float64],
    level_id: int | None,
) -> bytes:
    """PNG of the plane spanned by ``d`` (horizontal) and ``v_axis`` (vertical) around the tool."""
    from PIL import Image, ImageDraw

    a = pts_path[0]
    along = (pts_path - a) @ d
    lo_u, hi_u = float(along.min()) - 20.0, float(along.max()) + 20.0
    half_v = 35.0
    us = np.arange(lo_u, hi_u, _PIXEL_MM)
    vs = np.arange(half_v, -half_v, -_PIXEL_MM)
    grid = a[None, None, :] + us[None, :, None] * d[None, None, :] + vs[:, None, None] * v_axis[None, None, :]
    hu = _sample(ct, grid, 1, -1024.0)
    lab = _sample(labels, grid, 0, 0.0).astype(np.int64)
    c, w = _WINDOW
    grey = np.clip((hu - (c - w / 2)) / w * 255.0, 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.float64)
    for sid, colour in _COLOURS.items():
        m = lab == sid
        rgb[m] = 0.6 * rgb[m] + 0.4 * np.asarray(colour)
    if level_id is not None:
        m = lab == level_id
        edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
        rgb[edge] = (0, 220, 255)
    img = Image.fromarray(rgb.astype(np.uint8)).resize((2 * len(us), 2 * len(vs)), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(img)

    def px(p: NDArray[np.float64]) -> tuple[float, float]:
        rel = p - a
        return (2 * (float(rel @ d) - lo_u) / _PIXEL_MM, 2 * (half_v - float(rel @ v_axis)) / _PIXEL_MM)

    offs = radius * v_axis
    for sign in (1.0, -1.0):
        line = [px(p + sign * offs) for p in pts_path]
        draw.line(line, fill=(255, 230, 0), width=2)
    draw.line([px(pts_path[0] - offs), px(pts_path[0] + offs)], fill=(255, 230, 0), width=2)
    draw.ellipse(
        [px(pts_path[-1])[0] - 3, px(pts_path[-1])[1] - 3, px(pts_path[-1])[0] + 3, px(pts_path[-1])[1] + 3],
        outline=(255, 60, 60),
        width=2,
    )
    draw.text((6, 4), "10 mm", fill=(255, 255, 255))
    draw.line([(6, 18), (6 + 2 * 10 / _PIXEL_MM, 18)], fill=(255, 255, 255), width=2)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _profile(
    ct: Volume, pts_path: NDArray[np.float64], radius: float
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Mean HU over the tool cross-section every 1 mm along the path: ``(depth mm, HU)``."""
    seg = np.linalg.norm(np.diff(pts_path, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    s = np.arange(0.0, cum[-1] + 1e-9, 1.0)
    centre = np.stack([np.interp(s, cum, pts_path[:, k]) for k in range(3)], axis=1)
    tang = np.gradient(centre, axis=0) if len(centre) > 1 else np.tile(_unit(pts_path[-1] - pts_path[0]), (1, 1))
    tang /= np.maximum(np.linalg.norm(tang, axis=1, keepdims=True), 1e-9)
    ref = np.where(np.abs(tang[:, :1]) < 0.9, np.array([[1.0, 0, 0]]), np.array([[0, 1.0, 0]]))
    e1 = np.cross(tang, ref)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(tang, e1)
    ang = np.linspace(0, 2 * np.pi, 8, endpoint=False)
    rings = [centre]
    for frac in (0.5, 0.9):
        for t in ang:
            rings.append(centre + frac * radius * (np.cos(t) * e1 + np.sin(t) * e2))
    hu = _sample(ct, np.stack(rings, axis=1), 1, -1024.0)
    return s, hu.mean(axis=1)


def _svg_profile(depth: NDArray[np.float64], hu: NDArray[np.float64], ref_hu: float | None) -> str:
    """Small inline SVG chart of HU against depth."""
    w, h, m = 420, 160, 36
    lo = min(-200.0, float(np.min(hu)))
    hi = max(800.0, float(np.max(hu)))
    span = max(float(depth[-1]), 1.0)

    def xy(x: float, y: float) -> str:
        return f"{m + (w - 2 * m) * x / span:.1f},{h - m - (h - 2 * m) * (y - lo) / (hi - lo):.1f}"

    pts = " ".join(xy(float(x), float(y)) for x, y in zip(depth, hu, strict=True))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" class="chart">',
        f'<rect x="{m}" y="{m}" width="{w - 2 * m}" height="{h - 2 * m}" fill="#fafafa" stroke="#999"/>',
    ]
    for yv in (0.0, 400.0, 800.0):
        if lo <= yv <= hi:
            parts.append(
                f'<line x1="{m}" x2="{w - m}" y1="{xy(0, yv).split(",")[1]}" y2="{xy(0, yv).split(",")[1]}" '
                'stroke="#ddd"/>'
            )
            parts.append(f'<text x="2" y="{float(xy(0, yv).split(",")[1]) + 4:.1f}" font-size="10">{yv:.0f}</text>')
    if ref_hu is not None:
        y = xy(0, ref_hu).split(",")[1]
        parts.append(f'<line x1="{m}" x2="{w - m}" y1="{y}" y2="{y}" stroke="#c60" stroke-dasharray="4 3"/>')
        parts.append(
            f'<text x="{w - m - 120}" y="{float(y) - 3:.1f}" font-size="10" fill="#c60">body trabecular HU</text>'
        )
    parts.append(f'<polyline points="{pts}" fill="none" stroke="#036" stroke-width="1.5"/>')
    parts.append(f'<text x="{m}" y="{h - 8}" font-size="10">depth from entry (mm), 0 - {span:.0f}</text>')
    parts.append(f'<text x="{m}" y="{m - 6}" font-size="10">HU (mean over the tool cross-section)</text>')
    parts.append("</svg>")
    return "".join(parts)


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}"/>'


def _straight_ahead_cell(t: Trajectory) -> str:
    """Gain over the straight-ahead screw sized by the catalogue rules, with that screw's size."""
    sa_score = float(t.metrics.get("straight_ahead_density_score_mg", 0.0) or 0.0)
    if sa_score <= 0:
        return "no safe size on that line"
    gain = float(t.metrics.get("density_score_mg", 0.0)) / sa_score - 1.0
    return (f"{100 * gain:+.0f}% ({float(t.metrics.get('straight_ahead_diameter_mm', 0.0)):.1f} &times; "
            f"{float(t.metrics.get('straight_ahead_length_mm', 0.0)):.0f})")


def _fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return html.escape(str(value))


def _superior_of(plan: PlanDocument, level: str) -> NDArray[np.float64]:
    """The level's anatomical superior axis (from the plan), else the image's +S."""
    info = plan.levels.get(level, {})
    sup = info.get("superior_lps") if isinstance(info, dict) else None
    if isinstance(sup, list) and len(sup) == 3:
        return _unit(np.asarray(sup, dtype=np.float64))
    return np.array([0.0, 0.0, 1.0])


def _trajectory_block(plan: PlanDocument, traj: Trajectory, ct: Volume, labels: Volume) -> str:
    pts = np.asarray(traj.path_lps_mm, dtype=np.float64)
    d = _unit(pts[-1] - pts[0])
    level_id = ids.level_id(traj.level) if traj.level else None
    axes = _view_axes(d, _superior_of(plan, traj.level))
    images = "".join(
        f"<figure>{_img(_render_view(ct, labels, pts, traj.diameter_mm / 2, d=d, v_axis=v, level_id=level_id), name)}"
        f"<figcaption>{name} view containing the {traj.kind.replace('_', ' ')} (0.5 mm pixels; cyan: "
        f"{html.escape(traj.level or 'target')} outline; green: canal; red/blue: aorta/IVC; orange: lesion)"
        f"</figcaption></figure>"
        for name, v in axes.items()
    )
    depth, hu = _profile(ct, pts, traj.diameter_mm / 2)
    lvl = plan.levels.get(traj.level, {})
    ref = lvl.get("bone_quality", {}).get("trabecular_hu") if isinstance(lvl, dict) else None
    chart = _svg_profile(depth, hu, float(ref) if isinstance(ref, int | float) else None)
    m = traj.metrics
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(v, 2)}</td></tr>" for k, v in sorted(m.items()))
    warn = "".join(f"<li>{html.escape(w)}</li>" for w in traj.warnings)
    return (
        f'<section class="traj"><h3>{html.escape(traj.id)} &mdash; {html.escape(traj.kind)}</h3>'
        f"<p>entry {np.round(traj.entry_lps_mm, 1).tolist()} mm &rarr; tip {np.round(traj.tip_lps_mm, 1).tolist()} mm "
        f"(LPS), &#8960; {traj.diameter_mm:.1f} mm, length {traj.length_mm:.1f} mm; trajectory sha256 "
        f"<code>{traj.sha256[:16]}&hellip;</code></p>"
        f'<div class="figs">{images}</div>{chart}'
        f"{'<ul class=warn>' + warn + '</ul>' if warn else ''}"
        f'<details><summary>all metrics</summary><table class="kv">{rows}</table></details></section>'
    )


_CSS = """
body{font-family:system-ui,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;max-width:1200px;color:#111}
h1{font-size:22px} h2{font-size:18px;border-bottom:1px solid #ccc;padding-bottom:4px;margin-top:28px}
.warnings{background:#fff3f0;border:2px solid #c33;padding:8px 16px;border-radius:6px}
.ok{background:#f0fff3;border:2px solid #3a3;padding:8px 16px;border-radius:6px}
table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}
th{background:#f2f2f2} td.l,th.l{text-align:left} .gradeA{color:#070;font-weight:bold}
.gradeB{color:#a60;font-weight:bold} .figs{display:flex;flex-wrap:wrap;gap:12px} figure{margin:0}
figcaption{font-size:11px;color:#555;max-width:480px} img{border:1px solid #333;max-width:560px}
.traj{border-top:1px dashed #bbb;margin-top:18px;padding-top:6px} code{font-size:12px} ul.warn{color:#a00}
.small{font-size:12px;color:#555}
"""


def render_report_html(plan: PlanDocument, ct: Volume, labels: Volume) -> str:
    """The report page as a string (see :func:`write_report`)."""
    ct.require_same_grid(labels)
    screws = [t for t in plan.trajectories if t.kind == "pedicle_screw"]
    others = [t for t in plan.trajectories if t.kind != "pedicle_screw"]
    warn_items = "".join(f"<li>{html.escape(w)}</li>" for w in plan.warnings)
    skipped = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in sorted(plan.skipped.items()))
    if warn_items or skipped:
        head = (
            f'<div class="warnings"><h2>Warnings</h2><ul>{warn_items}</ul>'
            + (f"<h3>Not planned</h3><ul>{skipped}</ul>" if skipped else "")
            + "</div>"
        )
    else:
        head = '<div class="ok">No warnings: every requested trajectory was planned within all constraints.</div>'
    rows = []
    for t in screws:
        m = t.metrics
        grade = str(m.get("predicted_grade", "?"))
        rows.append(
            f"<tr><td class=l>{html.escape(t.level)}</td><td class=l>{html.escape(t.side)}</td>"
            f"<td>{t.diameter_mm:.1f} &times; {t.length_mm:.0f}</td>"
            f"<td>{_fmt(m.get('transverse_deg'))}</td><td>{_fmt(m.get('sagittal_deg'))}</td>"
            f"<td>{_fmt(m.get('mean_hu'), 0)}</td><td>{_fmt(m.get('density_score_mg'), 0)}</td>"
            f"<td>{100 * float(m.get('density_gain', 0.0)):+.0f}%</td><td>{_straight_ahead_cell(t)}</td>"
            f"<td>{_fmt(m.get('min_bone_clearance_mm'))}</td><td>{_fmt(m.get('min_medial_clearance_mm'))}</td>"
            f"<td>{_fmt(m.get('min_structure_clearance_mm'))}</td>"
            f"<td class='grade{html.escape(grade)}'>{html.escape(grade)}</td>"
            f"<td>{_fmt(m.get('pullout_force_n_estimate'), 0)}</td>"
            f"<td class=l>{html.escape('; '.join(t.warnings))}</td></tr>"
        )
    screw_table = (
        "<table><tr><th class=l>level</th><th class=l>side</th><th>&#8960; &times; L (mm)</th>"
        "<th>transverse (&deg;)</th>"
        "<th>sagittal (&deg;)</th><th>mean HU</th><th>density score (mg)</th><th>vs straight-ahead line, same size</th>"
        "<th>vs surgeon-sized straight-ahead screw</th>"
        "<th>cortex clearance (mm)</th><th>medial (mm)</th><th>canal/neighbours (mm)</th><th>predicted GR grade</th>"
        "<th>pull-out est. (N)</th><th class=l>notes</th></tr>" + "".join(rows) + "</table>"
        if rows
        else "<p>No pedicle screws in this plan.</p>"
    )
    bq_rows = []
    for level, info in sorted(plan.levels.items(), key=lambda kv: ids.level_id(kv[0])):
        bq = info.get("bone_quality", {}) if isinstance(info, dict) else {}
        bq_rows.append(
            f"<tr><td class=l>{html.escape(level)}</td><td>{_fmt(bq.get('trabecular_hu'), 0)}</td>"
            f"<td>{_fmt(bq.get('trabecular_bmd_mg_cm3'), 0)}</td>"
            f"<td class=l>{html.escape(str(bq.get('category', '')))}</td>"
            f"<td class=l>{html.escape(str(info.get('canal', '')))}</td></tr>"
        )
    bq_table = (
        "<table><tr><th class=l>level</th><th>trabecular HU</th><th>BMD est. (mg/cm&sup3;)</th>"
        "<th class=l>category</th>"
        "<th class=l>spinal canal from</th></tr>" + "".join(bq_rows) + "</table>"
        if bq_rows
        else ""
    )
    derived = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in sorted(plan.derived.items()))
    blocks = "".join(_trajectory_block(plan, t, ct, labels) for t in [*screws, *others])
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>needle_steering plan</title>"
        f"<style>{_CSS}</style></head><body>"
        f"<h1>Surgical plan &mdash; {len(screws)} pedicle screw(s)"
        f"{', ' + str(len(others)) + ' needle path(s)' if others else ''}</h1>"
        f"<p class=small>plan sha256 <code>{plan.sha256}</code><br>CT sha256 <code>{plan.image.sha256}</code> "
        f"({html.escape(plan.image.source)})<br>created {html.escape(plan.created_utc)} "
        f"by {html.escape(plan.created_by)}; "
        "all coordinates LPS mm in the planning CT.</p>"
        f"{head}<h2>Pedicle screws</h2>{screw_table}"
        "<p class=small>Predicted Gertzbein-Robbins grade from the planned breach depth (A: none, B: &lt; 2 mm); "
        "clearances are from the screw surface; the density score is the bone mineral (HU &rarr; BMD calibration) "
        "integrated over the screw volume, compared with the straight-ahead trajectory along the pedicle axis of "
        "the same size. Pull-out force is a density &times; diameter &times; length <b>estimate</b> for comparing "
        "options, not a validated prediction.</p>"
        f"<h2>Bone quality</h2>{bq_table}"
        "<p class=small>Mean HU of the eroded trabecular core of each body. Below 110 HU at L1 osteoporosis is likely "
        "(Pickhardt et al., Ann Intern Med 2013); below 160 HU reduced density is possible.</p>"
        f"{'<h2>Derived structures</h2><ul>' + derived + '</ul>' if derived else ''}"
        f"<h2>Trajectories</h2>{blocks}</body></html>"
    )


def write_report(plan: PlanDocument, ct: Volume, labels: Volume, out_html: str | os.PathLike[str]) -> Path:
    """Write the self-contained HTML report of ``plan`` atomically.

    Args:
        plan: The plan document.
        ct: The planning CT (the one the plan was made on).
        labels: Its label map.
        out_html: Output path.

    Raises:
        PlanningError: The folder does not exist or the write fails.
        GeometryError: ``labels`` is not on the CT grid.
    """
    p = Path(out_html)
    if not p.parent.exists():
        raise PlanningError(f"{p}: folder {p.parent} does not exist")
    text = render_report_html(plan, ct, labels)
    try:
        return write_text_atomic(p, text)
    except OSError as exc:
        raise PlanningError(f"{p}: write failed ({exc})") from None


__all__ = ["render_report_html", "write_report"]
