"""``sim_node``: the digital twin behind the topics a real robot driver would offer.

CRTK names as on the dVRK, under ``/needle_robot``: ``servo_cp`` / ``move_cp`` (guide pose,
``robot_base`` frame), ``servo_jv`` (insertion, roll, spin-duty pseudo-joint), ``measured_cp``,
``measured_js`` and ``operating_state``. The simulated EM tracker publishes the tip in
``patient`` on ``/tracker/measured_cp`` (header stamp = acquisition time), and the twin's
registration is published on ``/registration/T_patient_from_robot_base`` (and its inverse).

The simulator behind the topics is chosen by the ``backend`` parameter
(:func:`needle_steering.nodes.core_adapters.make_twin_backend`): ``pybullet`` (default; a KUKA iiwa
aligns the guide by IK in :class:`needle_steering.sim.twin.Twin`, the patient's label map loaded as
collision bodies, see :mod:`needle_steering.nodes.twin_pybullet`) or ``kinematic`` (the
needle-model twin: an ideal guide, no arm, no anatomy). ``/sim/state`` publishes the backend's
ground truth (anatomy, needle clearance to critical structures, where each insertion stopped,
the last arm motion); the controller never reads it.

Threading: ROS callbacks only validate and enqueue; one simulation thread owns the
:class:`~needle_steering.nodes.twin.TwinBackend` from ``start`` (PyBullet connects on it) to
``close`` (steps it, applies queued commands, publishes). A ``servo_jv`` older than
``command_timeout_s`` is replaced by zero joint velocities, and a stalled simulation thread never
integrates more than ``command_timeout_s`` at once.
"""

from __future__ import annotations

import functools
import json
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from geometry_msgs.msg import PoseStamped
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.time import Time
from sensor_msgs.msg import JointState
from std_msgs.msg import String

from needle_steering.control.sensors import EMMeasurement
from needle_steering.nodes import core_adapters
from needle_steering.nodes.conversions import (
    MM_PER_M,
    PATIENT_FRAME,
    ROBOT_BASE_FRAME,
    ConversionError,
    T_mm_from_pose_stamped,
    frame_with_z_axis,
    invert_rigid,
    pose_stamped_msg,
    transform_stamped_msg,
)
from needle_steering.nodes.interfaces import (
    ROBOT_NS,
    SIM,
    SIM_FAULT,
    SIM_STATE,
    T_PATIENT_FROM_ROBOT,
    T_ROBOT_FROM_PATIENT,
    TRACKER_POSE,
    declare_parameters,
)
from needle_steering.nodes.ros_helpers import guarded, parse_json_object, publisher, run_node, subscription
from needle_steering.nodes.twin import TwinBackend, TwinConfig, TwinError, TwinJoints

if TYPE_CHECKING:
    from needle_steering.perception.volume import Volume

IFACE = SIM
_FAULT_KEYS = ("tracker_dropout", "tracker_frozen")
#: A simulation-loop gap this long (s) is reported: the twin stopped publishing meanwhile, so the
#: control node's tracker watchdog may trip on the twin's account, not the stack's.
STALL_REPORT_S = 0.1


def robot_base_pose_mm(origin_lps_mm: Sequence[float], yaw_deg: float) -> np.ndarray:
    """``T_patient_from_robot_base`` (mm) from the base origin and its rotation about patient +z."""
    c, s = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
    T = np.eye(4)
    T[:2, :2] = [[c, -s], [s, c]]
    T[:3, 3] = np.asarray(origin_lps_mm, dtype=float)
    return T


def joint_state_msg(joints: TwinJoints, stamp: Any) -> JointState:
    """CRTK ``measured_js``: insertion (m), roll (rad), then the arm's joints (rad), with velocities."""
    msg = JointState()
    msg.header.stamp = stamp
    msg.name = ["insertion", "roll", *joints.arm_names]
    msg.position = [joints.insertion_mm / MM_PER_M, joints.roll_rad, *joints.arm_positions_rad]
    msg.velocity = [joints.insertion_speed_mm_s / MM_PER_M, joints.roll_rate_rad_s, *joints.arm_velocities_rad_s]
    return msg


class SimNode(Node):
    """See module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(IFACE.name, **kwargs)
        p = declare_parameters(self, IFACE)
        self._p = p
        self._backend = self._make_backend(p)
        T_base = self._backend.T_patient_from_robot_base_mm()
        if T_base is None:
            T_base = robot_base_pose_mm(p["robot_base_in_patient_mm"], float(p["robot_base_yaw_deg"]))
        self._T_patient_from_robot = np.asarray(T_base, dtype=float)
        self._T_robot_from_patient = invert_rigid(self._T_patient_from_robot)
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=1000)
        self._stop = threading.Event()
        group = MutuallyExclusiveCallbackGroup()
        self._pub_cp = publisher(self, IFACE, f"{ROBOT_NS}/measured_cp")
        self._pub_js = publisher(self, IFACE, f"{ROBOT_NS}/measured_js")
        self._pub_state = publisher(self, IFACE, f"{ROBOT_NS}/operating_state")
        self._pub_tracker = publisher(self, IFACE, TRACKER_POSE)
        self._pub_sim_state = publisher(self, IFACE, SIM_STATE)
        pub_reg = publisher(self, IFACE, T_PATIENT_FROM_ROBOT)
        pub_reg_inv = publisher(self, IFACE, T_ROBOT_FROM_PATIENT)
        subscription(self, IFACE, f"{ROBOT_NS}/servo_cp", self._on_servo_cp, group)
        subscription(self, IFACE, f"{ROBOT_NS}/move_cp", self._on_move_cp, group)
        subscription(self, IFACE, f"{ROBOT_NS}/servo_jv", self._on_servo_jv, group)
        subscription(self, IFACE, SIM_FAULT, self._on_fault, group)
        stamp = self.get_clock().now().to_msg()
        pub_reg.publish(transform_stamped_msg(self._T_patient_from_robot, PATIENT_FRAME, ROBOT_BASE_FRAME, stamp))
        pub_reg_inv.publish(transform_stamped_msg(self._T_robot_from_patient, ROBOT_BASE_FRAME, PATIENT_FRAME, stamp))
        self._thread = threading.Thread(target=self._run, name="sim_node-simulator", daemon=True)
        self._thread.start()

    def _make_backend(self, p: dict[str, Any]) -> TwinBackend:
        """The configured simulator (``backend`` parameter), not started yet (the simulation thread starts it)."""
        from needle_steering.nodes.twin_pybullet import ArmSceneConfig

        home = np.asarray(p["home_tip_lps_mm"], dtype=float)
        config = TwinConfig(
            home_T_patient_from_tip_mm=frame_with_z_axis(home, (0.0, 1.0, 0.0)),
            needle_kappa_per_mm=float(p["needle_kappa_per_mm"]),
            tissue_curvature_scale=float(p["tissue_curvature_scale"]),
            guide_speed_mm_s=float(p["guide_speed_mm_s"]),
            max_insertion_speed_mm_s=float(p["max_insertion_speed_mm_s"]),
            max_servo_step_mm=float(p["max_servo_step_mm"]),
            tracker_rate_hz=float(p["tracker_rate_hz"]),
            tracker_position_sigma_mm=float(p["tracker_position_sigma_mm"]),
            tracker_latency_s=float(p["tracker_latency_s"]),
            seed=int(p["seed"]),
        )
        anatomy = str(p["anatomy"]).strip()
        load_labels: Callable[[], Volume] | None = None
        source = "none"
        if anatomy and anatomy != "none":
            seed, levels, spacing = int(p["phantom_seed"]), str(p["phantom_levels"]), float(p["phantom_spacing_mm"])
            source = f"phantom seed {seed} {levels} {spacing:g} mm" if anatomy == "phantom" else anatomy

            # a partial of a module-level function: the PyBullet backend calls it in a child process
            load_labels = functools.partial(core_adapters.twin_anatomy_labels, anatomy, seed, levels, spacing)

        scene = ArmSceneConfig(
            patient_anchor_lps_mm=tuple(float(v) for v in p["patient_anchor_lps_mm"]),  # type: ignore[arg-type]
            patient_yaw_deg=float(p["patient_yaw_deg"]),
            guide_standoff_mm=float(p["guide_standoff_mm"]),
            approach_mm=float(p["approach_mm"]),
            max_joint_speed_rad_s=float(p["max_joint_speed_rad_s"]),
            contact_rate_hz=float(p["contact_rate_hz"]),
            anatomy_source=source,
            seed=int(p["seed"]),
        )
        backend = core_adapters.make_twin_backend(config, str(p["backend"]), scene, load_labels)
        self.get_logger().info(f"twin backend {backend.name}; anatomy: {source}")
        return backend

    def close(self) -> None:
        """Stop the simulation thread (called at shutdown); the thread closes the simulator."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)

    # ------------------------------------------------------------------ callbacks: validate + enqueue
    def _enqueue(self, kind: str, payload: Any) -> None:
        try:
            self._queue.put_nowait((kind, payload))
        except queue.Full:
            self.get_logger().error(f"command queue full; {kind} dropped", throttle_duration_sec=1.0)

    def _pose_in_patient(self, msg: PoseStamped, what: str) -> np.ndarray | None:
        try:
            return self._T_patient_from_robot @ T_mm_from_pose_stamped(msg, ROBOT_BASE_FRAME)
        except ConversionError as exc:
            self._enqueue("error", f"{what} refused: {exc}")
            return None

    @guarded
    def _on_servo_cp(self, msg: PoseStamped) -> None:
        T = self._pose_in_patient(msg, "servo_cp")
        if T is not None:
            self._enqueue("servo_cp", T)

    @guarded
    def _on_move_cp(self, msg: PoseStamped) -> None:
        T = self._pose_in_patient(msg, "move_cp")
        if T is not None:
            self._enqueue("move_cp", T)

    @guarded
    def _on_servo_jv(self, msg: JointState) -> None:
        names = list(msg.name)
        if names[:2] != ["insertion", "roll"] or len(msg.velocity) != len(names) or len(names) not in (2, 3):
            self._enqueue(
                "error",
                f"servo_jv refused: expected joints [insertion, roll(, spin_duty)] with one velocity "
                f"each, got names {names} and {len(msg.velocity)} velocities",
            )
            return
        v_mm_s = float(msg.velocity[0]) * MM_PER_M
        omega = float(msg.velocity[1])
        duty = float(msg.velocity[2]) if len(names) == 3 else 0.0
        self._enqueue("servo_jv", (v_mm_s, omega, duty))

    @guarded
    def _on_fault(self, msg: String) -> None:
        try:
            data = parse_json_object(msg.data, SIM_FAULT)
            unknown = sorted(set(data) - set(_FAULT_KEYS))
            if unknown or not all(isinstance(v, bool) for v in data.values()):
                raise ValueError(f"{SIM_FAULT}: expected booleans for {list(_FAULT_KEYS)}, got {data!r}")
        except ValueError as exc:
            self.get_logger().error(str(exc))
            self._enqueue("error", str(exc))
            return
        self.get_logger().warning(f"fault injection: {data}")
        self._enqueue("fault", data)

    # ------------------------------------------------------------------ simulation thread
    def _run(self) -> None:
        """The simulation thread: owns the backend from ``start`` to ``close``."""
        try:
            self._backend.start()
        except Exception as exc:  # e.g. PyBullet cannot connect: report FAULT, never fake a robot
            reason = f"twin backend {self._backend.name} failed to start: {type(exc).__name__}: {exc}"
            self.get_logger().error(reason)
            body = {"state": "FAULT", "is_homed": False, "is_busy": False, "error": reason}
            while not self._stop.is_set() and self.context.ok():
                self._pub_state.publish(String(data=json.dumps(body, sort_keys=True)))
                self._stop.wait(1.0)
            return
        try:
            self._loop()
        finally:
            try:
                self._backend.close()
            except Exception as exc:  # shutting down: say it, do not mask the loop's exit
                self.get_logger().error(f"closing the twin backend failed: {type(exc).__name__}: {exc}")

    def _loop(self) -> None:
        p = self._p
        dt = 1.0 / float(p["rate_hz"])
        publish_period = 1.0 / float(p["publish_rate_hz"])
        state_period = 1.0 / float(p["state_rate_hz"])
        command_timeout = float(p["command_timeout_s"])
        faults = dict.fromkeys(_FAULT_KEYS, False)
        error = ""
        last_jv_s = -math.inf
        jv_active = False
        last_pub = -math.inf
        last_state_pub = -math.inf
        last_sim_state_pub = -math.inf
        last_state: tuple[bool, str] | None = None
        last_meas: EMMeasurement | None = None
        next_tracker_repeat = 0.0
        pop_events = getattr(self._backend, "pop_events", None)
        stalls, max_stall_s = 0, 0.0
        t_prev = self._now()
        wake = time.monotonic()
        while not self._stop.is_set() and self.context.ok():
            try:
                t = self._now()
                if t - t_prev >= STALL_REPORT_S:
                    stalls, max_stall_s = stalls + 1, max(max_stall_s, t - t_prev)
                    self.get_logger().warning(
                        f"simulation thread stalled {t - t_prev:.3f} s (no tracker or robot state published meanwhile)",
                        throttle_duration_sec=1.0,
                    )
                while True:
                    try:
                        kind, payload = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    try:
                        if kind == "move_cp":
                            self._backend.move_guide(payload)
                            error = ""
                        elif kind == "servo_cp":
                            self._backend.servo_guide(payload)
                            error = ""
                        elif kind == "servo_jv":
                            v, w, d = payload
                            if v == 0.0 and w == 0.0:
                                self._backend.hold()
                            else:
                                self._backend.servo_joints(v, w, d)
                            last_jv_s, jv_active = t, (v != 0.0 or w != 0.0)
                        elif kind == "fault":
                            faults.update(payload)
                        elif kind == "error":
                            error = str(payload)
                            self.get_logger().warning(error, throttle_duration_sec=1.0)
                    except TwinError as exc:
                        error = str(exc)
                        self.get_logger().warning(error, throttle_duration_sec=1.0)
                if jv_active and t - last_jv_s > command_timeout:
                    self._backend.servo_joints(0.0, 0.0, 0.0)
                    jv_active = False
                # A stalled thread (shared CPU) never integrates more than command_timeout_s at once:
                # a driver would have stopped on its command timeout meanwhile.
                step_s = min(max(t - t_prev, 0.0) or dt, command_timeout)
                try:
                    self._backend.step(t_prev, step_s)
                except TwinError as exc:  # a guide motion planned inside the step was refused
                    error = str(exc)
                    self.get_logger().warning(error)
                t_prev = t
                if callable(pop_events):
                    for event in pop_events():
                        self.get_logger().info(f"twin: {event}")
                stamp_now = self.get_clock().now().to_msg()
                for m in self._backend.sample_tracker(t, faults["tracker_dropout"]):
                    last_meas = m
                    if not faults["tracker_frozen"]:
                        self._publish_tracker(m)
                if faults["tracker_frozen"] and last_meas is not None and t >= next_tracker_repeat:
                    self._publish_tracker(last_meas)
                    next_tracker_repeat = t + 1.0 / float(p["tracker_rate_hz"])
                if t - last_pub >= publish_period:
                    last_pub = t
                    T_robot = self._T_robot_from_patient @ self._backend.tip_pose_mm()
                    self._pub_cp.publish(pose_stamped_msg(T_robot, ROBOT_BASE_FRAME, stamp_now))
                    self._pub_js.publish(joint_state_msg(self._backend.joints(), stamp_now))
                state = (self._backend.busy(), error)
                if state != last_state or t - last_state_pub >= 1.0:
                    last_state, last_state_pub = state, t
                    body = {"state": "ENABLED", "is_homed": True, "is_busy": state[0], "error": error}
                    self._pub_state.publish(String(data=json.dumps(body, sort_keys=True)))
                if t - last_sim_state_pub >= state_period:
                    last_sim_state_pub = t
                    sim_state = {
                        **self._backend.status(), "error": error, "stamp_s": round(t, 3),
                        "stalls": stalls, "max_stall_s": round(max_stall_s, 3),
                    }
                    self._pub_sim_state.publish(String(data=json.dumps(sim_state, sort_keys=True)))
            except Exception as exc:  # the simulation thread must not die silently
                self._backend.hold()
                if not self.context.ok():
                    break  # shutting down: publishers are gone
                self.get_logger().error(f"simulation step failed: {type(exc).__name__}: {exc}")
            wake += dt
            delay = wake - time.monotonic()
            if delay < -0.5:
                wake = time.monotonic()
            self._stop.wait(max(delay, 0.0))

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _publish_tracker(self, m: EMMeasurement) -> None:
        T = frame_with_z_axis(m.position_mm, m.axis)
        msg = pose_stamped_msg(T, PATIENT_FRAME, Time(nanoseconds=round(m.stamp_s * 1e9)).to_msg())
        self._pub_tracker.publish(msg)


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``sim_node``."""
    return run_node(SimNode, argv, multi_threaded=False)  # one callback group: see run_node


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
