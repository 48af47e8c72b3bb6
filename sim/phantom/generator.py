"""The phantom generator: :func:`generate_phantom` and :func:`write_phantom`.

Pipeline: draw the patient (sizes, curvature, pose, densities) from the seed -> lay the spine
out -> choose the grid -> paint soft tissue (torso slab by slab, organs, muscles, vessels, discs,
canal) -> paint bones (vertebrae, sacrum, ribs, ilia) box by box -> blur, CBCT artefacts, noise ->
assemble the ground truth. See ``docs/phantom.md`` for the model and its simplifications.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from needle_steering.atomic import write_text_atomic
from needle_steering.errors import ImageError
from needle_steering.perception.labels import (
    AORTA,
    DISC,
    INFERIOR_VENA_CAVA,
    LESION,
    SKIN,
    SPINAL_CANAL,
    STANDARD_ORDER,
    level_id,
)
from needle_steering.perception.volume import Volume
from needle_steering.sim.phantom.anatomy import SUPPORTED_LEVELS, LevelAnatomy, SacrumAnatomy
from needle_steering.sim.phantom.body import (
    HU,
    HU_CONTRAST,
    CoarseField,
    SpineCurve,
    Torso,
    paint_canal,
    paint_disc,
    paint_ellipsoid_organ,
    paint_lungs,
    paint_torso,
    paint_tube,
    torso_skin_distance,
)
from needle_steering.sim.phantom.config import Phantom, PhantomConfig, PhantomConfigError
from needle_steering.sim.phantom.imaging import (
    CBCT_PSF_SIGMA_MM,
    CT_PSF_SIGMA_MM,
    add_noise,
    apply_psf,
    cbct_fov_mask,
    cbct_shading,
    cbct_streaks,
    default_noise_hu,
)
from needle_steering.sim.phantom.raster import BoneDensity, Lesion, Section, rasterise_bone
from needle_steering.sim.phantom.sdf import FAR_MM, Grid, rotation_xyz
from needle_steering.sim.phantom.spine import (
    Bone,
    LevelModel,
    Pose,
    SacrumModel,
    build_layout,
    ilium_primitive,
    inferior_facet_primitive,
    pedicle_axis_local,
    rib_polyline,
    rib_primitive,
    sacrum_arc_local,
    sacrum_primitives,
    spinous_tip_local,
    superior_facet_local,
    vertebra_geometry,
    vertebra_primitives,
)

Vec = NDArray[np.float64]

#: Largest grid generated (voxels); keeps the peak memory under ~2 GB.
MAX_VOXELS = 80_000_000
META_SCHEMA = "needle_steering.phantom/1"

# random streams (SeedSequence spawn keys)
_K_PATIENT, _K_POSE, _K_LEVEL, _K_TEXTURE, _K_FIELDS, _K_LESION, _K_NOISE, _K_CBCT, _K_ILIUM = range(1, 10)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=tuple(keys)))


def _lst(v: Any, nd: int = 4) -> list[Any]:
    out: list[Any] = np.round(np.asarray(v, dtype=np.float64), nd).tolist()
    return out


def _chain(config: PhantomConfig) -> tuple[list[str], list[str]]:
    """All levels to build (requested plus neighbours), and the context ones."""
    req = list(config.levels)
    if not config.context_levels:
        return req, []
    first, last = STANDARD_ORDER.index(req[0]), STANDARD_ORDER.index(req[-1])
    context = []
    if first > 0 and STANDARD_ORDER[first - 1] in SUPPORTED_LEVELS:
        context.append(STANDARD_ORDER[first - 1])
    if last + 1 < len(STANDARD_ORDER) and STANDARD_ORDER[last + 1] in SUPPORTED_LEVELS:
        context.append(STANDARD_ORDER[last + 1])
    chain = sorted(req + context, key=STANDARD_ORDER.index)
    return chain, context


_STEP_MM = {"T": 24.0, "L": 36.0}


def _level_z_lookup(chain_z: dict[str, float]) -> Any:
    """Patient z of any level name, extrapolating outside the generated chain."""
    names = sorted(chain_z, key=STANDARD_ORDER.index)

    def z_of(name: str) -> float:
        if name in chain_z:
            return chain_z[name]
        idx = STANDARD_ORDER.index(name)
        ref = min(names, key=lambda n: abs(STANDARD_ORDER.index(n) - idx))
        ridx = STANDARD_ORDER.index(ref)
        z = chain_z[ref]
        step = 1 if idx > ridx else -1
        for i in range(ridx, idx, step):
            nm = STANDARD_ORDER[i + (1 if step > 0 else 0)]
            dz = _STEP_MM.get(nm[0], 30.0)
            z += -dz if step > 0 else dz
        return z

    return z_of


def generate_phantom(config: PhantomConfig) -> Phantom:
    """Generate a deterministic synthetic spine CT/CBCT with exact labels and ground truth.

    Args:
        config: What to generate (validated on construction).

    Returns:
        The phantom: ``ct`` (float32, HU or CBCT grey values), ``labels`` (uint8, same grid) and
        ``meta`` (JSON-serialisable ground truth in LPS millimetres).

    Raises:
        PhantomConfigError: Invalid configuration, or a grid too large for the memory budget.
    """
    if not isinstance(config, PhantomConfig):
        raise PhantomConfigError(f"config must be a PhantomConfig, got {type(config).__name__}")
    seed = config.seed
    s = config.spacing_mm
    rp = _rng(seed, _K_PATIENT)
    # ---------------- patient-level draws (fixed order) ----------------
    global_scale = float(np.clip(rp.normal(1.0, 0.035), 0.92, 1.08))
    curv_draw = float(np.clip(rp.normal(1.0, 0.15), 0.6, 1.4))
    curvature = curv_draw if config.curvature_scale is None else float(config.curvature_scale)
    torso_w = float(rp.uniform(282.0, 304.0))
    torso_ap = float(rp.uniform(200.0, 222.0))
    fat_base = float(rp.uniform(7.0, 15.0))
    canc_normal = float(rp.uniform(200.0, 265.0))
    cort_normal = float(rp.uniform(950.0, 1200.0))
    paraspinal_hu = float(rp.uniform(28.0, 52.0))
    vessel_scale = float(np.clip(rp.normal(1.0, 0.07), 0.85, 1.15))
    skin_to_tip_mm = float(rp.uniform(14.0, 28.0))
    groove = float(rp.uniform(3.0, 7.0))
    bq = config.bone_quality
    density = BoneDensity(
        cancellous_hu=55.0 + (canc_normal - 55.0) * bq,
        cortical_hu=cort_normal * (0.72 + 0.28 * bq),
        texture_sd_hu=10.0 + 0.12 * (55.0 + (canc_normal - 55.0) * bq),
        cortex_scale=0.7 + 0.3 * bq,
    )
    rpose = _rng(seed, _K_POSE)
    tilt = [float(np.clip(rpose.normal(0, config.tilt_sd_deg), -3 * config.tilt_sd_deg, 3 * config.tilt_sd_deg))
            for _ in range(3)]
    offset_xy = rpose.uniform(-7.0, 7.0, 2)
    z_world_mid = float(rpose.uniform(-320.0, -120.0))
    x_spine = float(rpose.normal(0.0, 2.0))

    # ---------------- spine layout ----------------
    chain, context = _chain(config)
    items, discs = build_layout(
        chain,
        lambda name: _rng(seed, _K_LEVEL, level_id(name)),
        curvature_scale=curvature,
        global_scale=global_scale,
    )
    requested = set(config.levels)
    # spine frame -> patient frame: requested body centres centred at (x_spine, y_body, 0)
    centres = np.array([pose.t for (name, _an, pose) in items if name in requested])
    torso = Torso(
        half_width=torso_w / 2,
        half_depth_ant=0.54 * torso_ap,
        half_depth_post=0.46 * torso_ap,
        groove_depth=groove,
        groove_sigma=16.0,
        fat_ant=fat_base * 1.5,
        fat_lat=fat_base * 1.2,
        fat_post=fat_base,
        wall=10.0,
        waist_z=0.0,
        spine_y_mean=0.0,
    )
    y_body = torso.half_depth_post - 75.0
    shift = np.array([x_spine, y_body, 0.0]) - centres.mean(axis=0)
    # move the spine antero-posteriorly so that the most superficial spinous tip lies
    # ``skin_to_tip_mm`` under the skin (the torso's back follows the lordosis by half)
    spine_y_mean = float(np.mean([p.t[1] + shift[1] for (_n, _a, p) in items]))
    torso = replace(torso, spine_y_mean=spine_y_mean)
    gaps = []
    for name, an, pose in items:
        if name not in requested or not isinstance(an, LevelAnatomy):
            continue
        tip = pose.apply(spinous_tip_local(an, vertebra_geometry(an))) + shift
        gaps.append(_skin_gap_patient(torso, items, shift, tip))
    if gaps:
        shift[1] += min(gaps) - skin_to_tip_mm
    R_g = rotation_xyz(*tilt)
    t_g = np.array([offset_xy[0], offset_xy[1], z_world_mid])
    patient = Pose(R_g, t_g)

    levels: list[LevelModel] = []
    sacrum: SacrumModel | None = None
    chain_z: dict[str, float] = {}
    for name, an, pose in items:
        p_t = pose.t + shift
        chain_z[name] = float(p_t[2])
        world = Pose(R_g @ pose.R, patient.apply(p_t))
        if isinstance(an, SacrumAnatomy):
            sacrum = SacrumModel(an, world, name in requested)
        else:
            assert isinstance(an, LevelAnatomy)
            levels.append(LevelModel(name, an, vertebra_geometry(an), world, name in requested))
    z_of = _level_z_lookup(chain_z)
    torso = replace(torso, waist_z=z_of("L3"),
                    spine_y_mean=float(np.mean([p.t[1] + shift[1] for (_n, _a, p) in items])))

    # spine curve in the patient frame (for the torso and muscles)
    curve = _spine_curve(levels, sacrum, patient)

    # ---------------- bones (geometry only) ----------------
    for lv in levels:
        lv.bone = Bone(lv.name, lv.label, vertebra_primitives(lv, density.cortex_scale), blend_mm=1.5,
                       texture_key=lv.label)
    if sacrum is not None:
        sacrum.bone = Bone("S", 26, sacrum_primitives(sacrum, density.cortex_scale), blend_mm=1.5, texture_key=26)
    _add_inferior_facets(levels, sacrum, density.cortex_scale)
    ribcage = _ribcage(levels, torso, patient)
    rib_meta: dict[str, dict[str, list[list[float]]]] = {}
    rib_bones: list[Bone] = []
    for lv in levels:
        if not lv.anatomy.has_rib:
            continue
        radius = 4.0 if lv.name in ("T11", "T12") else 4.6
        for side, side_name in ((1, "left"), (-1, "right")):
            pts = rib_polyline(lv, side, ribcage, patient)
            rib_meta.setdefault(lv.name, {})[side_name] = _lst(pts, 2)
            rib_bones.append(Bone(f"rib_{lv.name}_{side_name}", 0,
                                  [rib_primitive(pts, radius * global_scale, density.cortex_scale, "rib")],
                                  blend_mm=0.0, texture_key=200 + lv.label * 2 + (side > 0)))
    ilia: list[Bone] = []
    crest_z_patient: float | None = None
    if sacrum is not None:
        ri = _rng(seed, _K_ILIUM)
        for side in (1, -1):
            prim = ilium_primitive(sacrum, side, R_g, density.cortex_scale, ri)
            ilia.append(Bone(f"ilium_{side}", 0, [prim], blend_mm=0.0, texture_key=300 + (side > 0)))
        crest_z_patient = float(patient.inverse_apply(sacrum.arc_point(0.0))[2]) + 35.0
    bones = [lv.bone for lv in levels] + ([sacrum.bone] if sacrum is not None else [])

    # ---------------- grid ----------------
    req_bones = [lv.bone for lv in levels if lv.requested]
    if sacrum is not None and sacrum.requested:
        req_bones.append(sacrum.bone)
    lo = np.min([b.world_bounds()[0] for b in req_bones], axis=0)
    hi = np.max([b.world_bounds()[1] for b in req_bones], axis=0)
    z0 = float(lo[2]) - config.margin_mm
    z1 = float(hi[2]) + config.margin_mm
    fov_x, fov_y = config.fov_mm
    nx, ny = round(fov_x / s), round(fov_y / s)
    nz = int(np.ceil((z1 - z0) / s)) + 1
    if nx * ny * nz > MAX_VOXELS:
        raise PhantomConfigError(
            f"the requested phantom needs {nx}x{ny}x{nz} = {nx * ny * nz / 1e6:.0f} M voxels at spacing_mm={s} "
            f"(limit {MAX_VOXELS / 1e6:.0f} M, ~2 GB peak); use a coarser spacing, fewer levels or a smaller fov_mm"
        )
    origin = np.array([-(nx - 1) * s / 2, -(ny - 1) * s / 2, z0])
    grid = Grid(origin, s, (nx, ny, nz))
    hu = np.full(grid.shape, np.float32(HU["air"]), dtype=np.float32)
    labels = np.zeros(grid.shape, dtype=np.uint8)

    # ---------------- soft tissue ----------------
    rf = _rng(seed, _K_FIELDS)
    f_lo = np.array([-fov_x / 2 - 20, -fov_y / 2 - 20, float(lo[2]) - 80.0])
    f_hi = np.array([fov_x / 2 + 20, fov_y / 2 + 20, float(hi[2]) + 80.0])
    fields = {
        "bowel": CoarseField(f_lo, f_hi, 6.0, rf, 1.6),
        "gas": CoarseField(f_lo, f_hi, 6.0, rf, 1.4),
        "fat": CoarseField(f_lo, f_hi, 6.0, rf, 1.0),
        "lung": CoarseField(f_lo, f_hi, 4.0, rf, 0.8),
    }
    table_y = None
    if config.table:
        # the table touches the most posterior skin point in the field of view
        zs = np.linspace(z0, z1, 25)
        xs_ = np.linspace(-0.6 * torso.half_width, 0.6 * torso.half_width, 13)
        back = [
            _skin_posterior_point(torso, curve, patient, np.array([x_ + t_g[0], t_g[1], z_]))[1]
            for z_ in zs
            for x_ in xs_
        ]
        table_y = float(max(back) + 1.0)
    paint_torso(grid, hu, labels, torso=torso, curve=curve, patient=patient, fields=fields, table_y_mm=table_y,
                crest_z_patient=crest_z_patient)
    body_w = (torso, curve, patient)
    contrast = config.contrast
    hu_c = HU_CONTRAST if contrast else {}
    _paint_organs(grid, hu, labels, z_of=z_of, body=body_w, hu_c=hu_c)
    paint_lungs(grid, hu, labels, ribcage=ribcage, curve=curve, patient=patient, diaphragm_z=z_of("T11") + 5.0,
                field=fields["lung"])
    _paint_muscles(grid, hu, labels, levels=levels, sacrum=sacrum, body=body_w, paraspinal_hu=paraspinal_hu)
    vessel_meta = _paint_vessels(grid, hu, labels, levels=levels, scale=vessel_scale, hu_c=hu_c, patient=patient)
    for d in discs:
        upper = next((lv for lv in levels if lv.name == d["upper"]), None)
        lower: LevelModel | SacrumModel | None = next((lv for lv in levels if lv.name == d["lower"]), None)
        if d["lower"] == "S":
            lower = sacrum
        if upper is None or lower is None:
            continue
        # move the disc endplate points to the world
        dw = {
            "upper_endplate_mm": patient.apply(np.asarray(d["upper_endplate_mm"]) + shift),
            "lower_endplate_mm": patient.apply(np.asarray(d["lower_endplate_mm"]) + shift),
            "upper_normal": R_g @ np.asarray(d["upper_normal"]),
            "lower_normal": R_g @ np.asarray(d["lower_normal"]),
        }
        d.update(dw)
        paint_disc(grid, hu, labels, upper=upper, lower=lower, disc=d)
    canal_sections = _canal_sections(levels, sacrum)
    paint_canal(grid, hu, labels, canal_sections)

    # ---------------- lesion ----------------
    lesion = _draw_lesion(config, levels, _rng(seed, _K_LESION)) if config.lesion else None

    # ---------------- bones ----------------
    best = np.full(grid.shape, FAR_MM, dtype=np.float32)
    for bone in bones + rib_bones + ilia:
        les = lesion if (lesion is not None and bone.label == lesion.label) else None
        rasterise_bone(grid, bone, hu, labels, best, density_model=density,
                       rng=_rng(seed, _K_TEXTURE, bone.texture_key), lesion=les)
    del best
    _keep_largest_component(labels, SPINAL_CANAL)

    # ---------------- image formation ----------------
    modality_meta: dict[str, Any] = {"modality": config.modality}
    psf = config.psf_sigma_mm
    if psf is None:
        psf = CT_PSF_SIGMA_MM if config.modality == "ct" else CBCT_PSF_SIGMA_MM
    apply_psf(hu, psf, s)
    noise_hu = config.noise_hu if config.noise_hu is not None else default_noise_hu(config.modality, s)
    rn = _rng(seed, _K_NOISE)
    if config.modality == "ct":
        add_noise(hu, noise_hu, rn)
        fov_meta: dict[str, Any] = {
            "type": "box",
            "min_lps_mm": _lst(grid.origin_lps_mm),
            "max_lps_mm": _lst(grid.origin_lps_mm + s * (np.asarray(grid.shape) - 1)),
        }
    else:
        rc = _rng(seed, _K_CBCT)
        mid = [lv for lv in levels if lv.requested] or levels
        iso = mid[len(mid) // 2].pose.t if mid else t_g
        centre_xy = (float(iso[0] + rc.normal(0, 3.0)), float(iso[1] + rc.normal(0, 3.0)))
        radius = config.cbct_fov_diameter_mm / 2
        streak_meta = cbct_streaks(hu, grid, rc, n_streaks=8, amplitude_hu=float(rc.uniform(50.0, 90.0)))
        cupping = float(rc.uniform(0.05, 0.12))
        trunc = float(rc.uniform(60.0, 160.0))
        cbct_shading(hu, grid, centre_xy_mm=centre_xy, radius_mm=radius, cupping=cupping, truncation_hu=trunc)
        add_noise(hu, noise_hu, rn, correlation_vox=0.8)
        scale = float(rc.uniform(0.85, 1.12))
        offset = float(rc.uniform(-90.0, 90.0))
        hu *= np.float32(scale)
        hu += np.float32(offset)
        mask = cbct_fov_mask(grid, centre_xy, radius)
        hu[~mask] = np.float32(-1000.0)
        modality_meta.update(
            {
                "streaks": streak_meta,
                "cupping_fraction": cupping,
                "truncation_rim_hu": trunc,
                "grey_scale": scale,
                "grey_offset": offset,
                "grey_value_model": "grey = grey_scale * HU + grey_offset inside the FOV (before noise: cupping, rim)",
                "outside_fov_value": -1000.0,
            }
        )
        fov_meta = {
            "type": "cylinder",
            "axis_direction_lps": [0.0, 0.0, 1.0],
            "centre_lps_mm": [centre_xy[0], centre_xy[1], float(grid.origin_lps_mm[2])],
            "radius_mm": radius,
            "z_range_lps_mm": [float(grid.origin_lps_mm[2]), float(grid.origin_lps_mm[2] + s * (grid.shape[2] - 1))],
            "labels_outside_fov": "kept (labels are exact everywhere; the image is -1000 outside the cylinder)",
        }
    modality_meta.update({"psf_sigma_mm": float(psf), "noise_sd_hu": float(noise_hu)})

    # ---------------- volumes and meta ----------------
    ct_vol = Volume(hu, np.full(3, s), grid.origin_lps_mm, np.eye(3),
                    {"source": f"phantom(seed={seed})", "modality": config.modality.upper()})
    lab_vol = Volume(labels, np.full(3, s), grid.origin_lps_mm, np.eye(3), {"source": f"phantom(seed={seed}) labels"})
    meta = _meta(
        config,
        levels=levels,
        sacrum=sacrum,
        context=context,
        grid=grid,
        density=density,
        lesion=lesion,
        vessel_meta=vessel_meta,
        rib_meta=rib_meta,
        discs=discs,
        torso=torso,
        curve=curve,
        patient=patient,
        fov_meta=fov_meta,
        modality_meta=modality_meta,
        curvature=curvature,
        global_scale=global_scale,
        canal_sections=canal_sections,
    )
    return Phantom(ct_vol, lab_vol, meta)


# --------------------------------------------------------------------------------------------
def _skin_gap_patient(torso: Torso, items: list[Any], shift: Vec, tip_p: Vec) -> float:
    """Distance (mm, along +y) from a patient-frame point to the skin, with the spine at ``shift``."""
    pts = sorted((float(p.t[2] + shift[2]), float(p.t[0] + shift[0]), float(p.t[1] + shift[1]))
                 for (_n, _a, p) in items)
    zc, xc, yc = (np.array(v) for v in zip(*pts, strict=True))
    ys = tip_p[1] + np.arange(0.0, 200.0, 0.25)
    n = ys.size
    px = np.full(n, tip_p[0], dtype=np.float32)
    pz = np.full(n, tip_p[2], dtype=np.float32)
    sx = np.full(n, np.interp(tip_p[2], zc, xc), dtype=np.float32)
    sy = np.full(n, np.interp(tip_p[2], zc, yc), dtype=np.float32)
    d = torso_skin_distance(torso, px, ys.astype(np.float32), pz, sx=sx, sy=sy)
    out = np.nonzero(d >= 0)[0]
    return float(ys[out[0]] - tip_p[1]) if out.size else 200.0


def _keep_largest_component(labels: NDArray[np.uint8], label: int) -> None:
    """Clear isolated islands of ``label`` (slivers left between bones), keeping its largest part."""
    from scipy import ndimage

    mask = labels == label
    if not mask.any():
        return
    box = ndimage.find_objects(mask.astype(np.uint8))[0]
    comp, n = ndimage.label(mask[box])
    if n <= 1:
        return
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    keep = int(np.argmax(sizes))
    sub = labels[box]
    sub[(comp > 0) & (comp != keep)] = 0


def _spine_curve(levels: list[LevelModel], sacrum: SacrumModel | None, patient: Pose) -> SpineCurve:
    pts = []
    for lv in levels:
        c = patient.inverse_apply(lv.pose.t)
        pts.append((c[2], c[0], c[1], lv.geometry.a, lv.geometry.b))
    if sacrum is not None:
        c = patient.inverse_apply(sacrum.pose.t)
        pts.append((c[2], c[0], c[1], sacrum.anatomy.s1_width_mm / 2, sacrum.anatomy.s1_depth_mm / 2))
        low = patient.inverse_apply(sacrum.arc_point(sacrum.anatomy.length_mm * 0.8))
        pts.append((low[2], low[0], low[1], 12.0, 8.0))
    arr = np.array(sorted(pts))
    z, x, y, a, b = arr.T
    # extend flat beyond the ends
    z = np.concatenate([[z[0] - 400.0], z, [z[-1] + 400.0]])
    x = np.concatenate([[x[0]], x, [x[-1]]])
    y = np.concatenate([[y[0]], y, [y[-1]]])
    a = np.concatenate([[a[0]], a, [a[-1]]])
    b = np.concatenate([[b[0]], b, [b[-1]]])
    return SpineCurve(z, x, y, a, b)


def _add_inferior_facets(levels: list[LevelModel], sacrum: SacrumModel | None, cortex_scale: float) -> None:
    """Give every vertebra inferior articular processes that meet the superior ones below."""
    for i, upper in enumerate(levels):
        for side in (1, -1):
            if i + 1 < len(levels):
                lower = levels[i + 1]
                R_f, joint, half_h = lower.landmarks["_sap"][side]
                R_w, j_w = lower.pose.compose(R_f, joint)
            elif sacrum is not None:
                R_f, joint, half_h = sacrum.landmarks["_sap"][side]
                R_w, j_w = sacrum.pose.compose(R_f, joint)
            else:
                # virtual vertebra below: same anatomy, one segment lower
                an, g = upper.anatomy, upper.geometry
                R_f, _c, half, joint = superior_facet_local(an, g, side)
                half_h = float(half[2])
                down = np.array([0.0, 0.0, -(2 * g.h_mid + an.disc_below_mm)])
                R_w, j_w = upper.pose.compose(R_f, joint + down)
            upper.bone.prims.append(
                inferior_facet_primitive(upper, R_w, j_w, side, lower_half_height=half_h, cortex_scale=cortex_scale)
            )


def _ribcage(levels: list[LevelModel], torso: Torso, patient: Pose) -> dict[str, float]:
    """Ellipse of the rib cage in the patient's axial plane."""
    y_tp = []
    for lv in levels:
        for side in (1, -1):
            tip = lv.pose.apply(lv.landmarks["transverse_tips_local"][side])
            y_tp.append(patient.inverse_apply(tip)[1])
    y_post = float(np.max(y_tp)) + 14.0 if y_tp else torso.half_depth_post - 40.0
    y_ant = -(torso.half_depth_ant - (torso.skin_mm + torso.fat_ant + torso.wall + 4.0))
    A = torso.half_width - (torso.skin_mm + torso.fat_lat + torso.wall + 6.0)
    return {"cx": 0.0, "cy": 0.5 * (y_post + y_ant), "A": A, "B": 0.5 * (y_post - y_ant)}


def _paint_organs(
    grid: Grid,
    hu: NDArray[np.float32],
    labels: NDArray[np.uint8],
    *,
    z_of: Any,
    body: tuple[Torso, SpineCurve, Pose],
    hu_c: dict[str, float],
) -> None:
    """Liver, spleen, kidneys (with perirenal fat and sinus) and heart, placed relative to the spine."""
    _torso, curve, patient = body
    R = patient.R

    def at(x: float, y: float, z: float) -> Vec:
        return patient.apply([x, y, z])

    def spine_xy(z: float) -> tuple[float, float, float, float]:
        x, y, a, b = curve.at(np.asarray([z], dtype=np.float32))
        return float(x[0]), float(y[0]), float(a[0]), float(b[0])

    def organ(centre: Vec, rot: Vec, radii: tuple[float, float, float], value: float) -> None:
        paint_ellipsoid_organ(grid, hu, labels, centre=centre, R=rot, radii=radii, value=value, body=body)

    z_t11 = z_of("T11")
    sx, sy, _sa, _sb = spine_xy(z_t11)
    organ(at(-62.0, sy - 55.0, z_t11 + 10.0), R @ rotation_xyz(0, 0, -15), (92.0, 80.0, 95.0),
          hu_c.get("liver", HU["liver"]))
    organ(at(sx + 78.0, sy - 8.0, z_t11 + 12.0), R @ rotation_xyz(0, 0, 35), (24.0, 48.0, 52.0),
          hu_c.get("spleen", HU["spleen"]))
    for side, z_k in ((1, z_of("L1") - 12.0), (-1, z_of("L1") - 28.0)):
        sx, sy, sa, _sb = spine_xy(z_k)
        c = at(sx + side * (sa + 44.0), sy + 8.0, z_k)
        Rk = R @ rotation_xyz(side * -8.0, 0.0, side * 25.0)
        organ(c, Rk, (36.0, 32.0, 64.0), HU["fat"])
        organ(c, Rk, (26.0, 22.0, 55.0), hu_c.get("kidney", HU["kidney"]))
        organ(c + R @ np.array([-side * 12.0, -4.0, 0.0]), Rk, (9.0, 8.0, 24.0), HU["fat"] + 40.0)
    z_t8 = z_of("T8")
    sx, sy, _sa, sb = spine_xy(z_t8)
    organ(at(sx + 20.0, sy - sb - 70.0, z_t8), R @ rotation_xyz(0, 20, -30), (62.0, 50.0, 58.0),
          hu_c.get("heart", HU["heart"]))


def _paint_muscles(
    grid: Grid,
    hu: NDArray[np.float32],
    labels: NDArray[np.uint8],
    *,
    levels: list[LevelModel],
    sacrum: SacrumModel | None,
    body: tuple[Torso, SpineCurve, Pose],
    paraspinal_hu: float,
) -> None:
    """Psoas, quadratus lumborum and the paraspinal muscles as tubes following the spine."""
    psoas_r = {"T12": 5.0, "L1": 9.0, "L2": 13.0, "L3": 16.5, "L4": 19.0, "L5": 20.0}
    for side in (1, -1):
        secs: list[Section] = []
        for lv in levels:
            if lv.name not in psoas_r:
                continue
            g, r = lv.geometry, psoas_r[lv.name]
            fwd = 0.15 if lv.name in ("T12", "L1", "L2", "L3") else 0.45
            c = lv.pose.apply([side * (g.a + 0.75 * r - 2.0), -fwd * g.b, 0.0])
            secs.append(Section(c, lv.pose.R[:, 0], 0.85 * r, 1.05 * r))
        if sacrum is not None and secs:
            c = sacrum.pose.apply([side * (sacrum.anatomy.s1_width_mm / 2 + 24.0), -sacrum.anatomy.s1_depth_mm / 2 - 6,
                                   0])
            secs.append(Section(c, sacrum.pose.R[:, 0], 17.0, 19.0))
        if len(secs) >= 2:
            paint_tube(grid, hu, labels, secs, value=HU["muscle"], label=None, weight_body=body)
        ql = [lv for lv in levels if lv.name in ("T12", "L1", "L2", "L3", "L4")]
        if len(ql) >= 2:
            secs = [Section(lv.pose.apply([side * (lv.geometry.a + 46.0), 0.6 * lv.geometry.b + 14.0, 0.0]),
                            lv.pose.R[:, 0], 17.0, 8.0) for lv in ql]
            paint_tube(grid, hu, labels, secs, value=HU["muscle"], label=None, weight_body=body)
        # paraspinal muscles (erector spinae and multifidus), fatty-infiltrated to a patient-specific HU
        secs = []
        for lv in levels:
            g = lv.geometry
            thor = lv.anatomy.is_thoracic
            ra, rb = (19.0, 17.0) if thor else (24.0, 23.0)
            c = lv.pose.apply([side * (g.canal_a + (14.0 if thor else 18.0)), g.canal_y + g.canal_b + rb - 3.0, -4.0])
            secs.append(Section(c, lv.pose.R[:, 0], ra, rb))
        if sacrum is not None:
            c = sacrum.pose.apply([side * 20.0, sacrum.anatomy.s1_depth_mm / 2 + 34.0, -10.0])
            secs.append(Section(c, sacrum.pose.R[:, 0], 16.0, 12.0))
            c2 = sacrum.arc_point(45.0, sacrum.anatomy.s1_depth_mm / 2 + 20.0) + sacrum.pose.R[:, 0] * side * 16.0
            secs.append(Section(c2, sacrum.pose.R[:, 0], 12.0, 7.0))
        if len(secs) >= 2:
            paint_tube(grid, hu, labels, secs, value=paraspinal_hu, label=None, weight_body=body, exponent=2.6)


def _paint_vessels(
    grid: Grid,
    hu: NDArray[np.float32],
    labels: NDArray[np.uint8],
    *,
    levels: list[LevelModel],
    scale: float,
    hu_c: dict[str, float],
    patient: Pose,
) -> dict[str, Any]:
    """Aorta (101) left-anterior and IVC (102) right-anterior of the bodies, plus unlabelled iliacs.

    The aorta bifurcates at L4 into the common iliac arteries; the IVC forms at L5 from the common
    iliac veins and is followed up to about T9, where it leaves the spine for the heart.
    """
    hu_ao = hu_c.get("aorta", HU["blood"])
    hu_ivc = hu_c.get("ivc", HU["blood"])
    ao: list[Section] = []
    ivc: list[Section] = []
    bif: Vec | None = None
    confluence: Vec | None = None
    t12 = STANDARD_ORDER.index("T12")
    t9 = STANDARD_ORDER.index("T9")
    for lv in levels:
        g = lv.geometry
        idx = STANDARD_ORDER.index(lv.name)
        if lv.name in ("L4", "L5"):
            r = 8.5 * scale
        elif idx > t12:
            r = 9.5 * scale
        elif idx == t12:
            r = 10.5 * scale
        else:
            r = 11.5 * scale
        if idx < t12:
            c_ao = [0.7 * g.a + 0.45 * r, -0.55 * g.b - 0.35 * r, 0.0]
        elif idx == t12:
            c_ao = [0.35 * g.a + 0.3 * r, -g.b - 0.8 * r, 0.0]
        else:
            c_ao = [0.28 * g.a + 0.2 * r, -g.b - r - 1.5, 0.0]
        if lv.name != "L5":
            ao.append(Section(lv.pose.apply(c_ao), lv.pose.R[:, 0], r, r))
        if lv.name == "L4":
            bif = lv.pose.apply([0.1 * g.a, -g.b - r - 1.5, -0.5 * g.h_mid])
            ao.append(Section(bif, lv.pose.R[:, 0], r * 0.95, r * 0.95))
        rx, ry = 11.5 * scale, 8.0 * scale
        if idx < t9:
            continue
        if idx < t12:
            c_iv = [-(0.6 * g.a + rx), -g.b - 2 * ry - 12.0, 0.0]
        elif idx == t12:
            c_iv = [-(0.5 * g.a + rx), -g.b - ry - 5.0, 0.0]
        else:
            c_iv = [-(0.32 * g.a + 0.6 * rx), -g.b - ry - 1.0, 0.0]
        if lv.name == "L5":
            confluence = lv.pose.apply([-(0.15 * g.a), -g.b - ry, 0.4 * g.h_mid])
            ivc.append(Section(confluence, lv.pose.R[:, 0], rx * 0.9, ry))
        else:
            ivc.append(Section(lv.pose.apply(c_iv), lv.pose.R[:, 0], rx, ry))
    meta: dict[str, Any] = {}
    if len(ao) >= 2:
        paint_tube(grid, hu, labels, ao, value=hu_ao, label=AORTA, caps=False)
        meta["aorta"] = {"centreline_lps_mm": [_lst(sec.centre, 2) for sec in ao],
                         "radius_mm": [round(sec.a, 2) for sec in ao]}
    if len(ivc) >= 2:
        paint_tube(grid, hu, labels, ivc, value=hu_ivc, label=INFERIOR_VENA_CAVA, caps=False)
        meta["inferior_vena_cava"] = {"centreline_lps_mm": [_lst(sec.centre, 2) for sec in ivc],
                                      "half_axes_mm": [[round(sec.a, 2), round(sec.b, 2)] for sec in ivc]}
    # common iliac arteries and veins (unlabelled)
    down_ref = levels[-1].pose if levels else patient
    for side in (1, -1):
        if bif is not None:
            end = bif + down_ref.R @ np.array([side * 45.0, -6.0, -70.0])
            mid = bif + down_ref.R @ np.array([side * 20.0, -4.0, -32.0])
            secs = [Section(bif, down_ref.R[:, 0], 6.5 * scale, 6.5 * scale),
                    Section(mid, down_ref.R[:, 0], 6.0 * scale, 6.0 * scale),
                    Section(end, down_ref.R[:, 0], 5.5 * scale, 5.5 * scale)]
            paint_tube(grid, hu, labels, secs, value=hu_ao, label=None)
        if confluence is not None:
            end = confluence + down_ref.R @ np.array([side * 42.0, 8.0, -70.0])
            mid = confluence + down_ref.R @ np.array([side * 16.0, 4.0, -30.0])
            secs = [Section(confluence, down_ref.R[:, 0], 7.5 * scale, 7.0 * scale),
                    Section(mid, down_ref.R[:, 0], 7.0 * scale, 6.5 * scale),
                    Section(end, down_ref.R[:, 0], 6.5 * scale, 6.0 * scale)]
            paint_tube(grid, hu, labels, secs, value=hu_ivc, label=None)
    return meta


def _canal_sections(levels: list[LevelModel], sacrum: SacrumModel | None) -> list[Section]:
    secs: list[Section] = []
    for i, lv in enumerate(levels):
        g = lv.geometry
        if i == 0:
            secs.append(Section(lv.pose.apply([0.0, g.canal_y, g.h_post + 25.0]), lv.pose.R[:, 0], g.canal_a,
                                g.canal_b))
        secs.append(Section(lv.pose.apply([0.0, g.canal_y, 0.0]), lv.pose.R[:, 0], 0.97 * g.canal_a,
                            0.97 * g.canal_b))
    if sacrum is not None:
        an = sacrum.anatomy
        for s_mm, f in ((0.0, 1.0), (18.0, 0.8), (36.0, 0.6), (50.0, 0.45)):
            n = an.s1_depth_mm / 2 * (1.0 - 0.25 * s_mm / 36.0) + an.canal_depth_mm / 2 * f
            c = sacrum.pose.apply(sacrum_arc_local(an, s_mm, n))
            secs.append(Section(c, sacrum.pose.R[:, 0], 0.95 * an.canal_width_mm / 2 * f,
                                0.9 * an.canal_depth_mm / 2 * f))
    elif levels:
        lv = levels[-1]
        g = lv.geometry
        secs.append(Section(lv.pose.apply([0.0, g.canal_y, -g.h_post - 25.0]), lv.pose.R[:, 0], g.canal_a,
                            g.canal_b))
    return secs


def _draw_lesion(config: PhantomConfig, levels: list[LevelModel], rng: np.random.Generator) -> Lesion:
    candidates = [lv for lv in levels if lv.requested]
    if config.lesion_level is not None:
        target = next(lv for lv in candidates if lv.name == config.lesion_level)
        rng.integers(0, max(len(candidates), 1))  # keep the stream aligned with the random choice
    else:
        target = candidates[int(rng.integers(0, len(candidates)))]
    kind_draw = "lytic" if rng.random() < 0.5 else "blastic"
    kind = kind_draw if config.lesion_type == "random" else config.lesion_type
    g = target.geometry
    diameter = float(rng.uniform(8.0, 20.0))
    shape = np.array([1.0, rng.uniform(0.8, 1.15), rng.uniform(0.7, 1.0)])
    radii = diameter / 2 * shape
    # keep the lesion inside the body with >= 1.5 mm of bone around it
    limit = np.array([g.a, g.b, min(g.h_post, g.h_ant)]) - 1.5 - 1.0
    radii = np.minimum(radii, 0.8 * limit)
    room = np.maximum(limit - radii, 0.0)
    u = rng.uniform(-1.0, 1.0, 3)
    # a point in the body's inscribed ellipse
    centre_local = np.array([u[0] * room[0] * 0.6, u[1] * room[1] * 0.6, u[2] * room[2] * 0.8])
    hu = float(rng.uniform(5.0, 40.0)) if kind == "lytic" else float(rng.uniform(800.0, 1200.0))
    R = target.pose.R @ rotation_xyz(0.0, 0.0, float(rng.uniform(0, 180)))
    return Lesion(target.name, target.label, target.pose.apply(centre_local), R, radii, kind, hu)


def _skin_posterior_point(torso: Torso, curve: SpineCurve, patient: Pose, p_world: Vec) -> Vec:
    """Where the ray from ``p_world`` toward +y (world posterior) leaves the skin."""
    ys = p_world[1] + np.arange(0.0, 250.0, 0.25)
    pts = np.stack([np.full_like(ys, p_world[0]), ys, np.full_like(ys, p_world[2])], axis=1)
    local = patient.inverse_apply(pts).astype(np.float32)
    sx, sy, _, _ = curve.at(local[:, 2])
    d = torso_skin_distance(torso, local[:, 0], local[:, 1], local[:, 2], sx=sx, sy=sy)
    out = np.nonzero(d >= 0)[0]
    if out.size == 0:
        return pts[-1]
    i = int(out[0])
    if i == 0:
        return pts[0]
    f = float(-d[i - 1] / max(float(d[i] - d[i - 1]), 1e-6))
    return pts[i - 1] + f * (pts[i] - pts[i - 1])


def _meta(
    config: PhantomConfig,
    *,
    levels: list[LevelModel],
    sacrum: SacrumModel | None,
    context: list[str],
    grid: Grid,
    density: BoneDensity,
    lesion: Lesion | None,
    vessel_meta: dict[str, Any],
    rib_meta: dict[str, Any],
    discs: list[dict[str, Any]],
    torso: Torso,
    curve: SpineCurve,
    patient: Pose,
    fov_meta: dict[str, Any],
    modality_meta: dict[str, Any],
    curvature: float,
    global_scale: float,
    canal_sections: list[Section],
) -> dict[str, Any]:
    lv_meta: dict[str, Any] = {}
    for lv in levels:
        an, g, pose = lv.anatomy, lv.geometry, lv.pose
        ped: dict[str, Any] = {}
        for side, side_name in ((1, "left"), (-1, "right")):
            p = pose.apply([side * g.pedicle_x, g.pedicle_y, g.pedicle_z])
            ped[side_name] = {
                "isthmus_centre_lps_mm": _lst(p),
                "axis_lps": _lst(pose.direction(pedicle_axis_local(an, side)), 6),
                "width_mm": round(an.pedicle_width_mm, 3),
                "height_mm": round(an.pedicle_height_mm, 3),
                "transverse_angle_deg": round(an.pedicle_transverse_deg, 3),
                "sagittal_angle_deg": round(an.pedicle_sagittal_deg, 3),
            }
        tip = pose.apply(lv.landmarks["spinous_tip_local"])
        skin = _skin_posterior_point(torso, curve, patient, tip)
        entry: dict[str, Any] = {
            "label": lv.label,
            "requested": lv.requested,
            "body_centre_lps_mm": _lst(pose.t),
            "superior_direction_lps": _lst(pose.R[:, 2], 6),
            "left_direction_lps": _lst(pose.R[:, 0], 6),
            "posterior_direction_lps": _lst(pose.R[:, 1], 6),
            "superior_endplate_centre_lps_mm": _lst(pose.apply([0, 0, g.h_mid])),
            "inferior_endplate_centre_lps_mm": _lst(pose.apply([0, 0, -g.h_mid])),
            "body_width_mm": round(an.body_width_mm, 3),
            "body_depth_mm": round(an.body_depth_mm, 3),
            "body_height_mm": round(an.body_height_mm, 3),
            "body_height_anterior_mm": round(an.body_height_anterior_mm, 3),
            "pedicles": ped,
            "canal_centre_lps_mm": _lst(pose.apply([0.0, g.canal_y, 0.0])),
            "canal_width_mm": round(an.canal_width_mm, 3),
            "canal_depth_mm": round(an.canal_depth_mm, 3),
            "spinous_process_tip_lps_mm": _lst(tip),
            "transverse_process_tips_lps_mm": {
                "left": _lst(pose.apply(lv.landmarks["transverse_tips_local"][1])),
                "right": _lst(pose.apply(lv.landmarks["transverse_tips_local"][-1])),
            },
            "skin_posterior_midline_lps_mm": _lst(skin),
            "sagittal_tilt_deg": round(float(np.degrees(np.arctan2(pose.R[1, 2], pose.R[2, 2]))), 3),
            "anatomy": {k: (round(v, 3) if isinstance(v, float) else v) for k, v in an.__dict__.items()},
        }
        if lv.name in rib_meta:
            entry["ribs_centreline_lps_mm"] = rib_meta[lv.name]
        lv_meta[lv.name] = entry
    if sacrum is not None:
        an_s = sacrum.anatomy
        lv_meta["S"] = {
            "label": 26,
            "requested": sacrum.requested,
            "body_centre_lps_mm": _lst(sacrum.pose.t),
            "superior_direction_lps": _lst(sacrum.pose.R[:, 2], 6),
            "superior_endplate_centre_lps_mm": _lst(sacrum.arc_point(0.0)),
            "apex_lps_mm": _lst(sacrum.arc_point(an_s.length_mm)),
            "sacral_slope_deg": round(an_s.sacral_slope_deg, 3),
            "anatomy": {k: round(float(v), 3) for k, v in an_s.__dict__.items()},
        }
    mid = [lv for lv in levels if lv.requested] or levels
    lesion_meta = None
    if lesion is not None:
        lesion_meta = {
            "level": lesion.level,
            "label": LESION,
            "type": lesion.kind,
            "centre_lps_mm": _lst(lesion.centre),
            "radii_mm": _lst(lesion.radii, 3),
            "radius_mm": round(float(np.mean(lesion.radii)), 3),
            "axes_lps": _lst(lesion.R, 6),
            "hu": round(lesion.hu, 2),
        }
    return {
        "schema": META_SCHEMA,
        "frame": "LPS",
        "units": "mm",
        "config": config.as_dict(),
        "seed": config.seed,
        "modality": config.modality,
        "levels": list(config.levels),
        "context_levels": list(context),
        "label_ids": {
            **{name: level_id(name) for name in [*config.levels, *context]},
            "spinal_canal": SPINAL_CANAL,
            "aorta": AORTA,
            "inferior_vena_cava": INFERIOR_VENA_CAVA,
            "lesion": LESION,
            "skin": SKIN,
            "disc": DISC,
        },
        "unlabelled_bone": ["ribs", "ilia"],
        "grid": {
            "shape": list(grid.shape),
            "spacing_mm": [grid.spacing_mm] * 3,
            "origin_lps_mm": _lst(grid.origin_lps_mm),
            "direction": np.eye(3).reshape(-1).tolist(),
        },
        "patient": {
            "global_scale": round(global_scale, 4),
            "curvature_scale": round(curvature, 4),
            "R_world_from_patient": _lst(patient.R, 6),
            "t_world_from_patient_mm": _lst(patient.t),
            "torso_half_width_mm": round(torso.half_width, 2),
            "torso_half_depth_anterior_mm": round(torso.half_depth_ant, 2),
            "torso_half_depth_posterior_mm": round(torso.half_depth_post, 2),
            "subcutaneous_fat_mm": {"anterior": round(torso.fat_ant, 2), "lateral": round(torso.fat_lat, 2),
                                    "posterior": round(torso.fat_post, 2)},
        },
        "vertebrae": lv_meta,
        "discs": [
            {
                "upper": d["upper"],
                "lower": d["lower"],
                "centre_lps_mm": _lst(0.5 * (np.asarray(d["upper_endplate_mm"]) + np.asarray(d["lower_endplate_mm"]))),
                "height_mm": round(float(d["height_mm"]), 3),
            }
            for d in discs
            if isinstance(d.get("upper_endplate_mm"), np.ndarray) and d["lower"] in [lv.name for lv in levels] + (
                ["S"] if sacrum is not None else [])
        ],
        "spinal_canal": {"centreline_lps_mm": [_lst(sec.centre, 2) for sec in canal_sections]},
        "vessels": vessel_meta,
        "lesion": lesion_meta,
        "skin_posterior_midline_lps_mm": lv_meta[mid[len(mid) // 2].name]["skin_posterior_midline_lps_mm"]
        if mid else None,
        "bone_density": {
            "bone_quality": config.bone_quality,
            "cancellous_hu": round(density.cancellous_hu, 2),
            "cortical_hu": round(density.cortical_hu, 2),
            "texture_sd_hu": round(density.texture_sd_hu, 2),
            "cortex_thickness_scale": round(density.cortex_scale, 3),
        },
        "soft_tissue_hu": {**HU, **(HU_CONTRAST if config.contrast else {})},
        "fov": fov_meta,
        "imaging": modality_meta,
    }


def write_phantom(phantom: Phantom, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``ct.nii.gz``, ``labels.nii.gz`` and ``meta.json`` into ``out_dir`` (created if missing).

    Each file is written under a temporary name and renamed into place, so readers never see a
    half-written file.

    Returns:
        ``{"ct": path, "labels": path, "meta": path}``.
    """
    from needle_steering.perception.io import write_volume

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ImageError(f"{out}: cannot create output folder ({exc})") from None
    paths = {"ct": out / "ct.nii.gz", "labels": out / "labels.nii.gz", "meta": out / "meta.json"}
    write_volume(phantom.ct, paths["ct"])
    write_volume(phantom.labels, paths["labels"])
    write_text_atomic(paths["meta"], json.dumps(phantom.meta, indent=1, allow_nan=False))
    return paths


__all__ = ["MAX_VOXELS", "META_SCHEMA", "generate_phantom", "write_phantom"]
