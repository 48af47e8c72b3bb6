"""Straight biopsy-needle planning to a target point (e.g. a lesion centroid).

Straight approach
-----------------
Candidate directions are spread evenly (Fibonacci sphere) over the posterior half-space of the
patient (posterior of the vertebra nearest the target, else the image's +P axis). For each
direction a ray is marched from the target outward every ``step_mm``:

* the **skin entry** is where the ray leaves the body: the skin label (104) if the label map has
  one, otherwise the first sample below ``skin_hu`` (-300 HU) followed by at least 5 mm of air
  (the body surface from ``HU > -300``, stated in the plan's ``derived``). A ray that leaves the
  image while still in tissue has no visible skin entry and is rejected;
* the needle may cross bone only inside the target's own vertebra, as one contiguous segment
  ending at the target; other vertebrae, bone outside the labels (HU above ``bone_hu``), discs
  and the structures themselves are refused;
* the **clearance** to critical structures (spinal canal, aorta, inferior vena cava; the canal
  is derived from the vertebral arch when the label map lacks it) is the distance from the
  needle axis to the nearest structure surface voxel (KD-tree over surface voxel centres, minus
  half a voxel) minus the needle radius, and must be ``>= margin_mm`` along the whole path;
* length ``<= max_length_mm`` and the angle between the needle and the skin normal (fitted to the
  skin entries of neighbouring rays) ``<= max_skin_angle_deg``.

The cost of a feasible path is ``length / max_length + w_angle * angle / max_angle +
w_risk * margin / clearance``; the cheapest wins.

Transpedicular approach
-----------------------
For a target inside a vertebra the needle can pass through a pedicle: lines from the target
through points of the pedicle's isthmus section (spaced 0.5 mm) are kept when, inside the
vertebra, the needle surface keeps ``pedicle_clearance_mm`` from the outer cortex and the surface
points facing the canal keep ``medial_clearance_mm`` (the medial pedicle wall is not crossed);
outside the vertebra the same skin/critical-structure rules as above apply. It is preferred for
vertebral-body targets when feasible (the usual clinical choice); the straight path is kept as
the alternative.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import numpy as np
from numpy.typing import ArrayLike, NDArray

from needle_steering.errors import GeometryError, PlanningError
from needle_steering.perception import labels as ids
from needle_steering.perception.volume import Volume
from needle_steering.planning.anatomy import LabelIndex, VertebraAnatomy, analyze_vertebra
from needle_steering.planning.plan_document import Trajectory

if TYPE_CHECKING:
    from scipy.spatial import cKDTree

_MEDIAL_ANGLES: Final = np.radians([-60.0, -30.0, 0.0, 30.0, 60.0])


@dataclass(frozen=True)
class BiopsyOptions:
    """Constraints and cost weights of the biopsy planner (mm, degrees)."""

    needle_diameter_mm: float = 3.0
    max_length_mm: float = 150.0
    max_skin_angle_deg: float = 45.0
    margin_mm: float = 5.0
    pedicle_clearance_mm: float = 0.5
    medial_clearance_mm: float = 1.0
    n_directions: int = 1500
    step_mm: float = 1.0
    skin_hu: float = -300.0
    bone_hu: float = 500.0
    w_angle: float = 0.5
    w_risk: float = 0.5
    transpedicular: bool = True
    posterior_min_cos: float = 0.5

    def __post_init__(self) -> None:
        for name in ("needle_diameter_mm", "max_length_mm", "max_skin_angle_deg", "step_mm"):
            v = float(getattr(self, name))
            if not (np.isfinite(v) and v > 0):
                raise PlanningError(f"biopsy options: {name} must be finite and > 0, got {v!r}")
        for name in ("margin_mm", "pedicle_clearance_mm", "medial_clearance_mm"):
            v = float(getattr(self, name))
            if not (np.isfinite(v) and v >= 0):
                raise PlanningError(f"biopsy options: {name} must be finite and >= 0, got {v!r}")
        if not 50 <= self.n_directions <= 20000:
            raise PlanningError(f"biopsy options: n_directions must lie in [50, 20000], got {self.n_directions}")

    def to_dict(self) -> dict[str, object]:
        """Settings for the plan document."""
        return {
            k: getattr(self, k)
            for k in (
                "needle_diameter_mm",
                "max_length_mm",
                "max_skin_angle_deg",
                "margin_mm",
                "pedicle_clearance_mm",
                "medial_clearance_mm",
                "skin_hu",
                "transpedicular",
            )
        }


@dataclass(frozen=True)
class BiopsyPath:
    """One straight biopsy path (LPS mm).

    ``min_clearance_mm`` is the clearance to critical structures where the margin applies (the
    whole path for straight approaches, outside the vertebra for transpedicular ones);
    ``min_clearance_overall_mm`` includes the bony part (the medial pedicle wall lies between).
    """

    approach: str  # "straight" or "transpedicular-left" / "transpedicular-right"
    entry_lps_mm: NDArray[np.float64]
    target_lps_mm: NDArray[np.float64]
    length_mm: float
    skin_angle_deg: float
    min_clearance_mm: float
    nearest_structure: str
    cost: float
    level: str = ""
    min_clearance_overall_mm: float = float("inf")

    @property
    def direction(self) -> NDArray[np.float64]:
        """Unit insertion direction (entry -> target)."""
        d = self.target_lps_mm - self.entry_lps_mm
        out: NDArray[np.float64] = d / np.linalg.norm(d)
        return out


@dataclass(frozen=True)
class BiopsyPlan:
    """The chosen biopsy path, alternatives, and what the planner derived."""

    best: BiopsyPath
    alternatives: tuple[BiopsyPath, ...]
    derived: dict[str, str]
    warnings: tuple[str, ...]
    n_candidates: int
    n_feasible: int
    rejections: dict[str, int] = field(default_factory=dict)

    def to_trajectory(self, diameter_mm: float, path: BiopsyPath | None = None) -> Trajectory:
        """As a plan-document :class:`Trajectory` (``kind="biopsy"``)."""
        p = path or self.best
        side = "left" if p.approach.endswith("left") else "right" if p.approach.endswith("right") else "none"
        return Trajectory(
            id=f"biopsy-{p.approach}",
            kind="biopsy",
            level=p.level,
            side=side,
            entry_lps_mm=tuple(p.entry_lps_mm.tolist()),
            tip_lps_mm=tuple(p.target_lps_mm.tolist()),
            path_lps_mm=(tuple(p.entry_lps_mm.tolist()), tuple(p.target_lps_mm.tolist())),
            diameter_mm=diameter_mm,
            length_mm=p.length_mm,
            metrics={
                "approach": p.approach,
                "skin_angle_deg": p.skin_angle_deg,
                "min_critical_clearance_mm": p.min_clearance_mm,
                "min_critical_clearance_incl_bone_mm": p.min_clearance_overall_mm,
                "nearest_structure": p.nearest_structure,
                "cost": p.cost,
            },
            warnings=self.warnings,
        )


def fibonacci_directions(n: int) -> NDArray[np.float64]:
    """``n`` unit vectors spread evenly over the sphere (deterministic), shape ``(n, 3)``."""
    k = np.arange(n, dtype=np.float64) + 0.5
    z = 1.0 - 2.0 * k / n
    r = np.sqrt(np.maximum(0.0, 1.0 - z * z))
    phi = k * np.pi * (3.0 - np.sqrt(5.0))
    return np.stack([r * np.cos(phi), r * np.sin(phi), z], axis=1)


class _Critical:
    """Surfaces of the critical structures near the target as a KD-tree of voxel centres."""

    def __init__(
        self,
        labels: Volume,
        index: LabelIndex,
        centre: NDArray[np.float64],
        radius_mm: float,
        extra_masks: list[tuple[str, NDArray[np.float64]]],
    ) -> None:
        from scipy import ndimage
        from scipy.spatial import cKDTree

        pts_all: list[NDArray[np.float64]] = []
        names: list[str] = []
        self.half_voxel = 0.5 * float(np.max(labels.spacing_mm))
        for sid, name in ids.CRITICAL_STRUCTURES.items():
            if not index.present(sid):
                continue
            box = index.bboxes[sid - 1]
            assert box is not None
            crop = np.asarray(labels.array[box]) == sid
            surf = crop & ~ndimage.binary_erosion(crop)
            idx = np.argwhere(surf) + np.array([s.start for s in box])
            pts = labels.index_to_lps(idx)
            near = pts[np.linalg.norm(pts - centre, axis=1) <= radius_mm]
            pts_all.append(near)
            names.extend([name] * len(near))
        for name, extra_pts in extra_masks:
            near = extra_pts[np.linalg.norm(extra_pts - centre, axis=1) <= radius_mm]
            pts_all.append(near)
            names.extend([name] * len(near))
        self.points = np.vstack(pts_all) if pts_all else np.zeros((0, 3))
        self.names = np.asarray(names if names else ["none"])
        self.tree: cKDTree | None = cKDTree(self.points) if len(self.points) else None

    def distance(
        self, pts: NDArray[np.float64], upper_mm: float = 60.0
    ) -> tuple[NDArray[np.float64], NDArray[np.int64]]:
        """Distance (mm) from points ``(..., 3)`` to the nearest structure surface, and its index."""
        flat = pts.reshape(-1, 3)
        if self.tree is None:
            return np.full(pts.shape[:-1], np.inf), np.zeros(pts.shape[:-1], np.int64)
        d, k = self.tree.query(flat, distance_upper_bound=upper_mm)
        d = np.where(np.isfinite(d), d - self.half_voxel, np.inf)
        k = np.where(k >= len(self.points), 0, k)
        return d.reshape(pts.shape[:-1]), k.reshape(pts.shape[:-1])


def _sample(volume: Volume, pts: NDArray[np.float64], order: int, cval: float) -> NDArray[np.float64]:
    from scipy import ndimage

    idx = volume.lps_to_index(pts.reshape(-1, 3))
    arr = volume.array
    if order == 1 and arr.dtype.kind not in "f":
        arr = arr.astype(np.float32)
    vals = ndimage.map_coordinates(arr, idx.T, order=order, mode="constant", cval=cval, prefilter=False)
    return np.asarray(vals, dtype=np.float64).reshape(pts.shape[:-1])


def _target_vertebra(labels: Volume, index: LabelIndex, target: NDArray[np.float64]) -> int | None:
    """VerSe id of the vertebra containing the target (or whose lesion contains it), else None."""
    lab = int(_sample(labels, target[None, :], 0, 0.0)[0])
    if ids.is_vertebra(lab):
        return lab
    if lab != ids.LESION:
        return None
    # lesion: the vertebra with the most voxels in a 10 mm ball around the target
    vids = index.vertebra_ids()
    offs = np.array(np.meshgrid(*[np.arange(-10.0, 10.1, 2.0)] * 3, indexing="ij")).reshape(3, -1).T
    offs = offs[np.linalg.norm(offs, axis=1) <= 10.0]
    near = _sample(labels, target[None, :] + offs, 0, 0.0).astype(int)
    counts = {i: int(np.sum(near == i)) for i in vids}
    best = max(counts.items(), key=lambda kv: kv[1], default=(0, 0))
    return best[0] if best[1] > 0 else None


def _path_checks(
    ct: Volume,
    labels: Volume,
    crit: _Critical,
    target: NDArray[np.float64],
    dirs: NDArray[np.float64],
    *,
    opts: BiopsyOptions,
    vertebra_id: int | None,
    exempt_in_vertebra: bool = False,
) -> dict[str, NDArray[np.float64]]:
    """March rays from the target outward along ``dirs`` ``(B, 3)`` (unit, target -> skin).

    With ``exempt_in_vertebra`` the critical-structure margin is not applied inside the target
    vertebra's bone (the transpedicular planner checks the pedicle walls there instead).

    Returns per ray: ``ok`` (bool as float), ``length``, ``clear``, ``nearest`` (index into the
    critical-structure names) and ``entry`` (B, 3), plus per-reason failure flags.
    """
    step = opts.step_mm
    s = np.arange(0.0, opts.max_length_mm + 20.0 + step / 2, step)
    pts = target[None, None, :] + s[None, :, None] * dirs[:, None, :]
    hu = _sample(ct, pts, 1, -1024.0)
    lab = _sample(labels, pts, 0, 0.0).astype(np.int64)
    inside_img = ct.contains_lps(pts)
    air = (hu < opts.skin_hu) | ~inside_img
    # skin exit: first sample that is air and stays air for 5 mm (or leaves the image)
    k5 = max(1, round(5.0 / step))
    air_run = np.ones_like(air)
    for k in range(k5):
        shifted = np.ones_like(air)
        shifted[:, : air.shape[1] - k] = air[:, k:]
        air_run &= shifted
    is_skin_label = lab == ids.SKIN
    skin_lab_any = is_skin_label.any(axis=1)
    k_exit_air = np.where(air_run.any(axis=1), np.argmax(air_run, axis=1), len(s) - 1)
    k_exit_lab = np.where(skin_lab_any, np.argmax(is_skin_label, axis=1), len(s) - 1)
    k_exit = np.where(skin_lab_any, np.minimum(k_exit_lab + 1, k_exit_air), k_exit_air)
    exit_in_image = inside_img[np.arange(len(dirs)), np.clip(k_exit, 0, len(s) - 1)] | skin_lab_any
    length = s[k_exit]
    before = s[None, :] <= length[:, None]
    # bone and forbidden labels along the path
    other_vert = np.isin(lab, [v for v in ids.VERTEBRA_NAMES if v != vertebra_id])
    forbidden_lab = np.isin(lab, [ids.DISC, *ids.CRITICAL_STRUCTURES])
    unlabelled_bone = (hu > opts.bone_hu) & (lab == 0)
    bad_bone = np.any(before & (other_vert | unlabelled_bone), axis=1)
    bad_label = np.any(before & forbidden_lab, axis=1)
    # the target vertebra only as one segment starting at the target
    if vertebra_id is not None:
        in_v = (lab == vertebra_id) | (lab == ids.LESION)
        left_v = np.cumsum(~in_v & before, axis=1) > 0
        reenter = np.any(left_v & in_v & before, axis=1)
    else:
        reenter = np.zeros(len(dirs), bool)
    # distances only where the needle is (between the target and the skin entry)
    dist = np.full(before.shape, np.inf)
    near = np.zeros(before.shape, np.int64)
    useful = before & (length <= opts.max_length_mm)[:, None]
    d_use, n_use = crit.distance(pts[useful], upper_mm=opts.margin_mm + opts.needle_diameter_mm + 20.0)
    dist[useful] = d_use
    near[useful] = n_use
    checked = before
    if exempt_in_vertebra and vertebra_id is not None:
        checked = before & ~((lab == vertebra_id) | (lab == ids.LESION))
    clear_path = np.where(checked, dist, np.inf)
    clear_all = np.where(before, dist, np.inf).min(axis=1) - opts.needle_diameter_mm / 2.0
    kmin = np.argmin(clear_path, axis=1)
    clear = clear_path[np.arange(len(dirs)), kmin] - opts.needle_diameter_mm / 2.0
    nearest = near[np.arange(len(dirs)), kmin]
    entry = target[None, :] + length[:, None] * dirs
    ok_len = (length <= opts.max_length_mm) & exit_in_image & (length > 0)
    ok_clear = clear >= opts.margin_mm
    ok = ok_len & ok_clear & ~bad_bone & ~bad_label & ~reenter
    return {
        "ok": ok.astype(np.float64),
        "length": length,
        "clear": clear,
        "clear_all": clear_all,
        "nearest": nearest.astype(np.float64),
        "entry": entry,
        "fail_length": (~ok_len).astype(np.float64),
        "fail_margin": (~ok_clear).astype(np.float64),
        "fail_bone": (bad_bone | reenter).astype(np.float64),
        "fail_structure": bad_label.astype(np.float64),
    }


def _skin_normals(
    entries: NDArray[np.float64], dirs: NDArray[np.float64], valid: NDArray[np.bool_], k: int = 10
) -> NDArray[np.float64]:
    """Outward skin normals at each ray's entry from a plane fit to neighbouring rays' entries."""
    from scipy.spatial import cKDTree

    normals = dirs.copy()
    idx_valid = np.nonzero(valid)[0]
    if len(idx_valid) < 4:
        return normals
    tree = cKDTree(dirs[idx_valid])
    kk = min(k, len(idx_valid))
    _, nb = tree.query(dirs[idx_valid], k=kk)
    pts = entries[idx_valid][nb]  # (V, k, 3)
    centred = pts - pts.mean(axis=1, keepdims=True)
    cov = np.einsum("vki,vkj->vij", centred, centred)
    _, vecs = np.linalg.eigh(cov)
    n = vecs[:, :, 0]
    n *= np.sign(np.sum(n * dirs[idx_valid], axis=1, keepdims=True) + 1e-12)
    normals[idx_valid] = n
    return normals


def plan_biopsy(
    ct: Volume,
    labels: Volume,
    target_lps_mm: ArrayLike,
    options: BiopsyOptions | None = None,
    *,
    index: LabelIndex | None = None,
    anatomy: dict[str, VertebraAnatomy] | None = None,
) -> BiopsyPlan:
    """Plan a straight biopsy needle from the posterior skin to ``target_lps_mm``.

    Args:
        ct: CT in HU.
        labels: Label map on the CT grid.
        target_lps_mm: Target point ``(3,)``, LPS mm.
        options: Constraints and weights.
        index: Precomputed :class:`LabelIndex`.
        anatomy: Already analysed vertebrae (by level name), reused for the canal and the pedicles.

    Raises:
        PlanningError: Invalid target or no path meets every constraint (the message gives the
            count of rays failing each constraint).
        GeometryError: ``labels`` is not on the CT grid.
    """
    from scipy import ndimage

    opts = options or BiopsyOptions()
    ct.require_same_grid(labels)
    target = np.asarray(target_lps_mm, dtype=np.float64).reshape(-1)
    if target.shape != (3,) or not np.all(np.isfinite(target)):
        raise PlanningError(
            f"biopsy target must be 3 finite LPS coordinates, got {np.asarray(target_lps_mm).tolist()!r}"
        )
    if not bool(ct.contains_lps(target)):
        raise GeometryError(f"biopsy target {target.round(2).tolist()} mm lies outside the image")
    index = index or LabelIndex(labels)
    anatomy = dict(anatomy or {})
    lab_at = int(_sample(labels, target[None, :], 0, 0.0)[0])
    if lab_at in ids.CRITICAL_STRUCTURES:
        raise PlanningError(f"biopsy target lies inside the {ids.CRITICAL_STRUCTURES[lab_at]} (label {lab_at})")
    derived: dict[str, str] = {}
    warnings: list[str] = []
    vid = _target_vertebra(labels, index, target)
    # nearby vertebrae: frames (posterior direction) and derived canals
    extra: list[tuple[str, NDArray[np.float64]]] = []
    verts = sorted(index.vertebra_ids(), key=lambda i: float(np.linalg.norm(index.centroid_lps(i) - target)))  # type: ignore[operator]
    # the nearest vertebra gives the posterior direction and the pedicles; without a canal label its
    # neighbours are analysed too, for their derived canals
    n_near = 1 if index.present(ids.SPINAL_CANAL) else 3
    near_ids = [
        i
        for i in verts
        if float(np.linalg.norm(index.centroid_lps(i) - target)) < 80.0  # type: ignore[operator]
        and i != 26
    ][:n_near]
    for i in near_ids:
        name = ids.level_name(i)
        if name not in anatomy:
            try:
                anatomy[name] = analyze_vertebra(ct, labels, i, index=index)
            except (PlanningError, GeometryError, ValueError) as exc:
                warnings.append(f"{name}: not analysed ({exc})")
                continue
        a = anatomy[name]
        canal = a.fields.masks["canal"]
        surf_idx = np.argwhere(canal & ~ndimage.binary_erosion(canal))
        if len(surf_idx):
            extra.append(("spinal_canal", a.fields.grid.index_to_lps(surf_idx)))
    if not index.present(ids.SPINAL_CANAL):
        derived["biopsy.spinal_canal"] = "derived from the hole of the vertebral arch (no canal label)"
    if not index.present(ids.SKIN):
        derived["biopsy.skin"] = f"body surface from HU > {opts.skin_hu:g} (no skin label)"
    posterior = None
    for i in near_ids:
        name = ids.level_name(i)
        if name in anatomy:
            posterior = anatomy[name].frame.posterior
            break
    if posterior is None:
        posterior = np.array([0.0, 1.0, 0.0])
        warnings.append("posterior direction taken from the image axes (no vertebra near the target)")
    crit = _Critical(labels, index, target, opts.max_length_mm + 30.0, extra)
    dirs = fibonacci_directions(opts.n_directions)
    dirs = dirs[dirs @ posterior >= opts.posterior_min_cos]
    res = _path_checks(ct, labels, crit, target, dirs, opts=opts, vertebra_id=vid)
    valid_entry = res["fail_length"] == 0
    normals = _skin_normals(res["entry"], dirs, valid_entry)
    angle = np.degrees(np.arccos(np.clip(np.sum(normals * dirs, axis=1), -1.0, 1.0)))
    ok = (res["ok"] > 0) & (angle <= opts.max_skin_angle_deg)
    rejections = {
        "length_or_no_skin": int(res["fail_length"].sum()),
        "margin": int(res["fail_margin"].sum()),
        "crosses_bone": int(res["fail_bone"].sum()),
        "crosses_structure": int(res["fail_structure"].sum()),
        "skin_angle": int(np.sum(angle > opts.max_skin_angle_deg)),
    }
    candidates: list[BiopsyPath] = []
    level = ids.level_name(vid) if vid is not None else ""
    if ok.any():
        cost = (
            res["length"] / opts.max_length_mm
            + opts.w_angle * angle / opts.max_skin_angle_deg
            + opts.w_risk * opts.margin_mm / np.maximum(res["clear"], 1e-3)
        )
        cost = np.where(ok, cost, np.inf)
        k = int(np.argmin(cost))
        candidates.append(
            BiopsyPath(
                approach="straight",
                entry_lps_mm=res["entry"][k],
                target_lps_mm=target,
                length_mm=float(res["length"][k]),
                skin_angle_deg=float(angle[k]),
                min_clearance_mm=float(res["clear"][k]),
                nearest_structure=str(crit.names[int(res["nearest"][k])]),
                cost=float(cost[k]),
                level=level,
                min_clearance_overall_mm=float(res["clear_all"][k]),
            )
        )
    if opts.transpedicular and vid is not None and ids.level_name(vid) in anatomy:
        tp = _transpedicular(ct, labels, crit, anatomy[ids.level_name(vid)], target, opts=opts, vid=vid)
        candidates = tp + candidates
    if not candidates:
        detail = ", ".join(f"{k} {v}" for k, v in rejections.items() if v)
        raise PlanningError(
            f"no safe biopsy path to {target.round(1).tolist()} mm: all {len(dirs)} posterior directions fail "
            f"({detail}; margin {opts.margin_mm:g} mm, max length {opts.max_length_mm:g} mm, "
            f"max skin angle {opts.max_skin_angle_deg:g} deg)"
        )
    best = candidates[0]
    return BiopsyPlan(best, tuple(candidates[1:]), derived, tuple(warnings), len(dirs), int(ok.sum()), rejections)


def _transpedicular(
    ct: Volume,
    labels: Volume,
    crit: _Critical,
    anat: VertebraAnatomy,
    target: NDArray[np.float64],
    *,
    opts: BiopsyOptions,
    vid: int,
) -> list[BiopsyPath]:
    """Best transpedicular path per side (cheapest first), empty if none is safe."""
    r = opts.needle_diameter_mm / 2.0
    out: list[BiopsyPath] = []
    for side, ped in sorted(anat.pedicles.items()):
        half = max(0.0, ped.width_mm / 2.0 - r - opts.pedicle_clearance_mm)
        hh = max(0.0, ped.height_mm / 2.0 - r - opts.pedicle_clearance_mm)
        aa, bb = np.meshgrid(np.arange(-half, half + 1e-9, 0.5), np.arange(-hh, hh + 1e-9, 0.5), indexing="ij")
        q = (
            ped.isthmus_centre_lps_mm
            + aa.reshape(-1, 1) * ped.plane_lateral_lps
            + bb.reshape(-1, 1) * ped.plane_superior_lps
        )
        out_dirs = q - target
        norms = np.linalg.norm(out_dirs, axis=1)
        out_dirs = out_dirs / norms[:, None]
        # the pedicle: from 10 mm in front of the isthmus (body side) to 5 mm behind it
        s = np.arange(0.0, 1.0 + 1e-9, 0.02)
        seg = target[None, None, :] + (s[None, :, None] * (norms[:, None, None] + 5.0)) * out_dirs[:, None, :]
        sdf = anat.fields.sample("sdf", seg)
        dist_isthmus = s[None, :] * (norms[:, None] + 5.0)
        in_ped = dist_isthmus >= norms[:, None] - 10.0
        ok_ped = np.all(~in_ped | (sdf - r >= opts.pedicle_clearance_mm), axis=1)
        m = anat.canal_point_lps(seg) - seg
        m -= np.sum(m * out_dirs[:, None, :], axis=2, keepdims=True) * out_dirs[:, None, :]
        m /= np.maximum(np.linalg.norm(m, axis=2, keepdims=True), 1e-9)
        m2 = np.cross(out_dirs[:, None, :], m)
        ring = seg[:, :, None, :] + r * (
            np.cos(_MEDIAL_ANGLES)[None, None, :, None] * m[:, :, None, :]
            + np.sin(_MEDIAL_ANGLES)[None, None, :, None] * m2[:, :, None, :]
        )
        med = anat.fields.sample("sdf", ring).min(axis=2)
        ok_med = np.all(~in_ped | (med >= opts.medial_clearance_mm), axis=1)
        good = ok_ped & ok_med
        if not good.any():
            continue
        res = _path_checks(
            ct, labels, crit, target, out_dirs[good], opts=opts, vertebra_id=vid, exempt_in_vertebra=True
        )
        valid = res["ok"] > 0
        if not valid.any():
            continue
        cost = res["length"] / opts.max_length_mm + opts.w_risk * opts.margin_mm / np.maximum(res["clear"], 1e-3)
        cost = np.where(valid, cost, np.inf)
        k = int(np.argmin(cost))
        d = out_dirs[good][k]
        normals = _skin_normals(res["entry"], out_dirs[good], valid)
        angle = float(np.degrees(np.arccos(np.clip(normals[k] @ d, -1.0, 1.0))))
        if angle > opts.max_skin_angle_deg:
            continue
        out.append(
            BiopsyPath(
                approach=f"transpedicular-{side}",
                entry_lps_mm=res["entry"][k],
                target_lps_mm=target,
                length_mm=float(res["length"][k]),
                skin_angle_deg=angle,
                min_clearance_mm=float(res["clear"][k]),
                nearest_structure=str(crit.names[int(res["nearest"][k])]),
                cost=float(cost[k]),
                level=anat.level,
                min_clearance_overall_mm=float(res["clear_all"][k]),
            )
        )
    return sorted(out, key=lambda p: p.cost)


def verify_biopsy_path(
    labels: Volume, path: BiopsyPath, needle_diameter_mm: float, exempt_label: int | None = None
) -> float:
    """Smallest clearance (mm) between the needle surface and any critical-structure voxel.

    Independent check against the label map (surface voxels of the canal, aorta and vena cava
    labels), used by tests; samples inside ``exempt_label`` (the target vertebra, for
    transpedicular paths) are skipped. ``>= margin`` means no margin violation.
    """
    index = LabelIndex(labels)
    crit = _Critical(labels, index, 0.5 * (path.entry_lps_mm + path.target_lps_mm), path.length_mm / 2.0 + 30.0, [])
    s = np.arange(0.0, path.length_mm + 1e-9, 0.25)
    pts = path.target_lps_mm[None, :] - s[:, None] * path.direction[None, :]
    d, _ = crit.distance(pts, upper_mm=np.inf)
    if exempt_label is not None:
        lab = _sample(labels, pts, 0, 0.0).astype(int)
        d = np.where((lab == exempt_label) | (lab == ids.LESION), np.inf, d)
    return float(np.min(d)) - needle_diameter_mm / 2.0


__all__ = ["BiopsyOptions", "BiopsyPath", "BiopsyPlan", "fibonacci_directions", "plan_biopsy", "verify_biopsy_path"]
