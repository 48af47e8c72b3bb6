"""Painting shapes into the phantom's HU and label arrays, box by box.

Every painter works inside the bounding box of its shape only (never on the full volume) and
composites with a partial-volume occupancy (:func:`~.sdf.occupancy`), so edges are anti-aliased at
any spacing while labels stay exact (a voxel is labelled when its centre is inside).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from needle_steering.perception.labels import LESION
from needle_steering.sim.phantom.sdf import (
    F32,
    FAR_MM,
    Grid,
    combine,
    ellipse2,
    ellipsoid,
    occupancy,
    smooth_min,
    superellipse2,
    to_local,
)
from needle_steering.sim.phantom.spine import Bone

Vec = NDArray[np.float64]
WorldSdf = Callable[[F32, F32, F32], F32]


@dataclass(frozen=True)
class BoneDensity:
    """Bone HU model of one patient.

    Attributes:
        cancellous_hu: Cancellous (trabecular) HU of the vertebral bodies.
        cortical_hu: HU of the cortical shell material (before partial-volume blur).
        texture_sd_hu: Standard deviation of the trabecular texture, HU.
        cortex_scale: Multiplier of every cortical thickness (thinner in osteoporosis).
    """

    cancellous_hu: float
    cortical_hu: float
    texture_sd_hu: float
    cortex_scale: float


@dataclass(frozen=True)
class Lesion:
    """A focal lesion in a vertebral body.

    Attributes:
        level: Level name.
        label: VerSe id of the level (the lesion replaces it in the label map).
        centre: World centre, mm.
        R: World-from-lesion rotation.
        radii: Semi-axes, mm.
        kind: ``"lytic"`` or ``"blastic"``.
        hu: HU inside the lesion.
    """

    level: str
    label: int
    centre: Vec
    R: Vec
    radii: Vec
    kind: str
    hu: float


def _sub(outer: tuple[slice, slice, slice], inner: tuple[slice, slice, slice]) -> tuple[slice, slice, slice]:
    """Express global slices ``inner`` relative to the box ``outer``."""
    return tuple(slice(i.start - o.start, i.stop - o.start) for o, i in zip(outer, inner, strict=True))  # type: ignore[return-value]


def texture_field(lo_mm: Vec, hi_mm: Vec, rng: np.random.Generator, sigma_mm: tuple[float, float, float]) -> tuple[
    NDArray[np.float32], Vec
]:
    """Unit-variance smooth random field on a 1 mm world-aligned grid covering ``[lo, hi]``.

    The grid is anchored on whole millimetres, so the same bone gets the same texture at any
    output spacing. Returns the field and its origin (world mm of element ``[0, 0, 0]``).
    """
    origin = np.floor(np.asarray(lo_mm)) - 2.0
    top = np.ceil(np.asarray(hi_mm)) + 2.0
    shape = tuple(int(v) for v in (top - origin + 1))
    noise = rng.standard_normal(shape, dtype=np.float32)
    field = ndimage.gaussian_filter(noise, sigma=sigma_mm, mode="wrap")
    sd = float(np.std(field))
    field /= np.float32(max(sd, 1e-6))
    return field, origin


def sample_field(field: NDArray[np.float32], origin: Vec, x: F32, y: F32, z: F32) -> F32:
    """Trilinear sample of a 1 mm field at world points (arrays of equal shape)."""
    coords = np.stack([x - np.float32(origin[0]), y - np.float32(origin[1]), z - np.float32(origin[2])])
    return np.asarray(ndimage.map_coordinates(field, coords, order=1, mode="nearest"), dtype=np.float32)


#: Regional inhomogeneity of vertebral-body cancellous bone (relative change of the cancellous HU
#: above water across the body, linear in the body's normalised coordinates, mean-preserving).
#: Banse et al., J Bone Miner Res 2001;16:1684-92 (pQCT of 136 cores from T9, T12-L1 and L4 of nine
#: subjects): cancellous density about 20 % higher in the posterior cores than in the anterior and
#: external ones, and the lower half of the body 15-25 % less dense than the upper half. Kim et al.,
#: Ann Biomed Eng 2007;35:1907-13 (micro-CT, T10-L5): density and BV/TV significantly lower in the
#: anterior than in the posterior centrum. ``+-0.09`` across the depth gives a posterior/anterior
#: ratio of about 1.2; ``+-0.09`` across the height an upper/lower-half ratio of about 1.2.
BODY_POSTERIOR_GRADIENT: float = 0.09
BODY_CRANIAL_GRADIENT: float = 0.09


def _body_cancellous_factor(lx: F32, ly: F32, lz: F32, prim_lo: Vec, prim_hi: Vec) -> F32:
    """Multiplier of the cancellous HU above water at local body coordinates (``+y`` posterior, ``+z`` superior)."""
    half_y = np.float32(max(0.5 * float(prim_hi[1] - prim_lo[1]) - 1.0, 1.0))
    half_z = np.float32(max(0.5 * float(prim_hi[2] - prim_lo[2]) - 1.0, 1.0))
    yn = np.clip(ly / half_y, -1.0, 1.0)
    zn = np.clip(lz / half_z, -1.0, 1.0)
    out: F32 = (
        np.float32(1.0) + np.float32(BODY_POSTERIOR_GRADIENT) * yn + np.float32(BODY_CRANIAL_GRADIENT) * zn
    ).astype(np.float32)
    return out


def bone_sdf_in_box(grid: Grid, bone: Bone, sl: tuple[slice, slice, slice], margin_mm: float) -> tuple[
    F32, F32, F32, F32
]:
    """Union distance, cortical thickness, density multiplier and cancellous multiplier over the box ``sl``.

    The cancellous multiplier is the primitive's density times, in vertebral bodies (primitives
    named ``"body"``), the regional factor of :func:`_body_cancellous_factor`.
    """
    shape = tuple(s.stop - s.start for s in sl)
    sdf = np.full(shape, FAR_MM, dtype=np.float32)
    cortex = np.zeros(shape, dtype=np.float32)
    density = np.ones(shape, dtype=np.float32)
    canc = np.ones(shape, dtype=np.float32)
    for prim in bone.prims:
        lo, hi = prim.world_bounds()
        found = grid.box_slices(lo - margin_mm, hi + margin_mm)
        if found is None:
            continue
        sx_, sy_, sz_ = (slice(max(p.start, b.start), min(p.stop, b.stop)) for p, b in zip(found, sl, strict=True))
        psl = (sx_, sy_, sz_)
        if any(p.stop <= p.start for p in psl):
            continue
        x, y, z = grid.box_coords(psl)
        lx, ly, lz = to_local(x, y, z, prim.R, prim.centre)
        d = np.asarray(prim.fn(lx, ly, lz), dtype=np.float32)
        rel = _sub(sl, psl)
        cur = sdf[rel]
        closer = d < cur
        cortex[rel] = np.where(closer, np.float32(prim.cortex_mm), cortex[rel])
        density[rel] = np.where(closer, np.float32(prim.density), density[rel])
        local: F32 | np.float32 = np.float32(prim.density)
        if prim.name == "body":
            local = np.float32(prim.density) * _body_cancellous_factor(lx, ly, lz, prim.lo, prim.hi)
        canc[rel] = np.where(closer, local, canc[rel])
        sdf[rel] = smooth_min(cur, d, bone.blend_mm)
    return sdf, cortex, density, canc


def rasterise_bone(
    grid: Grid,
    bone: Bone,
    hu: NDArray[np.float32],
    labels: NDArray[np.uint8],
    best_sdf: NDArray[np.float32],
    *,
    density_model: BoneDensity,
    rng: np.random.Generator,
    lesion: Lesion | None = None,
) -> None:
    """Paint one bone: cortical shell + textured cancellous core, label by nearest-surface rule.

    Args:
        grid: Output grid.
        bone: The bone (primitives in world coordinates).
        hu: HU array ``(I, J, K)``, modified in place.
        labels: Label array, modified in place (``bone.label``; 0 clears soft-tissue labels).
        best_sdf: Per-voxel distance of the bone currently owning the voxel (for overlaps).
        density_model: HU model.
        rng: Generator for this bone's trabecular texture.
        lesion: Lesion inside this bone, if any.
    """
    s = grid.spacing_mm
    lo, hi = bone.world_bounds()
    margin = bone.blend_mm + 2.0 * s
    sl = grid.box_slices(lo - margin, hi + margin)
    # texture is drawn from the unclipped bounds so it does not depend on the field of view
    field, f_origin = texture_field(lo, hi, rng, (0.8, 0.8, 1.6))
    if sl is None:
        return
    sdf, cortex, density, canc_mult = bone_sdf_in_box(grid, bone, sl, margin)
    o_outer = occupancy(sdf, s)
    o_inner = occupancy(sdf + cortex, s)
    inside_idx = np.nonzero(o_inner > 0)
    x0 = grid.origin_lps_mm + s * np.array([sl[0].start, sl[1].start, sl[2].start])
    canc = np.zeros(sdf.shape, dtype=np.float32)
    if inside_idx[0].size:
        px = np.float32(x0[0]) + np.float32(s) * inside_idx[0].astype(np.float32)
        py = np.float32(x0[1]) + np.float32(s) * inside_idx[1].astype(np.float32)
        pz = np.float32(x0[2]) + np.float32(s) * inside_idx[2].astype(np.float32)
        tex = sample_field(field, f_origin, px, py, pz)
        base = np.float32(30.0) + (np.float32(density_model.cancellous_hu - 30.0)) * canc_mult[inside_idx]
        canc[inside_idx] = base + np.float32(density_model.texture_sd_hu) * tex
    cort = np.float32(density_model.cortical_hu) * np.minimum(density, np.float32(1.15))
    value = o_inner * canc + (o_outer - o_inner) * cort
    box_hu = hu[sl]
    inside = sdf < 0
    if lesion is not None:
        x, y, z = grid.box_coords(sl)
        lx, ly, lz = to_local(x, y, z, lesion.R, lesion.centre)
        d_les = ellipsoid(lx, ly, lz, (float(lesion.radii[0]), float(lesion.radii[1]), float(lesion.radii[2])))
        o_les = occupancy(d_les, s) * o_outer
        value = value * (1 - o_les) + o_les * np.float32(lesion.hu)
    hu[sl] = box_hu * (1 - o_outer) + value
    box_best = best_sdf[sl]
    own = inside & (sdf < box_best)
    box_labels = labels[sl]
    box_labels[own] = np.uint8(bone.label)
    if lesion is not None:
        box_labels[own & (d_les < 0)] = np.uint8(LESION)
    labels[sl] = box_labels
    best_sdf[sl] = np.where(own, sdf, box_best)


def paint(
    hu: NDArray[np.float32],
    labels: NDArray[np.uint8],
    sl: tuple[slice, slice, slice],
    sdf: F32,
    value: float | F32,
    *,
    spacing_mm: float,
    label: int | None = None,
    weight: F32 | None = None,
) -> None:
    """Composite ``value`` where ``sdf < 0`` (partial-volume blended) and optionally set ``label``.

    Args:
        hu: HU array, modified in place.
        labels: Label array, modified in place when ``label`` is given (0 erases).
        sl: Box of ``sdf``.
        sdf: Signed distance over the box, mm.
        value: HU inside (scalar or array over the box).
        spacing_mm: Voxel size (for the occupancy ramp).
        label: Label to write where the voxel centre is inside; ``None`` leaves labels unchanged.
        weight: Optional extra occupancy factor in ``[0, 1]`` (e.g. "inside the body").
    """
    occ = occupancy(sdf, spacing_mm)
    if weight is not None:
        occ = occ * weight
    box = hu[sl]
    hu[sl] = box + occ * (np.asarray(value, dtype=np.float32) - box)
    if label is not None:
        inside = sdf < 0
        if weight is not None:
            inside &= weight > 0.5
        box_l = labels[sl]
        box_l[inside] = np.uint8(label)
        labels[sl] = box_l


@dataclass(frozen=True)
class Section:
    """Cross-section of a tube: centre, in-plane x reference, half axes (mm)."""

    centre: Vec
    x_ref: Vec
    a: float
    b: float


def tube_sdf(grid: Grid, sections: list[Section], margin_mm: float, caps: bool = True, exponent: float = 2.0
             ) -> tuple[tuple[slice, slice, slice] | None, F32 | None]:
    """Signed distance of a tube swept through ``sections`` over its bounding box.

    The cross-section is an ellipse (``exponent`` 2) or a boxier superellipse (larger exponent).
    """
    C = np.array([sec.centre for sec in sections])
    rmax = max(max(sec.a, sec.b) for sec in sections)
    sl = grid.box_slices(C.min(axis=0) - rmax - margin_mm, C.max(axis=0) + rmax + margin_mm)
    if sl is None:
        return None, None
    shape = tuple(s.stop - s.start for s in sl)
    out = np.full(shape, FAR_MM, dtype=np.float32)
    n = len(sections)
    for k in range(n - 1):
        s0, s1 = sections[k], sections[k + 1]
        r = max(s0.a, s0.b, s1.a, s1.b) + margin_mm
        lo = np.minimum(s0.centre, s1.centre) - r
        hi = np.maximum(s0.centre, s1.centre) + r
        psl = grid.box_slices(lo, hi)
        if psl is None:
            continue
        x, y, z = grid.box_coords(psl)
        axis = s1.centre - s0.centre
        L = float(np.linalg.norm(axis))
        if L < 1e-6:
            continue
        zu = axis / L
        xr = s0.x_ref - np.dot(s0.x_ref, zu) * zu
        xr = xr / np.linalg.norm(xr)
        yr = np.cross(zu, xr)
        px = x - np.float32(s0.centre[0])
        py = y - np.float32(s0.centre[1])
        pz = z - np.float32(s0.centre[2])
        t_raw = (px * zu[0] + py * zu[1] + pz * zu[2]) / np.float32(L)
        t = np.clip(t_raw, 0.0, 1.0)
        qx = px - t * np.float32(axis[0])
        qy = py - t * np.float32(axis[1])
        qz = pz - t * np.float32(axis[2])
        u = qx * xr[0] + qy * xr[1] + qz * xr[2]
        v = qx * yr[0] + qy * yr[1] + qz * yr[2]
        a = np.float32(s0.a) + t * np.float32(s1.a - s0.a)
        b = np.float32(s0.b) + t * np.float32(s1.b - s0.b)
        d = ellipse2(u, v, a, b) if exponent == 2.0 else superellipse2(u, v, a, b, exponent)
        ends = []
        if caps and k == 0:
            ends.append(-t_raw * np.float32(L))
        if caps and k == n - 2:
            ends.append((t_raw - 1) * np.float32(L))
        if ends:
            d = combine(d, ends[0] if len(ends) == 1 else np.maximum(ends[0], ends[1]))
        rel = _sub(sl, psl)
        np.minimum(out[rel], d, out=out[rel])
    return sl, out


def ellipsoid_sdf(grid: Grid, centre: Vec, R: Vec, radii: Any, margin_mm: float) -> tuple[
    tuple[slice, slice, slice] | None, F32 | None
]:
    """Signed distance of an oriented ellipsoid over its bounding box."""
    r = float(np.max(radii)) + margin_mm
    sl = grid.box_slices(np.asarray(centre) - r, np.asarray(centre) + r)
    if sl is None:
        return None, None
    x, y, z = grid.box_coords(sl)
    lx, ly, lz = to_local(x, y, z, R, centre)
    r3 = [float(v) for v in radii]
    return sl, ellipsoid(lx, ly, lz, (r3[0], r3[1], r3[2]))


def box_world_coords(grid: Grid, sl: tuple[slice, slice, slice]) -> tuple[F32, F32, F32]:
    """Full (not broadcast) world coordinate arrays of a box."""
    x, y, z = grid.box_coords(sl)
    shape = (sl[0].stop - sl[0].start, sl[1].stop - sl[1].start, sl[2].stop - sl[2].start)
    return (
        np.broadcast_to(x, shape).astype(np.float32),
        np.broadcast_to(y, shape).astype(np.float32),
        np.broadcast_to(z, shape).astype(np.float32),
    )


__all__ = [
    "BoneDensity",
    "Lesion",
    "Section",
    "WorldSdf",
    "bone_sdf_in_box",
    "box_world_coords",
    "ellipsoid_sdf",
    "paint",
    "rasterise_bone",
    "sample_field",
    "texture_field",
    "tube_sdf",
]
