"""Soft tissue of the phantom: torso layers, abdominal contents, organs, muscles, vessels, canal, discs.

The torso is described in the *patient frame* (origin on the torso axis, +x left, +y posterior,
+z superior; the world is this frame rotated and shifted by the patient's pose on the table).
Only the torso layers are evaluated slab by slab over the whole grid; every other structure is
painted inside its own bounding box.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from needle_steering.perception.labels import DISC, SKIN, SPINAL_CANAL
from needle_steering.sim.phantom.raster import Section, ellipsoid_sdf, paint, tube_sdf
from needle_steering.sim.phantom.sdf import (
    F32,
    Grid,
    combine,
    ellipse2,
    occupancy,
    superellipse2,
    to_local,
    world_aabb,
)
from needle_steering.sim.phantom.spine import LevelModel, Pose, SacrumModel, body_section_sdf

Vec = NDArray[np.float64]

#: Soft-tissue HU (non-contrast), calibrated on the shared abdominal CT (fat ~ -100, muscle ~ 45-50,
#: unenhanced blood ~ 40, cord/CSF ~ 10).
HU = {
    "air": -1000.0,
    "skin": 35.0,
    "fat": -100.0,
    "muscle": 48.0,
    "blood": 40.0,
    "csf": 12.0,
    "epidural_fat": -40.0,
    "liver": 58.0,
    "spleen": 46.0,
    "kidney": 32.0,
    "bowel": 30.0,
    "gas": -950.0,
    "lung": -850.0,
    "disc_annulus": 95.0,
    "disc_nucleus": 72.0,
    "table": 220.0,
    "heart": 42.0,
}
#: Contrast-enhanced (portal-venous/arterial mix) values used when ``contrast=True``.
HU_CONTRAST = {"aorta": 250.0, "ivc": 150.0, "liver": 105.0, "spleen": 115.0, "kidney": 160.0, "heart": 180.0}


@dataclass(frozen=True)
class Torso:
    """Torso shape and layers in the patient frame (mm).

    The cross-section is an ellipse anteriorly and a flatter superellipse (exponent 3) posteriorly
    (the back lies on the table), with a shallow midline groove over the spinous processes.
    """

    half_width: float
    half_depth_ant: float
    half_depth_post: float
    groove_depth: float
    groove_sigma: float
    fat_ant: float
    fat_lat: float
    fat_post: float
    wall: float
    waist_z: float
    spine_y_mean: float
    skin_mm: float = 2.0


@dataclass(frozen=True)
class SpineCurve:
    """Spine landmarks as functions of patient z (linear interpolation between levels)."""

    z: Vec
    x: Vec
    y: Vec
    half_width: Vec
    half_depth: Vec

    def at(self, pz: Any) -> tuple[F32, F32, F32, F32]:
        """Body centre x, y, half width and half depth at patient heights ``pz``."""
        return (
            np.interp(pz, self.z, self.x).astype(np.float32),
            np.interp(pz, self.z, self.y).astype(np.float32),
            np.interp(pz, self.z, self.half_width).astype(np.float32),
            np.interp(pz, self.z, self.half_depth).astype(np.float32),
        )


def torso_skin_distance(torso: Torso, px: F32, py: F32, pz: F32, *, sx: F32, sy: F32) -> F32:
    """Signed distance to the skin (mm, negative inside) at patient coordinates.

    Args:
        torso: Torso shape.
        px: Patient x (any broadcastable shape); ``py``, ``pz`` likewise.
        py: Patient y.
        pz: Patient z.
        sx: Spine centre x at ``pz`` (from :meth:`SpineCurve.at`).
        sy: Spine centre y at ``pz``.
    """
    waist = np.float32(1.0) - np.float32(0.03) * np.exp(-(((pz - np.float32(torso.waist_z)) / 70.0) ** 2))
    a = np.float32(torso.half_width) * waist
    b_post = np.float32(torso.half_depth_post) + np.float32(0.5) * (sy - np.float32(torso.spine_y_mean))
    b_ant = np.float32(torso.half_depth_ant)
    xa = np.abs(px) / a
    # anterior half: ellipse
    ya = py / b_ant
    rho2 = np.sqrt(xa * xa + ya * ya)
    g2 = np.sqrt((xa / a) ** 2 + (ya / b_ant) ** 2)
    d_ant = (rho2 - 1) * rho2 / np.maximum(g2, np.float32(1e-6))
    # posterior half: superellipse of exponent 3 with the midline groove
    groove = np.float32(torso.groove_depth) * np.exp(-(((px - sx) / np.float32(torso.groove_sigma)) ** 2))
    yb = np.abs(py + groove) / b_post
    rho3 = np.cbrt(xa * xa * xa + yb * yb * yb)
    inv = 1.0 / np.maximum(rho3 * rho3, np.float32(1e-6))
    g3 = inv * np.sqrt((xa * xa / a) ** 2 + (yb * yb / b_post) ** 2)
    d_post = (rho3 - 1) / np.maximum(g3, np.float32(1e-6))
    return np.asarray(np.where(py > 0, d_post, d_ant), dtype=np.float32)


def fat_thickness(torso: Torso, px: F32, py: F32) -> F32:
    """Subcutaneous fat thickness (mm) around the circumference (thicker anteriorly)."""
    r = np.sqrt(px * px + py * py) + np.float32(1e-3)
    sin_t = py / r
    ant = np.maximum(-sin_t, 0)
    post = np.maximum(sin_t, 0)
    return np.asarray(
        np.float32(torso.fat_lat) + np.float32(torso.fat_ant - torso.fat_lat) * ant
        + np.float32(torso.fat_post - torso.fat_lat) * post,
        dtype=np.float32,
    )


class CoarseField:
    """Smooth unit-variance random field on a coarse world grid (anchored on multiples of the step).

    Sampling on the output grid is separable linear interpolation (cheap); the field does not
    depend on the output spacing, so one seed gives the same anatomy at every resolution.
    """

    def __init__(self, lo: Vec, hi: Vec, step_mm: float, rng: np.random.Generator, sigma_cells: float) -> None:
        self.step = float(step_mm)
        self.origin = np.floor(np.asarray(lo) / step_mm) * step_mm - 2 * step_mm
        top = np.ceil(np.asarray(hi) / step_mm) * step_mm + 2 * step_mm
        shape = tuple(int(v) for v in np.round((top - self.origin) / step_mm) + 1)
        f = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), sigma_cells, mode="wrap")
        f /= np.float32(max(float(np.std(f)), 1e-6))
        self.values = f
        self._xy: NDArray[np.float32] | None = None
        self._grid: Grid | None = None

    def _weights(self, coords_mm: F32, axis: int) -> tuple[NDArray[np.intp], F32]:
        u = (np.asarray(coords_mm, dtype=np.float64) - self.origin[axis]) / self.step
        n = self.values.shape[axis]
        u = np.clip(u, 0, n - 1.000001)
        i0 = np.floor(u).astype(np.intp)
        return i0, (u - i0).astype(np.float32)

    def prepare(self, grid: Grid) -> None:
        """Interpolate in x and y onto the grid once (all coarse z kept)."""
        ix, wx = self._weights(grid.axis_mm(0), 0)
        iy, wy = self._weights(grid.axis_mm(1), 1)
        v = self.values
        vx = v[ix] * (1 - wx)[:, None, None] + v[ix + 1] * wx[:, None, None]
        self._xy = np.ascontiguousarray(vx[:, iy] * (1 - wy)[None, :, None] + vx[:, iy + 1] * wy[None, :, None])
        self._grid = grid

    def slab(self, grid: Grid, sl: tuple[slice, slice, slice]) -> F32:
        """Field over a box of ``grid`` (call :meth:`prepare` first)."""
        if self._xy is None or self._grid is not grid:
            self.prepare(grid)
        assert self._xy is not None
        iz, wz = self._weights(grid.axis_mm(2, sl[2].start, sl[2].stop), 2)
        xy = self._xy[sl[0], sl[1]]
        return np.asarray(xy[:, :, iz] * (1 - wz) + xy[:, :, iz + 1] * wz, dtype=np.float32)

    def sample(self, x: F32, y: F32, z: F32) -> F32:
        """Trilinear sample at arbitrary world points."""
        shape = np.broadcast_shapes(np.shape(x), np.shape(y), np.shape(z))
        coords = np.stack(
            [
                np.broadcast_to((x - np.float32(self.origin[0])) / np.float32(self.step), shape),
                np.broadcast_to((y - np.float32(self.origin[1])) / np.float32(self.step), shape),
                np.broadcast_to((z - np.float32(self.origin[2])) / np.float32(self.step), shape),
            ]
        )
        return np.asarray(ndimage.map_coordinates(self.values, coords, order=1, mode="nearest"), dtype=np.float32)


def slice_patient_z(grid: Grid, patient: Pose, k0: int, k1: int) -> F32:
    """Patient z of the torso axis at world slices ``k0..k1`` (shape ``(1, 1, k1-k0)``)."""
    zs = grid.axis_mm(2, k0, k1).astype(np.float64)
    pts = np.stack([np.full_like(zs, patient.t[0]), np.full_like(zs, patient.t[1]), zs], axis=1)
    return np.asarray(patient.inverse_apply(pts)[:, 2], dtype=np.float32)[None, None, :]


def paint_torso(
    grid: Grid,
    hu: NDArray[np.float32],
    labels: NDArray[np.uint8],
    *,
    torso: Torso,
    curve: SpineCurve,
    patient: Pose,
    fields: dict[str, CoarseField],
    table_y_mm: float | None,
    crest_z_patient: float | None,
    slab_voxels: int = 400_000,
) -> None:
    """Skin, subcutaneous fat, abdominal wall and the abdominal contents, slab by slab.

    Args:
        grid: Output grid.
        hu: HU array (initialised to air), modified in place.
        labels: Label array, skin (104) written here.
        torso: Torso shape.
        curve: Spine curve (patient frame).
        patient: World-from-patient pose.
        fields: Coarse random fields ``"bowel"``, ``"gas"``, ``"fat"``.
        table_y_mm: World y of the table top (None: no table).
        crest_z_patient: Patient z of the iliac crests (below it the flanks are gluteal muscle).
        slab_voxels: Voxels per slab (small slabs stay in cache).
    """
    s = grid.spacing_mm
    nx, ny, nz = grid.shape
    slab = max(1, slab_voxels // (nx * ny))
    xs = grid.axis_mm(0)[:, None, None]
    ys = grid.axis_mm(1)[None, :, None]
    skin_label_mm = max(torso.skin_mm, 1.01 * s)
    Rf = patient.R.astype(np.float32)
    t = patient.t
    table = None
    if table_y_mm is not None:
        ty = np.float32(table_y_mm) + np.float32(0.0009) * xs * xs
        top = np.abs(ys - ty - np.float32(1.5)) - np.float32(1.5)
        bottom = np.abs(ys - ty - np.float32(45.0)) - np.float32(1.5)
        shell = np.where(np.abs(xs) < 230, np.minimum(top, bottom), np.float32(99))
        table = occupancy(shell, s)
    dxy_x = xs - np.float32(t[0])
    dxy_y = ys - np.float32(t[1])
    for k0 in range(0, nz, slab):
        k1 = min(nz, k0 + slab)
        sl = (slice(0, nx), slice(0, ny), slice(k0, k1))
        dz = grid.axis_mm(2, k0, k1)[None, None, :] - np.float32(t[2])
        px = Rf[0, 0] * dxy_x + Rf[1, 0] * dxy_y + Rf[2, 0] * dz
        py = Rf[0, 1] * dxy_x + Rf[1, 1] * dxy_y + Rf[2, 1] * dz
        pz = slice_patient_z(grid, patient, k0, k1)
        sx, sy, sa, sb = curve.at(pz)
        d = torso_skin_distance(torso, px, py, pz, sx=sx, sy=sy)
        box = hu[sl]
        if table is not None:
            box += table * (np.float32(HU["table"]) - box)
        box += occupancy(d, s) * (np.float32(HU["skin"]) - box)
        fat = fat_thickness(torso, px, py)
        d_fat = d + np.float32(torso.skin_mm)
        fat_tex = fields["fat"].slab(grid, sl)
        box += occupancy(d_fat, s) * (np.float32(HU["fat"]) + np.float32(6.0) * fat_tex - box)
        # abdominal wall muscles (anterior and lateral; posteriorly the paraspinals take over)
        r = np.sqrt(px * px + py * py) + np.float32(1e-3)
        sin_t = py / r
        wall = np.float32(torso.wall) * np.clip(1.0 - np.maximum(sin_t, 0) * 1.6, 0, 1)
        if crest_z_patient is not None:
            # below the iliac crest the flanks hold the gluteal and iliac muscles
            below = np.clip((np.float32(crest_z_patient) - pz) / 25.0, 0, 1)
            wall = wall + below * np.float32(30.0) * np.clip(np.abs(px) / np.float32(torso.half_width) - 0.35, 0, 1)
        d_wall = d_fat + fat
        box += occupancy(d_wall, s) * (wall > 0.5) * (np.float32(HU["muscle"]) - box)
        # abdominal contents: bowel loops, mesenteric fat, gas; retroperitoneal fat behind the bodies
        d_in = d_wall + wall
        # bowel fills ~70 % of the peritoneal cavity: everywhere in front of the bodies, and in the
        # flanks (colon) lateral to the psoas/kidneys down to the level of the spine
        w_bowel = np.clip((fields["bowel"].slab(grid, sl) + 0.55) / 0.5 + 0.5, 0, 1)
        front = np.clip((sy - sb - np.float32(8.0) - py) / 10.0, 0, 1)
        flank = np.clip((np.abs(px - sx) - (sa + np.float32(75.0))) / 10.0, 0, 1)
        flank *= np.clip((sy + np.float32(10.0) - py) / 10.0, 0, 1)
        w_bowel *= np.maximum(front, flank)
        w_gas = np.clip((fields["gas"].slab(grid, sl) - 1.3) / 0.3 + 0.5, 0, 1) * w_bowel
        w_gas *= np.clip((sy - sb - 40 - py) / 10.0, 0, 1)
        contents = (
            np.float32(HU["fat"]) * (1 - w_bowel)
            + np.float32(HU["bowel"]) * (w_bowel - w_gas)
            + np.float32(HU["gas"]) * w_gas
        )
        box += occupancy(d_in, s) * (contents - box)
        lab = labels[sl]
        lab[(d < 0) & (d >= -np.float32(skin_label_mm))] = np.uint8(SKIN)
        del sa


def inner_weight_points(
    x: F32, y: F32, z: F32, *, spacing_mm: float, body: tuple[Torso, SpineCurve, Pose]
) -> F32:
    """Occupancy of 'deeper than the subcutaneous fat' at world points (1-D arrays)."""
    torso, curve, patient = body
    px, py, pz = to_local(x, y, z, patient.R, patient.t)
    sx, sy, _, _ = curve.at(pz)
    d = torso_skin_distance(torso, px, py, pz, sx=sx, sy=sy)
    d_inner = d + np.float32(torso.skin_mm) + fat_thickness(torso, px, py) + np.float32(2.0)
    return occupancy(d_inner, spacing_mm)


def paint_weighted(
    grid: Grid,
    hu: NDArray[np.float32],
    labels: NDArray[np.uint8],
    *,
    sl: tuple[slice, slice, slice],
    d: F32,
    value: float,
    label: int | None,
    body: tuple[Torso, SpineCurve, Pose],
) -> None:
    """Paint ``value`` where ``d < 0``, kept inside the body wall (evaluated only near the shape)."""
    s = grid.spacing_mm
    near = d < np.float32(0.5 * s)
    if not near.any():
        return
    idx = np.nonzero(near)
    x0 = grid.origin_lps_mm + s * np.array([sl[0].start, sl[1].start, sl[2].start])
    px = np.float32(x0[0]) + np.float32(s) * idx[0].astype(np.float32)
    py = np.float32(x0[1]) + np.float32(s) * idx[1].astype(np.float32)
    pz = np.float32(x0[2]) + np.float32(s) * idx[2].astype(np.float32)
    w = inner_weight_points(px, py, pz, spacing_mm=s, body=body)
    occ = occupancy(d[idx], s) * w
    box = hu[sl]
    box[idx] += occ * (np.float32(value) - box[idx])
    if label is not None:
        inside = (d[idx] < 0) & (w > 0.5)
        lab = labels[sl]
        lab[tuple(i[inside] for i in idx)] = np.uint8(label)


def paint_ellipsoid_organ(
    grid: Grid,
    hu: NDArray[np.float32],
    labels: NDArray[np.uint8],
    *,
    centre: Vec,
    R: Vec,
    radii: Any,
    value: float,
    body: tuple[Torso, SpineCurve, Pose],
) -> None:
    """Paint an ellipsoidal organ (kept inside the body wall); no label."""
    sl, d = ellipsoid_sdf(grid, centre, R, radii, 2 * grid.spacing_mm)
    if sl is None or d is None:
        return
    paint_weighted(grid, hu, labels, sl=sl, d=d, value=value, label=None, body=body)


def paint_tube(
    grid: Grid,
    hu: NDArray[np.float32],
    labels: NDArray[np.uint8],
    sections: list[Section],
    *,
    value: float,
    label: int | None,
    weight_body: tuple[Torso, SpineCurve, Pose] | None = None,
    caps: bool = True,
    exponent: float = 2.0,
) -> None:
    """Paint a tube (vessel, muscle) with an optional label; ``exponent`` > 2 makes it boxier."""
    sl, d = tube_sdf(grid, sections, 2 * grid.spacing_mm, caps=caps, exponent=exponent)
    if sl is None or d is None:
        return
    if weight_body is not None:
        paint_weighted(grid, hu, labels, sl=sl, d=d, value=value, label=label, body=weight_body)
    else:
        paint(hu, labels, sl, d, value, spacing_mm=grid.spacing_mm, label=label)


def paint_canal(
    grid: Grid, hu: NDArray[np.float32], labels: NDArray[np.uint8], sections: list[Section]
) -> None:
    """Spinal canal: thecal sac (CSF) with a thin rim of epidural fat, labelled 100 throughout.

    The cross-section is a rounded rectangle (superellipse), filling the lateral recesses.
    """
    sl, d = tube_sdf(grid, sections, 2 * grid.spacing_mm, exponent=2.8)
    if sl is None or d is None:
        return
    paint(hu, labels, sl, d, HU["epidural_fat"], spacing_mm=grid.spacing_mm)
    paint(hu, labels, sl, d + np.float32(1.5), HU["csf"], spacing_mm=grid.spacing_mm)
    # the label reaches 1.5 mm further so it closes on the bone (painted later, which wins)
    box = labels[sl]
    box[d < np.float32(1.5)] = np.uint8(SPINAL_CANAL)


def disc_sdf(
    grid: Grid, upper: LevelModel, lower: LevelModel | SacrumModel, disc: dict[str, Any]
) -> tuple[tuple[slice, slice, slice] | None, F32 | None, F32 | None]:
    """Signed distance of the intervertebral disc between two vertebrae, and its normalised radius."""
    ga = upper.geometry
    if isinstance(lower, SacrumModel):
        a = 0.5 * (ga.a + lower.anatomy.s1_width_mm / 2)
        b = 0.5 * (ga.b + lower.anatomy.s1_depth_mm / 2)
    else:
        a = 0.5 * (ga.a + lower.geometry.a)
        b = 0.5 * (ga.b + lower.geometry.b)
    conc = ga.concavity
    up_u = np.asarray(disc["upper_normal"])
    up_l = np.asarray(disc["lower_normal"])
    e_u = np.asarray(disc["upper_endplate_mm"])
    e_l = np.asarray(disc["lower_endplate_mm"])
    centre = 0.5 * (e_u + e_l)
    zax = up_u + up_l
    zax = zax / np.linalg.norm(zax)
    xax = upper.pose.R[:, 0] - np.dot(upper.pose.R[:, 0], zax) * zax
    xax = xax / np.linalg.norm(xax)
    yax = np.cross(zax, xax)
    R = np.stack([xax, yax, zax], axis=1)
    r = max(a, b) + 4.0
    h = float(np.linalg.norm(e_u - e_l)) + 8.0
    ext = np.abs(R) @ np.array([r, r, h])
    sl = grid.box_slices(centre - ext, centre + ext)
    if sl is None:
        return None, None, None
    x, y, z = grid.box_coords(sl)
    lx, ly, _ = to_local(x, y, z, R, centre)
    bulge = np.float32(0.9) * np.clip(0.5 - ly / np.float32(b), 0, 1)
    d_xy = body_section_sdf(lx, ly, a, b, conc) - bulge
    # between the upper inferior endplate and the lower superior endplate (2 mm into each body)
    dx, dy, dz = x - np.float32(e_u[0]), y - np.float32(e_u[1]), z - np.float32(e_u[2])
    above_lower_top = dx * up_u[0] + dy * up_u[1] + dz * up_u[2] - np.float32(2.0)
    ex, ey, ez = x - np.float32(e_l[0]), y - np.float32(e_l[1]), z - np.float32(e_l[2])
    below = -(ex * up_l[0] + ey * up_l[1] + ez * up_l[2]) - np.float32(2.0)
    d = combine(d_xy, np.maximum(above_lower_top, below))
    rho = np.sqrt((lx / np.float32(a)) ** 2 + (ly / np.float32(b)) ** 2)
    return sl, d, rho


def paint_disc(
    grid: Grid,
    hu: NDArray[np.float32],
    labels: NDArray[np.uint8],
    *,
    upper: LevelModel,
    lower: LevelModel | SacrumModel,
    disc: dict[str, Any],
) -> None:
    """Paint one disc: annulus (~95 HU) and a softer nucleus (~72 HU), label 105."""
    sl, d, rho = disc_sdf(grid, upper, lower, disc)
    if sl is None or d is None or rho is None:
        return
    value = np.float32(HU["disc_annulus"]) + np.float32(HU["disc_nucleus"] - HU["disc_annulus"]) * np.exp(
        -((rho / np.float32(0.55)) ** 2)
    )
    paint(hu, labels, sl, d, value, spacing_mm=grid.spacing_mm, label=DISC)


def paint_lungs(
    grid: Grid,
    hu: NDArray[np.float32],
    labels: NDArray[np.uint8],
    *,
    ribcage: dict[str, float],
    curve: SpineCurve,
    patient: Pose,
    diaphragm_z: float,
    field: CoarseField,
) -> None:
    """Lung bases above a dome-shaped diaphragm, inside the rib cage, outside the mediastinum.

    Args:
        grid: Output grid.
        hu: HU array, modified in place.
        labels: Label array (lungs are unlabelled; nothing is written).
        ribcage: Rib-cage ellipse in the patient axial plane (``cx, cy, A, B``).
        curve: Spine curve.
        patient: World-from-patient pose.
        diaphragm_z: Patient z of the diaphragm dome's reference height (about T11).
        field: Texture of the lung parenchyma.
    """
    nz = grid.shape[2]
    s = grid.spacing_mm
    cx, cy, A, B = ribcage["cx"], ribcage["cy"], ribcage["A"] - 9.0, ribcage["B"] - 9.0
    lo_z = diaphragm_z - 75.0
    top_z = float(patient.inverse_apply([patient.t[0], patient.t[1], grid.origin_lps_mm[2] + s * (nz - 1)])[2])
    if top_z <= lo_z:
        return
    lo_w, hi_w = world_aabb(patient.R, patient.t, [cx - A, cy - B, lo_z], [cx + A, cy + B, top_z + 40.0])
    sl = grid.box_slices(lo_w - 2.0, hi_w + 2.0)
    if sl is None:
        return
    x, y, z = grid.box_coords(sl)
    px, py, _ = to_local(x, y, z, patient.R, patient.t)
    pz = slice_patient_z(grid, patient, sl[2].start, sl[2].stop)
    sx, sy, sa, sb = curve.at(pz)
    d_cage = superellipse2(px - np.float32(cx), py - np.float32(cy), A, B, 2.0)
    # diaphragm: dome highest antero-laterally, lowest in the posterior recess
    post = np.clip((py - (sy - sb)) / np.float32(70.0), 0, 1)
    lat = (np.abs(px - sx) / np.float32(A)) ** 2
    z_d = np.float32(diaphragm_z) + np.float32(25.0) * (1 - post) - np.float32(45.0) * post - np.float32(12.0) * lat
    d_dia = z_d - pz
    # mediastinum and spine: no lung within the body's width in front of and around the spine
    spine_col = np.maximum(np.abs(px - sx) - (sa + np.float32(10.0)), py - (sy + 3 * sb + 40))
    heart = ellipse2(px - (sx + np.float32(14.0)), py - (sy - sb - np.float32(60.0)), np.float32(60.0),
                     np.float32(64.0))
    d_med = np.minimum(spine_col, heart)
    d = np.maximum(np.maximum(d_cage, d_dia), -d_med)
    if not np.any(d < s):
        return
    tex = field.slab(grid, sl)
    paint(hu, labels, sl, d, np.float32(HU["lung"]) + np.float32(40.0) * tex, spacing_mm=s)


__all__ = [
    "HU",
    "HU_CONTRAST",
    "CoarseField",
    "SpineCurve",
    "Torso",
    "disc_sdf",
    "fat_thickness",
    "inner_weight_points",
    "paint_canal",
    "paint_disc",
    "paint_ellipsoid_organ",
    "paint_lungs",
    "paint_torso",
    "paint_tube",
    "paint_weighted",
    "slice_patient_z",
    "torso_skin_distance",
]
