"""Pedicle-screw execution in the twin, graded with the Gertzbein-Robbins scale.

For each planned screw (:class:`~needle_steering.planning.plan_document.Trajectory`, LPS mm)
the arm aligns the drill guide with the trajectory using the **believed** registration, which
differs from the true patient placement by a random rigid error (per vertebra, e.g. 0.9 mm and
1 degree about the vertebra's centre). The achieved guide pose (forward kinematics after IK)
is perturbed by arm tremor, mapped into the true patient frame, and the screw is driven along
the achieved guide axis to the planned length. Reported per screw: entry and tip deviation
(mm), angle error (deg), the largest cortical breach (mm) and the Gertzbein-Robbins grade.

Breach: the screw is a cylinder of the planned diameter; points on its surface are sampled
every ``step_mm`` along the axis and ``n_around`` directions around it, and the breach is the
largest distance of a surface point **outside** the vertebra (signed distance field of the
vertebra's label, :class:`~needle_steering.sim.twin.anatomy.SignedDistanceField`). The first
``entry_exclusion_mm`` past the entry point are not graded: the screw head region sits on the
posterior cortex by design and GR grades the pedicle and body. Grades: A no breach, B < 2 mm,
C 2-4 mm, D 4-6 mm, E >= 6 mm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from needle_steering.errors import SimulationError
from needle_steering.perception import labels as label_ids
from needle_steering.perception.volume import Volume
from needle_steering.planning.plan_document import Trajectory
from needle_steering.sim.twin.anatomy import SignedDistanceField, label_meshes
from needle_steering.sim.twin.frames import (
    DEFAULT_ANCHOR_ROBOT_M,
    MM_PER_M,
    FloatArray,
    axis_angle_deg,
    frame_from_axis,
    make_transform,
    pose_patient_mm_to_robot_m,
    pose_robot_m_to_patient_mm,
    prone_T_robot_from_patient_m,
    rigid_error_transform,
    rotation_about_axis,
    transform_points,
    unit,
)
from needle_steering.sim.twin.twin import Twin

#: Gertzbein-Robbins grades and their upper breach limits (mm, exclusive); E is everything else.
GR_LIMITS_MM: tuple[tuple[str, float], ...] = (("B", 2.0), ("C", 4.0), ("D", 6.0))


def gertzbein_robbins_grade(breach_mm: float) -> str:
    """Grade of a cortical breach (mm): A none (<= 0), B < 2, C 2-4, D 4-6, E >= 6."""
    if not math.isfinite(breach_mm):
        raise SimulationError(f"breach_mm must be finite, got {breach_mm!r}")
    if breach_mm <= 0.0:
        return "A"
    for grade, limit in GR_LIMITS_MM:
        if breach_mm < limit:
            return grade
    return "E"


def screw_breach_mm(
    sdf: SignedDistanceField,
    entry_lps_mm: ArrayLike,
    tip_lps_mm: ArrayLike,
    diameter_mm: float,
    *,
    entry_exclusion_mm: float = 5.0,
    step_mm: float = 0.25,
    n_around: int = 16,
) -> float:
    """Largest distance (mm) of the screw surface outside the bone, 0 when fully contained.

    Args:
        sdf: Signed distance field of the vertebra (positive inside, mm).
        entry_lps_mm: Screw entry point (3,), LPS mm.
        tip_lps_mm: Screw tip (3,), LPS mm.
        diameter_mm: Thread major diameter (mm).
        entry_exclusion_mm: Axial length past the entry that is not graded (mm).
        step_mm: Axial sampling step (mm).
        n_around: Sampling directions around the axis.
    """
    e = np.asarray(entry_lps_mm, dtype=np.float64).reshape(3)
    t = np.asarray(tip_lps_mm, dtype=np.float64).reshape(3)
    length = float(np.linalg.norm(t - e))
    if not (math.isfinite(diameter_mm) and diameter_mm > 0):
        raise SimulationError(f"diameter_mm must be > 0, got {diameter_mm!r}")
    if length <= entry_exclusion_mm:
        raise SimulationError(f"screw length {length:.2f} mm does not exceed entry_exclusion_mm {entry_exclusion_mm}")
    R = frame_from_axis(t - e)
    s = np.arange(entry_exclusion_mm, length + 1e-9, step_mm)
    ang = np.linspace(0.0, 2.0 * math.pi, n_around, endpoint=False)
    ring = (diameter_mm / 2.0) * (np.cos(ang)[:, None] * R[:, 0] + np.sin(ang)[:, None] * R[:, 1])
    pts = e + s[:, None, None] * R[:, 2] + ring[None, :, :]
    depth = sdf(pts.reshape(-1, 3))
    return max(0.0, float(-depth.min()))


@dataclass(frozen=True)
class ScrewExecutionConfig:
    """Error model and grading of screw execution (units in the names).

    Attributes:
        registration_error_mm: Translation error of the believed registration (exact magnitude,
            random direction).
        registration_error_deg: Rotation error (exact angle, random axis through the centre of
            the screw's vertebra).
        per_level_registration: One registration error per vertebra (per-level registration,
            as :mod:`needle_steering.perception.registration`); otherwise one per patient.
        tremor_sigma_mm: Standard deviation of the guide-tip tremor, per axis.
        tremor_sigma_deg: Standard deviation of the guide tilt tremor, per axis.
        standoff_mm: Distance from the guide tip to the entry point along the axis.
        entry_exclusion_mm: Axial length past the entry not graded (screw head region).
        anchor_robot_m: Robot point where the centre of the planned screws is placed.
        target_triangles: Triangle budget of each anatomy mesh.
    """

    registration_error_mm: float = 0.9
    registration_error_deg: float = 1.0
    per_level_registration: bool = True
    tremor_sigma_mm: float = 0.05
    tremor_sigma_deg: float = 0.05
    standoff_mm: float = 20.0
    entry_exclusion_mm: float = 5.0
    anchor_robot_m: tuple[float, float, float] = tuple(float(v) for v in DEFAULT_ANCHOR_ROBOT_M)  # type: ignore[assignment]
    target_triangles: int = 3000

    def __post_init__(self) -> None:
        for name in ("registration_error_mm", "registration_error_deg", "tremor_sigma_mm", "tremor_sigma_deg",
                     "standoff_mm", "entry_exclusion_mm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise SimulationError(f"ScrewExecutionConfig.{name} must be finite and >= 0, got {value!r}")


@dataclass(frozen=True)
class ScrewResult:
    """Outcome of one screw (mm and degrees; LPS mm points in the true patient frame)."""

    trajectory_id: str
    level: str
    side: str
    executed: bool
    reason: str
    grade: str
    breach_mm: float
    entry_deviation_mm: float
    tip_deviation_mm: float
    angle_error_deg: float
    ik_position_error_mm: float
    ik_angle_error_deg: float
    arm_clearance_mm: float
    guide_clearance_mm: float
    planned_entry_lps_mm: tuple[float, float, float]
    planned_tip_lps_mm: tuple[float, float, float]
    achieved_entry_lps_mm: tuple[float, float, float]
    achieved_tip_lps_mm: tuple[float, float, float]
    diameter_mm: float
    planned_breach_mm: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dictionary (non-finite numbers become None)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float) and not math.isfinite(value):
                out[key] = None
        return out


def _tremor(rng: np.random.Generator, sigma_mm: float, sigma_deg: float) -> FloatArray:
    """Small random rigid motion (4, 4, mm) about the origin of the frame it is applied in."""
    phi = rng.standard_normal(3) * math.radians(sigma_deg)
    angle = float(np.linalg.norm(phi))
    R = rotation_about_axis(phi, angle) if angle > 0 else np.eye(3)
    return make_transform(R, rng.standard_normal(3) * sigma_mm)


def _level_of(traj: Trajectory, labels: Volume) -> int:
    if traj.level:
        return label_ids.level_id(traj.level)
    # Not tied to a level: the vertebra containing the middle of the screw.
    mid = 0.5 * (np.asarray(traj.entry_lps_mm) + np.asarray(traj.tip_lps_mm))
    ijk = np.round(labels.lps_to_index(mid)).astype(int)
    if not bool(labels.contains_lps(mid)):
        raise SimulationError(f"trajectory {traj.id!r}: its middle {mid.tolist()} lies outside the label map")
    lid = int(labels.array[tuple(ijk)])
    if not label_ids.is_vertebra(lid):
        raise SimulationError(f"trajectory {traj.id!r} has no level and its middle is not in a vertebra (label {lid})")
    return lid


def execute_screws(
    labels: Volume,
    trajectories: Sequence[Trajectory],
    config: ScrewExecutionConfig | None = None,
    seed: int = 0,
    *,
    twin: Twin | None = None,
    meshes: Sequence[Any] | None = None,
) -> list[ScrewResult]:
    """Execute planned pedicle screws with the twin and grade them against the label map.

    Args:
        labels: Label map (VerSe vertebra ids; the ground truth the breach is measured on).
        trajectories: Planned screws (``kind="pedicle_screw"``), LPS mm.
        config: Error model and grading.
        seed: Seed of the registration errors and tremor (per-level and per-screw streams
            are derived from it, so results do not depend on the screw order).
        twin: A connected twin to reuse (its patient bodies are cleared first); a new one is
            created and closed when None.
        meshes: Anatomy meshes of ``labels`` (computed when None).

    Returns:
        One :class:`ScrewResult` per trajectory, in the given order.
    """
    cfg = config or ScrewExecutionConfig()
    trajs = list(trajectories)
    if not trajs:
        raise SimulationError("no trajectories to execute")
    for traj in trajs:
        if traj.kind != "pedicle_screw":
            raise SimulationError(f"trajectory {traj.id!r} is a {traj.kind!r}, not a pedicle_screw")
    if twin is None:
        with Twin(seed=seed) as own:
            return execute_screws(labels, trajs, cfg, seed, twin=own, meshes=meshes)
    level_ids = [_level_of(t, labels) for t in trajs]
    arr = np.asarray(labels.array)
    centres: dict[int, FloatArray] = {}
    sdfs: dict[int, SignedDistanceField] = {}
    for lid in sorted(set(level_ids)):
        mask = arr == lid
        if not mask.any():
            raise SimulationError(f"level {label_ids.level_name(lid)} (label {lid}) is not in the label map")
        centres[lid] = labels.index_to_lps(np.argwhere(mask).mean(axis=0))
        sdfs[lid] = SignedDistanceField(labels, mask, pad_mm=15.0)
    # True placement: the centre of the planned screws at the workspace anchor, prone.
    screw_pts = np.array([[t.entry_lps_mm, t.tip_lps_mm] for t in trajs]).reshape(-1, 3)
    T_true = prone_T_robot_from_patient_m(screw_pts.mean(axis=0), cfg.anchor_robot_m)
    twin.clear_patient()
    # Start from the home posture: the IK seeds (and so the results) do not depend on earlier calls.
    twin.set_joint_positions(np.asarray(twin.config.home_joints_rad))
    twin.set_patient(T_true)
    if meshes is None:
        meshes = label_meshes(labels, target_triangles=cfg.target_triangles)
    twin.add_anatomy(meshes)
    # The table carries the patient: its top touches the most anterior labelled voxel.
    nz = np.argwhere(arr > 0)
    corners = labels.index_to_lps(np.array([nz.min(axis=0), nz.max(axis=0)]))
    box = np.array(np.meshgrid(*corners.T, indexing="ij")).reshape(3, -1).T
    twin.add_table(float(np.min(transform_points(T_true, box / MM_PER_M)[:, 2])) - 0.005)

    reg_errors: dict[int, FloatArray] = {}
    patient_err: FloatArray | None = None
    results: list[ScrewResult] = []
    for index, (traj, lid) in enumerate(zip(trajs, level_ids, strict=True)):
        if cfg.per_level_registration:
            if lid not in reg_errors:
                rng_reg = np.random.default_rng(np.random.SeedSequence([int(seed), 1, lid]))
                reg_errors[lid] = rigid_error_transform(
                    rng_reg, cfg.registration_error_mm, cfg.registration_error_deg, centres[lid]
                )
            E = reg_errors[lid]
        else:
            if patient_err is None:
                rng_reg = np.random.default_rng(np.random.SeedSequence([int(seed), 2]))
                centre = np.mean(list(centres.values()), axis=0)
                patient_err = rigid_error_transform(rng_reg, cfg.registration_error_mm, cfg.registration_error_deg,
                                                    centre)
            E = patient_err
        rng_screw = np.random.default_rng(np.random.SeedSequence([int(seed), 3, index]))
        results.append(
            _execute_one(twin, traj, lid=lid, E_mm=E, T_true_m=T_true, sdf=sdfs[lid], cfg=cfg, rng=rng_screw)
        )
    return results


def _execute_one(
    twin: Twin,
    traj: Trajectory,
    *,
    lid: int,
    E_mm: FloatArray,
    T_true_m: FloatArray,
    sdf: SignedDistanceField,
    cfg: ScrewExecutionConfig,
    rng: np.random.Generator,
) -> ScrewResult:
    entry = np.asarray(traj.entry_lps_mm, dtype=np.float64)
    tip = np.asarray(traj.tip_lps_mm, dtype=np.float64)
    axis = unit(tip - entry, f"trajectory {traj.id!r} axis")
    length = float(np.linalg.norm(tip - entry))
    planned_breach = screw_breach_mm(sdf, entry, tip, traj.diameter_mm, entry_exclusion_mm=cfg.entry_exclusion_mm)
    # Guide goal in the patient frame, then in the robot frame through the *believed* registration.
    G_plan_mm = make_transform(frame_from_axis(axis), entry - cfg.standoff_mm * axis)
    T_believed_m = T_true_m @ make_transform(E_mm[:3, :3], E_mm[:3, 3] / MM_PER_M)
    goal_m = pose_patient_mm_to_robot_m(T_believed_m, G_plan_mm)
    sol = twin.move_cp(goal_m)
    common: dict[str, Any] = {
        "trajectory_id": traj.id,
        "level": label_ids.level_name(lid),
        "side": traj.side,
        "ik_position_error_mm": sol.position_error_mm,
        "ik_angle_error_deg": sol.angle_error_deg,
        "arm_clearance_mm": sol.arm_clearance_mm,
        "guide_clearance_mm": sol.guide_clearance_mm,
        "planned_entry_lps_mm": tuple(float(v) for v in entry),
        "planned_tip_lps_mm": tuple(float(v) for v in tip),
        "diameter_mm": traj.diameter_mm,
        "planned_breach_mm": planned_breach,
    }
    if not sol.ok:
        nan3 = (math.nan, math.nan, math.nan)
        return ScrewResult(
            executed=False, reason=sol.reason, grade="", breach_mm=math.nan, entry_deviation_mm=math.nan,
            tip_deviation_mm=math.nan, angle_error_deg=math.nan, achieved_entry_lps_mm=nan3,
            achieved_tip_lps_mm=nan3, **common,
        )
    # Tremor of the held guide, about its tip, then the true guide pose in the patient frame.
    T_exec_m = sol.T_robot_from_guide_m @ _scale(_tremor(rng, cfg.tremor_sigma_mm, cfg.tremor_sigma_deg))
    G_true_mm = pose_robot_m_to_patient_mm(T_true_m, T_exec_m)
    z = G_true_mm[:3, 2]
    a_entry = G_true_mm[:3, 3] + cfg.standoff_mm * z
    a_tip = a_entry + length * z
    breach = screw_breach_mm(sdf, a_entry, a_tip, traj.diameter_mm, entry_exclusion_mm=cfg.entry_exclusion_mm)
    return ScrewResult(
        executed=True,
        reason="",
        grade=gertzbein_robbins_grade(breach),
        breach_mm=breach,
        entry_deviation_mm=float(np.linalg.norm(a_entry - entry)),
        tip_deviation_mm=float(np.linalg.norm(a_tip - tip)),
        angle_error_deg=axis_angle_deg(z, axis),
        achieved_entry_lps_mm=tuple(float(v) for v in a_entry),  # type: ignore[arg-type]
        achieved_tip_lps_mm=tuple(float(v) for v in a_tip),  # type: ignore[arg-type]
        **common,
    )


def _scale(T_mm: FloatArray) -> FloatArray:
    out = T_mm.copy()
    out[:3, 3] /= MM_PER_M
    return out


def summarize_screws(results: Sequence[ScrewResult]) -> dict[str, Any]:
    """Acceptance numbers: grade counts, A+B fraction (unexecuted screws count as failures),
    mean/max tip and entry deviation, mean/max angle error, IK errors."""
    n = len(results)
    if n == 0:
        raise SimulationError("no screw results to summarise")
    done = [r for r in results if r.executed]
    grades = {g: sum(r.grade == g for r in done) for g in ("A", "B", "C", "D", "E")}
    ab = grades["A"] + grades["B"]

    def stat(values: list[float], fn: Any) -> float | None:
        return float(fn(values)) if values else None

    tips = [r.tip_deviation_mm for r in done]
    entries = [r.entry_deviation_mm for r in done]
    angles = [r.angle_error_deg for r in done]
    return {
        "n": n,
        "executed": len(done),
        "not_executed": {r.trajectory_id: r.reason for r in results if not r.executed},
        "grades": grades,
        "grade_ab_fraction": ab / n,
        "mean_tip_deviation_mm": stat(tips, np.mean),
        "max_tip_deviation_mm": stat(tips, np.max),
        "mean_entry_deviation_mm": stat(entries, np.mean),
        "max_entry_deviation_mm": stat(entries, np.max),
        "mean_angle_error_deg": stat(angles, np.mean),
        "max_angle_error_deg": stat(angles, np.max),
        "max_breach_mm": stat([r.breach_mm for r in done], np.max),
        "max_ik_position_error_mm": stat([r.ik_position_error_mm for r in done], np.max),
        "max_ik_angle_error_deg": stat([r.ik_angle_error_deg for r in done], np.max),
    }


__all__ = [
    "GR_LIMITS_MM",
    "ScrewExecutionConfig",
    "ScrewResult",
    "execute_screws",
    "gertzbein_robbins_grade",
    "screw_breach_mm",
    "summarize_screws",
]
