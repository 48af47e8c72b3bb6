"""``make demo`` / ``needle-steering demo``: the end-to-end path THROUGH THE ROS 2 GRAPH on a generated patient.

1. The node graph of ``config/sim.yaml`` starts as ``needle-steering bringup`` does, one process
   per node (:func:`needle_steering.nodes.bringup.start_graph_process`; node logs in
   ``DIR/graph.log``); the patient is the generated phantom (``seed``, T12-L5, 1 mm, with a lesion)
   and the twin is the PyBullet twin.
2. An rclpy client node in the demo's own process then acts as the user, over DDS:
   ``/perception/segment`` -> sets the ``planning_node`` parameters (L1-L5 screws + a
   transpedicular biopsy of the lesion, planned on the segmentation) -> ``/planning/plan`` ->
   a **scripted reviewer** approves every trajectory with the same
   ``visualization_msgs/InteractiveMarkerFeedback`` ``MENU_SELECT`` messages RViz sends (surgeon id
   ``scripted-demo-reviewer``, client id ``/scripted_demo_reviewer``; labelled as scripted in the
   output, the audit log and the summary) -> ``/control/execute`` -> waits for ``/control/status``.
3. While it runs, the client records the graph's topics into ``DIR/run.mcap`` (rosbag2-compatible,
   ``mcap-ros2-support``; the received messages re-serialised with their ROS 2 definitions).
4. It writes ``DIR/plan.json`` (the approved plan document), ``DIR/report.html``
   (:func:`needle_steering.planning.report.write_report`), ``DIR/summary.json`` and prints a table.

Progress goes to stderr as ``[n/N] ...``. The exit status is 0 only when every approved trajectory
was reached within the acceptance tolerance; a stop or fault is reported with its reason (status 1).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from needle_steering.errors import NeedleSteeringError

#: Identity of the scripted reviewer (surgeon id and RViz client id of its approvals).
REVIEWER_ID = "scripted-demo-reviewer"
REVIEWER_CLIENT_ID = "/scripted_demo_reviewer"
SCRIPTED_NOTE = (
    "SCRIPTED approvals for the demonstration: a script sent the RViz menu messages; no human reviewed this plan"
)
CONFIG = "config/sim.yaml"
PHANTOM_LEVELS = "T12-L5"
PHANTOM_SPACING_MM = 1.0
PLAN_LEVELS = "L1-L5"
#: Added to the controller's target tolerance when grading the true tip error: the controller
#: stops on its *estimate* (EKF of the noisy tracker), so the true error may exceed its tolerance.
ESTIMATOR_ALLOWANCE_MM = 0.5
TOTAL_STEPS = 8
#: What control_node reports per reached trajectory (kept in the summary next to the twin's truth).
CONTROL_RESULT_KEYS = ("robot_tip_error_mm", "estimated_tip_error_mm", "tracker_tip_error_mm", "inserted_mm")
#: Topics the client records (published by the graph; types and QoS from the interface table).
RECORDED_TOPICS = (
    "/control/status",
    "/control/tip_estimate",
    "/tracker/measured_cp",
    "/needle_robot/measured_cp",
    "/needle_robot/measured_js",
    "/needle_robot/servo_jv",
    "/needle_robot/move_cp",
    "/needle_robot/operating_state",
    "/plan/document",
    "/plan/approvals",
    "/plan_review/events",
    "/perception/levels",
    "/sim/state",
    "/registration/T_patient_from_robot_base",
    "/registration/T_robot_base_from_patient",
)
#: Graph parameters of the demo on top of config/sim.yaml (the rest comes from the file).
DEMO_SETTINGS = {
    "control_node.insertion_speed_mm_s": 25.0,
    "sim_node.guide_speed_mm_s": 250.0,
    "sim_node.max_joint_speed_rad_s": 2.0,
    "sim_node.approach_mm": 40.0,
    # The arm at the head end of the table: posterior and lateral (straight biopsy) approaches are
    # both within reach (beside the table, a left-lateral path would need the wrist inside the base).
    "sim_node.patient_yaw_deg": 90.0,
    "sim_node.rate_hz": 100.0,
    "plan_review_node.surgeon_id": REVIEWER_ID,
}


class DemoError(Exception):
    """The demo cannot go on; the message is the one line printed."""


def _progress(step: int, text: str) -> None:
    print(f"[{step}/{TOTAL_STEPS}] {text}", file=sys.stderr, flush=True)


def _require(module: str, name: str, what: str) -> None:
    """Raise :class:`DemoError` naming ``module.name`` when that core API has not landed."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise DemoError(f"{what} is missing: {module}.{name} is not available yet ({exc})") from None
    if not hasattr(mod, name):
        raise DemoError(f"{what} is missing: {module}.{name} is not available yet ({module} has no {name!r})")


def _published_topic(name: str) -> tuple[str, str]:
    """``(message type, QoS profile)`` of a topic some node of the table publishes."""
    from needle_steering.nodes.interfaces import NODES

    for iface in NODES.values():
        for topic in iface.topics:
            if topic.name == name and topic.direction == "pub":
                return topic.msg_type, topic.qos
    raise KeyError(f"no node publishes {name!r}")


class _Recorder:
    """Rosbag2-compatible MCAP of the messages the client receives (profile ``ros2``, ``ros2msg`` schemas, CDR).

    The messages are written as the CDR bytes that arrived (``raw=True`` subscriptions): exactly
    what was on the wire, and no Python (de)serialisation in the process that also runs the whole
    graph (re-encoding ~250 messages/s under the one GIL starved the controller on 2 shared cores).
    The schemas are the ROS 2 message definitions of :data:`needle_steering.sim.mcap_recorder.MSGDEFS`;
    ``mcap_ros2.reader`` (mcap-ros2-support), Foxglove and ``ros2 bag`` decode the file.
    """

    def __init__(self, path: Path) -> None:
        from mcap.writer import Writer

        self.path = path
        self._file = path.open("wb")
        self._writer = Writer(self._file)
        self._writer.start(profile="ros2", library="needle_steering.demo")
        self._schemas: dict[str, int] = {}
        self._sequence: dict[int, int] = {}
        self.messages = 0

    def channel(self, topic: str, msg_type: str) -> int:
        from needle_steering.sim.mcap_recorder import MSGDEFS

        if msg_type not in MSGDEFS:
            raise DemoError(f"no ROS 2 message definition for {msg_type!r} to record {topic}")
        if msg_type not in self._schemas:
            self._schemas[msg_type] = self._writer.register_schema(msg_type, "ros2msg", MSGDEFS[msg_type].encode())
        channel_id = self._writer.register_channel(topic, "cdr", self._schemas[msg_type])
        self._sequence[channel_id] = 0
        return channel_id

    def write(self, channel_id: int, data: bytes, t_ns: int) -> None:
        sequence = self._sequence[channel_id]
        self._writer.add_message(channel_id, log_time=t_ns, data=data, publish_time=t_ns, sequence=sequence)
        self._sequence[channel_id] = sequence + 1
        self.messages += 1

    def close(self) -> None:
        if not self._file.closed:
            try:
                self._writer.finish()
            finally:
                self._file.close()


#: Topics whose content the client also reads (low rates; parsed from the same bytes).
_OBSERVED = ("/control/status", "/sim/state", "/plan/approvals", "/perception/levels", "/plan/document")


class _Client:
    """The user's rclpy node (own context, over DDS): services, parameters, RViz feedback, recording."""

    def __init__(self, domain_id: int, mcap_path: Path, graph_problem: Callable[[], str | None]) -> None:
        self.graph_problem = graph_problem
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.signals import SignalHandlerOptions
        from visualization_msgs.msg import InteractiveMarkerFeedback

        from needle_steering.nodes.qos import qos

        self.context = Context()
        rclpy.init(context=self.context, domain_id=domain_id, signal_handler_options=SignalHandlerOptions.NO)
        self.node = rclpy.create_node("needle_steering_demo_client", context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.recorder = _Recorder(mcap_path)
        self.counts: dict[str, int] = {}
        self.status: dict[str, Any] = {}
        self.sim_state: dict[str, Any] = {}
        self.sim_states: list[dict[str, Any]] = []
        self.approvals: dict[str, Any] = {}
        self.levels: dict[str, Any] = {}
        self.plan_text = ""
        self._recorded: set[str] = set()
        for topic in RECORDED_TOPICS:
            self.record(topic)
        self.feedback = self.node.create_publisher(InteractiveMarkerFeedback, "/plan_review/feedback", qos("events"))

    # ------------------------------------------------------------------ recording
    def record(self, topic: str, msg_type: str | None = None, profile: str | None = None) -> None:
        """Subscribe to ``topic`` (its table QoS) and write every message received into the MCAP file."""
        from rclpy.serialization import deserialize_message
        from std_msgs.msg import String

        from needle_steering.nodes.qos import qos
        from needle_steering.nodes.ros_helpers import msg_class

        if topic in self._recorded:
            return
        if msg_type is None or profile is None:
            msg_type, profile = _published_topic(topic)
        channel_id = self.recorder.channel(topic, msg_type)
        observed = topic in _OBSERVED

        def on_message(data: bytes) -> None:
            self.recorder.write(channel_id, data, self.node.get_clock().now().nanoseconds)
            self.counts[topic] = self.counts.get(topic, 0) + 1
            if observed:
                self._observe(topic, deserialize_message(data, String).data)

        self.node.create_subscription(msg_class(msg_type), topic, on_message, qos(profile), raw=True)
        self._recorded.add(topic)

    def _observe(self, topic: str, text: str) -> None:
        if topic == "/plan/document":
            self.plan_text = text
            return
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            return  # malformed input is the graph's to refuse; the recording keeps it
        if topic == "/control/status":
            self.status = data
        elif topic == "/sim/state":
            self.sim_state = data
            self.sim_states.append(data)
        elif topic == "/plan/approvals":
            self.approvals = data
        elif topic == "/perception/levels":
            self.levels = data

    # ------------------------------------------------------------------ helpers
    def spin(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=0.02)

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if predicate():
                return
            problem = self.graph_problem()
            if problem:
                raise DemoError(f"while waiting for {what}: {problem}")
            self.executor.spin_once(timeout_sec=0.02)
        raise DemoError(f"timed out after {timeout_s:.0f} s waiting for {what}")

    def call(self, srv_type: Any, name: str, request: Any = None, timeout_s: float = 30.0) -> Any:
        client = self.node.create_client(srv_type, name)
        try:
            if not client.wait_for_service(timeout_sec=min(timeout_s, 20.0)):
                raise DemoError(f"service {name} is not available")
            future = client.call_async(request if request is not None else srv_type.Request())
            self.wait_for(future.done, timeout_s, f"the answer of {name}")
            return future.result()
        finally:
            self.node.destroy_client(client)

    def trigger(self, name: str, timeout_s: float = 30.0) -> Any:
        from std_srvs.srv import Trigger

        return self.call(Trigger, name, timeout_s=timeout_s)

    def set_parameters(self, node_name: str, values: Mapping[str, Any]) -> None:
        """``/<node>/set_parameters`` (the node checks ranges and answers with reasons)."""
        from rcl_interfaces.msg import Parameter, ParameterType, ParameterValue
        from rcl_interfaces.srv import SetParameters

        params = []
        for name, value in values.items():
            pv = ParameterValue()
            if isinstance(value, bool):
                pv.type, pv.bool_value = ParameterType.PARAMETER_BOOL, value
            elif isinstance(value, str):
                pv.type, pv.string_value = ParameterType.PARAMETER_STRING, value
            elif isinstance(value, int | float):
                pv.type, pv.double_value = ParameterType.PARAMETER_DOUBLE, float(value)
            else:
                pv.type, pv.double_array_value = ParameterType.PARAMETER_DOUBLE_ARRAY, [float(v) for v in value]
            params.append(Parameter(name=name, value=pv))
        response = self.call(SetParameters, f"/{node_name}/set_parameters", SetParameters.Request(parameters=params))
        refused = [f"{p.name}: {r.reason}" for p, r in zip(params, response.results, strict=True) if not r.successful]
        if refused:
            raise DemoError(f"{node_name} refused parameters: {'; '.join(refused)}")

    def menu_select(self, marker: str, entry_id: int) -> None:
        """The ``InteractiveMarkerFeedback`` RViz sends when a context-menu entry is chosen."""
        from visualization_msgs.msg import InteractiveMarkerFeedback as Fb

        from needle_steering.nodes.review_protocol import MENU_CONTROL

        fb = Fb(
            client_id=REVIEWER_CLIENT_ID,
            marker_name=marker,
            control_name=MENU_CONTROL,
            event_type=Fb.MENU_SELECT,
            menu_entry_id=entry_id,
        )
        fb.header.frame_id = "patient"
        fb.header.stamp = self.node.get_clock().now().to_msg()
        fb.pose.orientation.w = 1.0
        self.feedback.publish(fb)

    def close(self) -> None:
        try:
            self.recorder.close()
        finally:
            self.executor.shutdown(timeout_sec=2.0)
            self.node.destroy_node()
            if self.context.ok():
                self.context.shutdown()


def _config_values(overrides: Sequence[str]) -> dict[str, dict[str, Any]]:
    from needle_steering.nodes.bringup import find_config, load_config

    return load_config(find_config(CONFIG), overrides)


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{float(value):.{digits}f}"


def _per_insertion_truth(states: Sequence[Mapping[str, Any]], start_index: int) -> list[dict[str, Any]]:
    """The twin's ground truth per insertion after ``start_index``: where the tip stopped, closest critical structure.

    ``/sim/state`` carries ``insertion_index`` (insertions so far) with the current insertion's deepest
    tip and its closest approach to a critical structure; the last message of an index holds the
    whole insertion.
    """
    last: dict[int, Mapping[str, Any]] = {}
    for state in states:
        index = state.get("insertion_index")
        if isinstance(index, int) and index > start_index:
            last[index] = state
    return [
        {
            "deepest_tip_lps_mm": last[i].get("insertion_deepest_tip_lps_mm"),
            "inserted_mm": last[i].get("insertion_depth_mm"),
            "min_critical_clearance_mm": last[i].get("insertion_min_critical_clearance_mm"),
            "critical_body": last[i].get("insertion_min_critical_body", ""),
        }
        for i in sorted(last)
    ]


def run_demo(out_dir: Path, seed: int = 7) -> int:
    """Run the demonstration into ``out_dir``; returns the process exit status (0 only when all went well)."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    try:
        # Fail at once, before anything starts, when a core API the path needs has not landed.
        _require("needle_steering.perception.segment", "segment_volume", "segmentation")
        _require("needle_steering.planning", "plan_case", "planning")
        _require("needle_steering.planning.report", "write_report", "the planning report")
        _require("needle_steering.sim.twin", "Twin", "the PyBullet twin")
        return _run(out_dir, seed, started)
    except (DemoError, NeedleSteeringError) as exc:
        print(f"demo: error: {exc}", file=sys.stderr, flush=True)
        return 1


def _run(out_dir: Path, seed: int, started: float) -> int:
    from needle_steering.nodes import core_adapters
    from needle_steering.nodes.bringup import BringupError, start_graph_process

    out_dir.mkdir(parents=True, exist_ok=True)
    audit_dir = out_dir / "audit"
    perception_dir = out_dir / "perception"
    for stale in (out_dir / "summary.json", audit_dir / "plan_review.jsonl", audit_dir / "control.jsonl"):
        stale.unlink(missing_ok=True)  # the audit logs are append-only: one run per folder
    settings: dict[str, Any] = {
        **DEMO_SETTINGS,
        "plan_review_node.audit_log": str(audit_dir / "plan_review.jsonl"),
        "control_node.audit_log": str(audit_dir / "control.jsonl"),
        "perception_node.output_dir": str(perception_dir),
    }
    for node_name in ("perception_node", "planning_node", "sim_node"):
        settings[f"{node_name}.phantom_seed"] = int(seed)
        settings[f"{node_name}.phantom_levels"] = PHANTOM_LEVELS
        settings[f"{node_name}.phantom_spacing_mm"] = PHANTOM_SPACING_MM
    settings["sim_node.seed"] = int(seed)
    overrides = [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in settings.items()]
    try:
        config = _config_values(overrides)
    except BringupError as exc:
        raise DemoError(str(exc)) from None
    env_domain = os.environ.get("ROS_DOMAIN_ID", "")
    domain_id = int(env_domain) if env_domain.isdigit() else random.SystemRandom().randint(1, 100)
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    timings: dict[str, float] = {}
    summary: dict[str, Any] = {
        "schema": "needle_steering.demo/1",
        "seed": seed,
        "scripted_review": {"approver": REVIEWER_ID, "client_id": REVIEWER_CLIENT_ID, "note": SCRIPTED_NOTE},
        "ros": {"config": CONFIG, "domain_id": domain_id, "settings": settings},
    }

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - t0, 2)
        return now

    _progress(1, f"starting the ROS 2 graph from {CONFIG}, one process per node (ROS_DOMAIN_ID={domain_id}, "
                 f"PyBullet twin, phantom seed {seed} {PHANTOM_LEVELS}; node logs in {out_dir / 'graph.log'})")
    t = time.perf_counter()
    try:
        graph = start_graph_process(CONFIG, overrides, out_dir / "graph.log", domain_id=domain_id)
    except BringupError as exc:
        raise DemoError(str(exc)) from None
    client: _Client | None = None
    exit_status = 1
    try:
        client = _Client(domain_id, out_dir / "run.mcap", graph.problem)
        summary["ros"]["nodes"] = list(graph.names)
        client.wait_for(lambda: bool(client.status) and bool(client.sim_state), 30.0, "the graph's first status")
        t = lap("graph_start_s", t)

        _progress(2, "/perception/segment (phantom CT, label map written for the planner)")
        response = client.trigger("/perception/segment", timeout_s=150.0)
        if not response.success:
            raise DemoError(f"/perception/segment failed: {response.message}")
        client.wait_for(lambda: bool(client.levels), 10.0, "/perception/levels")
        labels_file = perception_dir / "labels.nii.gz"
        if not labels_file.is_file():
            raise DemoError(f"perception_node did not write {labels_file}")
        summary["segmentation"] = {
            "levels_found": client.levels.get("levels", []),
            "structures": client.levels.get("structures", []),
            "backend": client.levels.get("backend"),
            "source": client.levels.get("source"),
            "message": response.message,
            "labels_file": str(labels_file),
        }
        print(f"      {response.message}", file=sys.stderr, flush=True)
        t = lap("segment_s", t)

        patient = core_adapters.generate_phantom_patient(seed, PHANTOM_LEVELS, PHANTOM_SPACING_MM)  # cached
        lesion = patient.meta.get("lesion") or {}
        target = lesion.get("centre_lps_mm")
        if target is None:
            raise DemoError("the phantom patient has no lesion to biopsy (meta['lesion'] is empty)")
        target_lps_mm = [round(float(v), 3) for v in target]
        _progress(3, f"/planning/plan: {PLAN_LEVELS} bilateral pedicle screws + transpedicular biopsy of the "
                     f"{lesion.get('level', '')} lesion at LPS {target_lps_mm} mm, on the segmentation")
        client.set_parameters(
            "planning_node",
            {
                "levels": PLAN_LEVELS,
                "biopsy": True,
                "biopsy_target_lps_mm": target_lps_mm,
                "labels_path": str(labels_file),
                "plan_file": "",
                "output_dir": str(out_dir / "plans"),
            },
        )
        response = client.trigger("/planning/plan", timeout_s=120.0)
        if not response.success:
            raise DemoError(f"/planning/plan failed: {response.message}")
        from needle_steering.nodes.approvals import parse_plan_message
        from needle_steering.planning.plan_document import save_plan

        client.wait_for(
            lambda: bool(client.plan_text) and client.status.get("plan_sha256") not in (None, "")
            and client.approvals.get("plan_sha256") == client.status.get("plan_sha256"),
            15.0,
            "the plan to reach plan review and control",
        )
        plan = parse_plan_message(client.plan_text)
        if plan.sha256 not in response.message:
            raise DemoError(f"/plan/document holds plan {plan.sha256[:12]}, the planner answered {response.message}")
        save_plan(plan, out_dir / "plan.json")
        from needle_steering.nodes.interfaces import PLAN_PATH_PATTERN
        from needle_steering.nodes.markers import topic_safe

        for traj in plan.trajectories:
            path_topic = PLAN_PATH_PATTERN.replace("{trajectory}", topic_safe(traj.id))
            client.record(path_topic, "nav_msgs/msg/Path", "latched")
        screws = [tr for tr in plan.trajectories if tr.kind == "pedicle_screw"]
        biopsies = [tr for tr in plan.trajectories if tr.kind == "biopsy"]
        biopsy_approach = str(biopsies[0].metrics.get("approach", "")) if biopsies else "none planned"
        if biopsies and not biopsy_approach.startswith("transpedicular"):
            biopsy_approach += " (the planner prefers transpedicular and found no safe transpedicular path)"
        summary["planning"] = {
            "plan_sha256": plan.sha256,
            "levels_requested": PLAN_LEVELS,
            "labels": f"segmentation ({summary['segmentation']['backend']}) written by perception_node",
            "biopsy_target_lps_mm": target_lps_mm,
            "biopsy_target_source": "the phantom's lesion centre (ground truth), as a radiologist would mark it",
            "biopsy_approach": biopsy_approach,
            "screws_planned": len(screws),
            "screws_skipped": dict(plan.skipped),
            "trajectories": [
                {
                    "id": tr.id,
                    "kind": tr.kind,
                    "level": tr.level,
                    "side": tr.side,
                    "length_mm": round(tr.length_mm, 2),
                    "diameter_mm": tr.diameter_mm,
                    "entry_lps_mm": [round(float(v), 2) for v in tr.entry_lps_mm],
                    "tip_lps_mm": [round(float(v), 2) for v in tr.tip_lps_mm],
                }
                for tr in plan.trajectories
            ],
            "warnings": list(plan.warnings),
            "planner_message": response.message,
        }
        if not plan.trajectories:
            raise DemoError(f"the planner produced no trajectory (skipped: {dict(plan.skipped)})")
        t = lap("plan_s", t)

        from needle_steering.nodes.review_protocol import MENU_APPROVE

        _progress(4, f"SCRIPTED review: {REVIEWER_ID} approves {len(plan.trajectories)} trajectories with RViz "
                     f"MENU_SELECT 'Approve' feedback on /plan_review/feedback (no human review)")
        for traj in plan.trajectories:
            client.menu_select(traj.id, MENU_APPROVE)
            client.spin(0.05)
        client.wait_for(
            lambda: client.approvals.get("plan_sha256") == plan.sha256
            and len(client.approvals.get("approvals", [])) == len(plan.trajectories),
            15.0,
            "the scripted approvals to reach /plan/approvals",
        )
        client.wait_for(
            lambda: client.status.get("approvals_plan_sha256") == plan.sha256
            and len(client.status.get("approved", [])) == len(plan.trajectories),
            15.0,
            "control_node to hold the approvals",
        )
        summary["approvals"] = [
            {k: a.get(k) for k in ("trajectory_id", "trajectory_sha256", "surgeon_id", "client_id", "time_utc")}
            | {"scripted": True}
            for a in client.approvals["approvals"]
        ]
        t = lap("review_s", t)

        _progress(5, "waiting for the PyBullet twin's anatomy (collision bodies from the phantom's label map)")
        client.wait_for(
            lambda: bool(client.sim_state.get("anatomy_loaded"))
            or str(client.sim_state.get("anatomy", "")).startswith("failed"),
            120.0,
            "the twin's anatomy",
        )
        if not client.sim_state.get("anatomy_loaded"):
            raise DemoError(f"the twin has no anatomy: {client.sim_state.get('anatomy')}")
        try:  # registration and robot state reach control by DDS; under load that can lag
            client.wait_for(lambda: client.status.get("robot_problem") == "", 30.0, "control_node to see a ready robot")
        except DemoError as exc:
            raise DemoError(f"{exc}: {client.status.get('robot_problem', 'no control status')}") from None
        t = lap("twin_ready_wait_s", t)

        _progress(6, "/control/execute: align (arm IK) -> insert (EKF + sliding-mode control) -> retract, per "
                     "trajectory")
        start_insertion_index = int(client.sim_state.get("insertion_index", 0))
        response = client.trigger("/control/execute")
        if not response.success:
            raise DemoError(f"/control/execute refused: {response.message}")
        seen: tuple[str, str] = ("", "")
        reported = 0

        def progress_line() -> bool:
            nonlocal seen, reported
            st = client.status
            key = (str(st.get("trajectory", "")), str(st.get("phase", "")))
            if st.get("state") == "executing" and key != seen and key[0]:
                seen = key
                print(f"      {key[0]}: {key[1]}", file=sys.stderr, flush=True)
            results = st.get("results", [])
            while reported < len(results):
                r = results[reported]
                print(f"      {r['trajectory']}: reached (control's estimate {r['estimated_tip_error_mm']:.2f} mm "
                      f"from the target)", file=sys.stderr, flush=True)
                reported += 1
            return st.get("state") in ("done", "stopped", "fault")

        client.wait_for(progress_line, 300.0, "the execution to end (/control/status done, stopped or fault)")
        client.spin(0.5)  # the last /sim/state of the final retraction
        final = dict(client.status)
        t = lap("execute_s", t)

        _progress(7, "writing plan.json and report.html (planning.report)")
        from needle_steering.planning.report import write_report

        labels_volume = core_adapters.read_image(str(labels_file), "labels").ct
        write_report(plan, patient.ct, labels_volume, out_dir / "report.html")
        t = lap("report_s", t)

        _progress(8, "summary")
        tolerance = float(config["control_node"]["target_tolerance_mm"]) + ESTIMATOR_ALLOWANCE_MM
        truth = _per_insertion_truth(client.sim_states, start_insertion_index)
        executed = []
        results = {r["trajectory"]: r for r in final.get("results", [])}
        approved = {a["trajectory_id"] for a in summary["approvals"]}
        for k, traj in enumerate(tr for tr in plan.trajectories if tr.id in approved):
            r = results.get(traj.id)
            twin_truth = truth[k] if k < len(truth) else {}
            tip = twin_truth.get("deepest_tip_lps_mm")
            error = (
                round(math.dist([float(v) for v in tip], [float(v) for v in traj.tip_lps_mm]), 3)
                if r and tip is not None
                else None
            )
            executed.append(
                {
                    "trajectory": traj.id,
                    "status": "reached" if r else ("not reached: " + str(final.get("reason", ""))),
                    "target_error_mm": error,
                    "final_tip_lps_mm": tip,
                    "inserted_mm": twin_truth.get("inserted_mm"),
                    "planned_length_mm": round(traj.length_mm, 3),
                    "within_tolerance": error is not None and error <= tolerance,
                    "min_critical_clearance_mm": twin_truth.get("min_critical_clearance_mm"),
                    "critical_body": twin_truth.get("critical_body", ""),
                    "control_reported": {key: r.get(key) for key in CONTROL_RESULT_KEYS} if r else None,
                }
            )
        summary["execution"] = {
            "state": final.get("state"),
            "reason": final.get("reason"),
            "acceptance_tolerance_mm": tolerance,
            "acceptance_tolerance_note": (
                f"control_node.target_tolerance_mm + {ESTIMATOR_ALLOWANCE_MM} mm: the controller stops on its "
                "tip estimate. target_error_mm: the twin's true tip where the needle stopped (deepest point of the "
                "insertion, from /sim/state) to the planned tip; control_reported: what control_node measured when "
                "it decided (its inputs may lag a few control periods)"
            ),
            "trajectories": executed,
        }
        summary["twin"] = {
            k: client.sim_state.get(k)
            for k in (
                "backend", "anatomy", "anatomy_meshes", "critical_contacts", "moves_planned", "moves_refused",
                "stalls", "max_stall_s",  # a watchdog stop after a stall is the twin's doing (CPU starvation)
            )
        }
        failures = [e["trajectory"] for e in executed if not e["within_tolerance"]]
        ok = final.get("state") == "done" and not failures
        exit_status = 0 if ok else 1
    except (DemoError, NeedleSteeringError) as exc:
        summary["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if client is not None:
            summary["recorded_messages"] = dict(sorted(client.counts.items()))
            summary["recorded_messages_total"] = client.recorder.messages
            client.close()
        graph_status = graph.shutdown()
        summary["ros"]["graph_exit_status"] = graph_status
        if graph_status != 0:
            exit_status = 1
            summary.setdefault("error", f"the node graph exited with status {graph_status} (see {graph.log_path})")
        summary["timings_s"] = {**timings, "total_s": round(time.perf_counter() - started, 2)}
        summary["files"] = {
            name: str(out_dir / name) for name in ("plan.json", "report.html", "run.mcap", "summary.json")
            if (out_dir / name).exists() or name == "summary.json"
        }
        summary["files"]["audit_logs"] = [str(audit_dir / "plan_review.jsonl"), str(audit_dir / "control.jsonl")]
        summary["exit_status"] = exit_status
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    _print_table(summary, out_dir)
    if exit_status != 0:
        execution = summary["execution"]
        bad = [e["trajectory"] for e in execution["trajectories"] if not e["within_tolerance"]]
        print(f"demo: error: execution {execution['state']} ({execution['reason']}); not reached within "
              f"{execution['acceptance_tolerance_mm']} mm: {', '.join(bad) or 'none'}", file=sys.stderr, flush=True)
    return exit_status


def _print_table(summary: Mapping[str, Any], out_dir: Path) -> None:
    planning = summary["planning"]
    execution = summary["execution"]
    kinds = {t["id"]: t["kind"] for t in planning["trajectories"]}
    print()
    print(f"levels found by segmentation: {', '.join(summary['segmentation']['levels_found']) or 'none'}")
    print(f"plan {planning['plan_sha256'][:12]}: {planning['screws_planned']} screws planned, "
          f"{len(planning['screws_skipped'])} skipped; biopsy of LPS {planning['biopsy_target_lps_mm']} mm: "
          f"{planning['biopsy_approach']}")
    for traj_id, reason in planning["screws_skipped"].items():
        print(f"  skipped {traj_id}: {reason}")
    print(f"approvals: {len(summary['approvals'])} by {REVIEWER_ID} -- SCRIPTED, not a human review")
    print()
    header = f"{'trajectory':28s} {'kind':14s} {'status':10s} {'target err mm':>13s} {'closest critical mm':>20s}"
    print(header)
    print("-" * len(header))
    for e in execution["trajectories"]:
        status = "reached" if e["status"] == "reached" else "NOT reached"
        flag = "" if e["within_tolerance"] else "  <-- outside tolerance"
        body = f" ({e['critical_body']})" if e.get("critical_body") else ""
        print(f"{e['trajectory']:28s} {kinds.get(e['trajectory'], ''):14s} {status:10s} "
              f"{_fmt(e['target_error_mm']):>13s} {_fmt(e.get('min_critical_clearance_mm')):>8s}{body:12s}{flag}")
    print()
    print(f"execution: {execution['state']} ({execution['reason']}); acceptance {execution['acceptance_tolerance_mm']} "
          f"mm on the twin's true tip")
    print(f"outputs in {out_dir}: plan.json, report.html, run.mcap, summary.json, audit/ "
          f"({summary['timings_s']['total_s']:.1f} s)")
