"""A steerable-needle episode in the twin: align the guide with the arm, then insert.

Stages of :func:`run_twin_episode`:

1. **Placement.** The scenario's patient frame (mm; the control layer's "world") is placed in
   the robot's workspace with :func:`~needle_steering.sim.twin.frames.approach_T_robot_from_patient_m`
   (entry at the workspace anchor, insertion axis pointing down). Obstacles (spheres, capsules)
   and optional anatomy meshes become PyBullet bodies attached to the patient; a table carries it.
2. **Alignment.** The robot knows the patient only through a *believed* registration, off by a
   random rigid error (``registration_error_mm`` / ``registration_error_deg``, exact magnitudes,
   random directions). The arm aligns the guide with the planned entry pose through that
   registration (IK, verified by forward kinematics, arm clearance checked); the achieved
   guide pose plus tremor, seen in the true patient frame, gives the needle's **true** start
   pose. An unreachable or colliding alignment ends the episode as a safe abort before insertion.
3. **Insertion.** The control layer's own loop
   (:func:`needle_steering.control.closed_loop.run_episode`: needle model, EM tracker, CBCT,
   TipEKF, SlidingModeController, ArcReplanner, SafetyMonitor, faults) runs from that true start
   while the system believes it starts on the plan; no second controller exists here.
4. **Twin contact replay.** Every recorded control period, the twin's needle bodies (tip and
   shaft, with the needle's radius) are set to the true tip path and the patient bodies to the
   patient's displacement, and PyBullet's ``getClosestPoints`` checks the needle against
   obstacles and anatomy. ``run_episode`` offers no per-step callback, so this replay follows the
   episode instead of being interleaved with it; nothing in the twin feeds back into the
   controller (there is no contact sensor), so the contacts found are the same as in lockstep.
   The final control period after the last recorded row is extrapolated with the needle model.

The ``registration_error`` fault is a large registration error (e.g. 6 mm / 3 deg): the EM
tracker, registered to the patient, then disagrees with the believed start and the safety
monitor stops the insertion (``sensor_inconsistent`` or ``corridor``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from needle_steering.control.closed_loop import EpisodeResult, Fault, Scenario, run_episode
from needle_steering.control.closed_loop import Trajectory as ControlTrajectory
from needle_steering.control.needle_model import NeedleCommand, NeedleState, TissueParams, step_needle
from needle_steering.errors import SimulationError
from needle_steering.sim.twin.anatomy import AnatomyMesh
from needle_steering.sim.twin.frames import (
    DEFAULT_ANCHOR_ROBOT_M,
    MM_PER_M,
    FloatArray,
    approach_T_robot_from_patient_m,
    axis_angle_deg,
    invert,
    make_transform,
    patient_mm_to_robot_m,
    pose_patient_mm_to_robot_m,
    pose_robot_m_to_patient_mm,
    rigid_error_transform,
    rotation_about_axis,
)
from needle_steering.sim.twin.twin import Twin

CONTACT_KINDS: tuple[str, ...] = ("obstacle", "bone", "critical")


@dataclass(frozen=True)
class TwinEpisodeConfig:
    """Twin-side settings of a steering episode (units in the names).

    Attributes:
        registration_error_mm: Translation error of the believed registration (exact).
        registration_error_deg: Rotation error (exact), about the entry-target midpoint.
        tremor_sigma_mm: Guide tremor, per axis.
        tremor_sigma_deg: Guide tilt tremor, per axis.
        standoff_mm: Guide tip held this far before the entry along the axis; the needle
            crosses the gap straight (air/skin) before the control loop starts at the entry.
        anchor_robot_m: Robot point where the entry is placed.
        table_clearance_mm: Table top this far below the deepest target/obstacle point.
        contact_query_mm: Range of the twin's needle clearance queries.
        shaft_check_every: Check the whole shaft every this many periods (the tip every period;
            the whole shaft also whenever the patient moves).
        dt_s: Control period (s).
        post_stop_s: Hold simulated after the stop to measure residual travel (s).
    """

    registration_error_mm: float = 0.9
    registration_error_deg: float = 1.0
    tremor_sigma_mm: float = 0.05
    tremor_sigma_deg: float = 0.05
    standoff_mm: float = 5.0
    anchor_robot_m: tuple[float, float, float] = tuple(float(v) for v in DEFAULT_ANCHOR_ROBOT_M)  # type: ignore[assignment]
    table_clearance_mm: float = 60.0
    contact_query_mm: float = 30.0
    shaft_check_every: int = 20
    dt_s: float = 0.025
    post_stop_s: float = 0.5

    def __post_init__(self) -> None:
        for name in ("registration_error_mm", "registration_error_deg", "tremor_sigma_mm", "tremor_sigma_deg",
                     "standoff_mm", "table_clearance_mm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise SimulationError(f"TwinEpisodeConfig.{name} must be finite and >= 0, got {value!r}")
        for name in ("contact_query_mm", "dt_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise SimulationError(f"TwinEpisodeConfig.{name} must be finite and > 0, got {value!r}")
        if self.shaft_check_every < 1:
            raise SimulationError(f"shaft_check_every must be >= 1, got {self.shaft_check_every!r}")


@dataclass(frozen=True)
class TwinEpisodeResult:
    """Outcome of :func:`run_twin_episode` (mm, s; patient frame unless named otherwise).

    ``status``: ``"reached"``, ``"aborted"`` (the system stopped itself; ``reason`` says why) or
    ``"failed"`` (collision, silent miss, timeout). ``control`` is the control layer's own
    result; ``collided`` joins its analytic tip check and the twin's needle contacts.
    """

    status: str
    reason: str
    target_error_mm: float
    max_path_deviation_mm: float
    min_obstacle_clearance_mm: float
    collided: bool
    sim_seconds: float
    wall_seconds: float
    scans_used: int
    travel_after_stop_mm: float
    travel_after_fault_onset_mm: float
    stop_time_s: float
    trip_codes: tuple[str, ...]
    aligned: bool
    ik_position_error_mm: float
    ik_angle_error_deg: float
    arm_clearance_mm: float
    start_position_error_mm: float
    start_angle_error_deg: float
    twin_needle_clearance_mm: float
    twin_contact_body: str
    twin_wall_seconds: float
    control_wall_seconds: float
    joints_rad: FloatArray
    T_robot_from_patient_m: FloatArray
    control: EpisodeResult | None
    trajectory: ControlTrajectory | None
    plan_points_mm: FloatArray
    target_mm: FloatArray

    @property
    def realtime_factor(self) -> float:
        """Simulated seconds per wall-clock second (whole twin episode)."""
        return self.sim_seconds / self.wall_seconds if self.wall_seconds > 0 else math.inf


def patient_shift_mm(faults: Sequence[Fault], t_s: float) -> FloatArray:
    """Rigid patient displacement (3,), mm, of the ``patient_motion`` faults at ``t_s``.

    Same semantics as the control layer's faults: the shift ramps in linearly over ``ramp_s``
    from ``start_s`` and is then held.
    """
    shift = np.zeros(3)
    for f in faults:
        if f.kind == "patient_motion" and t_s >= f.start_s:
            d = np.asarray(f.direction, dtype=np.float64)
            shift += f.magnitude * min(1.0, (t_s - f.start_s) / f.ramp_s) * d / np.linalg.norm(d)
    return shift


def _strip_roll(G_true_mm: FloatArray, G_plan_mm: FloatArray) -> FloatArray:
    """The true guide pose with the plan's roll: rotate the planned frame onto the true axis."""
    z_p, z_t = G_plan_mm[:3, 2], G_true_mm[:3, 2]
    cross = np.cross(z_p, z_t)
    s = float(np.linalg.norm(cross))
    R_fix = rotation_about_axis(cross, math.atan2(s, float(z_p @ z_t))) if s > 1e-12 else np.eye(3)
    return make_transform(R_fix @ G_plan_mm[:3, :3], G_true_mm[:3, 3])


def _tremor_m(rng: np.random.Generator, sigma_mm: float, sigma_deg: float) -> FloatArray:
    phi = rng.standard_normal(3) * math.radians(sigma_deg)
    angle = float(np.linalg.norm(phi))
    R = rotation_about_axis(phi, angle) if angle > 0 else np.eye(3)
    return make_transform(R, rng.standard_normal(3) * sigma_mm / MM_PER_M)


def run_twin_episode(
    scenario: Scenario,
    seed: int | np.random.Generator,
    config: TwinEpisodeConfig | None = None,
    twin: Twin | None = None,
    anatomy: Sequence[AnatomyMesh] = (),
) -> TwinEpisodeResult:
    """Align the guide with the arm, insert with the control loop, check contacts in PyBullet.

    Args:
        scenario: Control-layer scenario (patient frame, mm). Its ``believed_start`` is the
            planned entry pose; its ``start`` perturbation (needle play in the guide, bevel
            roll) is kept on top of the arm's registration/IK/tremor error.
        seed: Seed or generator of the registration error, tremor and the whole control episode.
        config: Twin-side settings.
        twin: A connected twin to reuse (its patient bodies are cleared first); a new one is
            made and closed when None.
        anatomy: Optional anatomy meshes (patient LPS mm) added to the scene.

    Returns:
        A :class:`TwinEpisodeResult` (the recorded trajectory included).
    """
    cfg = config or TwinEpisodeConfig()
    if twin is None:
        with Twin(seed=0) as own:
            return run_twin_episode(scenario, seed, cfg, own, anatomy)
    wall0 = time.perf_counter()
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    reg_rng, tremor_rng, ctl_rng = rng.spawn(3)
    P = np.asarray(scenario.believed_start_T_world_from_tip, dtype=np.float64)
    target = np.asarray(scenario.target_mm, dtype=np.float64)
    axis = P[:3, 2]
    T_true = approach_T_robot_from_patient_m(P[:3, 3], axis, cfg.anchor_robot_m)
    twin.clear_patient()
    twin.set_joint_positions(np.asarray(twin.config.home_joints_rad))
    twin.set_patient(T_true)
    twin.add_obstacles(scenario.obstacles)
    if anatomy:
        twin.add_anatomy(anatomy)
    deep = [target[None, :], scenario.obstacles.sphere_centers_mm, scenario.obstacles.capsule_a_mm,
            scenario.obstacles.capsule_b_mm]
    z_min = float(np.min(patient_mm_to_robot_m(T_true, np.concatenate(deep, axis=0))[:, 2]))
    twin.add_table(z_min - cfg.table_clearance_mm / MM_PER_M)

    # --- alignment through the believed registration
    E = rigid_error_transform(reg_rng, cfg.registration_error_mm, cfg.registration_error_deg,
                              0.5 * (P[:3, 3] + target))
    T_believed = T_true @ make_transform(E[:3, :3], E[:3, 3] / MM_PER_M)
    G_plan = P @ make_transform(np.eye(3), (0.0, 0.0, -cfg.standoff_mm))
    sol = twin.move_cp(pose_patient_mm_to_robot_m(T_believed, G_plan))
    plan_pts = np.array([P[:3, 3], target])
    if not sol.ok:
        err = float(np.linalg.norm(P[:3, 3] - target))
        clear = float(scenario.obstacles.clearance_mm(P[None, :3, 3])[0])
        wall = time.perf_counter() - wall0
        return TwinEpisodeResult(
            "aborted", f"alignment: {sol.reason}", err, 0.0, clear, False, 0.0, wall, 0, 0.0, math.nan, 0.0,
            (), False, sol.position_error_mm, sol.angle_error_deg, sol.arm_clearance_mm, math.nan, math.nan,
            math.inf, "", wall, 0.0, sol.joints_rad, T_true, None, None, plan_pts, target,
        )
    T_exec = sol.T_robot_from_guide_m @ _tremor_m(tremor_rng, cfg.tremor_sigma_mm, cfg.tremor_sigma_deg)
    G_true = _strip_roll(pose_robot_m_to_patient_mm(T_true, T_exec), G_plan)
    D = G_true @ invert(G_plan)
    start_true = D @ np.asarray(scenario.start_T_world_from_tip, dtype=np.float64)
    sc = replace(scenario, start_T_world_from_tip=start_true)
    t_align = time.perf_counter() - wall0

    # --- insertion: the control layer's loop
    ep = run_episode(sc, ctl_rng, dt_s=cfg.dt_s, record=True, post_stop_s=cfg.post_stop_s)

    # --- twin contact replay
    t_twin0 = time.perf_counter()
    clearance, body = _replay_contacts(twin, sc, ep, G_true, cfg)
    twin_wall = time.perf_counter() - t_twin0 + t_align
    collided = ep.collided or clearance <= 0.0
    status, reason = ep.status, ep.abort_reason
    if collided and not ep.collided:
        status = "failed"
        reason = f"collision: twin needle contact with {body} ({clearance:.2f} mm) ({reason})"
    plan = ep.trajectory.plan_points_mm if ep.trajectory is not None else plan_pts
    return TwinEpisodeResult(
        status=status,
        reason=reason,
        target_error_mm=ep.target_error_mm,
        max_path_deviation_mm=ep.max_path_deviation_mm,
        min_obstacle_clearance_mm=ep.min_obstacle_clearance_mm,
        collided=collided,
        sim_seconds=ep.sim_seconds,
        wall_seconds=time.perf_counter() - wall0,
        scans_used=ep.scans_used,
        travel_after_stop_mm=ep.travel_after_stop_mm,
        travel_after_fault_onset_mm=ep.travel_after_fault_onset_mm,
        stop_time_s=ep.stop_time_s,
        trip_codes=tuple(t.reason for t in ep.trips),
        aligned=True,
        ik_position_error_mm=sol.position_error_mm,
        ik_angle_error_deg=sol.angle_error_deg,
        arm_clearance_mm=sol.arm_clearance_mm,
        start_position_error_mm=float(np.linalg.norm(start_true[:3, 3] - P[:3, 3])),
        start_angle_error_deg=axis_angle_deg(start_true[:3, 2], P[:3, 2]),
        twin_needle_clearance_mm=clearance,
        twin_contact_body=body,
        twin_wall_seconds=twin_wall,
        control_wall_seconds=ep.wall_seconds,
        joints_rad=sol.joints_rad,
        T_robot_from_patient_m=T_true,
        control=ep,
        trajectory=ep.trajectory,
        plan_points_mm=np.asarray(plan, dtype=np.float64),
        target_mm=target,
    )


def _replay_contacts(
    twin: Twin, sc: Scenario, ep: EpisodeResult, G_true_mm: FloatArray, cfg: TwinEpisodeConfig
) -> tuple[float, str]:
    """Drive the twin's needle along the recorded true tip path; smallest clearance and body."""
    tr = ep.trajectory
    if tr is None or len(tr.t_s) == 0:
        return math.inf, ""
    poses = [np.asarray(T, dtype=np.float64) for T in tr.true_T_world_from_tip]
    times = [float(t) for t in tr.t_s]
    # Extrapolate the last control period (the loop stops before recording the final state).
    last_cmd = tr.commands[-1]
    t_last = times[-1]
    stuck = any(f.kind == "stuck_insertion" and f.active(t_last) for f in sc.faults)
    curv = math.prod(f.magnitude for f in sc.faults if f.kind == "curvature_mismatch" and f.active(t_last))
    cmd = NeedleCommand(0.0 if stuck else float(last_cmd[0]), float(last_cmd[1]), float(last_cmd[2]))
    final = step_needle(NeedleState(poses[-1]), cmd, cfg.dt_s, sc.needle,
                        TissueParams(sc.tissue.curvature_scale * curv))
    poses.append(final.T_world_from_tip)
    times.append(t_last + cfg.dt_s)
    path = np.concatenate([G_true_mm[None, :3, 3], np.array([T[:3, 3] for T in poses])], axis=0)
    best, body = math.inf, ""
    last_shift = np.zeros(3)
    for k, (t, T) in enumerate(zip(times, poses, strict=True)):
        shift = patient_shift_mm(sc.faults, t)
        moved = bool(np.any(np.abs(shift - last_shift) > 1e-9))
        if moved:
            twin.set_patient_shift(shift)
            last_shift = shift
        whole = moved or k % cfg.shaft_check_every == 0 or k == len(poses) - 1
        twin.set_needle(path[: k + 2], T, tip_only=not whole)
        rep = twin.needle_contact(CONTACT_KINDS, cfg.contact_query_mm, tip_only=not whole)
        if rep.clearance_mm < best:
            best, body = rep.clearance_mm, rep.body
    return best, body


__all__ = [
    "CONTACT_KINDS",
    "TwinEpisodeConfig",
    "TwinEpisodeResult",
    "patient_shift_mm",
    "run_twin_episode",
]
