"""``planning_node``: plan on request and publish the plan document (thin wrapper).

``/planning/plan`` (``std_srvs/Trigger``):

* with ``plan_file`` set, loads that plan document (schema and sha256 verified) and publishes it;
* otherwise loads the patient (``image_path`` or the phantom), takes labels from
  ``labels_path`` / the phantom's ground truth / segmentation, and calls
  :func:`needle_steering.nodes.core_adapters.plan_case`.

The plan is published on ``/plan/document`` (``std_msgs/String``, the canonical JSON,
transient-local reliable), each trajectory as ``nav_msgs/Path`` on ``/plan/path/<id>`` and
markers on ``/plan/markers`` (frame ``patient``, metres).

``/planning/adjust_request`` (from ``plan_review_node``) asks to move one trajectory's entry;
the planner re-checks and re-grades it (:func:`core_adapters.recheck_trajectory`) and publishes
an adjusted plan (new sha256: every approval must be given again) or a rejection with the
reason on ``/planning/adjust_result``.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.publisher import Publisher
from std_msgs.msg import String
from std_srvs.srv import Trigger

from needle_steering.errors import NeedleSteeringError
from needle_steering.nodes import core_adapters
from needle_steering.nodes.interfaces import (
    ADJUST_REQUEST,
    ADJUST_RESULT,
    PLAN_DOCUMENT,
    PLAN_MARKERS,
    PLAN_PATH_PATTERN,
    PLANNING,
    current_values,
    declare_parameters,
)
from needle_steering.nodes.markers import plan_markers, topic_safe, trajectory_path
from needle_steering.nodes.ros_helpers import guarded, parse_json_object, publisher, run_node, subscription
from needle_steering.planning.plan_document import PlanDocument, load_plan, save_plan

IFACE = PLANNING


class PlanningNode(Node):
    """See module docstring."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(IFACE.name, **kwargs)
        declare_parameters(self, IFACE)
        self._lock = threading.Lock()
        self._group = MutuallyExclusiveCallbackGroup()
        self._plan: PlanDocument | None = None
        self._patient: core_adapters.Patient | None = None
        self._labels: Any = None
        self._pub_doc = publisher(self, IFACE, PLAN_DOCUMENT)
        self._pub_markers = publisher(self, IFACE, PLAN_MARKERS)
        self._pub_result = publisher(self, IFACE, ADJUST_RESULT)
        self._path_pubs: dict[str, Publisher] = {}
        subscription(self, IFACE, ADJUST_REQUEST, self._on_adjust_request, self._group)
        self.create_service(Trigger, "/planning/plan", self._on_plan, callback_group=self._group)

    # ------------------------------------------------------------------ planning
    def _on_plan(self, _request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        try:
            plan, origin = self._make_plan()
            self._publish(plan)
            response.success = True
            response.message = f"plan {plan.sha256} ({len(plan.trajectories)} trajectories) from {origin}"
        except NeedleSteeringError as exc:
            response.success, response.message = False, str(exc)
        except (OSError, MemoryError) as exc:
            response.success, response.message = False, f"{type(exc).__name__}: {exc}"
        self.get_logger().info(f"/planning/plan: success={response.success}: {response.message}")
        return response

    def _make_plan(self) -> tuple[PlanDocument, str]:
        p = current_values(self, IFACE)
        if p["plan_file"]:
            path = Path(p["plan_file"]).expanduser()
            self._patient, self._labels = None, None
            return load_plan(path), f"plan file {path}"
        from needle_steering.perception.labels import parse_level_range

        core_adapters.require_planner()  # fail fast, before a phantom or image is loaded
        patient = core_adapters.load_patient(
            p["image_path"], "auto", p["phantom_seed"], p["phantom_levels"], p["phantom_spacing_mm"]
        )
        labels = patient.labels
        if p["labels_path"]:
            labels = core_adapters.read_image(p["labels_path"], "labels").ct
        if labels is None:
            labels = core_adapters.segment(patient.ct, "auto", "cpu", "auto").labels
        levels = parse_level_range(p["levels"]) if p["levels"] else []
        target = list(p["biopsy_target_lps_mm"]) if p["biopsy"] else None
        options = json.loads(p["options_json"])
        plan = core_adapters.plan_case(patient.ct, labels, levels, target, options)
        self._patient, self._labels = patient, labels
        return plan, patient.source

    def _publish(self, plan: PlanDocument) -> None:
        p = current_values(self, IFACE)
        if p["output_dir"]:
            out = Path(p["output_dir"]).expanduser()
            out.mkdir(parents=True, exist_ok=True)
            save_plan(plan, out / f"plan-{plan.sha256[:12]}.json")
        self._plan = plan
        stamp = self.get_clock().now().to_msg()
        self._pub_doc.publish(String(data=plan.to_json()))
        self._pub_markers.publish(plan_markers(plan, stamp))
        for traj in plan.trajectories:
            name = PLAN_PATH_PATTERN.replace("{trajectory}", topic_safe(traj.id))
            if name not in self._path_pubs:
                self._path_pubs[name] = publisher(self, IFACE, PLAN_PATH_PATTERN, topic_name=name)
            self._path_pubs[name].publish(trajectory_path(traj, stamp))

    # ------------------------------------------------------------------ adjustments
    def _result(self, accepted: bool, reason: str, request: dict[str, Any], new_sha: str = "") -> None:
        body = {
            "accepted": accepted,
            "reason": reason,
            "trajectory_id": request.get("trajectory_id", ""),
            "plan_sha256": request.get("plan_sha256", ""),
            "new_plan_sha256": new_sha,
        }
        self._pub_result.publish(String(data=json.dumps(body, sort_keys=True)))
        self.get_logger().info(f"adjust request {'accepted' if accepted else 'rejected'}: {reason}")

    @guarded
    def _on_adjust_request(self, msg: String) -> None:
        try:
            request = parse_json_object(msg.data, ADJUST_REQUEST)
        except ValueError as exc:
            self._result(False, str(exc), {})
            return
        traj_id = request.get("trajectory_id")
        entry = request.get("entry_lps_mm")
        if self._plan is None:
            self._result(False, "no plan has been published by this planner", request)
            return
        if request.get("plan_sha256") != self._plan.sha256:
            self._result(
                False,
                f"request is for plan {str(request.get('plan_sha256'))[:12]}, current is {self._plan.sha256[:12]}",
                request,
            )
            return
        if (
            not isinstance(traj_id, str)
            or not isinstance(entry, list)
            or len(entry) != 3
            or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in entry)
        ):
            self._result(
                False, f"trajectory_id must be a string and entry_lps_mm 3 finite numbers: {request!r}", request
            )
            return
        try:
            patient_ct = self._patient.ct if self._patient else None
            new_plan = core_adapters.recheck_trajectory(self._plan, traj_id, entry, patient_ct, self._labels)
        except NeedleSteeringError as exc:
            self._result(False, str(exc), request)
            return
        self._publish(new_plan)
        self._result(True, f"re-checked; new plan {new_plan.sha256[:12]} needs approval", request, new_plan.sha256)


def main(argv: Sequence[str] | None = None) -> int:
    """Console script ``planning_node``."""
    return run_node(PlanningNode, argv)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
