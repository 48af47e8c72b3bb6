"""``control_node``: execute approved trajectories behind the execution gate.

``/control/execute`` (``std_srvs/Trigger``) answers at once: it asks the pure gate
(:func:`needle_steering.nodes.approvals.check_execution`) and either refuses with the reason or
starts. Progress goes to ``/control/status`` (JSON, transient-local). Each approved trajectory,
in plan order, runs through the phases

``retract`` (only if the needle is still inserted) -> ``align`` (``move_cp``: tip at the entry,
+z along the first path segment) -> ``insert`` (tip EKF + sliding-mode controller + safety
monitor from :mod:`needle_steering.control`, ``servo_jv`` every period) -> ``retract``.

Every control period the node re-checks: e-stop, the plan hash and the trajectory's approval
(a new plan or a voided approval stops the insertion), tracker and robot-state freshness
(watchdog), the robot's operating state, and the safety monitor. A stop sends ``servo_jv``
zero at once and latches; ``/control/reset`` clears it only when the e-stop input is released,
the robot is still and the sensors are fresh. Everything is audited (append-only JSON lines).

All callbacks share one mutually exclusive callback group: no two run at the same time.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from geometry_msgs.msg import PoseStamped, TransformStamped
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, String
from std_srvs.srv import Trigger
from visualization_msgs.msg import Marker

from needle_steering.control.controller import ControllerParams, SlidingModeController
from needle_steering.control.estimator import EstimatorParams, TipEKF
from needle_steering.control.needle_model import HOLD, NeedleCommand, NeedleParams
from needle_steering.control.replanner import ArcReplanner, Path
from needle_steering.control.safety import SafetyLimits, SafetyMonitor, SafetyObservation
from needle_steering.control.sensors import EMMeasurement
from needle_steering.errors import NeedleSteeringError
from needle_steering.nodes.approvals import (
    ApprovalError,
    ApprovalSet,
    check_execution,
    check_trajectory_still_approved,
    parse_approvals,
    parse_plan_message,
)
from needle_steering.nodes.audit import AuditLog
from needle_steering.nodes.conversions import (
    MM_PER_M,
    PATIENT_FRAME,
    ROBOT_BASE_FRAME,
    ConversionError,
    T_mm_from_pose_stamped,
    T_mm_from_transform_stamped,
    frame_with_z_axis,
    invert_rigid,
    pose_stamped_msg,
)
from needle_steering.nodes.interfaces import (
    CONTROL,
    CONTROL_ESTOP,
    CONTROL_STATUS,
    CONTROL_STATUS_MARKER,
    CONTROL_TIP,
    PLAN_APPROVALS,
    PLAN_DOCUMENT,
    ROBOT_NS,
    T_PATIENT_FROM_ROBOT,
    TRACKER_POSE,
    current_values,
    declare_parameters,
)
from needle_steering.nodes.ros_helpers import guarded, parse_json_object, publisher, run_node, subscription
from needle_steering.nodes.twin import RETRACTED_MM
from needle_steering.planning.plan_document import PlanDocument, Trajectory

IFACE = CONTROL
STATES = ("idle", "executing", "done", "stopped", "fault")
#: Joint speed below which the robot counts as still (mm/s).
STILL_MM_S = 1e-3
SETTLE_S = 0.05  # samples must be received this long after the hold command
SETTLE_TIMEOUT_S = 2.0
#: Guide orientation error accepted before inserting (rad).
ALIGN_ANGLE_RAD = math.radians(1.0)


def status_text_marker(status: dict[str, Any], stamp: Any) -> Marker:
    """A text marker (frame ``patient``, 5 cm above the origin) showing the control state."""
    marker = Marker()
    marker.header.frame_id = PATIENT_FRAME
    marker.header.stamp = stamp
    marker.ns = "control_status"
    marker.type = Marker.TEXT_VIEW_FACING
    marker.action = Marker.ADD
    marker.pose.position.z = 0.05
    marker.pose.orientation.w = 1.0
    marker.scale.z = 0.01
    colours = {"executing": (0.2, 0.6, 1.0), "done": (0.1, 0.85, 0.2), "stopped": (1.0, 0.2, 0.1)}
    r, g, b = colours.get(str(status["state"]), (1.0, 0.6, 0.0) if status["state"] == "fault" else (0.9, 0.9, 0.9))
    marker.color.r, marker.color.g, marker.color.b, marker.color.a = r, g, b, 1.0
    text = f"control: {status['state']}"
    if status.get("trajectory"):
        text += f" {status['trajectory']} ({status.get('phase', '')})"
    if status.get("reason"):
        text += f"\n{status['reason']}"
    marker.text = text
    return marker


def _stamp_s(stamp: Any) -> float:
    return float(stamp.sec) + float(stamp.nanosec) * 1e-9


def _rounded_or_none(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


@dataclass
class _Run:
    """One execution: trajectories to run in order and the active phase."""

    plan_sha256: str
    queue: list[str]
    skipped: list[str]
    index: int = 0
    phase: str = "retract"
    phase_t0: float = 0.0
    move_sent: bool = False
    ekf: TipEKF | None = None
    controller: SlidingModeController | None = None
    safety: SafetyMonitor | None = None
    results: list[dict[str, Any]] = field(default_factory=list)
    pending: dict[str, Any] | None = None  # reached, waiting for the robot to settle before measuring

    @property
    def current(self) -> str:
        return self.queue[self.index] if self.index < len(self.queue) else ""


class ControlNode(Node):
    """See module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(IFACE.name, **kwargs)
        params = declare_parameters(self, IFACE)
        self._group = MutuallyExclusiveCallbackGroup()
        self._audit = AuditLog(params["audit_log"])
        # inputs
        self._plan: PlanDocument | None = None
        self._plan_problem = "nothing received on /plan/document"
        self._approvals: ApprovalSet | None = None
        self._estop_input = False
        self._estop_latched = False
        self._T_patient_from_robot: np.ndarray | None = None
        self._tracker: EMMeasurement | None = None
        self._robot_tip: tuple[float, np.ndarray] | None = None  # stamp, T_patient_from_tip (mm)
        self._robot_tip_raw: tuple[float, np.ndarray] | None = None  # stamp, T_robot_from_tip (mm)
        self._joints: tuple[float, float, float] | None = None  # stamp, insertion_mm, speed_mm_s
        self._operating: dict[str, Any] | None = None
        self._operating_problem = "nothing received on operating_state"
        # execution
        self._state = "idle"
        self._reason = ""
        self._latched = ""
        self._run: _Run | None = None
        self._last_results: list[dict[str, Any]] = []
        # ROS
        self._pub_status = publisher(self, IFACE, CONTROL_STATUS)
        self._pub_tip = publisher(self, IFACE, CONTROL_TIP)
        self._pub_status_marker = publisher(self, IFACE, CONTROL_STATUS_MARKER)
        self._pub_move = publisher(self, IFACE, f"{ROBOT_NS}/move_cp")
        self._pub_jv = publisher(self, IFACE, f"{ROBOT_NS}/servo_jv")
        g = self._group
        subscription(self, IFACE, PLAN_DOCUMENT, self._on_plan, g)
        subscription(self, IFACE, PLAN_APPROVALS, self._on_approvals, g)
        subscription(self, IFACE, CONTROL_ESTOP, self._on_estop, g)
        subscription(self, IFACE, TRACKER_POSE, self._on_tracker, g)
        subscription(self, IFACE, T_PATIENT_FROM_ROBOT, self._on_registration, g)
        subscription(self, IFACE, f"{ROBOT_NS}/measured_cp", self._on_measured_cp, g)
        subscription(self, IFACE, f"{ROBOT_NS}/measured_js", self._on_measured_js, g)
        subscription(self, IFACE, f"{ROBOT_NS}/operating_state", self._on_operating_state, g)
        self.create_service(Trigger, "/control/execute", self._on_execute, callback_group=g)
        self.create_service(Trigger, "/control/reset", self._on_reset, callback_group=g)
        self._timer = self.create_timer(1.0 / float(params["control_rate_hz"]), self._tick, callback_group=g)
        self.create_timer(1.0, self._publish_status, callback_group=g)
        self._audit.append({"event": "control_started", "node": self.get_name()})
        self._publish_status()
        self.get_logger().info(
            f"ready: {params['control_rate_hz']} Hz control, tracker watchdog {params['sensor_timeout_s']} s, "
            f"audit log {params['audit_log'] or '(none)'}"
        )

    def close(self) -> None:
        """Hold the robot and close the audit log (called at shutdown)."""
        import rclpy

        try:
            if rclpy.ok(context=self.context):
                self._send_jv(HOLD)
        except RuntimeError as exc:  # rclpy's RCLError: a signal shut the context down after the check
            self.get_logger().warning(f"hold not sent at shutdown ({exc}); the driver's command timeout stops it")
        finally:
            self._audit.close()

    # ------------------------------------------------------------------ helpers
    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _p(self) -> dict[str, Any]:
        return current_values(self, IFACE)

    def _audit_event(self, event: str, **fields: Any) -> None:
        self._audit.append({"event": event, "plan_sha256": self._plan.sha256 if self._plan else None, **fields})

    def _publish_status(self) -> None:
        run = self._run
        now = self._now()
        body = {
            "state": self._state,
            "trajectory": run.current if run else "",
            "phase": run.phase if run else "",
            "reason": self._reason,
            "estop_latched": self._estop_latched,
            "plan_sha256": self._plan.sha256 if self._plan else None,
            # the decisions this node holds (what the gate will use), for the operator's display
            "approvals_plan_sha256": self._approvals.plan_sha256 if self._approvals else None,
            "approved": [r.trajectory_id for r in self._approvals.approvals] if self._approvals else [],
            "queue": list(run.queue) if run else [],
            "skipped": list(run.skipped) if run else [],
            "results": list(run.results) if run else self._last_results,
            # why /control/execute would be refused on the robot's account now ("" when it is ready)
            "robot_problem": self._robot_problem(now) or "",
            "tracker_age_s": _rounded_or_none(self._sensor_age(now), 3),
            "stamp_s": round(now, 3),
        }
        self._pub_status.publish(String(data=json.dumps(body, sort_keys=True)))
        self._pub_status_marker.publish(status_text_marker(body, self.get_clock().now().to_msg()))

    def _set_state(self, state: str, reason: str) -> None:
        if state != self._state or reason != self._reason:
            self._state, self._reason = state, reason
            self.get_logger().info(f"state {state}: {reason}")
        self._publish_status()

    def _send_jv(self, cmd: NeedleCommand) -> None:
        msg = JointState()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.name = ["insertion", "roll", "spin_duty"]
        msg.velocity = [cmd.insertion_speed_mm_s / MM_PER_M, cmd.rotation_rate_rad_s, cmd.spin_duty]
        self._pub_jv.publish(msg)

    def _send_retract(self, speed_mm_s: float) -> None:
        msg = JointState()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.name = ["insertion", "roll", "spin_duty"]
        msg.velocity = [-speed_mm_s / MM_PER_M, 0.0, 1.0]
        self._pub_jv.publish(msg)

    def _halt(self, state: str, reason: str) -> None:
        """Stop at once (zero velocities), latch, audit."""
        self._send_jv(HOLD)
        run = self._run
        if run is not None:
            self._last_results = list(run.results)
        self._run = None
        self._latched = reason
        self._audit_event(
            "stopped" if state == "stopped" else "fault",
            reason=reason,
            trajectory_id=run.current if run else "",
            phase=run.phase if run else "",
            inserted_mm=self._joints[1] if self._joints else None,
        )
        self._set_state(state, reason)

    def _sensor_age(self, now: float) -> float | None:
        return None if self._tracker is None else now - self._tracker.stamp_s

    def _robot_problem(self, now: float) -> str | None:
        timeout = float(self._p()["sensor_timeout_s"])
        if self._T_patient_from_robot is None:
            return f"no robot registration received on {T_PATIENT_FROM_ROBOT}"
        if self._operating is None:
            return f"robot operating state unknown: {self._operating_problem}"
        if self._operating.get("state") != "ENABLED":
            return (
                f"robot not enabled: state {self._operating.get('state')!r} {self._operating.get('error', '')}".strip()
            )
        if self._robot_tip is None or now - self._robot_tip[0] > timeout:
            return f"robot state stale: no measured_cp within {timeout} s"
        if self._joints is None or now - self._joints[0] > timeout:
            return f"robot state stale: no measured_js within {timeout} s"
        return None

    # ------------------------------------------------------------------ inputs
    @guarded
    def _on_plan(self, msg: String) -> None:
        try:
            plan = parse_plan_message(msg.data)
        except NeedleSteeringError as exc:
            self._plan, self._plan_problem = None, f"last message on {PLAN_DOCUMENT} was rejected: {exc}"
            self.get_logger().error(self._plan_problem)
            self._audit_event("input_rejected", source=PLAN_DOCUMENT, reason=str(exc))
            if self._run is not None:
                self._halt("stopped", f"plan message rejected during execution: {exc}")
            return
        changed = self._plan is None or self._plan.sha256 != plan.sha256
        self._plan, self._plan_problem = plan, ""
        if changed:
            self._audit_event(
                "plan_received", trajectories=[{"id": t.id, "sha256": t.sha256} for t in plan.trajectories]
            )
            if self._run is not None and self._run.plan_sha256 != plan.sha256:
                self._halt("stopped", f"plan changed during execution (new plan {plan.sha256[:12]})")
            self._publish_status()

    @guarded
    def _on_approvals(self, msg: String) -> None:
        try:
            approvals = parse_approvals(msg.data)
        except ApprovalError as exc:
            self._approvals = None
            self.get_logger().error(f"rejected {PLAN_APPROVALS}: {exc}")
            self._audit_event("input_rejected", source=PLAN_APPROVALS, reason=str(exc))
            if self._run is not None:
                self._halt("stopped", f"approvals message rejected during execution: {exc}")
            return
        self._approvals = approvals
        run = self._run
        if run is not None and run.current:
            why = check_trajectory_still_approved(self._plan, approvals, run.current)
            if why:
                self._halt("stopped", f"approval withdrawn during execution: {why}")
                return
        self._publish_status()

    @guarded
    def _on_estop(self, msg: Bool) -> None:
        self._estop_input = bool(msg.data)
        if msg.data and not self._estop_latched:
            self._estop_latched = True
            self._audit_event("estop", executing=self._run is not None)
            self._halt("stopped", "e-stop")
        elif not msg.data:
            self._audit_event("estop_released", latched=self._estop_latched)

    @guarded
    def _on_tracker(self, msg: PoseStamped) -> None:
        try:
            T = T_mm_from_pose_stamped(msg, PATIENT_FRAME)
        except ConversionError as exc:
            self.get_logger().warning(f"{TRACKER_POSE} ignored: {exc}", throttle_duration_sec=5.0)
            return
        stamp = _stamp_s(msg.header.stamp)
        meas = EMMeasurement(stamp, self._now(), T[:3, 3].copy(), T[:3, 2].copy())
        if self._tracker is None or stamp > self._tracker.stamp_s:
            self._tracker = meas
        run = self._run
        if run is not None and run.ekf is not None and stamp >= run.phase_t0:
            try:
                run.ekf.fuse_em(meas)
            except NeedleSteeringError as exc:
                self.get_logger().warning(f"tracker sample not fused: {exc}", throttle_duration_sec=5.0)

    @guarded
    def _on_registration(self, msg: TransformStamped) -> None:
        try:
            self._T_patient_from_robot = T_mm_from_transform_stamped(msg, PATIENT_FRAME, ROBOT_BASE_FRAME)
        except ConversionError as exc:
            self.get_logger().error(f"{T_PATIENT_FROM_ROBOT} rejected: {exc}")
            self._audit_event("input_rejected", source=T_PATIENT_FROM_ROBOT, reason=str(exc))
            self._T_patient_from_robot = None
            if self._run is not None:
                self._halt("stopped", f"registration rejected during execution: {exc}")

    @guarded
    def _on_measured_cp(self, msg: PoseStamped) -> None:
        try:
            T_robot = T_mm_from_pose_stamped(msg, ROBOT_BASE_FRAME)
        except ConversionError as exc:
            self.get_logger().warning(f"measured_cp ignored: {exc}", throttle_duration_sec=5.0)
            return
        stamp = self._now()
        self._robot_tip_raw = (stamp, T_robot)
        if self._T_patient_from_robot is not None:
            self._robot_tip = (stamp, self._T_patient_from_robot @ T_robot)

    @guarded
    def _on_measured_js(self, msg: JointState) -> None:
        names = list(msg.name)
        if "insertion" not in names or len(msg.position) != len(names):
            self.get_logger().warning(f"measured_js ignored: joints {names}", throttle_duration_sec=5.0)
            return
        i = names.index("insertion")
        pos_mm = float(msg.position[i]) * MM_PER_M
        vel_mm_s = float(msg.velocity[i]) * MM_PER_M if len(msg.velocity) == len(names) else 0.0
        if not (math.isfinite(pos_mm) and math.isfinite(vel_mm_s)):
            self.get_logger().warning("measured_js ignored: non-finite values", throttle_duration_sec=5.0)
            return
        self._joints = (self._now(), pos_mm, vel_mm_s)

    @guarded
    def _on_operating_state(self, msg: String) -> None:
        try:
            data = parse_json_object(msg.data, f"{ROBOT_NS}/operating_state")
            if not isinstance(data.get("state"), str):
                raise ValueError(f"{ROBOT_NS}/operating_state: 'state' must be a string, got {data.get('state')!r}")
        except ValueError as exc:
            self._operating, self._operating_problem = None, str(exc)
            self.get_logger().error(str(exc))
            self._audit_event("input_rejected", source=f"{ROBOT_NS}/operating_state", reason=str(exc))
            if self._run is not None:
                self._halt("fault", f"robot operating state unreadable: {exc}")
            return
        self._operating = data
        if self._run is not None and data["state"] != "ENABLED":
            self._halt("fault", f"robot reports {data['state']}: {data.get('error', '')}")

    # ------------------------------------------------------------------ services
    @guarded
    def _on_execute(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        now = self._now()
        p = self._p()
        busy = None
        if self._run is not None:
            busy = f"already executing {self._run.current!r}"
        elif self._latched and not self._estop_latched:
            busy = f"stopped ({self._latched}); call /control/reset when safe"
        plan = self._plan
        decision = check_execution(
            plan,
            self._approvals,
            estop_latched=self._estop_latched,
            sensor_age_s=self._sensor_age(now),
            sensor_timeout_s=float(p["sensor_timeout_s"]),
            robot_ready_reason=self._robot_problem(now),
            busy_reason=busy,
        )
        if plan is None and decision.reason.startswith("no plan") and self._plan_problem:
            decision = type(decision)(False, f"no plan: {self._plan_problem}")
        if not decision.allowed:
            response.success, response.message = False, f"refused: {decision.reason}"
            self._audit_event("execute_refused", reason=decision.reason)
            self.get_logger().warning(response.message)
            self._publish_status()
            return response
        assert plan is not None and self._approvals is not None
        self._run = _Run(plan.sha256, list(decision.to_execute), list(decision.skipped), phase_t0=now)
        self._latched = ""
        self._audit_event(
            "execute_started",
            trajectories=[
                {"id": t, "sha256": plan.trajectory(t).sha256, "approval": self._approvals.approval_for(t).to_dict()}  # type: ignore[union-attr]
                for t in decision.to_execute
            ],
            skipped=list(decision.skipped),
        )
        self._set_state("executing", f"executing {len(decision.to_execute)} trajectories")
        response.success = True
        response.message = f"started: {', '.join(decision.to_execute)}" + (
            f" (rejected, skipped: {', '.join(decision.skipped)})" if decision.skipped else ""
        )
        return response

    @guarded
    def _on_reset(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        now = self._now()
        if not self._latched and not self._estop_latched:
            response.success, response.message = True, "nothing to reset"
            return response
        problems = []
        if self._estop_input:
            problems.append("e-stop input still pressed (publish false on /control/estop)")
        timeout = float(self._p()["sensor_timeout_s"])
        age = self._sensor_age(now)
        if age is None or age > timeout:
            problems.append(f"tracker data stale ({'none' if age is None else f'{age:.3f} s old'})")
        if self._joints is None or now - self._joints[0] > timeout:
            problems.append("robot joint state stale")
        elif abs(self._joints[2]) > STILL_MM_S:
            problems.append(f"robot still moving ({self._joints[2]:.3f} mm/s)")
        if self._operating is None or self._operating.get("state") != "ENABLED":
            problems.append(
                f"robot not enabled ({self._operating.get('state') if self._operating else self._operating_problem})"
            )
        if problems:
            reason = "; ".join(problems)
            self._audit_event("reset_refused", reason=reason, latched=self._latched)
            response.success, response.message = False, f"reset refused: {reason}"
            return response
        self._audit_event("reset", cleared=self._latched, estop_was_latched=self._estop_latched)
        self._latched = ""
        self._estop_latched = False
        self._set_state("idle", "reset")
        response.success, response.message = True, "reset: stop cleared; execute again to continue"
        return response

    # ------------------------------------------------------------------ control loop
    @guarded
    def _tick(self) -> None:
        run = self._run
        if run is None:
            return
        now = self._now()
        p = self._p()
        timeout = float(p["sensor_timeout_s"])
        age = self._sensor_age(now)
        if age is None or age > timeout:
            self._halt(
                "stopped",
                f"watchdog: tracker data stale ({'none' if age is None else f'{age:.3f} s old'} > {timeout} s)",
            )
            return
        problem = self._robot_problem(now)
        if problem:
            self._halt("fault", f"watchdog: {problem}")
            return
        why = check_trajectory_still_approved(self._plan, self._approvals, run.current)
        if why or self._plan is None or self._plan.sha256 != run.plan_sha256:
            self._halt("stopped", f"execution gate: {why or 'plan changed'}")
            return
        traj = self._plan.trajectory(run.current)
        assert self._joints is not None and self._robot_tip is not None
        inserted_mm = self._joints[1]
        speed = float(p["insertion_speed_mm_s"])
        if run.phase in {"retract", "retract_after"}:
            if inserted_mm <= RETRACTED_MM and abs(self._joints[2]) <= STILL_MM_S:
                self._send_jv(HOLD)
                if run.phase == "retract_after":
                    run.index += 1
                    if run.index >= len(run.queue):
                        self._finish(run)
                        return
                self._enter(run, "align", now)
            else:
                self._send_retract(speed)
            return
        if run.phase == "settle":
            self._settle(run, traj, now)
            return
        if run.phase == "align":
            self._align(run, traj, now, p)
            return
        if run.phase == "insert":
            self._insert(run, traj, now, p, inserted_mm)

    def _settle(self, run: _Run, traj: Trajectory, now: float) -> None:
        """Measure the reached tip once the robot holds still.

        Robot and tracker samples arrive with transport latency; measured at the moment the controller
        declares "reached" they describe the needle a few tens of milliseconds earlier. The result is taken
        from samples received after the hold was commanded and while the insertion axis is still.
        """
        assert run.pending is not None and self._joints is not None and self._robot_tip is not None
        assert self._tracker is not None
        fresh = min(self._joints[0], self._robot_tip[0], self._tracker.stamp_s) > run.phase_t0 + SETTLE_S
        if not (fresh and abs(self._joints[2]) <= STILL_MM_S):
            if now - run.phase_t0 > SETTLE_TIMEOUT_S:
                self._halt(
                    "fault",
                    f"robot did not hold still within {SETTLE_TIMEOUT_S} s after reaching {traj.id!r} "
                    f"(insertion speed {self._joints[2]:.3f} mm/s)",
                )
            return
        target = np.asarray(traj.tip_lps_mm, dtype=float)
        result = {
            **run.pending,
            "robot_tip_error_mm": round(float(np.linalg.norm(self._robot_tip[1][:3, 3] - target)), 3),
            "tracker_tip_error_mm": round(float(np.linalg.norm(self._tracker.position_mm - target)), 3),
            "inserted_mm": round(self._joints[1], 3),
        }
        run.results.append(result)
        run.pending = None
        self._audit_event(
            "trajectory_reached", trajectory_id=traj.id, **{k: v for k, v in result.items() if k != "trajectory"}
        )
        self._enter(run, "retract_after", now)

    def _enter(self, run: _Run, phase: str, now: float) -> None:
        run.phase, run.phase_t0, run.move_sent = phase, now, False
        self._publish_status()

    def _entry_pose(self, traj: Trajectory) -> np.ndarray:
        pts = np.asarray(traj.path_lps_mm, dtype=float)
        return frame_with_z_axis(pts[0], pts[1] - pts[0])

    def _align(self, run: _Run, traj: Trajectory, now: float, p: dict[str, Any]) -> None:
        assert self._T_patient_from_robot is not None and self._robot_tip is not None
        goal = self._entry_pose(traj)
        if not run.move_sent:
            T_robot_goal = invert_rigid(self._T_patient_from_robot) @ goal
            self._pub_move.publish(pose_stamped_msg(T_robot_goal, ROBOT_BASE_FRAME, self.get_clock().now().to_msg()))
            run.move_sent = True
            self._audit_event("align", trajectory_id=traj.id, entry_lps_mm=list(traj.entry_lps_mm))
            return
        T = self._robot_tip[1]
        err_mm = float(np.linalg.norm(T[:3, 3] - goal[:3, 3]))
        angle = math.acos(max(-1.0, min(1.0, float(T[:3, 2] @ goal[:3, 2]))))
        busy = bool(self._operating and self._operating.get("is_busy"))
        if err_mm <= float(p["align_tolerance_mm"]) and angle <= ALIGN_ANGLE_RAD and not busy:
            self._start_insertion(run, traj, now, p, T)
            return
        if now - run.phase_t0 > float(p["align_timeout_s"]):
            self._halt(
                "fault",
                f"align timeout: guide {err_mm:.2f} mm / {math.degrees(angle):.2f} deg from the entry "
                f"of {traj.id!r} after {p['align_timeout_s']} s",
            )

    def _start_insertion(self, run: _Run, traj: Trajectory, now: float, p: dict[str, Any], T_start: np.ndarray) -> None:
        period = 1.0 / float(p["control_rate_hz"])
        needle = NeedleParams(kappa_per_mm=float(p["needle_kappa_per_mm"]))
        path = Path.from_points(np.asarray(traj.path_lps_mm, dtype=float))
        speed = float(p["insertion_speed_mm_s"])
        depth_limit = traj.length_mm + float(p["target_tolerance_mm"]) + 2.0
        run.ekf = TipEKF(
            T_start, now, needle, EstimatorParams(em_position_sigma_mm=float(p["tracker_position_sigma_mm"]))
        )
        run.controller = SlidingModeController(
            np.asarray(traj.tip_lps_mm, dtype=float),
            needle,
            ControllerParams(
                insertion_speed_mm_s=speed,
                control_period_s=period,
                target_tolerance_mm=float(p["target_tolerance_mm"]),
                max_depth_mm=depth_limit,
                cbct_trigger_distance_mm=0.0,
            ),
            path=path,
            replanner=ArcReplanner(),
        )
        run.safety = SafetyMonitor(
            SafetyLimits(
                max_insertion_speed_mm_s=speed * 1.05,
                max_depth_mm=depth_limit,
                corridor_radius_mm=float(p["max_lateral_error_mm"]),
                sensor_timeout_s=float(p["sensor_timeout_s"]),
            ),
            path.points_mm,
        )
        self._audit_event("insert", trajectory_id=traj.id, trajectory_sha256=traj.sha256)
        self._enter(run, "insert", now)

    def _insert(self, run: _Run, traj: Trajectory, now: float, p: dict[str, Any], inserted_mm: float) -> None:
        assert run.ekf is not None and run.controller is not None and run.safety is not None
        est = run.ekf.estimate(now)
        self._pub_tip.publish(pose_stamped_msg(est.T_world_from_tip, PATIENT_FRAME, self.get_clock().now().to_msg()))
        out = run.controller.step(now, est, inserted_mm)
        if out.replanned and run.controller.path is not None:
            run.safety.set_path(run.controller.path.points_mm)
        if out.status == "reached":
            self._send_jv(HOLD)
            target = np.asarray(traj.tip_lps_mm, dtype=float)
            run.pending = {
                "trajectory": traj.id,
                "reached": True,
                "estimated_tip_error_mm": round(float(np.linalg.norm(est.position_mm - target)), 3),
                "reason": out.reason,
            }
            run.ekf = run.controller = run.safety = None
            self._enter(run, "settle", now)
            return
        if out.status == "aborted":
            self._halt("fault", f"controller aborted {traj.id!r}: {out.reason}")
            return
        assert self._tracker is not None
        obs = SafetyObservation(
            t_s=now,
            tip_position_mm=est.position_mm,
            command=out.command,
            inserted_length_mm=inserted_mm,
            last_measurement_stamp_s=self._tracker.stamp_s,
            dt_s=1.0 / float(p["control_rate_hz"]),
            measured_position_mm=self._tracker.position_mm,
            measured_stamp_s=self._tracker.stamp_s,
            consecutive_rejections=run.ekf.consecutive_rejections,
        )
        cmd = run.safety.check(obs)
        if run.safety.tripped:
            trip = run.safety.active_trip
            self._halt("stopped", f"safety monitor: {trip.reason}: {trip.detail}" if trip else "safety monitor trip")
            return
        run.ekf.apply_command(now, cmd)
        self._send_jv(cmd)

    def _finish(self, run: _Run) -> None:
        self._last_results = list(run.results)
        self._audit_event("execute_done", results=run.results, skipped=run.skipped)
        self._run = None
        self._set_state(
            "done",
            f"{len(run.results)} trajectories reached"
            + (f"; skipped (rejected): {', '.join(run.skipped)}" if run.skipped else ""),
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``control_node``."""
    return run_node(ControlNode, argv, multi_threaded=False)  # one callback group: see run_node


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
