"""``plan_review_node``: interactive-marker server on ``/plan_review`` and the only source of approvals.

Protocol and marker building live in :mod:`needle_steering.nodes.review_protocol`; decisions and
the audit log in :mod:`needle_steering.nodes.approvals` / :mod:`needle_steering.nodes.audit`.
This node only wires them to ROS:

* ``/plan/document`` -> adopt the plan (a new hash voids every decision), rebuild all markers;
* ``/plan_review/feedback`` -> Approve / Reject / Approve all (MENU_SELECT), drag of the entry
  handle (POSE_UPDATE voids the decision at once, MOUSE_UP sends the proposal to the planner);
* ``/planning/adjust_result`` -> the planner's verdict on a proposal;
* publishes ``/plan/approvals`` (transient-local) after every change and each audit record on
  ``/plan_review/events``.

All callbacks share one mutually exclusive group, so the store is never used concurrently.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from std_msgs.msg import String
from visualization_msgs.msg import InteractiveMarkerFeedback
from visualization_msgs.srv import GetInteractiveMarkers

from needle_steering.errors import NeedleSteeringError
from needle_steering.nodes.approvals import ApprovalError, ApprovalStore, parse_plan_message
from needle_steering.nodes.audit import AuditLog
from needle_steering.nodes.interfaces import (
    ADJUST_REQUEST,
    ADJUST_RESULT,
    PLAN_APPROVALS,
    PLAN_DOCUMENT,
    PLAN_REVIEW,
    REVIEW_NS,
    current_values,
    declare_parameters,
)
from needle_steering.nodes.review_protocol import MarkerServerState, interpret_feedback, trajectory_marker
from needle_steering.nodes.ros_helpers import guarded, parse_json_object, publisher, run_node, subscription
from needle_steering.planning.plan_document import PlanDocument

IFACE = PLAN_REVIEW


class _AuditTap:
    """Audit log wrapper that also publishes each record on ``/plan_review/events``."""

    def __init__(self, log: AuditLog, node: PlanReviewNode) -> None:
        self._log = log
        self._node = node

    def append(self, fields: dict[str, Any]) -> dict[str, Any]:
        record = self._log.append(fields)
        self._node.publish_event(record)
        return record


class PlanReviewNode(Node):
    """See module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(IFACE.name, **kwargs)
        params = declare_parameters(self, IFACE)
        self._group = MutuallyExclusiveCallbackGroup()
        self._pub_events = publisher(self, IFACE, f"{REVIEW_NS}/events")
        self._audit = AuditLog(params["audit_log"])
        # a previous run's decisions, restored once if the first plan received is the plan it was reviewing
        self._history: tuple[dict[str, Any], ...] | None = self._audit.records_at_open
        self.store = ApprovalStore(_AuditTap(self._audit, self), params["surgeon_id"])  # type: ignore[arg-type]
        self._state = MarkerServerState(REVIEW_NS)
        self._notes: dict[str, str] = {}
        self._dragging: set[str] = set()
        self._pub_update = publisher(self, IFACE, f"{REVIEW_NS}/update")
        self._pub_approvals = publisher(self, IFACE, PLAN_APPROVALS)
        self._pub_adjust = publisher(self, IFACE, ADJUST_REQUEST)
        subscription(self, IFACE, PLAN_DOCUMENT, self._on_plan, self._group)
        subscription(self, IFACE, f"{REVIEW_NS}/feedback", self._on_feedback, self._group)
        subscription(self, IFACE, ADJUST_RESULT, self._on_adjust_result, self._group)
        self.create_service(
            GetInteractiveMarkers, f"{REVIEW_NS}/get_interactive_markers", self._on_get, callback_group=self._group
        )
        self.create_timer(float(params["keep_alive_period_s"]), self._keep_alive, callback_group=self._group)
        self.add_on_set_parameters_callback(self._on_params)
        self._audit.append({"event": "review_started", "surgeon_id": params["surgeon_id"], "node": self.get_name()})

    def close(self) -> None:
        """Close the audit log (called at shutdown)."""
        self._audit.close()

    def _on_params(self, params: list[Any]) -> Any:
        from rcl_interfaces.msg import SetParametersResult

        for param in params:
            if param.name == "surgeon_id":
                # Applied after validation by the table callback; recorded in the audit log.
                self._audit.append({"event": "surgeon_id_changed", "surgeon_id": param.value})
                self.store.surgeon_id = str(param.value)
            if param.name == "audit_log":
                return SetParametersResult(successful=False, reason="audit_log cannot change while running")
        return SetParametersResult(successful=True)

    def publish_event(self, record: dict[str, Any]) -> None:
        """Publish one audit record on ``/plan_review/events``."""
        self._pub_events.publish(String(data=json.dumps(record, sort_keys=True)))

    # ------------------------------------------------------------------ markers
    def _marker_for(self, traj_id: str) -> Any:
        assert self.store.plan is not None
        traj = self.store.plan.trajectory(traj_id)
        scale = float(current_values(self, IFACE)["marker_scale_m"])
        proposal = self.store.proposal(traj_id)
        state = self.store.decision_of(traj_id)
        note = self._notes.get(traj_id, "")
        entry = proposal.entry_lps_mm if proposal is not None else None
        return trajectory_marker(traj, state, handle_scale_m=scale, entry_lps_mm=entry, note=note)

    def _refresh(self, traj_ids: Sequence[str] | None = None) -> None:
        if self.store.plan is None:
            return
        if traj_ids is None:
            update = self._state.replace_all(self._marker_for(t.id) for t in self.store.plan.trajectories)
        else:
            update = self._state.upsert(self._marker_for(t) for t in traj_ids)
        self._pub_update.publish(update)

    def _publish_approvals(self) -> None:
        snapshot = self.store.snapshot()
        if snapshot is not None:
            self._pub_approvals.publish(String(data=snapshot.to_json()))

    @guarded
    def _keep_alive(self) -> None:
        self._pub_update.publish(self._state.keep_alive())

    @guarded
    def _on_get(self, _request: Any, response: Any) -> Any:
        response.sequence_number, response.markers = self._state.full_state()
        return response

    # ------------------------------------------------------------------ inputs
    @guarded
    def _on_plan(self, msg: String) -> None:
        try:
            plan: PlanDocument = parse_plan_message(msg.data)
        except NeedleSteeringError as exc:
            self.get_logger().error(f"rejected {PLAN_DOCUMENT}: {exc}")
            self.store.note_rejected_input(PLAN_DOCUMENT, str(exc))
            return
        if self.store.set_plan(plan):
            self._notes.clear()
            self._dragging.clear()
            history, self._history = self._history, None
            if history:
                self._restore(history)
            self._refresh()
            self._publish_approvals()

    def _restore(self, history: Sequence[dict[str, Any]]) -> None:
        try:
            restored = self.store.restore(history)
        except ApprovalError as exc:
            self.get_logger().error(f"{exc}; the plan must be reviewed again")
            return
        if restored:
            self.get_logger().warning(
                f"restored the previous run's decisions on this plan from {self._audit.path}: {', '.join(restored)}"
            )

    @guarded
    def _on_feedback(self, fb: InteractiveMarkerFeedback) -> None:
        if self.store.plan is None:
            return
        entries = {t.id: t.entry_lps_mm for t in self.store.plan.trajectories}
        action = interpret_feedback(fb, entries)
        try:
            if action.kind in {"approve", "reject"}:
                self.store.decide(action.kind, action.trajectory_id, action.client_id)
                self._notes.pop(action.trajectory_id, None)
                self._refresh([action.trajectory_id])
            elif action.kind == "approve_all":
                _records, refusals = self.store.approve_all(action.client_id)
                for reason in refusals:
                    self.get_logger().warning(f"approve all: {reason}")
                self._refresh()
            elif action.kind == "drag":
                if action.trajectory_id not in self._dragging:
                    self._dragging.add(action.trajectory_id)
                    self.store.invalidate(action.trajectory_id, "entry handle is being dragged", action.client_id)
                    self._refresh([action.trajectory_id])
            elif action.kind == "drop" and action.entry_lps_mm is not None:
                self._dragging.discard(action.trajectory_id)
                self.store.propose(action.trajectory_id, action.entry_lps_mm, action.client_id)
                self._notes[action.trajectory_id] = "re-check requested"
                self._pub_adjust.publish(
                    String(
                        data=json.dumps(
                            {
                                "plan_sha256": self.store.plan.sha256,
                                "trajectory_id": action.trajectory_id,
                                "entry_lps_mm": list(action.entry_lps_mm),
                                "requested_by": {"surgeon_id": self.store.surgeon_id, "client_id": action.client_id},
                            }
                        )
                    )
                )
                self._refresh([action.trajectory_id])
            else:
                return
        except ApprovalError as exc:
            self.get_logger().warning(f"{action.kind} {action.trajectory_id!r} refused: {exc}")
            self._notes[action.trajectory_id] = f"refused: {exc}"
            self._refresh([action.trajectory_id])
        self._publish_approvals()

    @guarded
    def _on_adjust_result(self, msg: String) -> None:
        try:
            result = parse_json_object(msg.data, ADJUST_RESULT)
        except ValueError as exc:
            self.get_logger().error(str(exc))
            self.store.note_rejected_input(ADJUST_RESULT, str(exc))
            return
        traj_id = result.get("trajectory_id")
        about = result.get("plan_sha256")
        if self.store.plan is None or not isinstance(traj_id, str) or not isinstance(about, str):
            return
        accepted = result.get("accepted") is True
        reason = str(result.get("reason", ""))
        self.store.proposal_result(traj_id, accepted, reason, about, str(result.get("new_plan_sha256", "")))
        if about != self.store.plan.sha256:
            return  # a verdict on an earlier plan: audited, nothing to show
        if traj_id in {t.id for t in self.store.plan.trajectories}:
            self._notes[traj_id] = ("planner accepted: " if accepted else "planner rejected: ") + reason
            self._refresh([traj_id])
        self._publish_approvals()


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``plan_review_node``."""
    return run_node(PlanReviewNode, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
