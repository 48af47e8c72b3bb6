"""PyBullet backend of ``sim_node`` (``sim_node.backend: pybullet``): a KUKA iiwa holds the needle guide.

:class:`PyBulletTwinBackend` implements :class:`needle_steering.nodes.twin.TwinBackend` on top of
:class:`needle_steering.sim.twin.Twin`:

* **Placement.** The patient lies prone in front of the arm
  (:func:`~needle_steering.sim.twin.prone_T_robot_from_patient_m`): ``patient_anchor_lps_mm`` sits at
  the workspace anchor ``(0.60, 0, 0.25)`` m of the arm base, turned by ``patient_yaw_deg`` about
  the vertical (0: the arm beside the table, at the patient's left; 90: at the head end). The arm
  base *is* the ``robot_base`` frame of the CRTK topics, so :meth:`T_patient_from_robot_base_mm` is
  this placement (the node publishes it as the registration).
* **Tool point.** ``move_cp`` / ``measured_cp`` poses are the needle tip at zero insertion. The guide
  exit is held ``guide_standoff_mm`` behind it on the same axis (the guide sleeve must not touch
  bone; the entry of a pedicle screw is on the cortex), so a retracted needle protrudes that much
  from the guide. The needle's bevel roll is set by the needle driver: the tool frame takes the
  commanded roll about the achieved guide axis (the guide is axisymmetric).
* **Alignment.** ``move_guide`` solves the guide pose by inverse kinematics
  (:meth:`Twin.solve_ik`: IK verified by forward kinematics, arm and guide clearance from the
  anatomy and the table) and plans a joint-space path: straight to the goal when every sample of
  it keeps the clearances, otherwise back out ``approach_mm`` along the current guide axis, move
  to ``approach_mm`` before the goal and approach along the goal axis. The path is followed at
  ``guide_speed_mm_s`` (guide tip) and at most ``max_joint_speed_rad_s``. Planning runs as small
  chunks inside :meth:`step` (one IK solve or a few clearance samples per step) so the simulation
  thread keeps publishing while it plans; the twin is ``busy`` until the guide has arrived.
  Unreachable or colliding goals are refused with the reason (:class:`TwinError`).
* **Needle.** The insertion stage and the needle model (:class:`~needle_steering.nodes.twin.NeedleStage`)
  drive the tip from the tool point; the tip tracker samples the true tip with noise and latency.
  At ``contact_rate_hz`` the needle's PyBullet bodies follow the tip path and their clearance to the
  critical structures (spinal canal, aorta, vena cava) is measured; it is reported in
  :meth:`status` (``/sim/state``), never hidden: a contact is logged as an event.
* **Anatomy.** The label map (``load_labels``: the phantom's ground truth or a label-map file) is
  loaded and meshed in a child process (pure numpy / SciPy / scikit-image / Open3D, no PyBullet);
  the owner thread adds the meshes as collision bodies at the next step, together with the table
  under the patient. Until then :meth:`status` says ``loading`` and motions are checked against
  the table only. A process, not a thread: phantom generation and Open3D's mesh decimation hold
  the GIL for hundreds of milliseconds, which stalled the simulation thread (and with it the
  tracker stream, tripping the control node's 0.25 s watchdog) when they ran on a thread.

Threading: every :class:`Twin` call happens on the thread that called :meth:`start` (``sim_node``'s
simulation thread); the child process never touches PyBullet.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING, Any

import numpy as np

from needle_steering.control.geometry import FloatArray
from needle_steering.control.sensors import EMMeasurement
from needle_steering.errors import NeedleSteeringError
from needle_steering.nodes.twin import RETRACTED_MM, NeedleStage, TwinConfig, TwinError, TwinJoints
from needle_steering.sim.twin.frames import MM_PER_M

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from needle_steering.perception.volume import Volume
    from needle_steering.sim.twin import AnatomyMesh, Twin
    from needle_steering.sim.twin.twin import ClearanceReport

#: Names of the iiwa joints on ``measured_js`` (after ``insertion`` and ``roll``).
ARM_JOINT_NAMES = tuple(f"lbr_iiwa_joint_{j + 1}" for j in range(7))
#: Largest guide-tip travel (mm) or joint change (rad) between two clearance samples of a path.
_SAMPLE_MM = 5.0
_SAMPLE_RAD = 0.05
#: Spacing of the IK samples on straight back-out and approach legs along the guide axis (mm).
_LINE_STEP_MM = 5.0
#: Largest joint change between two samples of a straight leg (rad); more means the IK changed branch.
_LINE_MAX_JUMP_RAD = 0.3
#: IK restarts inside one :meth:`Twin.solve_ik` call (one planning chunk); the planner adds its
#: own seed postures and rolls about the guide axis (:data:`_IK_SEEDS`), one chunk each.
_IK_RESTARTS = 4
_IK_SEEDS = 8
#: The table top sits this far below the most anterior labelled voxel (mm).
_TABLE_GAP_MM = 5.0
#: Clearance samples evaluated per simulation step while planning.
_SAMPLES_PER_STEP = 16
#: Distance queries of planning reach this far beyond the larger required clearance (mm):
#: PyBullet's closest-point queries get much slower with the query distance (~40 ms at 50 mm
#: near the spine, ~0.3 ms at 10 mm), and only violations matter for planning; reported
#: clearances at or above the query distance mean "at least that much".
_QUERY_MARGIN_MM = 5.0


@dataclass(frozen=True)
class ArmSceneConfig:
    """Settings of the PyBullet scene (units in the names).

    Attributes:
        patient_anchor_lps_mm: Patient point placed at the arm's workspace anchor (prone placement).
        patient_yaw_deg: Rotation of the prone patient about the vertical through the anchor: 0 puts
            the patient's left toward the arm base (the arm beside the table), 90 the head (the arm
            at the head end: lateral approaches from both sides are reachable).
        guide_standoff_mm: Distance from the guide exit to the tool point (needle tip at zero insertion).
        approach_mm: Distance the guide backs out / approaches along its axis when a direct path
            between two poses would collide.
        max_joint_speed_rad_s: Joint speed limit of the arm.
        contact_rate_hz: Rate of the needle-vs-critical-structure clearance check.
        mesh_target_triangles: Triangle budget per anatomy mesh.
        anatomy_source: Text naming where the label map comes from (for the status).
        seed: Seed of the twin's IK restart postures.
    """

    patient_anchor_lps_mm: tuple[float, float, float] = (0.0, 0.0, -320.0)
    patient_yaw_deg: float = 0.0
    guide_standoff_mm: float = 20.0
    approach_mm: float = 60.0
    max_joint_speed_rad_s: float = 1.0
    contact_rate_hz: float = 20.0
    mesh_target_triangles: int = 3000
    anatomy_source: str = "none"
    seed: int = 0

    def __post_init__(self) -> None:
        anchor = np.asarray(self.patient_anchor_lps_mm, dtype=float)
        if anchor.shape != (3,) or not np.all(np.isfinite(anchor)):
            raise TwinError(f"patient_anchor_lps_mm must be 3 finite numbers, got {self.patient_anchor_lps_mm!r}")
        if not math.isfinite(self.patient_yaw_deg):
            raise TwinError(f"patient_yaw_deg must be finite, got {self.patient_yaw_deg!r}")
        for name in ("guide_standoff_mm", "approach_mm"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value >= 0.0):
                raise TwinError(f"{name} must be finite and >= 0, got {value!r}")
        for name in ("max_joint_speed_rad_s", "contact_rate_hz"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0.0):
                raise TwinError(f"{name} must be finite and > 0, got {value!r}")
        if self.mesh_target_triangles < 100:
            raise TwinError(f"mesh_target_triangles must be >= 100, got {self.mesh_target_triangles!r}")


@dataclass(frozen=True)
class _Anatomy:
    """What the anatomy process hands to the owner thread."""

    meshes: tuple[AnatomyMesh, ...]
    table_top_z_m: float
    seconds: float


def _prepare_anatomy(
    load: Callable[[], Volume], T_robot_from_patient_m: FloatArray, target_triangles: int
) -> _Anatomy:
    """Load the label map, mesh it and place the table under it (runs in the anatomy process).

    Returns:
        The meshes (LPS mm) and the table-top height in the robot base frame (m).

    Raises:
        NeedleSteeringError: the label map holds nothing to mesh (or the loader's own errors).
    """
    from needle_steering.sim.twin import label_meshes
    from needle_steering.sim.twin.frames import patient_mm_to_robot_m

    t0 = time.perf_counter()
    labels = load()
    meshes = tuple(label_meshes(labels, target_triangles=target_triangles))
    if not meshes:
        raise NeedleSteeringError("the label map holds no vertebra or critical structure to mesh")
    arr = np.asarray(labels.array)
    nz = np.argwhere(arr > 0)
    corners = labels.index_to_lps(np.array([nz.min(axis=0), nz.max(axis=0)], dtype=float))
    box = np.array(np.meshgrid(*corners.T, indexing="ij")).reshape(3, -1).T
    z_min = float(np.min(patient_mm_to_robot_m(T_robot_from_patient_m, box)[:, 2]))
    return _Anatomy(meshes, z_min - _TABLE_GAP_MM / MM_PER_M, time.perf_counter() - t0)


def _anatomy_process_main(
    load: Callable[[], Volume], T_robot_from_patient_m: FloatArray, target_triangles: int, conn: Connection
) -> None:
    """Entry point of the anatomy process: sends ``("ok", _Anatomy)`` or ``("failed", reason)``."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, 0, 10)  # background work: the simulation and control loops come first
    try:
        conn.send(("ok", _prepare_anatomy(load, T_robot_from_patient_m, target_triangles)))
    except Exception as exc:  # the parent reports it in the twin's status
        conn.send(("failed", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()


class _AnatomyProcess:
    """The anatomy built in a spawned child process, polled without blocking by the owner thread.

    A process, not a thread: phantom generation and Open3D's decimation hold the GIL for hundreds of
    milliseconds, which stalls the simulation thread. Spawned, not forked: the parent runs DDS threads.
    """

    def __init__(self, load: Callable[[], Volume], T_robot_from_patient_m: FloatArray, target_triangles: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child_conn = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=_anatomy_process_main, args=(load, T_robot_from_patient_m, target_triangles, child_conn),
            name="sim_node-anatomy", daemon=True,
        )  # fmt: skip
        try:
            self._process.start()  # pickles the loader: a closure or lambda fails here
        except BaseException:
            self._conn.close()
            raise
        finally:
            child_conn.close()

    def poll(self) -> _Anatomy | str | None:
        """The anatomy, a failure reason, or ``None`` while the process is still working."""
        if self._conn.poll():
            try:
                kind, value = self._conn.recv()
            except EOFError:
                return self._died()
            self.close()
            return value if kind == "ok" else str(value)
        if not self._process.is_alive():
            return self._died()
        return None

    def _died(self) -> str:
        self._process.join(1.0)
        code = self._process.exitcode
        self.close()
        return f"the anatomy process exited without a result (exit code {code})"

    def close(self) -> None:
        """Stop the process if it is still working (idempotent)."""
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(2.0)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(2.0)
        self._conn.close()


@dataclass(frozen=True)
class _Pose:
    """An IK result for planning: joints (``None`` when refused) and why, with the achieved accuracy."""

    q: FloatArray | None
    reason: str
    position_error_mm: float
    angle_error_deg: float
    arm_clearance_mm: float
    guide_clearance_mm: float


@dataclass(frozen=True)
class _Leg:
    """Part of an arm path: joint waypoints followed with one smooth start and stop."""

    name: str
    waypoints: list[FloatArray]
    duration_s: float = 0.0


@dataclass
class _Motion:
    """A planned arm path being followed."""

    legs: list[_Leg]
    roll_reference: FloatArray  # goal tool rotation (3, 3): its x-axis sets the needle roll
    leg: int = 0
    elapsed_s: float = 0.0


def _translate_z(T: FloatArray, dz: float) -> FloatArray:
    """``T`` moved by ``dz`` along its own z-axis (same unit as its translation)."""
    out = np.array(T, dtype=float)
    out[:3, 3] = out[:3, 3] + dz * out[:3, 2]
    return out


def _with_roll(T: FloatArray, R_reference: FloatArray) -> FloatArray:
    """``T`` with its z-axis kept and its x-axis as close as possible to ``R_reference``'s x-axis."""
    z = T[:3, 2] / np.linalg.norm(T[:3, 2])
    x: FloatArray = R_reference[:, 0] - float(R_reference[:, 0] @ z) * z
    if np.linalg.norm(x) < 1e-6:  # reference x along the axis: use the reference y instead
        y_ref = R_reference[:, 1] - float(R_reference[:, 1] @ z) * z
        x = np.asarray(np.cross(y_ref, z), dtype=np.float64)
    x = x / np.linalg.norm(x)
    out = np.array(T, dtype=float)
    out[:3, :3] = np.column_stack([x, np.cross(z, x), z])
    return out


def _finite_or_none(value: float, digits: int = 3) -> float | None:
    return round(float(value), digits) if math.isfinite(value) else None


class PyBulletTwinBackend:
    """See the module docstring.

    Args:
        config: Needle, tracker and guide-speed settings shared with the kinematic twin
            (``home_T_patient_from_tip_mm`` is not used: the arm starts at its home posture).
        scene: Placement, guide and anatomy settings.
        load_labels: Returns the label map of the patient (LPS mm grid); ``None``: no anatomy. It runs
            in a child process, so it must be picklable (a module-level function or a
            :func:`functools.partial` of one, not a lambda or a closure).
    """

    name = "pybullet"

    def __init__(
        self, config: TwinConfig, scene: ArmSceneConfig, load_labels: Callable[[], Volume] | None = None
    ) -> None:
        from needle_steering.sim.twin import DEFAULT_ANCHOR_ROBOT_M, prone_T_robot_from_patient_m
        from needle_steering.sim.twin.frames import make_transform, pose_robot_m_to_patient_mm, rotation_about_axis

        self.config = config
        self.scene = scene
        self._load_labels = load_labels
        anchor_robot_m = np.asarray(DEFAULT_ANCHOR_ROBOT_M, dtype=float)
        prone = prone_T_robot_from_patient_m(np.asarray(scene.patient_anchor_lps_mm, float), anchor_robot_m)
        # Turn the patient about the vertical through the workspace anchor (the anchor stays put).
        R_yaw = rotation_about_axis([0.0, 0.0, 1.0], math.radians(scene.patient_yaw_deg))
        turn = make_transform(R_yaw, anchor_robot_m - R_yaw @ anchor_robot_m)
        self.T_robot_from_patient_m = turn @ prone
        self._T_patient_from_robot_mm = pose_robot_m_to_patient_mm(self.T_robot_from_patient_m, np.eye(4))
        self._twin: Twin | None = None
        self._stage: NeedleStage | None = None
        self._tool_R_reference = np.eye(3)
        self._motion: _Motion | None = None
        self._planner: Generator[None, None, None] | None = None
        self._q = np.zeros(len(ARM_JOINT_NAMES))
        self._q_rate = np.zeros(len(ARM_JOINT_NAMES))
        self._anatomy_process: _AnatomyProcess | None = None
        self._anatomy_state = "none" if load_labels is None else f"loading ({scene.anatomy_source})"
        self._anatomy_names: list[str] = []
        self._critical_names: list[str] = []
        self._contact_period_s = 1.0 / scene.contact_rate_hz
        self._next_contact_s = 0.0
        self._critical_clearance_mm = math.inf
        self._critical_body = ""
        self._insertion_min_clearance_mm = math.inf
        self._insertion_min_body = ""
        self._critical_contacts = 0
        self._in_contact = False
        self._was_inserted = False
        self._insertion_index = 0
        self._deepest_mm = 0.0
        self._deepest_tip_lps_mm: FloatArray | None = None
        self._last_move: dict[str, Any] = {}
        self._moves_planned = 0
        self._moves_refused = 0
        self._events: list[str] = []

    # ------------------------------------------------------------------ lifecycle (owner thread)
    def start(self) -> None:
        """Connect PyBullet on this thread (the owner), build the cell, start loading the anatomy."""
        from needle_steering.sim.twin import Twin
        from needle_steering.sim.twin import TwinConfig as PyBulletConfig
        from needle_steering.sim.twin.frames import patient_mm_to_robot_m

        twin = Twin(PyBulletConfig(ik_restarts=_IK_RESTARTS), seed=self.scene.seed)
        twin.connect()
        self._twin = twin
        twin.set_patient(self.T_robot_from_patient_m)
        # Until the anatomy (and with it the patient's extent) is known, the table sits 150 mm
        # below the anchor; it moves under the most anterior labelled voxel when the anatomy loads.
        anchor_robot_m = patient_mm_to_robot_m(self.T_robot_from_patient_m, self.scene.patient_anchor_lps_mm)
        twin.add_table(float(anchor_robot_m[2]) - 150.0 / MM_PER_M)
        self._q = twin.measured_js()
        tool = self._tool_pose_mm()
        self._tool_R_reference = tool[:3, :3].copy()
        self._stage = NeedleStage(self.config, tool)
        if self._load_labels is not None:
            try:
                self._anatomy_process = _AnatomyProcess(
                    self._load_labels, self.T_robot_from_patient_m, self.scene.mesh_target_triangles
                )
            except Exception as exc:  # reported in the status; the twin keeps running without anatomy
                self._anatomy_failed(f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        """Disconnect PyBullet and stop the anatomy process (owner thread; idempotent)."""
        process, self._anatomy_process = self._anatomy_process, None
        if process is not None:
            process.close()
        twin, self._twin = self._twin, None
        if twin is not None:
            twin.close()

    def T_patient_from_robot_base_mm(self) -> FloatArray:
        """The prone placement of the patient in front of the arm, as ``T_patient_from_robot_base`` (mm)."""
        return self._T_patient_from_robot_mm.copy()

    # ------------------------------------------------------------------ anatomy (child process: no PyBullet)
    def _poll_anatomy(self) -> None:
        process = self._anatomy_process
        if process is None:
            return
        result = process.poll()
        if result is None:
            return
        self._anatomy_process = None
        if isinstance(result, str):
            self._anatomy_failed(result)
            return
        twin = self._require_twin()
        twin.add_anatomy(list(result.meshes))
        twin.add_table(result.table_top_z_m)
        self._anatomy_names = [m.name for m in result.meshes]
        self._critical_names = [m.name for m in result.meshes if m.kind == "critical"]
        self._anatomy_state = (
            f"loaded ({self.scene.anatomy_source}, {len(result.meshes)} meshes, {result.seconds:.1f} s)"
        )
        self._events.append(f"anatomy {self._anatomy_state}")

    def _anatomy_failed(self, reason: str) -> None:
        self._anatomy_state = f"failed: {reason}"
        self._events.append(f"anatomy {self._anatomy_state}")

    @property
    def anatomy_loaded(self) -> bool:
        """Whether the anatomy meshes are collision bodies of the twin."""
        return self._anatomy_state.startswith("loaded")

    # ------------------------------------------------------------------ helpers (owner thread)
    def _require_twin(self) -> Twin:
        if self._twin is None:
            raise TwinError("the PyBullet twin is not started (start() runs on the simulation thread)")
        return self._twin

    def _require_stage(self) -> NeedleStage:
        if self._stage is None:
            raise TwinError("the PyBullet twin is not started (start() runs on the simulation thread)")
        return self._stage

    def _tool_pose_mm(self) -> FloatArray:
        """Tool point (needle tip at zero insertion) from forward kinematics, patient mm, with the commanded roll."""
        from needle_steering.sim.twin.frames import pose_robot_m_to_patient_mm

        guide_mm = pose_robot_m_to_patient_mm(self.T_robot_from_patient_m, self._require_twin().measured_cp())
        tool = _translate_z(guide_mm, self.scene.guide_standoff_mm)
        return _with_roll(tool, self._tool_R_reference)

    def _guide_goal_robot_m(self, T_patient_from_tip_mm: FloatArray) -> FloatArray:
        from needle_steering.sim.twin.frames import pose_patient_mm_to_robot_m

        guide_mm = _translate_z(np.asarray(T_patient_from_tip_mm, dtype=float), -self.scene.guide_standoff_mm)
        return pose_patient_mm_to_robot_m(self.T_robot_from_patient_m, guide_mm)

    def _set_arm(self, q: FloatArray) -> None:
        self._require_twin().set_joint_positions(q)
        self._q = np.asarray(q, dtype=float).copy()

    # ------------------------------------------------------------------ commands
    def move_guide(self, T_patient_from_tip_mm: FloatArray) -> None:
        """See :class:`~needle_steering.nodes.twin.TwinBackend`: plan (in chunks) and follow an arm path."""
        stage = self._require_stage()
        self._require_twin()
        stage.require_retracted("move_cp")
        goal = np.asarray(T_patient_from_tip_mm, dtype=float)
        stage.hold()
        self._motion = None
        self._planner = self._plan_motion(goal)

    def servo_guide(self, T_patient_from_tip_mm: FloatArray) -> None:
        """See :class:`~needle_steering.nodes.twin.TwinBackend`: one IK solve, the arm jumps there."""
        stage = self._require_stage()
        twin = self._require_twin()
        stage.require_retracted("servo_cp")
        goal = np.asarray(T_patient_from_tip_mm, dtype=float)
        step = float(np.linalg.norm(goal[:3, 3] - stage.tip_pose_mm()[:3, 3]))
        if step > self.config.max_servo_step_mm:
            raise TwinError(f"servo_cp refused: step {step:.2f} mm > max_servo_step_mm {self.config.max_servo_step_mm}")
        sol = twin.solve_ik(self._guide_goal_robot_m(goal))
        if not sol.ok:
            raise TwinError(f"servo_cp refused: {sol.reason}")
        self._motion, self._planner = None, None
        self._set_arm(sol.joints_rad)
        self._tool_R_reference = goal[:3, :3].copy()
        stage.place(self._tool_pose_mm())

    def servo_joints(self, insertion_speed_mm_s: float, roll_rate_rad_s: float, spin_duty: float) -> None:
        """See :class:`~needle_steering.nodes.twin.TwinBackend`."""
        stage = self._require_stage()
        v, w, _d = stage.validate(insertion_speed_mm_s, roll_rate_rad_s, spin_duty)
        if self.busy() and (v != 0.0 or w != 0.0):
            raise TwinError("servo_jv refused: the guide is still moving (move_cp in progress)")
        stage.command(insertion_speed_mm_s, roll_rate_rad_s, spin_duty)

    def hold(self) -> None:
        """See :class:`~needle_steering.nodes.twin.TwinBackend`: the arm stops where it is."""
        if self._stage is not None:
            self._stage.hold()
        self._motion, self._planner = None, None

    # ------------------------------------------------------------------ motion planning (generator, owner thread)
    def _refuse(self, reason: str) -> None:
        self._moves_refused += 1
        self._last_move = {"ok": False, "reason": reason}
        self._events.append(reason)
        raise TwinError(reason)

    def _query_mm(self) -> float:
        cfg = self._require_twin().config
        return max(cfg.min_arm_clearance_mm, cfg.min_guide_clearance_mm) + _QUERY_MARGIN_MM

    def _solve(self, T_robot_from_guide_m: FloatArray, seed_q: FloatArray) -> Generator[None, None, _Pose]:
        """A collision-free IK solution for a guide pose (generator: one chunk per IK solve).

        :meth:`Twin.solve_ik` without its own clearance check (its 50 mm distance queries take
        ~40 ms near the spine), from ``seed_q`` first, then from the home posture and seeded
        random postures with rolls about the guide axis (the guide is axisymmetric); each
        kinematic solution is checked with a short-range clearance query.
        """
        from needle_steering.sim.twin.frames import make_transform, rotation_about_axis

        twin = self._require_twin()
        cfg = twin.config
        q_restore = self._q.copy()
        lower, upper = twin.joint_limits_rad
        home = np.asarray(cfg.home_joints_rad, dtype=float)
        unreachable, collisions = "", ""
        best_pos, best_ang = math.inf, math.inf
        for k in range(_IK_SEEDS):
            if k == 0:
                seed = np.asarray(seed_q, dtype=float)
            elif k == 1:
                seed = home
            else:
                rng = np.random.default_rng([self.scene.seed, 7919, k])
                seed = np.clip(home + rng.uniform(-0.3, 0.3, len(home)) * (upper - lower) / 2, lower, upper)
            roll = 2.0 * math.pi * k / _IK_SEEDS
            T_k = T_robot_from_guide_m @ make_transform(rotation_about_axis([0.0, 0.0, 1.0], roll), np.zeros(3))
            try:
                twin.set_joint_positions(seed)
                sol = twin.solve_ik(T_k, check_clearance=False)
                best_pos = min(best_pos, sol.position_error_mm)
                best_ang = min(best_ang, sol.angle_error_deg)
                if sol.ok:
                    twin.set_joint_positions(sol.joints_rad)
                    report = twin.clearance(query_mm=self._query_mm())
                    if report.ok(cfg):
                        return _Pose(sol.joints_rad, "", sol.position_error_mm, sol.angle_error_deg,
                                     report.arm_mm, report.guide_mm)
                    collisions = collisions or report.describe(cfg)
                else:
                    unreachable = unreachable or sol.reason
            finally:
                twin.set_joint_positions(q_restore)
            yield None
        reason = collisions or unreachable
        return _Pose(None, f"{reason} ({_IK_SEEDS} seed postures tried)", best_pos, best_ang, math.nan, math.nan)

    def _cartesian(
        self, T_from_robot_m: FloatArray, T_to_robot_m: FloatArray, q_from: FloatArray
    ) -> Generator[None, None, tuple[list[FloatArray], str]]:
        """Joint waypoints moving the guide on a straight line (position) with slerped orientation.

        Samples every :data:`_LINE_STEP_MM` / 3 deg; each is solved from the previous one (the arm
        stays on its branch) and checked for clearance (one chunk per sample). Returns
        ``(waypoints starting at q_from, "")`` or ``([], reason)``.
        """
        from scipy.spatial.transform import Rotation, Slerp

        twin = self._require_twin()
        cfg = twin.config
        p_a, p_b = T_from_robot_m[:3, 3], T_to_robot_m[:3, 3]
        rotations = Rotation.from_matrix(np.stack([T_from_robot_m[:3, :3], T_to_robot_m[:3, :3]]))
        angle = float((rotations[0].inv() * rotations[1]).magnitude())
        travel_mm = float(np.linalg.norm(p_b - p_a)) * MM_PER_M
        n = max(1, math.ceil(travel_mm / _LINE_STEP_MM), math.ceil(math.degrees(angle) / 3.0))
        slerp = Slerp([0.0, 1.0], rotations)
        q_restore = self._q.copy()
        waypoints = [np.asarray(q_from, dtype=float)]
        for k in range(1, n + 1):
            u = k / n
            T = np.eye(4)
            T[:3, :3] = slerp([u]).as_matrix()[0]
            T[:3, 3] = p_a + u * (p_b - p_a)
            where = f"{u * travel_mm:.0f} mm along the line:"
            try:
                twin.set_joint_positions(waypoints[-1])
                sol = twin.solve_ik(T, check_clearance=False)
                if not sol.ok:
                    return [], f"{where} {sol.reason}"
                jump = float(np.max(np.abs(sol.joints_rad - waypoints[-1])))
                if jump > _LINE_MAX_JUMP_RAD:
                    return [], f"{where} the arm changes posture ({jump:.2f} rad)"
                twin.set_joint_positions(sol.joints_rad)
                report = twin.clearance(query_mm=self._query_mm())
                if not report.ok(cfg):
                    return [], f"{where} {report.describe(cfg)}"
                waypoints.append(sol.joints_rad)
            finally:
                twin.set_joint_positions(q_restore)
            yield None
        return waypoints, ""

    def _plan_motion(self, goal_tip_mm: FloatArray) -> Generator[None, None, None]:
        """Chunks of planning work; sets ``self._motion`` at the end or raises :class:`TwinError`.

        Candidate paths, the first collision-free one wins: joint-space straight to the goal; then,
        for approach distances ``approach_mm``, half and a quarter of it: back out straight along
        the current guide axis, cross over in joint space, approach straight along the goal axis
        (or only one of the two straight legs).
        """
        twin = self._require_twin()
        t0 = time.perf_counter()
        q_now = self._q.copy()
        goal_robot = self._guide_goal_robot_m(goal_tip_mm)
        current_robot = twin.measured_cp()
        goal = yield from self._solve(goal_robot, q_now)
        if goal.q is None:
            self._refuse(f"move_cp refused: {goal.reason}")
        assert goal.q is not None
        problems: list[str] = []
        legs: list[_Leg] | None = None
        reason = yield from self._path_problem([q_now, goal.q])
        if not reason:
            legs = [_Leg("direct", [q_now, goal.q])]
        else:
            problems.append(f"direct: {reason}")
        distances = [d for d in (self.scene.approach_mm, self.scene.approach_mm / 2, self.scene.approach_mm / 4)
                     if d >= _LINE_STEP_MM]
        for d_mm in distances if legs is None else []:
            back_pose = _translate_z(current_robot, -d_mm / MM_PER_M)
            pre_pose = _translate_z(goal_robot, -d_mm / MM_PER_M)
            back, back_reason = yield from self._cartesian(current_robot, back_pose, q_now)
            approach_out, approach_reason = yield from self._cartesian(goal_robot, pre_pose, goal.q)
            approach = approach_out[::-1]
            if back_reason:
                problems.append(f"back out {d_mm:g} mm: {back_reason}")
            if approach_reason:
                problems.append(f"approach {d_mm:g} mm: {approach_reason}")
            back_leg = _Leg(f"back out {d_mm:g} mm", back)
            approach_leg = _Leg(f"approach {d_mm:g} mm", approach)
            candidates: list[list[_Leg]] = []
            if back and approach:
                cross, cross_reason = yield from self._cartesian(back_pose, pre_pose, back[-1])
                if cross:
                    candidates.append(
                        [back_leg, _Leg("cross over (line)", cross), _Leg("settle", [cross[-1], approach[0]]),
                         approach_leg]
                    )
                else:
                    problems.append(f"cross over {d_mm:g} mm (line): {cross_reason}")
                candidates.append([back_leg, _Leg("cross over (joints)", [back[-1], approach[0]]), approach_leg])
            if back:
                candidates.append([back_leg, _Leg("to the goal", [back[-1], goal.q])])
            if approach:
                candidates.append([_Leg("to the approach", [q_now, approach[0]]), approach_leg])
            for candidate in candidates:
                for leg in candidate:
                    if len(leg.waypoints) == 2:  # joint-space leg: sample it (straight legs are checked)
                        reason = yield from self._path_problem(leg.waypoints)
                        if reason:
                            problems.append(f"{' + '.join(x.name for x in candidate)}: {leg.name}: {reason}")
                            break
                else:
                    legs = candidate
                    break
            if legs is not None:
                break
        if legs is None:
            self._refuse("move_cp refused: no collision-free arm path: " + "; ".join(problems))
        assert legs is not None
        timed = [_Leg(leg.name, leg.waypoints, self._leg_duration(leg.waypoints)) for leg in legs]
        self._set_arm(q_now)
        self._moves_planned += 1
        self._last_move = {
            "ok": True,
            "reason": "",
            "legs": [leg.name for leg in timed],
            "duration_s": round(sum(leg.duration_s for leg in timed), 3),
            "planning_s": round(time.perf_counter() - t0, 3),
            "ik_position_error_mm": _finite_or_none(goal.position_error_mm, 6),
            "ik_angle_error_deg": _finite_or_none(goal.angle_error_deg, 6),
            "arm_clearance_mm": _finite_or_none(goal.arm_clearance_mm, 2),
            "guide_clearance_mm": _finite_or_none(goal.guide_clearance_mm, 2),
            "clearance_query_mm": self._query_mm(),
            "anatomy_checked": self.anatomy_loaded,
        }
        if not self.anatomy_loaded:
            self._events.append("move_cp planned before the anatomy was loaded: checked against the table only")
        self._motion = _Motion(timed, np.asarray(goal_tip_mm, dtype=float)[:3, :3].copy())

    def _path_problem(self, waypoints: list[FloatArray]) -> Generator[None, None, str]:
        """Clearance along a joint-space path (generator); returns the first violation or ``""``."""
        twin = self._require_twin()
        q_restore = self._q.copy()
        query_mm = self._query_mm()
        done = 0
        try:
            for a, b in pairwise(waypoints):
                twin.set_joint_positions(a)
                pa = twin.measured_cp()[:3, 3]
                twin.set_joint_positions(b)
                pb = twin.measured_cp()[:3, 3]
                travel_mm = float(np.linalg.norm(pb - pa)) * MM_PER_M
                n = max(2, math.ceil(max(travel_mm / _SAMPLE_MM, float(np.max(np.abs(b - a))) / _SAMPLE_RAD)))
                for k in range(1, n + 1):
                    twin.set_joint_positions(a + (b - a) * (k / n))
                    report = twin.clearance(query_mm=query_mm)
                    if not report.ok(twin.config):
                        return report.describe(twin.config)
                    done += 1
                    if done % _SAMPLES_PER_STEP == 0:
                        twin.set_joint_positions(q_restore)
                        yield None
        finally:
            twin.set_joint_positions(q_restore)
        return ""

    def _leg_duration(self, waypoints: list[FloatArray]) -> float:
        """Time for a leg: guide-tip speed, guide rotation speed and joint speed limits (s)."""
        twin = self._require_twin()
        q_restore = self._q.copy()
        total = 0.0
        try:
            poses = []
            for q in waypoints:
                twin.set_joint_positions(q)
                poses.append(twin.measured_cp())
        finally:
            twin.set_joint_positions(q_restore)
        for (a, Ga), (b, Gb) in pairwise(zip(waypoints, poses, strict=True)):
            travel_mm = float(np.linalg.norm(Gb[:3, 3] - Ga[:3, 3])) * MM_PER_M
            angle = math.acos(max(-1.0, min(1.0, float(Ga[:3, 2] @ Gb[:3, 2]))))
            joint = float(np.max(np.abs(b - a)))
            total += max(
                travel_mm / self.config.guide_speed_mm_s,
                angle / self.config.guide_rotation_speed_rad_s,
                joint / self.scene.max_joint_speed_rad_s,
            )
        # The smooth start/stop of a leg peaks at 1.5x the mean speed: stretch so the peak respects the limits.
        return max(1.5 * total, 0.05)

    # ------------------------------------------------------------------ simulation (owner thread)
    def step(self, t_s: float, dt_s: float) -> None:
        """See :class:`~needle_steering.nodes.twin.TwinBackend`.

        Raises:
            TwinError: a move being planned turned out unreachable or colliding (the arm has not moved).
        """
        stage = self._require_stage()
        self._poll_anatomy()
        q_before = self._q.copy()
        if self._planner is not None:
            try:
                next(self._planner)
            except StopIteration:
                self._planner = None
            except TwinError:
                self._planner = None
                raise
        elif self._motion is not None:
            self._advance_motion(dt_s)
            stage.place(self._tool_pose_mm())
        else:
            stage.step(dt_s)
        self._q_rate = (self._q - q_before) / dt_s if dt_s > 0 else np.zeros_like(self._q)
        self._track_insertion(stage)
        if t_s >= self._next_contact_s:
            self._next_contact_s = t_s + self._contact_period_s
            self._check_contacts()

    def _advance_motion(self, dt_s: float) -> None:
        motion = self._motion
        assert motion is not None
        motion.elapsed_s += dt_s
        while motion.leg < len(motion.legs) and motion.elapsed_s >= motion.legs[motion.leg].duration_s:
            motion.elapsed_s -= motion.legs[motion.leg].duration_s
            motion.leg += 1
        if motion.leg >= len(motion.legs):
            self._set_arm(motion.legs[-1].waypoints[-1])
            self._tool_R_reference = motion.roll_reference
            self._motion = None
            return
        leg = motion.legs[motion.leg]
        u = motion.elapsed_s / leg.duration_s
        x = u * u * (3.0 - 2.0 * u) * (len(leg.waypoints) - 1)  # smooth start and stop of each leg
        i = min(int(x), len(leg.waypoints) - 2)
        a, b = leg.waypoints[i], leg.waypoints[i + 1]
        self._set_arm(a + (b - a) * (x - i))

    def _track_insertion(self, stage: NeedleStage) -> None:
        """Count insertions; keep each insertion's deepest tip (ground truth of where the needle stopped)."""
        inserted = stage.inserted_mm > RETRACTED_MM
        if inserted and not self._was_inserted:
            self._insertion_index += 1
            self._insertion_min_clearance_mm, self._insertion_min_body = math.inf, ""
            self._deepest_mm, self._deepest_tip_lps_mm = 0.0, None
        self._was_inserted = inserted
        if inserted and stage.inserted_mm > self._deepest_mm:
            self._deepest_mm = stage.inserted_mm
            self._deepest_tip_lps_mm = stage.tip_pose_mm()[:3, 3].copy()

    def _check_contacts(self) -> None:
        """Needle bodies follow the tip path; clearance to the critical structures (mm)."""
        stage = self._require_stage()
        twin = self._require_twin()
        if not self._critical_names or self.busy():
            twin.hide_needle()
            self._critical_clearance_mm, self._critical_body = math.inf, ""
            return
        guide_exit = _translate_z(self._tool_pose_mm(), -self.scene.guide_standoff_mm)[:3, 3]
        shaft = np.vstack([guide_exit[None, :], stage.path_points_mm()])
        twin.set_needle(shaft, stage.tip_pose_mm())
        report = twin.needle_contact(kinds=("critical",), query_mm=20.0)
        clearance = report.clearance_mm if report.body else math.inf
        self._critical_clearance_mm, self._critical_body = clearance, report.body
        if clearance < self._insertion_min_clearance_mm:
            self._insertion_min_clearance_mm, self._insertion_min_body = clearance, report.body
        if report.in_contact and not self._in_contact:
            self._critical_contacts += 1
            self._events.append(
                f"needle contact with {report.body} ({report.clearance_mm:.2f} mm) at {stage.inserted_mm:.1f} mm"
            )
        self._in_contact = report.in_contact

    # ------------------------------------------------------------------ state
    def tip_pose_mm(self) -> FloatArray:
        """See :class:`~needle_steering.nodes.twin.TwinBackend` (true tip: arm kinematics + needle model)."""
        return self._require_stage().tip_pose_mm()

    def joints(self) -> TwinJoints:
        """Insertion, roll and the seven arm joints (rad, rad/s)."""
        j = self._require_stage().joints()
        return TwinJoints(
            j.insertion_mm, j.roll_rad, j.insertion_speed_mm_s, j.roll_rate_rad_s,
            ARM_JOINT_NAMES, tuple(float(v) for v in self._q), tuple(float(v) for v in self._q_rate),
        )

    def busy(self) -> bool:
        """Whether a guide motion is being planned or followed."""
        return self._planner is not None or self._motion is not None

    def sample_tracker(self, t_s: float, dropout: bool) -> list[EMMeasurement]:
        """See :class:`~needle_steering.nodes.twin.TwinBackend`."""
        return self._require_stage().sample_tracker(t_s, dropout)

    def clearance(self, query_mm: float = 50.0) -> ClearanceReport:
        """Arm and guide clearances (mm) to the anatomy and the table now (owner thread; for displays and tests)."""
        return self._require_twin().clearance(query_mm=query_mm)

    def pop_events(self) -> list[str]:
        """Events since the last call (anatomy loaded, refusals, needle contacts), for the node's log."""
        events, self._events = self._events, []
        return events

    def status(self) -> dict[str, Any]:
        """Backend state for ``/sim/state``."""
        return {
            "backend": self.name,
            "anatomy": self._anatomy_state,
            "anatomy_loaded": self.anatomy_loaded,
            "anatomy_meshes": list(self._anatomy_names),
            "patient_anchor_lps_mm": [float(v) for v in self.scene.patient_anchor_lps_mm],
            "guide_standoff_mm": self.scene.guide_standoff_mm,
            "busy": self.busy(),
            "needle_critical_clearance_mm": _finite_or_none(self._critical_clearance_mm),
            "needle_critical_body": self._critical_body,
            "insertion_index": self._insertion_index,
            "insertion_depth_mm": round(self._deepest_mm, 4),
            "insertion_deepest_tip_lps_mm": None
            if self._deepest_tip_lps_mm is None
            else [round(float(v), 4) for v in self._deepest_tip_lps_mm],
            "insertion_min_critical_clearance_mm": _finite_or_none(self._insertion_min_clearance_mm),
            "insertion_min_critical_body": self._insertion_min_body,
            "critical_contacts": self._critical_contacts,
            "moves_planned": self._moves_planned,
            "moves_refused": self._moves_refused,
            "last_move": dict(self._last_move),
        }


__all__ = ["ARM_JOINT_NAMES", "ArmSceneConfig", "PyBulletTwinBackend"]
