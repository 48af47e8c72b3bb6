"""Pure-Python closed-loop episodes: needle model + sensors + EKF + controller + replanner + safety.

:func:`run_episode` runs one :class:`Scenario` until the target is reached, the system stops
itself (safety trip or controller abort, each with a reason), or it fails (collision, timeout,
or a silent miss: "reached" while the true error exceeds the tolerance). It is deterministic
for a given seed. :func:`random_scenario` draws reachable scenarios and :func:`run_campaign`
runs many of them and summarises the issue's acceptance numbers.

Timing of one control period ``[t, t + dt]``: sensors sample the true state at ``t``, arrived
measurements are fused, the estimate is predicted to ``t``, the controller and the safety
monitor decide, and the resulting command drives the true needle over the period.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field, replace

import numpy as np

from needle_steering.control.controller import ABORTED, REACHED, ControllerParams, SlidingModeController
from needle_steering.control.estimator import EstimatorParams, TipEKF
from needle_steering.control.geometry import FloatArray, Obstacles, check_point, check_pose, polyline_distance_mm
from needle_steering.control.needle_model import (
    HOLD,
    NeedleCommand,
    NeedleParams,
    NeedleState,
    TissueParams,
    arc_points_tip_mm,
    step_needle,
)
from needle_steering.control.replanner import REPLANNER_KINDS, Replanner, make_replanner
from needle_steering.control.safety import SafetyLimits, SafetyMonitor, SafetyObservation, SafetyTrip
from needle_steering.control.sensors import (
    CbctParams,
    CbctScanner,
    EMMeasurement,
    EMTracker,
    EMTrackerParams,
    PatientReferenceSensor,
)
from needle_steering.errors import ControlError

__all__ = [
    "FAULT_KINDS",
    "CampaignSummary",
    "EpisodeResult",
    "Fault",
    "Scenario",
    "Trajectory",
    "random_scenario",
    "run_campaign",
    "run_episode",
]

FAULT_KINDS = (
    "sensor_dropout",
    "noise_burst",
    "latency_spike",
    "stuck_insertion",
    "curvature_mismatch",
    "patient_motion",
)


@dataclass(frozen=True)
class Fault:
    """A fault injected during ``[start_s, start_s + duration_s)``.

    ``magnitude`` means, per ``kind``:

    * ``sensor_dropout``: unused (every EM sample is lost).
    * ``noise_burst``: EM noise multiplier (e.g. 10).
    * ``latency_spike``: extra EM latency (s).
    * ``stuck_insertion``: unused (the stage advances, the tip does not).
    * ``curvature_mismatch``: multiplier of the true tissue curvature scale (e.g. 0.3).
    * ``patient_motion``: rigid shift of target and obstacles (mm) along ``direction``,
      ramped in over ``ramp_s`` and then held.
    """

    kind: str
    start_s: float
    duration_s: float = math.inf
    magnitude: float = 0.0
    direction: tuple[float, float, float] = (1.0, 0.0, 0.0)
    ramp_s: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ControlError(f"unknown fault kind {self.kind!r}; known: {FAULT_KINDS}")
        if not (math.isfinite(self.start_s) and self.start_s >= 0):
            raise ControlError(f"Fault.start_s must be finite and >= 0, got {self.start_s!r}")
        if not (self.duration_s > 0) or not math.isfinite(self.magnitude) or not self.ramp_s > 0:
            raise ControlError(
                f"invalid fault timing/magnitude: duration_s={self.duration_s!r}, "
                f"magnitude={self.magnitude!r}, ramp_s={self.ramp_s!r}"
            )
        n = math.sqrt(sum(d * d for d in self.direction))
        if not (math.isfinite(n) and n > 0):
            raise ControlError(f"Fault.direction must be a non-zero finite vector, got {self.direction!r}")

    def active(self, t_s: float) -> bool:
        """Whether the fault is active at ``t_s``."""
        return self.start_s <= t_s < self.start_s + self.duration_s


@dataclass(frozen=True)
class Scenario:
    """Everything one episode needs (all poses and points in mm, world frame).

    Attributes:
        start_T_world_from_tip: shape (4, 4) **true** start pose of the tip.
        believed_start_T_world_from_tip: shape (4, 4) start pose the system believes
            (robot kinematics + registration); the plan and the estimator start from it.
        target_mm: shape (3,) target.
        obstacles: critical structures.
        needle: true needle parameters.
        needle_nominal: parameters the controller and estimator use.
        tissue: true tissue (curvature scale).
        em, cbct: sensor models.
        controller, safety, estimator: tuning.
        faults: injected faults.
        tissue_inhomogeneity_per_sqrt_mm: random walk of the true log curvature scale.
        patient_reference_sigma_mm: noise of the patient reference sensor.
        plan_kappa_fraction: fraction of the nominal curvature the initial plan may use.
        replanner_clearance_mm: clearance the built-in replanner requires.
        replanner_kind: built-in replanner, one of ``"arc"`` (default, fast), ``"steerable"``
            (planning's arc RRT) or ``"arc+steerable"`` (arcs first, the RRT when they fail).
        patient_motion_replan_mm: measured patient shift that moves target and obstacles and
            triggers a replan (shifts beyond ``SafetyLimits.max_patient_shift_mm`` stop instead).
        max_sim_s: timeout (s).
    """

    start_T_world_from_tip: FloatArray  # noqa: N815 (T_target_from_source convention)
    believed_start_T_world_from_tip: FloatArray  # noqa: N815
    target_mm: FloatArray
    obstacles: Obstacles = field(default_factory=Obstacles)
    needle: NeedleParams = field(default_factory=NeedleParams)
    needle_nominal: NeedleParams = field(default_factory=NeedleParams)
    tissue: TissueParams = field(default_factory=TissueParams)
    em: EMTrackerParams = field(default_factory=EMTrackerParams)
    cbct: CbctParams = field(default_factory=CbctParams)
    controller: ControllerParams = field(default_factory=ControllerParams)
    safety: SafetyLimits = field(default_factory=SafetyLimits)
    estimator: EstimatorParams = field(default_factory=EstimatorParams)
    faults: tuple[Fault, ...] = ()
    tissue_inhomogeneity_per_sqrt_mm: float = 0.002
    patient_reference_sigma_mm: float = 0.05
    plan_kappa_fraction: float = 0.7
    replanner_clearance_mm: float = 2.0
    replanner_kind: str = "arc"
    patient_motion_replan_mm: float = 0.5
    max_sim_s: float = 300.0

    def __post_init__(self) -> None:
        check_pose(self.start_T_world_from_tip, "start_T_world_from_tip")
        check_pose(self.believed_start_T_world_from_tip, "believed_start_T_world_from_tip")
        check_point(self.target_mm, "target_mm")
        if self.replanner_kind not in REPLANNER_KINDS:
            raise ControlError(f"replanner_kind must be one of {REPLANNER_KINDS}, got {self.replanner_kind!r}")
        if not 0 < self.plan_kappa_fraction <= 1:
            raise ControlError(f"plan_kappa_fraction must be in (0, 1], got {self.plan_kappa_fraction!r}")


@dataclass(frozen=True)
class Trajectory:
    """Recorded signals, one row per control period (for plots and rosbag export).

    Attributes:
        t_s: shape (K,).
        true_T_world_from_tip: shape (K, 4, 4).
        estimated_T_world_from_tip: shape (K, 4, 4).
        commands: shape (K, 3): insertion_speed_mm_s, rotation_rate_rad_s, spin_duty.
        estimated_curvature_scale: shape (K,).
        plan_points_mm: shape (M, 3), the path active at the end.
    """

    t_s: FloatArray
    true_T_world_from_tip: FloatArray  # noqa: N815 (T_target_from_source convention)
    estimated_T_world_from_tip: FloatArray  # noqa: N815
    commands: FloatArray
    estimated_curvature_scale: FloatArray
    plan_points_mm: FloatArray


@dataclass(frozen=True)
class EpisodeResult:
    """Outcome of :func:`run_episode` (true errors are measured against the simulated truth).

    ``status`` is ``"reached"`` (stopped at the target within tolerance), ``"aborted"`` (the
    system stopped itself and says why in ``abort_reason``) or ``"failed"`` (collision,
    timeout, or a silent miss; ``abort_reason`` then says what went wrong).

    ``target_error_mm`` is the true tip-to-(moved)-target distance after the stop;
    ``max_path_deviation_mm`` the largest true distance to the path that was active at each
    instant (a replan starts a new path at the estimated tip); ``min_obstacle_clearance_mm`` the
    smallest true surface clearance (inf without obstacles); ``travel_after_stop_mm`` the true
    tip travel while holding for ``post_stop_s`` after the stop; ``travel_after_fault_onset_mm``
    the travel between the first fault's onset and the stop (NaN without faults).
    """

    status: str
    target_error_mm: float
    max_path_deviation_mm: float
    min_obstacle_clearance_mm: float
    collided: bool
    sim_seconds: float
    wall_seconds: float
    scans_used: int
    abort_reason: str = ""
    trips: tuple[SafetyTrip, ...] = ()
    replans: int = 0
    travel_after_stop_mm: float = 0.0
    stop_time_s: float = math.nan
    travel_after_fault_onset_mm: float = math.nan
    final_curvature_scale_estimate: float = math.nan
    trajectory: Trajectory | None = None


def _fault_state(faults: tuple[Fault, ...], t: float) -> tuple[bool, float, float, bool, float, FloatArray]:
    """(dropout, sigma_scale, extra_latency_s, stuck, curvature_multiplier, patient_shift_mm) at t."""
    dropout = False
    sigma = 1.0
    latency = 0.0
    stuck = False
    curv = 1.0
    shift = np.zeros(3)
    for f in faults:
        if f.kind == "patient_motion":
            if t >= f.start_s:
                d = np.asarray(f.direction, dtype=float)
                frac = min(1.0, (t - f.start_s) / f.ramp_s)
                shift = shift + f.magnitude * frac * d / np.linalg.norm(d)
            continue
        if not f.active(t):
            continue
        if f.kind == "sensor_dropout":
            dropout = True
        elif f.kind == "noise_burst":
            sigma *= f.magnitude
        elif f.kind == "latency_spike":
            latency += f.magnitude
        elif f.kind == "stuck_insertion":
            stuck = True
        elif f.kind == "curvature_mismatch":
            curv *= f.magnitude
    return dropout, sigma, latency, stuck, curv, shift


def run_episode(
    scenario: Scenario,
    seed: int | np.random.Generator,
    *,
    dt_s: float = 0.025,
    record: bool = False,
    replanner: Replanner | None = None,
    post_stop_s: float = 0.5,
) -> EpisodeResult:
    """Run one closed-loop insertion.

    Args:
        scenario: the scenario.
        seed: seed or generator for every noise source (sensors, tissue).
        dt_s: control period (s), > 0; also the truth integration step (exact per step).
        record: keep the trajectories in the result.
        replanner: replanner to use; when None, the scenario's ``replanner_kind``.
        post_stop_s: time simulated after the stop, holding, to measure residual travel (s).

    Returns:
        An :class:`EpisodeResult`.
    """
    if not (math.isfinite(dt_s) and dt_s > 0):
        raise ControlError(f"dt_s must be finite and > 0, got {dt_s!r}")
    wall0 = time.perf_counter()
    sc = scenario
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    em_rng, cbct_rng, ref_rng, tissue_rng = rng.spawn(4)
    ctrl_params = replace(sc.controller, control_period_s=dt_s)
    target0 = np.asarray(sc.target_mm, dtype=float)
    planner = (
        replanner
        if replanner is not None
        else make_replanner(sc.replanner_kind, clearance_mm=sc.replanner_clearance_mm, seed=0)
    )

    truth = NeedleState.from_pose(sc.start_T_world_from_tip)
    ekf = TipEKF(sc.believed_start_T_world_from_tip, 0.0, sc.needle_nominal, sc.estimator)
    em = EMTracker(sc.em, em_rng)
    cbct = CbctScanner(sc.cbct, cbct_rng)
    ref = PatientReferenceSensor(sc.patient_reference_sigma_mm, ref_rng)

    kappa_plan = sc.needle_nominal.kappa_per_mm * sc.plan_kappa_fraction
    first = planner.plan(sc.believed_start_T_world_from_tip, target0, sc.obstacles, kappa_plan)
    if first.path is None:
        err = float(np.linalg.norm(truth.position_mm - target0))
        clear0 = float(sc.obstacles.clearance_mm(truth.position_mm[None, :])[0])
        return EpisodeResult(
            "aborted",
            err,
            0.0,
            clear0,
            False,
            0.0,
            time.perf_counter() - wall0,
            0,
            f"no_initial_plan: {first.reason}",
            stop_time_s=0.0,
        )
    controller = SlidingModeController(
        target0, sc.needle_nominal, ctrl_params, path=first.path, replanner=planner, obstacles=sc.obstacles
    )
    safety = SafetyMonitor(sc.safety, first.path.points_mm, sc.obstacles)
    active_path = first.path

    onsets = [f.start_s for f in sc.faults]
    fault_onset = min(onsets) if onsets else math.inf
    t = 0.0
    encoder_mm = 0.0
    log_scale = math.log(sc.tissue.curvature_scale)
    last_meas: EMMeasurement | None = None
    max_dev = 0.0
    min_clear = float(sc.obstacles.clearance_mm(truth.position_mm[None, :])[0])
    collided = False
    status = ""
    reason = ""
    stop_time = math.nan
    travel_after_fault = 0.0
    rec_t: list[float] = []
    rec_true: list[FloatArray] = []
    rec_est: list[FloatArray] = []
    rec_cmd: list[tuple[float, float, float]] = []
    rec_scale: list[float] = []
    est = ekf.estimate(0.0)
    shift_true = np.zeros(3)
    applied_shift = np.zeros(3)
    while True:
        dropout, sigma_scale, extra_latency, stuck, curv_mult, shift_true = _fault_state(sc.faults, t)
        # --- sensing at t
        if em.due(t):
            em.sample(
                t, truth.T_world_from_tip, sigma_scale=sigma_scale, extra_latency_s=extra_latency, force_dropout=dropout
            )
        for m in em.receive(t):
            ekf.fuse_em(m)
            if last_meas is None or m.stamp_s > last_meas.stamp_s:
                last_meas = m
        for fix in cbct.receive(t):
            ekf.fuse_cbct(fix)
        shift_meas = ref.measure(shift_true)
        if np.linalg.norm(shift_meas - applied_shift) > sc.patient_motion_replan_mm:
            # small patient motion: move target and obstacles, replan (large motion trips safety)
            applied_shift = shift_meas.copy()
            moved = sc.obstacles.shifted(applied_shift)
            controller.update_target(target0 + applied_shift, moved)
            safety.set_obstacles(moved)
        est = ekf.estimate(t)
        # --- decide
        out = controller.step(t, est, encoder_mm, cbct.scans_remaining, cbct.pending)
        if out.request_cbct and cbct.scans_remaining > 0:
            cbct.request(t, truth.position_mm)
        if out.replanned and controller.path is not None:
            active_path = controller.path
            safety.set_path(active_path.points_mm)
        if out.status != "running":
            status = out.status
            reason = out.reason
            stop_time = t
            break
        obs = SafetyObservation(
            t_s=t,
            tip_position_mm=est.position_mm,
            command=out.command,
            inserted_length_mm=encoder_mm,
            last_measurement_stamp_s=ekf.last_em_stamp_s,
            dt_s=dt_s,
            measured_position_mm=None if last_meas is None else last_meas.position_mm,
            measured_stamp_s=-math.inf if last_meas is None else last_meas.stamp_s,
            patient_shift_mm=shift_meas,
            consecutive_rejections=ekf.consecutive_rejections,
        )
        cmd = safety.check(obs)
        if safety.tripped:
            trip = safety.active_trip
            status = ABORTED
            reason = f"{trip.reason}: {trip.detail}" if trip is not None else "safety trip"
            stop_time = t
            break
        if record:
            rec_t.append(t)
            rec_true.append(truth.T_world_from_tip)
            rec_est.append(est.T_world_from_tip)
            rec_cmd.append((cmd.insertion_speed_mm_s, cmd.rotation_rate_rad_s, cmd.spin_duty))
            rec_scale.append(est.curvature_scale)
        # --- act over [t, t + dt]
        ekf.apply_command(t, cmd)
        p_before = truth.position_mm.copy()
        true_cmd = NeedleCommand(0.0, cmd.rotation_rate_rad_s, cmd.spin_duty) if stuck else cmd
        scale_now = math.exp(log_scale) * curv_mult
        truth = step_needle(truth, true_cmd, dt_s, sc.needle, TissueParams(scale_now))
        ds = true_cmd.insertion_speed_mm_s * dt_s
        if sc.tissue_inhomogeneity_per_sqrt_mm > 0 and ds > 0:
            log_scale += sc.tissue_inhomogeneity_per_sqrt_mm * math.sqrt(ds) * float(tissue_rng.standard_normal())
        encoder_mm += cmd.insertion_speed_mm_s * dt_s
        t += dt_s
        if t > fault_onset:
            travel_after_fault += float(np.linalg.norm(truth.position_mm - p_before))
        # --- truth metrics
        p_true = truth.position_mm
        max_dev = max(max_dev, polyline_distance_mm(p_true, active_path.points_mm))
        if sc.obstacles.count:
            obst_now = sc.obstacles.shifted(shift_true) if np.any(shift_true) else sc.obstacles
            c = float(obst_now.clearance_mm(p_true[None, :])[0])
            min_clear = min(min_clear, c)
            if c < 0.0:
                collided = True
        if t > sc.max_sim_s:
            status = "failed"
            reason = f"timeout: {t:.1f} s > max_sim_s {sc.max_sim_s}"
            stop_time = t
            break
    # --- hold after the stop and measure residual travel
    travel_after_stop = 0.0
    for _ in range(max(0, math.ceil(post_stop_s / dt_s))):
        p_prev = truth.position_mm.copy()
        truth = step_needle(truth, HOLD, dt_s, sc.needle, TissueParams(math.exp(log_scale)))
        travel_after_stop += float(np.linalg.norm(truth.position_mm - p_prev))
    target_true = target0 + shift_true
    err = float(np.linalg.norm(truth.position_mm - target_true))
    if status == REACHED and err > ctrl_params.target_tolerance_mm:
        status = "failed"
        reason = f"missed_target: true error {err:.2f} mm > tolerance {ctrl_params.target_tolerance_mm} mm ({reason})"
    if collided:
        status = "failed"
        reason = f"collision: min clearance {min_clear:.2f} mm ({reason})"
    trajectory = None
    if record and rec_t:
        trajectory = Trajectory(
            np.array(rec_t),
            np.array(rec_true),
            np.array(rec_est),
            np.array(rec_cmd),
            np.array(rec_scale),
            active_path.points_mm.copy(),
        )
    return EpisodeResult(
        status=status,
        target_error_mm=err,
        max_path_deviation_mm=max_dev,
        min_obstacle_clearance_mm=min_clear,
        collided=collided,
        sim_seconds=t,
        wall_seconds=time.perf_counter() - wall0,
        scans_used=cbct.scans_used,
        abort_reason="" if status == REACHED else reason,
        trips=tuple(safety.trips),
        replans=controller.replans,
        travel_after_stop_mm=travel_after_stop,
        stop_time_s=stop_time,
        travel_after_fault_onset_mm=travel_after_fault if sc.faults else math.nan,
        final_curvature_scale_estimate=est.curvature_scale,
        trajectory=trajectory,
    )


def _random_rotation(rng: np.random.Generator, max_tilt_rad: float) -> FloatArray:
    """Rotation whose z-axis is within ``max_tilt_rad`` of +z, with uniform roll."""
    tilt = max_tilt_rad * math.sqrt(float(rng.random()))
    az = float(rng.uniform(0.0, 2.0 * math.pi))
    roll = float(rng.uniform(-math.pi, math.pi))
    z = np.array([math.sin(tilt) * math.cos(az), math.sin(tilt) * math.sin(az), math.cos(tilt)])
    a = np.array([1.0, 0.0, 0.0]) if abs(z[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x = np.cross(a, z)
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    R0 = np.stack([x, y, z], axis=1)
    c, s = math.cos(roll), math.sin(roll)
    return R0 @ np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _perturb(T: FloatArray, rng: np.random.Generator, pos_mm: float, tilt_rad: float, roll_rad: float) -> FloatArray:
    from needle_steering.control.geometry import so3_exp

    out = T.copy()
    dtheta = np.array([tilt_rad, tilt_rad, roll_rad]) * rng.standard_normal(3)
    out[:3, :3] = T[:3, :3] @ so3_exp(dtheta)
    out[:3, 3] = T[:3, 3] + pos_mm * rng.standard_normal(3)
    return out


def random_scenario(
    seed: int | np.random.Generator,
    *,
    curvature_mismatch: float = 0.2,
    em_sigma_mm: float = 0.5,
    n_obstacles: tuple[int, int] = (1, 3),
    faults: tuple[Fault, ...] = (),
    em_bias_sigma_mm: float = 0.3,
    insertion_speed_range_mm_s: tuple[float, float] = (1.5, 3.0),
    depth_range_mm: tuple[float, float] = (60.0, 110.0),
    path_kappa_fraction: float = 0.55,
) -> Scenario:
    """Draw a reachable scenario.

    The target lies at the end of a constant-curvature arc from the believed start pose whose
    curvature is at most ``path_kappa_fraction`` of the nominal one (so it stays reachable with
    margin when the true curvature is ``1 - curvature_mismatch`` times nominal). Obstacles are
    spheres (and sometimes a vessel-like capsule) placed beside that arc, 3-7 mm from it, never
    on it: the nominal arc keeps >= 2.5 mm clearance and the target >= 4 mm.

    Args:
        seed: seed or generator.
        curvature_mismatch: true curvature scale ~ U(1 - m, 1 + m).
        em_sigma_mm: EM position noise (mm).
        n_obstacles: inclusive range of the number of spheres.
        faults: faults to inject.
        em_bias_sigma_mm: per-axis standard deviation of the static EM bias (mm).
        insertion_speed_range_mm_s: range of the commanded insertion speed (mm/s).
        depth_range_mm: range of the nominal arc length (mm).
        path_kappa_fraction: largest nominal-arc curvature as a fraction of nominal.

    Returns:
        A :class:`Scenario`.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    kappa_nom = float(rng.uniform(0.007, 0.013))
    believed = np.eye(4)
    believed[:3, :3] = _random_rotation(rng, math.radians(15.0))
    true_start = _perturb(believed, rng, 0.2, 0.005, 0.15)
    kappa_p = float(rng.uniform(0.0, path_kappa_fraction)) * kappa_nom
    bend = float(rng.uniform(-math.pi, math.pi))
    length = float(rng.uniform(*depth_range_mm))
    s = np.linspace(0.0, length, max(2, math.ceil(length) + 1))
    arc_tip = arc_points_tip_mm(kappa_p, bend, s)
    R, p0 = believed[:3, :3], believed[:3, 3]
    arc = p0 + arc_tip @ R.T
    target = arc[-1].copy()
    # tangents along the arc (world)
    tang = np.gradient(arc, axis=0)
    tang /= np.linalg.norm(tang, axis=1, keepdims=True)

    centers: list[FloatArray] = []
    radii: list[float] = []
    caps_a: list[FloatArray] = []
    caps_b: list[FloatArray] = []
    caps_r: list[float] = []
    n_sph = int(rng.integers(n_obstacles[0], n_obstacles[1] + 1))
    want_capsule = bool(rng.random() < 0.5)
    attempts = 0
    while (len(radii) < n_sph or (want_capsule and not caps_r)) and attempts < 200:
        attempts += 1
        i = int(rng.integers(int(0.25 * len(s)), int(0.8 * len(s))))
        h = tang[i]
        a = np.cross(h, rng.standard_normal(3))
        u = a / np.linalg.norm(a)
        gap = float(rng.uniform(3.0, 7.0))
        make_capsule = want_capsule and not caps_r and len(radii) >= n_sph
        if make_capsule:
            r = float(rng.uniform(1.5, 3.0))
            c = arc[i] + u * (r + gap)
            axis = np.cross(h, u)
            trial = Obstacles(
                capsule_a_mm=(c - 15.0 * axis)[None],
                capsule_b_mm=(c + 15.0 * axis)[None],
                capsule_radii_mm=np.array([r]),
            )
        else:
            r = float(rng.uniform(2.0, 6.0))
            c = arc[i] + u * (r + gap)
            trial = Obstacles(sphere_centers_mm=c[None], sphere_radii_mm=np.array([r]))
        if float(np.min(trial.clearance_mm(arc))) < 2.5 or float(trial.clearance_mm(target[None])[0]) < 4.0:
            continue
        if make_capsule:
            caps_a.append(trial.capsule_a_mm[0])
            caps_b.append(trial.capsule_b_mm[0])
            caps_r.append(r)
        else:
            centers.append(c)
            radii.append(r)
    obstacles = Obstacles(
        np.array(centers).reshape(-1, 3),
        np.array(radii),
        np.array(caps_a).reshape(-1, 3),
        np.array(caps_b).reshape(-1, 3),
        np.array(caps_r),
    )
    tau = float(rng.uniform(0.02, 0.08))
    band = float(rng.uniform(0.0, 0.03))
    needle = NeedleParams(kappa_nom, tau, band)
    needle_nominal = NeedleParams(kappa_nom, 0.05, 0.015)
    em = EMTrackerParams(
        position_sigma_mm=em_sigma_mm,
        axis_sigma_rad=0.01,
        bias_mm=tuple(float(b) for b in em_bias_sigma_mm * rng.standard_normal(3)),  # type: ignore[arg-type]
        latency_s=float(rng.uniform(0.02, 0.05)),
        latency_jitter_s=0.005,
        dropout_probability=0.01,
        burst_start_probability=0.002,
        burst_end_probability=0.5,
    )
    est = EstimatorParams(
        em_position_sigma_mm=max(em_sigma_mm, 1e-3), initial_bias_sigma_mm=max(1.5 * em_bias_sigma_mm, 0.05)
    )
    ctrl = ControllerParams(insertion_speed_mm_s=float(rng.uniform(*insertion_speed_range_mm_s)))
    return Scenario(
        start_T_world_from_tip=true_start,
        believed_start_T_world_from_tip=believed,
        target_mm=target,
        obstacles=obstacles,
        needle=needle,
        needle_nominal=needle_nominal,
        tissue=TissueParams.sample(rng, curvature_mismatch),
        em=em,
        cbct=CbctParams(),
        controller=ctrl,
        safety=SafetyLimits(),
        estimator=est,
        faults=faults,
    )


@dataclass(frozen=True)
class CampaignSummary:
    """Acceptance numbers of :func:`run_campaign` (errors over the reached runs, in mm)."""

    n: int
    seed: int
    reached: int
    aborted: int
    failed: int
    reach_rate: float
    median_error_mm: float
    p95_error_mm: float
    max_error_mm: float
    collisions: int
    abort_reasons: dict[str, int]
    failure_reasons: dict[str, int]
    max_path_deviation_p95_mm: float
    min_obstacle_clearance_mm: float
    mean_scans: float
    max_scans: int
    mean_replans: float
    sim_seconds_total: float
    wall_seconds_total: float

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable dict of every field."""
        return dict(self.__dict__)


def run_campaign(
    n: int,
    seed: int,
    *,
    dt_s: float = 0.025,
    curvature_mismatch: float = 0.2,
    em_sigma_mm: float = 0.5,
    faults: tuple[Fault, ...] = (),
) -> CampaignSummary:
    """Run ``n`` random scenarios (from :func:`random_scenario`) and summarise them.

    Args:
        n: number of scenarios, > 0.
        seed: master seed; scenario ``i`` and its noise derive from it deterministically.
        dt_s: control period (s).
        curvature_mismatch: true curvature scale ~ U(1 - m, 1 + m).
        em_sigma_mm: EM position noise (mm).
        faults: faults injected in every scenario.

    Returns:
        A :class:`CampaignSummary` (``.to_dict()`` for JSON).
    """
    if n <= 0:
        raise ControlError(f"n must be > 0, got {n!r}")
    children = np.random.SeedSequence(seed).spawn(n)
    results: list[EpisodeResult] = []
    wall0 = time.perf_counter()
    for child in children:
        scen_seed, run_seed = (int(v) for v in child.generate_state(2))
        sc = random_scenario(scen_seed, curvature_mismatch=curvature_mismatch, em_sigma_mm=em_sigma_mm, faults=faults)
        results.append(run_episode(sc, run_seed, dt_s=dt_s))
    wall = time.perf_counter() - wall0
    reached = [r for r in results if r.status == REACHED]
    errs = np.array([r.target_error_mm for r in reached]) if reached else np.array([math.nan])
    devs = np.array([r.max_path_deviation_mm for r in results])
    clears = np.array([r.min_obstacle_clearance_mm for r in results])
    codes: Counter[str] = Counter()
    fails: Counter[str] = Counter()
    for r in results:
        if r.status == ABORTED:
            codes[r.abort_reason.split(":")[0]] += 1
        elif r.status == "failed":
            fails[r.abort_reason.split(":")[0]] += 1
    return CampaignSummary(
        n=n,
        seed=seed,
        reached=len(reached),
        aborted=sum(r.status == ABORTED for r in results),
        failed=sum(r.status == "failed" for r in results),
        reach_rate=len(reached) / n,
        median_error_mm=float(np.median(errs)),
        p95_error_mm=float(np.percentile(errs, 95)),
        max_error_mm=float(np.max(errs)),
        collisions=sum(r.collided for r in results),
        abort_reasons=dict(codes),
        failure_reasons=dict(fails),
        max_path_deviation_p95_mm=float(np.percentile(devs, 95)),
        min_obstacle_clearance_mm=float(np.min(clears)),
        mean_scans=float(np.mean([r.scans_used for r in results])),
        max_scans=int(max(r.scans_used for r in results)),
        mean_replans=float(np.mean([r.replans for r in results])),
        sim_seconds_total=float(sum(r.sim_seconds for r in results)),
        wall_seconds_total=wall,
    )
