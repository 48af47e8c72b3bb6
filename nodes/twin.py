"""``TwinBackend``: what ``sim_node`` needs from a simulator, and the needle-model implementation.

The robot is a needle guide (the arm's tool frame: tip at the guide exit, +z the insertion
direction) carrying a bevel-tip needle with two joints, ``insertion`` and ``roll``. All poses
here are ``T_patient_from_*`` in **millimetres** (the node converts to metres and to the robot
base frame). Two backends implement :class:`TwinBackend`:

* :class:`NeedleModelTwin` (``sim_node.backend: kinematic``): the guide is an ideal pose
  interpolator, the needle the control layer's model;
* :class:`needle_steering.nodes.twin_pybullet.PyBulletTwinBackend` (``backend: pybullet``): a
  KUKA iiwa aligns the guide by inverse kinematics in PyBullet, with the patient's anatomy as
  collision bodies (see :func:`needle_steering.nodes.core_adapters.make_twin_backend`).

Both drive the tip with the same :class:`NeedleStage` (insertion stage, bevel-tip needle model,
EM tracker with noise and latency).

Rules the twins enforce (each refusal raises :class:`TwinError` with the offending value):

* the guide moves (``move_guide`` / ``servo_guide``) only while the needle is retracted;
* insertion speeds beyond ``max_insertion_speed_mm_s`` are refused, not clamped;
* a ``servo_guide`` setpoint farther than ``max_servo_step_mm`` from the guide is refused.

Threading: ``sim_node`` calls every method from its one simulation thread (``start`` first,
``close`` last), so a backend may own a simulator that is bound to a thread (PyBullet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from scipy.spatial.transform import Rotation, Slerp

from needle_steering.control.geometry import FloatArray
from needle_steering.control.needle_model import NeedleCommand, NeedleParams, NeedleState, TissueParams, step_needle
from needle_steering.control.sensors import EMMeasurement, EMTracker, EMTrackerParams
from needle_steering.errors import SimulationError

#: Insertion below this counts as retracted (mm).
RETRACTED_MM = 0.05


class TwinError(SimulationError):
    """A command the twin refuses (the message names the value and the limit)."""


@dataclass(frozen=True)
class TwinConfig:
    """Parameters shared by the twins (units in the names)."""

    home_T_patient_from_tip_mm: FloatArray  # noqa: N815
    needle_kappa_per_mm: float = 0.005
    tissue_curvature_scale: float = 1.0
    guide_speed_mm_s: float = 100.0
    guide_rotation_speed_rad_s: float = 2.0
    max_insertion_speed_mm_s: float = 50.0
    max_servo_step_mm: float = 2.0
    tracker_rate_hz: float = 40.0
    tracker_position_sigma_mm: float = 0.2
    tracker_axis_sigma_rad: float = 0.005
    tracker_latency_s: float = 0.01
    seed: int = 0


@dataclass(frozen=True)
class TwinJoints:
    """Joint state: insertion (mm), roll (rad), their rates, and the arm's joints when there is an arm.

    ``arm_names`` / ``arm_positions_rad`` / ``arm_velocities_rad_s`` are empty for the kinematic twin.
    """

    insertion_mm: float
    roll_rad: float
    insertion_speed_mm_s: float
    roll_rate_rad_s: float
    arm_names: tuple[str, ...] = ()
    arm_positions_rad: tuple[float, ...] = ()
    arm_velocities_rad_s: tuple[float, ...] = ()


class TwinBackend(Protocol):
    """The simulator interface ``sim_node`` drives from its single simulation thread."""

    name: str

    def start(self) -> None:
        """Open the simulator on the calling thread (the simulation thread), before the first ``step``."""

    def close(self) -> None:
        """Release the simulator (on the simulation thread, after the last ``step``; idempotent)."""

    def T_patient_from_robot_base_mm(self) -> FloatArray | None:
        """Where the backend puts the robot base (4x4, mm), or ``None``: the node's parameters decide."""

    def step(self, t_s: float, dt_s: float) -> None:
        """Advance the simulation from ``t_s`` by ``dt_s`` seconds."""

    def move_guide(self, T_patient_from_tip_mm: FloatArray) -> None:
        """Start an interpolated guide motion to ``T_patient_from_tip_mm`` (needle retracted)."""

    def servo_guide(self, T_patient_from_tip_mm: FloatArray) -> None:
        """Jump the guide to a nearby setpoint (needle retracted, small steps only)."""

    def servo_joints(self, insertion_speed_mm_s: float, roll_rate_rad_s: float, spin_duty: float) -> None:
        """Hold these joint velocities until the next command (negative insertion retracts)."""

    def hold(self) -> None:
        """Stop all motion."""

    def tip_pose_mm(self) -> FloatArray:
        """True ``T_patient_from_tip`` (4x4, mm)."""

    def joints(self) -> TwinJoints:
        """Current joint state."""

    def busy(self) -> bool:
        """Whether a guide motion is in progress."""

    def sample_tracker(self, t_s: float, dropout: bool) -> list[EMMeasurement]:
        """Tracker measurements that arrive by ``t_s`` (patient frame, mm); none while ``dropout``."""

    def status(self) -> dict[str, Any]:
        """Backend state for ``/sim/state`` (JSON-serialisable: numbers, strings, lists)."""


class NeedleStage:
    """Insertion stage + bevel-tip needle (:func:`step_needle`) + simulated EM tip tracker.

    The stage sits at the guide: at zero insertion the tip is at the guide's tool point
    (``place``); positive insertion speeds advance the needle model, negative ones retract it
    along the path it came (follow-the-leader), back to the tool point.
    """

    def __init__(self, config: TwinConfig, T_patient_from_tip_mm: FloatArray) -> None:
        self.config = config
        self._needle = NeedleParams(kappa_per_mm=config.needle_kappa_per_mm)
        self._tissue = TissueParams(config.tissue_curvature_scale)
        T = np.asarray(T_patient_from_tip_mm, dtype=float)
        self._state = NeedleState.from_pose(T)
        self._history: list[tuple[float, FloatArray]] = [(0.0, T.copy())]
        self._command = NeedleCommand(0.0, 0.0, 0.0)
        self._retract_speed_mm_s = 0.0
        self._roll_rad = 0.0
        self._tracker = EMTracker(
            EMTrackerParams(
                rate_hz=config.tracker_rate_hz,
                position_sigma_mm=config.tracker_position_sigma_mm,
                axis_sigma_rad=config.tracker_axis_sigma_rad,
                latency_s=config.tracker_latency_s,
                latency_jitter_s=0.0,
            ),
            np.random.default_rng(config.seed),
        )
        self._tracker_started = False

    @property
    def inserted_mm(self) -> float:
        """Inserted length (mm)."""
        return self._state.inserted_length_mm

    @property
    def moving(self) -> bool:
        """Whether the stage has a non-zero command."""
        c = self._command
        return self._retract_speed_mm_s > 0.0 or c.insertion_speed_mm_s > 0.0 or c.rotation_rate_rad_s != 0.0

    def require_retracted(self, what: str) -> None:
        """Raise :class:`TwinError` naming ``what`` when the needle is inserted."""
        if self._state.inserted_length_mm > RETRACTED_MM:
            raise TwinError(
                f"{what} refused: needle inserted {self._state.inserted_length_mm:.2f} mm; retract it first"
            )

    def place(self, T_patient_from_tip_mm: FloatArray) -> None:
        """Put the retracted needle's tip at the guide's tool point (the guide moved)."""
        T = np.asarray(T_patient_from_tip_mm, dtype=float)
        self._state = NeedleState.from_pose(T)
        self._history = [(0.0, T.copy())]

    def validate(
        self, insertion_speed_mm_s: float, roll_rate_rad_s: float, spin_duty: float
    ) -> tuple[float, float, float]:
        """The command as floats, or :class:`TwinError` naming the offending value and limit."""
        v, w, d = float(insertion_speed_mm_s), float(roll_rate_rad_s), float(spin_duty)
        if not (math.isfinite(v) and math.isfinite(w) and math.isfinite(d)):
            raise TwinError(f"servo_jv refused: non-finite values {(v, w, d)}")
        if abs(v) > self.config.max_insertion_speed_mm_s:
            raise TwinError(
                f"servo_jv refused: insertion speed {v:.3f} mm/s beyond +/-{self.config.max_insertion_speed_mm_s}"
            )
        if not 0.0 <= d <= 1.0:
            raise TwinError(f"servo_jv refused: spin_duty {d!r} outside [0, 1]")
        return v, w, d

    def command(self, insertion_speed_mm_s: float, roll_rate_rad_s: float, spin_duty: float) -> None:
        """Validate and hold joint velocities (negative insertion retracts, spinning)."""
        v, w, d = self.validate(insertion_speed_mm_s, roll_rate_rad_s, spin_duty)
        if v < 0.0:
            self._command = NeedleCommand(0.0, 0.0, 1.0)
            self._retract_speed_mm_s = -v
        else:
            self._command = NeedleCommand(v, w, d)
            self._retract_speed_mm_s = 0.0

    def hold(self) -> None:
        """Zero velocities."""
        self._command = NeedleCommand(0.0, 0.0, 0.0)
        self._retract_speed_mm_s = 0.0

    def step(self, dt_s: float) -> None:
        """Advance the needle by ``dt_s`` seconds under the held command."""
        if self._retract_speed_mm_s > 0.0:
            target = max(0.0, self._state.inserted_length_mm - self._retract_speed_mm_s * dt_s)
            while len(self._history) > 1 and self._history[-1][0] > target:
                self._history.pop()
            length, T = self._history[-1]
            self._state = NeedleState(T.copy(), self._state.torsion_windup_rad, length)
            if length <= 0.0:
                self._retract_speed_mm_s = 0.0
        elif self._command.insertion_speed_mm_s > 0.0 or self._command.rotation_rate_rad_s != 0.0:
            self._state = step_needle(self._state, self._command, dt_s, self._needle, self._tissue)
            self._roll_rad += self._command.rotation_rate_rad_s * dt_s
            self._history.append((self._state.inserted_length_mm, self._state.T_world_from_tip.copy()))

    def tip_pose_mm(self) -> FloatArray:
        """True tip pose (4x4, patient mm)."""
        return self._state.T_world_from_tip.copy()

    def path_points_mm(self, spacing_mm: float = 1.0) -> FloatArray:
        """Tip positions (N, 3) from zero insertion to now, about every ``spacing_mm`` (the shaft)."""
        pts = [self._history[0][1][:3, 3]]
        last = 0.0
        for length, T in self._history[1:]:
            if length - last >= spacing_mm:
                pts.append(T[:3, 3])
                last = length
        pts.append(self._state.T_world_from_tip[:3, 3])
        return np.array(pts, dtype=float)

    def joints(self) -> TwinJoints:
        """Insertion and roll with their rates."""
        v = -self._retract_speed_mm_s if self._retract_speed_mm_s > 0 else self._command.insertion_speed_mm_s
        return TwinJoints(self._state.inserted_length_mm, self._roll_rad, v, self._command.rotation_rate_rad_s)

    def sample_tracker(self, t_s: float, dropout: bool) -> list[EMMeasurement]:
        """Tracker measurements of the true tip that arrive by ``t_s``; none while ``dropout``."""
        if not self._tracker_started:
            self._tracker = EMTracker(self._tracker.params, np.random.default_rng(self.config.seed), t0_s=t_s)
            self._tracker_started = True
        self._tracker.sample(t_s, self._state.T_world_from_tip, force_dropout=dropout)
        return self._tracker.receive(t_s)


class NeedleModelTwin:
    """Ideal guide (pose interpolation) + :class:`NeedleStage` (``sim_node.backend: kinematic``)."""

    name = "kinematic"

    def __init__(self, config: TwinConfig) -> None:
        self.config = config
        self._guide = np.array(config.home_T_patient_from_tip_mm, dtype=float)
        self._stage = NeedleStage(config, self._guide)
        self._motion: tuple[FloatArray, FloatArray, float, float] | None = None  # start, goal, duration, elapsed

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """See :class:`TwinBackend` (nothing to open)."""

    def close(self) -> None:
        """See :class:`TwinBackend` (nothing to release)."""

    def T_patient_from_robot_base_mm(self) -> FloatArray | None:
        """See :class:`TwinBackend`: the node's ``robot_base_*`` parameters place the base."""
        return None

    # ------------------------------------------------------------------ commands
    def move_guide(self, T_patient_from_tip_mm: FloatArray) -> None:
        """See :class:`TwinBackend`."""
        self._stage.require_retracted("move_cp")
        goal = np.asarray(T_patient_from_tip_mm, dtype=float)
        start = self._guide.copy()
        dist = float(np.linalg.norm(goal[:3, 3] - start[:3, 3]))
        angle = float(Rotation.from_matrix(start[:3, :3].T @ goal[:3, :3]).magnitude())
        duration = max(dist / self.config.guide_speed_mm_s, angle / self.config.guide_rotation_speed_rad_s, 1e-3)
        self._stage.hold()
        self._motion = (start, goal, duration, 0.0)

    def servo_guide(self, T_patient_from_tip_mm: FloatArray) -> None:
        """See :class:`TwinBackend`."""
        self._stage.require_retracted("servo_cp")
        goal = np.asarray(T_patient_from_tip_mm, dtype=float)
        step = float(np.linalg.norm(goal[:3, 3] - self._guide[:3, 3]))
        if step > self.config.max_servo_step_mm:
            raise TwinError(f"servo_cp refused: step {step:.2f} mm > max_servo_step_mm {self.config.max_servo_step_mm}")
        self._motion = None
        self._set_guide(goal)

    def servo_joints(self, insertion_speed_mm_s: float, roll_rate_rad_s: float, spin_duty: float) -> None:
        """See :class:`TwinBackend`."""
        v, w, _d = self._stage.validate(insertion_speed_mm_s, roll_rate_rad_s, spin_duty)
        if self._motion is not None and (v != 0.0 or w != 0.0):
            raise TwinError("servo_jv refused: the guide is still moving (move_cp in progress)")
        self._stage.command(insertion_speed_mm_s, roll_rate_rad_s, spin_duty)

    def hold(self) -> None:
        """See :class:`TwinBackend`."""
        self._stage.hold()
        self._motion = None

    # ------------------------------------------------------------------ simulation
    def _set_guide(self, T: FloatArray) -> None:
        self._guide = T.copy()
        self._stage.place(T)

    def step(self, t_s: float, dt_s: float) -> None:
        """See :class:`TwinBackend`."""
        if self._motion is not None:
            start, goal, duration, elapsed = self._motion
            elapsed = min(elapsed + dt_s, duration)
            u = elapsed / duration
            T = np.eye(4)
            T[:3, 3] = start[:3, 3] + u * (goal[:3, 3] - start[:3, 3])
            slerp = Slerp([0.0, 1.0], Rotation.from_matrix(np.stack([start[:3, :3], goal[:3, :3]])))
            T[:3, :3] = slerp([u]).as_matrix()[0]
            self._set_guide(goal if u >= 1.0 else T)
            self._motion = None if u >= 1.0 else (start, goal, duration, elapsed)
        else:
            self._stage.step(dt_s)

    def tip_pose_mm(self) -> FloatArray:
        """See :class:`TwinBackend`."""
        return self._stage.tip_pose_mm()

    def joints(self) -> TwinJoints:
        """See :class:`TwinBackend`."""
        return self._stage.joints()

    def busy(self) -> bool:
        """See :class:`TwinBackend`."""
        return self._motion is not None

    def sample_tracker(self, t_s: float, dropout: bool) -> list[EMMeasurement]:
        """See :class:`TwinBackend`."""
        return self._stage.sample_tracker(t_s, dropout)

    def status(self) -> dict[str, Any]:
        """See :class:`TwinBackend`."""
        return {"backend": self.name, "anatomy": "none (kinematic twin has no anatomy)"}


__all__ = [
    "RETRACTED_MM",
    "NeedleModelTwin",
    "NeedleStage",
    "TwinBackend",
    "TwinConfig",
    "TwinError",
    "TwinJoints",
]
