"""Spine layout (poses of the vertebrae) and the bony primitives of each vertebra, sacrum and ilium.

Everything here is geometry in millimetres; nothing touches a voxel grid (see :mod:`.raster`).
A vertebra's local frame has its origin at the body centre, +x left, +y posterior, +z superior.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from needle_steering.perception.labels import level_id
from needle_steering.sim.phantom.anatomy import (
    LEVEL_ANATOMY,
    SACRUM_ANATOMY,
    LevelAnatomy,
    SacrumAnatomy,
    vary_level,
)
from needle_steering.sim.phantom.sdf import (
    F32,
    combine,
    ellipse2,
    frame_from_axis,
    rotation_xyz,
    rounded_box,
    superellipse2,
    world_aabb,
)

Vec = NDArray[np.float64]
SdfFn = Callable[[F32, F32, F32], F32]


@dataclass
class Primitive:
    """One bony shape in its own frame.

    Attributes:
        R: World-from-primitive rotation ``(3, 3)`` (columns: primitive axes in world).
        centre: World position of the primitive origin ``(3,)``, mm.
        lo: Local lower bound ``(3,)`` of the shape (for bounding boxes), mm.
        hi: Local upper bound ``(3,)``, mm.
        fn: Signed distance of local coordinates ``(x, y, z)`` (mm, negative inside).
        cortex_mm: Cortical shell thickness where this primitive forms the surface.
        density: Multiplier of the cancellous HU above water (posterior elements are denser).
        name: For debugging.
    """

    R: Vec
    centre: Vec
    lo: Vec
    hi: Vec
    fn: SdfFn
    cortex_mm: float
    density: float
    name: str = ""

    def world_bounds(self) -> tuple[Vec, Vec]:
        """World axis-aligned bounding box of the shape."""
        return world_aabb(self.R, self.centre, self.lo, self.hi)


@dataclass
class Bone:
    """A bone to rasterise: primitives united with a smooth fillet, one label id (0 = unlabelled)."""

    name: str
    label: int
    prims: list[Primitive] = field(default_factory=list)
    blend_mm: float = 2.0
    texture_key: int = 0

    def world_bounds(self) -> tuple[Vec, Vec]:
        """World bounding box of all primitives."""
        bounds = [p.world_bounds() for p in self.prims]
        lo = np.min([b[0] for b in bounds], axis=0)
        hi = np.max([b[1] for b in bounds], axis=0)
        return lo, hi


@dataclass
class Pose:
    """World-from-local rigid transform: ``p_world = R @ p_local + t``."""

    R: Vec
    t: Vec

    def apply(self, p_local: Any) -> Vec:
        """Map local points ``(..., 3)`` to world."""
        return np.asarray(p_local, dtype=np.float64) @ self.R.T + self.t

    def inverse_apply(self, p_world: Any) -> Vec:
        """Map world points ``(..., 3)`` to local."""
        return (np.asarray(p_world, dtype=np.float64) - self.t) @ self.R

    def direction(self, d_local: Any) -> Vec:
        """Rotate a local direction to world."""
        return np.asarray(d_local, dtype=np.float64) @ self.R.T

    def compose(self, R_local: Vec, c_local: Any) -> tuple[Vec, Vec]:
        """World rotation and centre of a sub-frame given in this frame."""
        return self.R @ R_local, self.apply(c_local)


def _unit(v: Any) -> Vec:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


def _prim(pose: Pose, R_local: Vec, c_local: Any, lo: Any, hi: Any, *, fn: SdfFn, cortex: float, density: float,
          name: str) -> Primitive:
    R, c = pose.compose(R_local, c_local)
    return Primitive(R, c, np.asarray(lo, float), np.asarray(hi, float), fn, cortex, density, name)


# --------------------------------------------------------------------------------------------
# derived geometry of one vertebra (local frame)
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VertebraGeometry:
    """Derived local-frame geometry of a vertebra (mm). Computed once from the anatomy."""

    a: float  # body half width
    b: float  # body half depth
    h_post: float  # posterior half height
    h_ant: float  # anterior half height
    concavity: float  # posterior wall concavity
    canal_y: float  # canal centre y
    canal_a: float  # canal half width
    canal_b: float  # canal half depth
    pedicle_z: float  # pedicle isthmus centre z
    pedicle_y: float  # pedicle isthmus centre y
    pedicle_x: float  # |x| of the pedicle isthmus centre
    lamina_top: float
    lamina_bottom: float
    lamina_tilt_deg: float
    facet_x: float
    facet_y: float

    @property
    def h_mid(self) -> float:
        """Half height in the mid-sagittal centre of the body."""
        return 0.5 * (self.h_post + self.h_ant)


def vertebra_geometry(an: LevelAnatomy) -> VertebraGeometry:
    """Derive the local geometry (canal position, pedicle placement, lamina extent) from the anatomy."""
    a = an.body_width_mm / 2
    b = an.body_depth_mm / 2
    conc = 0.05 * an.body_depth_mm
    canal_a = an.canal_width_mm / 2
    canal_b = an.canal_depth_mm / 2
    # the canal's anterior border overlaps the posterior body wall by ~1.5 mm (bone wins), so the
    # canal is closed anteriorly whatever the waist of the body at the pedicle level
    canal_y = b - conc + canal_b - 1.5
    h_post = an.body_height_mm / 2
    h_ant = an.body_height_anterior_mm / 2
    ped_z = h_post - an.pedicle_height_mm / 2 - 0.11 * an.body_height_mm
    ped_y = canal_y + 0.05 * canal_b
    ped_x = canal_a + an.pedicle_width_mm / 2
    lam_top = ped_z + an.pedicle_height_mm / 2 + 1.0
    lam_bottom = lam_top - an.lamina_height_mm
    tilt = 28.0 if an.is_thoracic else 18.0
    facet_x = canal_a + 0.55 * an.pedicle_width_mm + 2.0
    facet_y = canal_y + 0.6 * canal_b + 2.0
    return VertebraGeometry(
        a, b, h_post, h_ant, conc, canal_y, canal_a, canal_b, ped_z, ped_y, ped_x, lam_top, lam_bottom, tilt,
        facet_x, facet_y,
    )


def pedicle_axis_local(an: LevelAnatomy, side: int) -> Vec:
    """Unit pedicle axis (posterior -> anterior) in the local frame; ``side`` +1 left, -1 right."""
    th = np.deg2rad(an.pedicle_transverse_deg)
    sg = np.deg2rad(an.pedicle_sagittal_deg)
    return _unit([-side * np.sin(th) * np.cos(sg), -np.cos(th) * np.cos(sg), -np.sin(sg)])


def body_section_sdf(x: F32, y: F32, a: float | F32, b: float | F32, conc: float) -> F32:
    """Cross-section of a vertebral body: rounder anterior, flatter posterior with a midline concavity."""
    xa = np.minimum(np.abs(x) / a, 1.0)
    y_eff = y + np.where(y > 0, conc * (1.0 - xa * xa), 0.0).astype(np.float32)
    d_ant = superellipse2(x, y_eff, a, b, 2.2)
    d_post = superellipse2(x, y_eff, a, b, 3.2)
    return np.asarray(np.where(y_eff > 0, d_post, d_ant), dtype=np.float32)


def _body_fn(g: VertebraGeometry, waist: float = 0.05, cavity: float = 1.2) -> SdfFn:
    a, b, conc = g.a, g.b, g.concavity
    hp, ha = g.h_post, g.h_ant

    def fn(x: F32, y: F32, z: F32) -> F32:
        yy = np.clip(y / (2 * b), -0.5, 0.5)
        h = np.float32(0.5 * (hp + ha)) + np.float32(hp - ha) * yy
        zr = np.clip(z / h, -1.0, 1.0)
        w = np.float32(1.0) - np.float32(waist) * (1.0 - zr * zr)
        d_xy = body_section_sdf(x, y, a * w, b * w, conc)
        rho2 = (x / a) ** 2 + (y / b) ** 2
        dz = np.abs(z) - h + np.float32(cavity) * np.maximum(1.0 - rho2, 0.0)
        return combine(d_xy, dz)

    return fn


def _pedicle_fn(half_w: float, half_h: float, L_ant: float, L_post: float) -> SdfFn:
    def fn(v: F32, u: F32, w: F32) -> F32:
        t_ant = np.clip(u / L_ant, 0.0, 1.0)
        t_post = np.clip(-u / L_post, 0.0, 1.0)
        flare = 1.0 + 0.6 * t_ant * t_ant + 0.35 * t_post * t_post
        d_r = ellipse2(v, w, half_w * flare, half_h * flare)
        d_a = np.maximum(u - L_ant, -L_post - u)
        return combine(d_r, d_a)

    return fn


def _arch_fn(g: VertebraGeometry, outer_a: float, outer_b: float, p: float) -> SdfFn:
    """Posterior arch: a ring around the posterior half of the canal, sheared caudally-posteriorly."""
    tan_t = float(np.tan(np.deg2rad(g.lamina_tilt_deg)))
    half_h = 0.5 * (g.lamina_top - g.lamina_bottom)
    ca, cb = g.canal_a, g.canal_b

    def fn(x: F32, y: F32, z: F32) -> F32:
        # local coordinates already centred at (0, canal_y, z_mid)
        ys = y + z * np.float32(tan_t)
        d_out = superellipse2(x, ys, outer_a, outer_b, p)
        d_in = superellipse2(x, ys, ca, cb, p)
        ring = np.maximum(d_out, -d_in)
        # only the posterior part: the pedicles form the lateral walls in front of the canal centre
        ring = np.maximum(ring, np.float32(0.15 * cb) - y)
        dz = np.abs(z) - np.float32(half_h)
        return combine(ring, dz)

    return fn


def _box_fn(half: Any, radius: float, taper: float = 0.0) -> SdfFn:
    """Rounded box; ``taper`` shrinks the cross-section (x, z) linearly toward +y by that fraction."""
    hx, hy, hz = (float(v) for v in half)

    def fn(x: F32, y: F32, z: F32) -> F32:
        if taper > 0:
            s = 1.0 - np.float32(taper) * np.clip((y + hy) / (2 * hy), 0.0, 1.0)
            return rounded_box(x / s, y, z / s, (hx, hy, hz), radius) * np.minimum(s, 1.0)
        return rounded_box(x, y, z, (hx, hy, hz), radius)

    return fn


@dataclass
class LevelModel:
    """One vertebra placed in the world: anatomy, derived geometry, pose, landmarks and primitives."""

    name: str
    anatomy: LevelAnatomy
    geometry: VertebraGeometry
    pose: Pose
    requested: bool
    bone: Bone = field(default_factory=lambda: Bone("", 0))
    landmarks: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> int:
        """VerSe id."""
        return level_id(self.name)


@dataclass
class SacrumModel:
    """The sacrum placed in the world."""

    anatomy: SacrumAnatomy
    pose: Pose
    requested: bool
    bone: Bone = field(default_factory=lambda: Bone("S", 26))
    landmarks: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """Level name."""
        return "S"

    @property
    def label(self) -> int:
        """VerSe id of the sacrum."""
        return 26

    def arc_point(self, s_mm: float, n_mm: float = 0.0) -> Vec:
        """World point at arc length ``s`` below the S1 endplate, offset ``n`` posteriorly from the axis."""
        return self.pose.apply(sacrum_arc_local(self.anatomy, s_mm, n_mm))

    def arc_frame(self, s_mm: float) -> Vec:
        """World rotation whose z column is the sacral axis tangent (superior) at ``s``."""
        kappa = np.deg2rad(self.anatomy.curvature_deg) / self.anatomy.length_mm
        ang = kappa * s_mm
        # tangent pointing superior along the arc and posterior normal in the local y-z plane
        up = np.array([0.0, -np.sin(ang), np.cos(ang)])
        post = np.array([0.0, np.cos(ang), np.sin(ang)])
        R_local = np.stack([np.array([1.0, 0.0, 0.0]), post, up], axis=1)
        return self.pose.R @ R_local


def sacrum_arc_local(an: SacrumAnatomy, s_mm: float, n_mm: float = 0.0) -> Vec:
    """Local point on the sacral axis arc (``s`` mm below the S1 top endplate, ``n`` mm posterior)."""
    kappa = np.deg2rad(an.curvature_deg) / an.length_mm
    r = 1.0 / kappa + n_mm
    ang = kappa * s_mm
    top = an.s1_height_mm / 2
    return np.array([0.0, -1.0 / kappa + r * np.cos(ang), top - r * np.sin(ang)])


# --------------------------------------------------------------------------------------------
# layout
# --------------------------------------------------------------------------------------------
@dataclass
class SpineLayout:
    """The chain of vertebrae (cranio-caudal) with the sacrum, in world coordinates."""

    levels: list[LevelModel]
    sacrum: SacrumModel | None
    discs: list[dict[str, Any]]
    curvature_scale: float

    def chain_names(self) -> list[str]:
        """Names of every element, cranio-caudal (vertebrae then ``"S"``)."""
        names = [lv.name for lv in self.levels]
        if self.sacrum is not None:
            names.append("S")
        return names


def _orthonormalise(R: Vec) -> Vec:
    U, _, Vt = np.linalg.svd(R)
    out = U @ Vt
    if np.linalg.det(out) < 0:
        U[:, -1] *= -1
        out = U @ Vt
    return np.asarray(out, dtype=np.float64)


def build_layout(
    chain: list[str],
    rng_for: Callable[[str], np.random.Generator],
    *,
    curvature_scale: float,
    global_scale: float,
    sacral_slope_jitter_deg: float = 0.0,
) -> tuple[list[tuple[str, LevelAnatomy | SacrumAnatomy, Pose]], list[dict[str, Any]]]:
    """Stack the vertebrae of ``chain`` (cranio-caudal) along the supine sagittal curve.

    Args:
        chain: Contiguous level names, cranio-caudal (``"S"`` last if present).
        rng_for: Random generator of each level (keyed by name, so a level's own variation does
            not depend on which other levels are generated).
        curvature_scale: Lordosis/kyphosis factor.
        global_scale: Patient size factor.
        sacral_slope_jitter_deg: Added to the sacral slope.

    Returns:
        ``(items, discs)``: ``(name, anatomy, pose)`` in a *spine frame* (first element at the
        origin), and the discs as dicts with their endplate geometry.
    """
    items: list[tuple[str, LevelAnatomy | SacrumAnatomy, Pose]] = []
    discs: list[dict[str, Any]] = []
    prev: tuple[str, LevelAnatomy | SacrumAnatomy, Pose] | None = None
    lateral = 0.0
    for name in chain:
        rng = rng_for(name)
        if name == "S":
            base_s = SACRUM_ANATOMY
            an_s = SacrumAnatomy(
                s1_width_mm=base_s.s1_width_mm * global_scale * float(rng.normal(1, 0.02)),
                s1_depth_mm=base_s.s1_depth_mm * global_scale * float(rng.normal(1, 0.02)),
                s1_height_mm=base_s.s1_height_mm * global_scale * float(rng.normal(1, 0.02)),
                ala_width_mm=base_s.ala_width_mm * global_scale * float(rng.normal(1, 0.025)),
                length_mm=base_s.length_mm * global_scale * float(rng.normal(1, 0.03)),
                curvature_deg=base_s.curvature_deg * float(rng.normal(1, 0.1)),
                canal_width_mm=base_s.canal_width_mm * global_scale * float(rng.normal(1, 0.03)),
                canal_depth_mm=base_s.canal_depth_mm * global_scale * float(rng.normal(1, 0.03)),
                facet_angle_deg=base_s.facet_angle_deg + float(rng.normal(0, 2.0)),
                sacral_slope_deg=base_s.sacral_slope_deg * max(curvature_scale, 0.25) + sacral_slope_jitter_deg,
            )
            an: LevelAnatomy | SacrumAnatomy = an_s
            tilt = -an_s.sacral_slope_deg
            half_h = an_s.s1_height_mm / 2
            axial = float(rng.normal(0, 1.0))
            coronal = float(rng.normal(0, 1.0))
        else:
            an_l = vary_level(LEVEL_ANATOMY[name], rng, global_scale=global_scale)
            an = an_l
            tilt = an_l.sagittal_tilt_deg * curvature_scale + float(rng.normal(0, 1.0))
            half_h = 0.25 * (an_l.body_height_mm + an_l.body_height_anterior_mm)
            axial = float(rng.normal(0, 1.5))
            coronal = float(rng.normal(0, 1.0))
        R = rotation_xyz(-tilt, 0.0, 0.0) @ rotation_xyz(0.0, coronal, axial)
        up = R[:, 2]
        if prev is None:
            t = np.zeros(3)
        else:
            p_name, p_an, p_pose = prev
            assert isinstance(p_an, LevelAnatomy)
            p_half = 0.25 * (p_an.body_height_mm + p_an.body_height_anterior_mm)
            p_up = p_pose.R[:, 2]
            inf_end = p_pose.t - p_half * p_up
            n = _unit(p_up + up)
            sup_end = inf_end - p_an.disc_below_mm * n
            lateral = 0.7 * lateral + float(rng.normal(0, 0.6))
            t = sup_end - half_h * up + np.array([lateral, 0.0, 0.0])
            discs.append(
                {
                    "upper": p_name,
                    "lower": name,
                    "upper_endplate_mm": inf_end,
                    "upper_normal": p_up,
                    "lower_endplate_mm": sup_end,
                    "lower_normal": up,
                    "height_mm": float(p_an.disc_below_mm),
                }
            )
        pose = Pose(R, t)
        items.append((name, an, pose))
        prev = (name, an, pose)
    return items, discs


# --------------------------------------------------------------------------------------------
# vertebra primitives
# --------------------------------------------------------------------------------------------
def vertebra_primitives(lv: LevelModel, cortex_scale: float) -> list[Primitive]:
    """The primitives of a vertebra except the inferior articular processes (added per joint)."""
    an, g, pose = lv.anatomy, lv.geometry, lv.pose
    prims: list[Primitive] = []
    c_body = 1.0 * cortex_scale
    c_post = 1.6 * cortex_scale
    eye = np.eye(3)
    hmax = max(g.h_post, g.h_ant)
    prims.append(
        _prim(pose, eye, np.zeros(3), [-g.a - 1, -g.b - 1, -hmax - 1], [g.a + 1, g.b + 1, hmax + 1], fn=_body_fn(g),
              cortex=c_body, density=1.0, name="body")
    )
    # pedicles
    for side in (1, -1):
        u = pedicle_axis_local(an, side)
        F = frame_from_axis(u, (0.0, 0.0, 1.0))
        P = np.array([side * g.pedicle_x, g.pedicle_y, g.pedicle_z])
        L_ant = max((P[1] - (g.b - 9.0)) / max(-u[1], 0.3), 6.0)
        L_post = max(((g.canal_y + 0.55 * g.canal_b) - P[1]) / max(-u[1], 0.3), 4.0) + 2.0
        hw, hh = an.pedicle_width_mm / 2, an.pedicle_height_mm / 2
        ext = 1.7 * max(hw, hh) + 1
        prims.append(
            _prim(pose, F, P, [-ext, -L_post - 1, -ext], [ext, L_ant + 1, ext], fn=_pedicle_fn(hw, hh, L_ant, L_post),
                  cortex=1.5 * cortex_scale, density=1.15, name=f"pedicle_{side}")
        )
    # posterior arch (laminae around the canal)
    outer_a = g.canal_a + 0.95 * an.pedicle_width_mm
    outer_b = g.canal_b + an.lamina_thickness_mm
    p_shape = 2.0 if an.is_thoracic else 1.5
    z_mid = 0.5 * (g.lamina_top + g.lamina_bottom)
    half_h = 0.5 * (g.lamina_top - g.lamina_bottom)
    shear = half_h * np.tan(np.deg2rad(g.lamina_tilt_deg))
    prims.append(
        _prim(pose, eye, [0.0, g.canal_y, z_mid], [-outer_a - 1, -0.2 * g.canal_b - 1, -half_h - 1],
              [outer_a + 1, outer_b + shear + 1, half_h + 1], fn=_arch_fn(g, outer_a, outer_b, p_shape), cortex=c_post,
              density=1.3, name="arch")
    )
    # spinous process
    R_sp, base, L_sp = spinous_frame(an, g)
    d_sp = R_sp[:, 1]
    t_sp = 6.0 if an.is_thoracic else (8.0 if an.name == "L5" else 7.0)
    half = np.array([t_sp / 2, L_sp / 2, an.spinous_height_mm / 2])
    prims.append(
        _prim(pose, R_sp, base + d_sp * L_sp / 2, -half - 1, half + 1, fn=_box_fn(half, min(2.5, t_sp / 2 - 0.2)),
              cortex=c_post, density=1.3, name="spinous")
    )
    tip_local = spinous_tip_local(an, g)
    # transverse processes
    beta = np.deg2rad(an.transverse_angle_deg)
    tp_tips = {}
    for side in (1, -1):
        if an.is_thoracic:
            thick, height = 9.0, 10.0
        elif an.name == "L5":
            thick, height = 10.0, 19.0
        else:
            thick, height = 5.5, 11.0 + 1.2 * (int(an.name[1]) - 1)
        # the process arises at the pedicle-lamina junction, behind the isthmus
        J = np.array([side * (g.canal_a + 0.75 * an.pedicle_width_mm),
                      g.canal_y + 0.3 * g.canal_b + thick / 2 - 2.0, g.pedicle_z + 1.0])
        d = np.array([side * np.cos(beta), np.sin(beta), 0.0])
        L = max((an.transverse_width_mm / 2 - abs(J[0])) / np.cos(beta), 6.0)
        F = frame_from_axis(d, (0.0, 0.0, 1.0))
        half_tp = np.array([thick / 2, L / 2 + 2.0, height / 2])
        centre = J + d * (L / 2 - 2.0)
        prims.append(
            _prim(pose, F, centre, -half_tp - 1, half_tp + 1,
                  fn=_box_fn(half_tp, min(2.4, thick / 2 - 0.3), taper=0.0 if an.is_thoracic else 0.3),
                  cortex=1.2 * cortex_scale, density=1.2, name=f"transverse_{side}")
        )
        tp_tips[side] = J + d * L
    # superior articular processes
    lv.landmarks["_sap"] = {}
    for side in (1, -1):
        R_f, c_f, half_f, joint = superior_facet_local(an, g, side)
        prims.append(
            _prim(pose, R_f, c_f, -half_f - 1, half_f + 1, fn=_box_fn(half_f, float(min(half_f[:2])) - 0.6),
                  cortex=c_post, density=1.25, name=f"sap_{side}")
        )
        lv.landmarks["_sap"][side] = (R_f, joint, float(half_f[2]))
    lv.landmarks["spinous_tip_local"] = tip_local
    lv.landmarks["transverse_tips_local"] = tp_tips
    return prims


def spinous_frame(an: LevelAnatomy, g: VertebraGeometry) -> tuple[Vec, Vec, float]:
    """Spinous process frame (columns: x, along the process, its normal), base point and length."""
    alpha = np.deg2rad(an.spinous_angle_deg)
    d_sp = np.array([0.0, np.cos(alpha), -np.sin(alpha)])
    n_sp = np.array([0.0, np.sin(alpha), np.cos(alpha)])
    R_sp = np.stack([np.array([1.0, 0.0, 0.0]), d_sp, n_sp], axis=1)
    z_mid = 0.5 * (g.lamina_top + g.lamina_bottom)
    half_h = 0.5 * (g.lamina_top - g.lamina_bottom)
    # the process starts right behind the canal so it merges with the (sheared) laminae without a notch
    base = np.array([0.0, g.canal_y + g.canal_b + 0.8, z_mid + 0.15 * half_h])
    L_sp = an.spinous_length_mm + an.lamina_thickness_mm - 0.8
    return R_sp, base, float(L_sp)


def spinous_tip_local(an: LevelAnatomy, g: VertebraGeometry) -> Vec:
    """Local position of the spinous process tip (its most posterior-caudal point on the axis)."""
    R_sp, base, L_sp = spinous_frame(an, g)
    return np.asarray(base + R_sp[:, 1] * (L_sp - 2.0), dtype=np.float64)


def superior_facet_local(an: LevelAnatomy, g: VertebraGeometry, side: int) -> tuple[Vec, Vec, Vec, Vec]:
    """Superior articular process of a vertebra: frame, centre, half sizes and joint-surface point.

    The frame's x axis is the facet normal pointing from this process toward the inferior
    articular process of the vertebra above (medial-posterior in the lumbar spine, posterior in
    the thoracic spine).
    """
    phi = np.deg2rad(an.facet_angle_deg)
    n = np.array([-side * np.cos(phi), np.sin(phi), 0.0])
    tang = np.cross(np.array([0.0, 0.0, 1.0]), n)
    R_f = np.stack([n, tang, np.array([0.0, 0.0, 1.0])], axis=1)
    z_lo = g.pedicle_z + 0.25 * an.pedicle_height_mm
    z_hi = g.h_post + 0.5 * an.disc_below_mm + 8.0
    joint = np.array([side * g.facet_x, g.facet_y, 0.5 * (z_lo + z_hi)])
    thick = 9.0 if not an.is_thoracic else 7.0
    width = 16.0 if not an.is_thoracic else 12.0
    half = np.array([thick / 2, width / 2, 0.5 * (z_hi - z_lo)])
    centre = joint - n * (thick / 2 + 0.8)
    return R_f, centre, half, joint


def inferior_facet_primitive(upper: LevelModel, lower_R_facet_world: Vec, joint_world: Vec, side: int, *,
                             lower_half_height: float, cortex_scale: float) -> Primitive:
    """Inferior articular process of ``upper`` facing the superior process of the vertebra below.

    Args:
        upper: The vertebra owning the process.
        lower_R_facet_world: World rotation of the lower superior facet frame (x = joint normal).
        joint_world: World point on the joint surface, mm.
        side: +1 left, -1 right.
        lower_half_height: Half height of the lower superior process, mm.
        cortex_scale: Cortical thickness factor.
    """
    thick = 8.0 if not upper.anatomy.is_thoracic else 6.5
    width = 14.0 if not upper.anatomy.is_thoracic else 11.0
    n_w = lower_R_facet_world[:, 0]
    centre_w = joint_world + n_w * (thick / 2 + 0.8) + lower_R_facet_world[:, 2] * 3.0
    # extend upward to reach the lamina of the upper vertebra
    up_w = upper.pose.R[:, 2]
    lam_bottom_w = upper.pose.apply([0.0, upper.geometry.canal_y, upper.geometry.lamina_bottom + 6.0])
    top = float(np.dot(lam_bottom_w - centre_w, up_w))
    half_h = max(lower_half_height * 0.85, 0.5 * (top + lower_half_height * 0.85))
    shift = 0.5 * (top - lower_half_height * 0.85)
    centre_w = centre_w + up_w * max(shift, 0.0)
    half = np.array([thick / 2, width / 2, half_h])
    return Primitive(lower_R_facet_world, centre_w, -half - 1, half + 1, _box_fn(half, float(min(half[:2])) - 0.6),
                     1.6 * cortex_scale, 1.25, f"iap_{side}")


# --------------------------------------------------------------------------------------------
# sacrum and ilia
# --------------------------------------------------------------------------------------------
def _interp(s: F32, knots: tuple[float, ...], values: tuple[float, ...]) -> F32:
    return np.asarray(np.interp(s, knots, values), dtype=np.float32)


def sacrum_primitives(sm: SacrumModel, cortex_scale: float) -> list[Primitive]:
    """The sacrum as one arc-swept primitive plus the S1 superior articular processes."""
    an = sm.anatomy
    kappa = float(np.deg2rad(an.curvature_deg) / an.length_mm)
    L = an.length_mm
    top = an.s1_height_mm / 2
    a1, b1 = an.s1_width_mm / 2, an.s1_depth_mm / 2
    ca, cb = an.canal_width_mm / 2, an.canal_depth_mm / 2
    half_ala = an.ala_width_mm / 2
    knots = (0.0, 0.25 * L, 0.45 * L, 0.62 * L, 0.8 * L, L)
    body_a = (a1, 0.85 * a1, 0.7 * a1, 0.55 * a1, 0.4 * a1, 0.25 * a1)
    body_b = (b1, 0.75 * b1, 0.6 * b1, 0.48 * b1, 0.38 * b1, 0.3 * b1)
    mass_w = (half_ala, 0.94 * half_ala, 0.7 * half_ala, 0.45 * half_ala, 0.3 * half_ala, 0.2 * half_ala)
    canal_a = (ca, 0.75 * ca, 0.55 * ca, 0.4 * ca, 0.25 * ca, 0.1 * ca)
    canal_b = (cb, 0.7 * cb, 0.5 * cb, 0.4 * cb, 0.3 * cb, 0.1 * cb)
    foramina_s = (0.2 * L, 0.4 * L, 0.57 * L, 0.73 * L)
    foramina_x = (0.95 * a1, 0.8 * a1, 0.66 * a1, 0.5 * a1)
    foramina_r = (4.5, 4.0, 3.2, 2.5)

    def fn(x: F32, y: F32, z: F32) -> F32:
        yc = y + np.float32(1.0 / kappa)
        zc = z - np.float32(top)
        r = np.sqrt(yc * yc + zc * zc)
        ang = np.arctan2(-zc, yc)
        s = ang / np.float32(kappa)
        n = r - np.float32(1.0 / kappa)
        ba = _interp(s, knots, body_a)
        bb = _interp(s, knots, body_b)
        d_body = ellipse2(x, n, ba, bb)
        # lateral masses (alae at the top): a rounded slab behind the body's front
        mw = _interp(s, knots, mass_w)
        front = -0.35 * bb + np.float32(6.0) * np.clip(1.0 - s / np.float32(0.3 * L), 0, 1)
        cb_s = _interp(s, knots, canal_b)
        back = bb + 2 * cb_s + np.float32(5.0)
        d_mass = np.maximum(np.abs(x) - mw, np.maximum(front - n, n - back))
        # the alae slope down laterally: trim the top of the lateral masses
        d_mass = np.maximum(d_mass, -s - np.float32(2.0) + np.float32(0.12) * np.maximum(np.abs(x) - ba, 0))
        d_arch = np.maximum(np.abs(x) - (_interp(s, knots, canal_a) + 7.0), np.maximum(bb - n, n - (back + 3.0)))
        # median sacral crest
        d_crest = np.maximum(np.abs(x) - 4.0, np.maximum(back - 2.0 - n, n - (back + 6.0)))
        d_crest = np.maximum(d_crest, np.float32(0.1 * L) - s)
        d = np.minimum(np.minimum(d_body, d_mass), np.minimum(d_arch, d_crest))
        # canal
        d_canal = ellipse2(x, n - (bb + cb_s), _interp(s, knots, canal_a), cb_s)
        d = np.maximum(d, -d_canal)
        # foramina (antero-posterior holes)
        for fs, fx, fr in zip(foramina_s, foramina_x, foramina_r, strict=True):
            d_hole = np.sqrt((np.abs(x) - np.float32(fx)) ** 2 + (s - np.float32(fs)) ** 2) - np.float32(fr)
            d = np.maximum(d, -d_hole)
        # ends along the arc
        d_s = np.maximum(-s, s - np.float32(L))
        return combine(d, d_s)

    pts = np.array([sacrum_arc_local(an, s, nn) for s in np.linspace(0, L, 12) for nn in (-b1 - 8, b1 + 2 * cb + 14)])
    lo = pts.min(axis=0) - np.array([0.0, 2.0, 2.0])
    hi = pts.max(axis=0) + np.array([0.0, 2.0, 2.0])
    lo[0], hi[0] = -half_ala - 2, half_ala + 2
    prims = [Primitive(sm.pose.R, sm.pose.t, lo, hi, fn, 1.0 * cortex_scale, 0.6, "sacrum")]
    # S1 superior articular processes (partners of the L5 inferior processes)
    proxy = _sacral_proxy_geometry(an)
    for side in (1, -1):
        phi = np.deg2rad(an.facet_angle_deg)
        nvec = np.array([-side * np.cos(phi), np.sin(phi), 0.0])
        tang = np.cross(np.array([0.0, 0.0, 1.0]), nvec)
        R_f = np.stack([nvec, tang, np.array([0.0, 0.0, 1.0])], axis=1)
        z_lo, z_hi = top - 12.0, top + 14.0
        joint = np.array([side * proxy["facet_x"], proxy["facet_y"], 0.5 * (z_lo + z_hi)])
        half = np.array([4.0, 7.0, 0.5 * (z_hi - z_lo)])
        centre = joint - nvec * (4.0 + 0.8)
        prims.append(_prim(sm.pose, R_f, centre, -half - 1, half + 1, fn=_box_fn(half, float(min(half[:2])) - 0.6),
                           cortex=1.6 * cortex_scale, density=1.2, name=f"sap_{side}"))
        sm.landmarks.setdefault("_sap", {})[side] = (R_f, joint, 0.5 * (z_hi - z_lo))
    return prims


def _sacral_proxy_geometry(an: SacrumAnatomy) -> dict[str, float]:
    b1 = an.s1_depth_mm / 2
    cb = an.canal_depth_mm / 2
    return {"facet_x": an.canal_width_mm / 2 + 6.0, "facet_y": b1 + cb + 2.0, "canal_y": b1 + cb}


def ilium_primitive(sm: SacrumModel, side: int, patient_R: Vec, cortex_scale: float,
                    rng: np.random.Generator) -> Primitive:
    """One iliac wing: a curved bony plate from the sacro-iliac joint up to the crest (unlabelled).

    In each axial plane the wing follows an ellipse arc that starts 2-3 mm lateral of the sacral
    ala (the joint), runs posteriorly (posterior iliac spines), laterally and then anteriorly to the
    anterior superior spine, concave toward the pelvis. The ellipse widens toward the crest (about
    the L4-L5 disc) so the wing flares like a bowl; the plate is thick at the joint and thin in the
    iliac fossa.
    """
    an = sm.anatomy
    half_ala = an.ala_width_mm / 2
    ea0 = 40.0 * float(rng.normal(1, 0.04))  # lateral semi-axis at the crest
    eb0 = 50.0 * float(rng.normal(1, 0.04))  # antero-posterior semi-axis at the crest
    crest_rise = 65.0 * float(rng.normal(1, 0.05))
    bottom = -110.0

    def fn(x: F32, y: F32, z: F32) -> F32:
        xs = x * np.float32(side)
        t = np.clip((z - np.float32(bottom)) / np.float32(-bottom + 40.0), 0, 1)
        ea = np.float32(ea0) * (0.45 + 0.55 * t)
        eb = np.float32(eb0) * (0.75 + 0.25 * t)
        below = np.clip(-z, 0, 80)
        x_j = np.float32(half_ala) * (1.0 - 0.35 * np.clip(-z / 70.0, 0, 1)) + np.float32(2.5)
        y_j = np.float32(5.0) + np.float32(0.6) * below
        cx = x_j + np.float32(0.924) * ea
        cy = y_j - np.float32(0.38) * eb
        u = np.asarray(xs - cx, dtype=np.float32)
        v = np.asarray(y - cy, dtype=np.float32)
        ang = np.arctan2(v / eb, u / ea)  # 0 lateral, +pi/2 posterior, +-pi medial
        d_r = ellipse2(u, v, ea, eb)
        thick = np.float32(3.0) + np.float32(9.0) * np.clip((ang - 1.3) / 1.2, 0, 1)
        d_plate = np.abs(d_r) - thick / 2
        d_ang = np.maximum(ang - np.float32(2.75), np.float32(-0.95) - ang) * (0.5 * (ea + eb))
        z_top = np.float32(-25.0) + np.float32(crest_rise) * np.clip(np.cos((ang - 0.8) * 0.6), 0.35, 1.0)
        d_z = np.maximum(z - z_top, np.float32(bottom) - z)
        return np.asarray(np.maximum(np.maximum(d_plate, d_ang), d_z), dtype=np.float32)

    lo = np.array([0.6 * half_ala, -130.0, bottom - 2.0])
    hi = np.array([half_ala + 2.5 + 2.0 * ea0 + 15.0, 130.0, -25.0 + crest_rise + 2.0])
    if side < 0:
        lo[0], hi[0] = -hi[0], -lo[0]
    return Primitive(patient_R, sm.arc_point(0.0), lo, hi, fn, 1.4 * cortex_scale, 0.8, f"ilium_{side}")


# --------------------------------------------------------------------------------------------
# ribs
# --------------------------------------------------------------------------------------------
def _tube_fn(points_local: Vec, radius: float) -> SdfFn:
    """Distance to a polyline (local coordinates) minus a radius; vectorised over the segments."""
    P = np.asarray(points_local, dtype=np.float32)

    def fn(x: F32, y: F32, z: F32) -> F32:
        best = np.full(np.broadcast_shapes(x.shape, y.shape, z.shape), np.float32(1e9), dtype=np.float32)
        for k in range(len(P) - 1):
            a, b = P[k], P[k + 1]
            ab = b - a
            L2 = float(ab @ ab)
            px, py, pz = x - a[0], y - a[1], z - a[2]
            t = np.clip((px * ab[0] + py * ab[1] + pz * ab[2]) / np.float32(max(L2, 1e-9)), 0, 1)
            dx, dy, dz = px - t * ab[0], py - t * ab[1], pz - t * ab[2]
            np.minimum(best, dx * dx + dy * dy + dz * dz, out=best)
        return np.asarray(np.sqrt(best) - np.float32(radius), dtype=np.float32)

    return fn


def rib_polyline(lv: LevelModel, side: int, ribcage: dict[str, float], patient_from_world: Pose) -> Vec:
    """World centreline of one rib: head, neck to the tubercle, then around the rib cage.

    Args:
        lv: Rib-bearing vertebra.
        side: +1 left, -1 right.
        ribcage: Ellipse of the rib cage in the patient axial plane: ``cx, cy, A, B`` (mm).
        patient_from_world: Transform mapping world points to the patient frame (``inverse_apply``).
    """
    an, g, pose = lv.anatomy, lv.geometry, lv.pose
    head_z = g.pedicle_z + (0.35 * an.pedicle_height_mm if an.name in ("T11", "T12") else g.h_post - g.pedicle_z)
    head_local = np.array([side * (g.a * 0.9 + 3.0), g.b - 7.0, head_z])
    tip = lv.landmarks["transverse_tips_local"][side]
    costotransverse = an.name not in ("T11", "T12")
    tub_local = tip + np.array([0.0, -6.0 if costotransverse else -10.0, -1.0])
    if not costotransverse:
        tub_local = tub_local + np.array([side * 6.0, 0.0, -3.0])
    head = pose.apply(head_local)
    tub = pose.apply(tub_local)
    head_p = patient_from_world.inverse_apply(head)
    tub_p = patient_from_world.inverse_apply(tub)
    cx, cy, A, B = ribcage["cx"], ribcage["cy"], ribcage["A"], ribcage["B"]
    # start angle on the cage ellipse: a bit lateral of the tubercle, posterior side
    x_start = min(abs(tub_p[0] - cx) + 28.0, 0.92 * A)
    psi0 = float(np.arccos(np.clip(x_start / A, -1, 1)))  # posterior half: y = cy + B sin(psi)
    slope = np.deg2rad(22.0 if an.name not in ("T11", "T12") else 18.0)
    neck = float(np.linalg.norm(tub_p - head_p))
    remaining = max(an.rib_length_mm - neck - 25.0, 10.0)
    # walk along the ellipse toward anterior (psi decreasing) until the arc length is used
    psis = np.linspace(psi0, psi0 - 2.6, 400)
    xs = cx + side * A * np.cos(psis)
    ys = cy + B * np.sin(psis)
    seg = np.hypot(np.diff(xs), np.diff(ys))
    arc = np.concatenate([[0.0], np.cumsum(seg)])
    keep = arc <= remaining
    idx = np.nonzero(keep)[0][:: max(1, int(len(np.nonzero(keep)[0]) / 14))]
    start = np.array([xs[0], ys[0], tub_p[2] - 6.0])
    pts_p = [head_p, tub_p, start]
    for i in idx[1:]:
        pts_p.append(np.array([xs[i], ys[i], start[2] - np.tan(slope) * arc[i]]))
    pts = np.asarray(pts_p)
    return patient_from_world.apply(pts)


def rib_primitive(points_world: Vec, radius: float, cortex_scale: float, name: str) -> Primitive:
    """A rib as a tube primitive around its world centreline (local frame = world, origin at its mean)."""
    c = points_world.mean(axis=0)
    local = points_world - c
    lo = local.min(axis=0) - radius - 1.5
    hi = local.max(axis=0) + radius + 1.5
    return Primitive(np.eye(3), c, lo, hi, _tube_fn(local, radius), 1.1 * cortex_scale, 0.9, name)


__all__ = [
    "Bone",
    "LevelModel",
    "Pose",
    "Primitive",
    "SacrumModel",
    "SpineLayout",
    "VertebraGeometry",
    "body_section_sdf",
    "build_layout",
    "ilium_primitive",
    "inferior_facet_primitive",
    "pedicle_axis_local",
    "rib_polyline",
    "rib_primitive",
    "sacrum_arc_local",
    "sacrum_primitives",
    "spinous_frame",
    "spinous_tip_local",
    "superior_facet_local",
    "vertebra_geometry",
    "vertebra_primitives",
]
