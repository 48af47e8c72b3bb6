"""Integration over real DDS: ``bringup`` in a subprocess, driven from a separate rclpy node as users would.

Isolation: a random ``ROS_DOMAIN_ID`` for this session, discovery limited to localhost, the
bringup process is stopped (SIGINT, then killed) at the end and must be gone.

The planner's ``plan_case`` and the phantom generator are not available yet, so plans come from
plan documents built here with :mod:`needle_steering.planning.plan_document` and loaded through
``planning_node``'s ``plan_file`` parameter (a real planning_node code path, no mock).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ["ROS_DOMAIN_ID"] = str(random.SystemRandom().randint(1, 100))
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"

import rclpy
from rcl_interfaces.msg import Parameter as ParameterMsg
from rcl_interfaces.msg import ParameterType, ParameterValue
from rcl_interfaces.srv import SetParameters
from sensor_msgs.msg import JointState
from std_msgs.msg import Bool, String
from std_srvs.srv import Trigger
from visualization_msgs.msg import InteractiveMarkerFeedback
from visualization_msgs.srv import GetInteractiveMarkers

from needle_steering.nodes import core_adapters
from needle_steering.nodes.audit import read_audit_log
from needle_steering.nodes.bringup import GraphProcess, start_graph_process
from needle_steering.nodes.qos import qos
from needle_steering.perception.volume import Volume
from needle_steering.planning.plan_document import ImageInfo, PlanDocument, Trajectory, load_plan, save_plan

pytestmark = pytest.mark.ros
REPO = Path(__file__).resolve().parents[2]
Fb = InteractiveMarkerFeedback


# --------------------------------------------------------------------------------------------------
# plans
# --------------------------------------------------------------------------------------------------
def _straight(tid: str, entry: tuple[float, float, float], tip: tuple[float, float, float], tag: str) -> Trajectory:
    length = float(np.linalg.norm(np.subtract(tip, entry)))
    return Trajectory(
        id=tid,
        kind="biopsy",
        level="L3",
        side="none",
        entry_lps_mm=entry,
        tip_lps_mm=tip,
        path_lps_mm=(entry, tip),
        diameter_mm=1.5,
        length_mm=length,
        metrics={"grade": "A", "case": tag},
    )


def write_plan(folder: Path, tag: str, shift_mm: float = 0.0) -> tuple[Path, PlanDocument]:
    """A two-trajectory biopsy plan (LPS mm) on a small real volume; ``tag`` makes its hash unique."""
    volume = Volume(np.arange(512, dtype=np.int16).reshape(8, 8, 8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    info = ImageInfo.from_volume(volume)
    plan = PlanDocument(
        info,
        info,
        (
            _straight("L3-biopsy", (10.0, 80.0, shift_mm), (10.0, 60.0, shift_mm), tag),
            _straight("L4-biopsy", (-10.0, 80.0, 10.0), (-12.0, 62.0, 8.0), tag),
        ),
    )
    path = folder / f"plan-{tag}.json"
    save_plan(plan, path)
    return path, plan


# --------------------------------------------------------------------------------------------------
# the graph and the user
# --------------------------------------------------------------------------------------------------
class User:
    """A separate rclpy node acting as RViz, the surgeon's console and a test bench."""

    def __init__(self) -> None:
        self.node = rclpy.create_node("test_user")
        self.status: dict[str, Any] = {}
        self.approvals: dict[str, Any] = {}
        self.joints: list[tuple[float, float]] = []
        self.review_events: list[dict[str, Any]] = []
        self.plan_text = ""
        n = self.node
        n.create_subscription(String, "/plan/document", self._on_plan, qos("latched"))
        n.create_subscription(String, "/control/status", lambda m: self._json(m, "status"), qos("status"))
        n.create_subscription(String, "/plan/approvals", lambda m: self._json(m, "approvals"), qos("latched"))
        n.create_subscription(String, "/plan_review/events", self._on_event, qos("events"))
        n.create_subscription(JointState, "/needle_robot/measured_js", self._on_js, qos("sensor"))
        self.feedback = n.create_publisher(Fb, "/plan_review/feedback", qos("events"))
        self.estop = n.create_publisher(Bool, "/control/estop", qos("command"))
        self.fault = n.create_publisher(String, "/sim/fault", qos("command"))
        self.raw: dict[tuple[str, str], Any] = {}

    def _json(self, msg: Any, attr: str) -> None:
        # our own malformed-input test publishes garbage on /plan/approvals
        with contextlib.suppress(json.JSONDecodeError):
            setattr(self, attr, json.loads(msg.data))

    def _on_plan(self, msg: String) -> None:
        self.plan_text = msg.data

    def _on_event(self, msg: Any) -> None:
        self.review_events.append(json.loads(msg.data))

    def _on_js(self, msg: JointState) -> None:
        self.joints.append((time.monotonic(), float(msg.position[0]) * 1000.0))

    def spin(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            rclpy.spin_once(self.node, timeout_sec=0.02)

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            rclpy.spin_once(self.node, timeout_sec=0.02)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}; status {self.status}")

    def call(self, srv_type: Any, name: str, request: Any = None, timeout: float = 20.0) -> Any:
        client = self.node.create_client(srv_type, name)
        try:
            assert client.wait_for_service(timeout_sec=timeout), f"service {name} not available"
            future = client.call_async(request if request is not None else srv_type.Request())
            end = time.monotonic() + timeout
            while not future.done() and time.monotonic() < end:
                rclpy.spin_once(self.node, timeout_sec=0.02)
            assert future.done(), f"{name} did not answer within {timeout} s"
            return future.result()
        finally:
            self.node.destroy_client(client)

    def trigger(self, name: str) -> Any:
        return self.call(Trigger, name)

    def set_param(self, node_name: str, name: str, value: Any) -> Any:
        pv = ParameterValue()
        if isinstance(value, str):
            pv.type, pv.string_value = ParameterType.PARAMETER_STRING, value
        else:
            pv.type, pv.double_value = ParameterType.PARAMETER_DOUBLE, float(value)
        request = SetParameters.Request(parameters=[ParameterMsg(name=name, value=pv)])
        return self.call(SetParameters, f"/{node_name}/set_parameters", request).results[0]

    def publish_raw(self, topic: str, text: str, profile: str) -> None:
        key = (topic, profile)
        if key not in self.raw:
            self.raw[key] = self.node.create_publisher(String, topic, qos(profile))
            self.spin(0.5)  # discovery
        self.raw[key].publish(String(data=text))

    def menu(self, marker: str, entry_id: int) -> None:
        self.feedback.publish(
            Fb(
                client_id="/rviz2/test_client",
                marker_name=marker,
                control_name="menu",
                event_type=Fb.MENU_SELECT,
                menu_entry_id=entry_id,
            )
        )

    def drag(self, marker: str, entry_lps_mm: tuple[float, float, float]) -> None:
        for event in (Fb.MOUSE_DOWN, Fb.POSE_UPDATE, Fb.MOUSE_UP):
            fb = Fb(client_id="/rviz2/test_client", marker_name=marker, control_name="entry", event_type=event)
            fb.header.frame_id = "patient"
            fb.pose.position.x, fb.pose.position.y, fb.pose.position.z = (v / 1000.0 for v in entry_lps_mm)
            fb.pose.orientation.w = 1.0
            self.feedback.publish(fb)
            self.spin(0.05)

    def load_plan(self, plan_file: Path, plan: PlanDocument, control_gets_approvals: bool = True) -> None:
        result = self.set_param("planning_node", "plan_file", str(plan_file))
        assert result.successful, result.reason
        response = self.trigger("/planning/plan")
        assert response.success, response.message
        self.wait_for(
            lambda: self.approvals.get("plan_sha256") == plan.sha256
            and self.status.get("plan_sha256") == plan.sha256
            and (self.status.get("approvals_plan_sha256") == plan.sha256 or not control_gets_approvals),
            10.0,
            "plan and its (empty) approvals to reach review and control",
        )

    def approve_all(self, plan: PlanDocument) -> None:
        self.menu(plan.trajectories[0].id, 3)
        ids = sorted(t.id for t in plan.trajectories)
        self.wait_for(
            lambda: sorted(self.status.get("approved", [])) == ids
            and sorted(a["trajectory_id"] for a in self.approvals.get("approvals", [])) == ids,
            5.0,
            "approvals to reach control",
        )

    def inserted_mm(self) -> float:
        return self.joints[-1][1] if self.joints else 0.0

    def idle(self) -> None:
        """Bring control back to a state that accepts execution (reset a latched stop)."""
        if self.status.get("state") in ("stopped", "fault") or self.status.get("estop_latched"):
            self.estop.publish(Bool(data=False))
            self.spin(0.2)
            response = self.trigger("/control/reset")
            assert response.success, response.message


class Bringup:
    """Some of sim.yaml's nodes under ``needle-steering bringup`` in a child process; restartable."""

    def __init__(self, folder: Path, name: str, only: tuple[str, ...]) -> None:
        self.folder, self.name, self.only = folder, name, only
        self.graph: GraphProcess | None = None
        self.starts = 0

    def start(self) -> None:
        overrides = [
            # The needle-model twin: these tests are about the gate, approvals and stops. The PyBullet
            # twin is exercised over DDS in test_nodes_twin_pybullet.py and in the end-to-end demo test.
            "sim_node.backend=kinematic",
            f"plan_review_node.audit_log={self.folder / 'review.jsonl'}",
            f"control_node.audit_log={self.folder / 'control.jsonl'}",
            "control_node.insertion_speed_mm_s=15.0",
        ]
        self.starts += 1
        log_path = self.folder / f"{self.name}-{self.starts}.log"
        self.graph = start_graph_process(str(REPO / "config" / "sim.yaml"), overrides, log_path, only=self.only)

    def alive(self) -> bool:
        return self.graph is not None and self.graph.problem() is None

    def log(self) -> str:
        assert self.graph is not None
        return self.graph.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> int:
        """SIGINT (bringup stops its nodes), kill the session if it hangs; returns the exit status."""
        assert self.graph is not None
        return self.graph.shutdown(timeout_s=20.0)


_REVIEW: dict[str, Bringup] = {}


@pytest.fixture(scope="module")
def graph(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[User, Path]]:
    """The sim.yaml graph (two bringups: the review node alone, so a test can restart it) + a user node."""
    folder = tmp_path_factory.mktemp("dds")
    main = Bringup(folder, "bringup", ("perception_node", "planning_node", "control_node", "sim_node"))
    review = Bringup(folder, "review", ("plan_review_node",))
    _REVIEW["review"] = review
    main.start()
    review.start()
    rclpy.init()
    user = User()
    try:
        user.wait_for(lambda: bool(user.status), 30.0, "first /control/status from bringup")
        assert main.alive(), main.log()
        assert review.alive(), review.log()
        yield user, folder
    finally:
        user.node.destroy_node()
        rclpy.shutdown()
        statuses = {b.name: b.stop() for b in (review, main)}
    assert statuses == {"review": 0, "bringup": 0}, (statuses, main.log(), review.log())


def _events(folder: Path, name: str) -> list[dict[str, Any]]:
    return read_audit_log(folder / name)  # also verifies the hash chain


# --------------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------------
def test_nodes_dds_interactive_marker_protocol(graph: tuple[User, Path], tmp_path: Path) -> None:
    user, _folder = graph
    plan_file, plan = write_plan(tmp_path, "protocol")
    user.load_plan(plan_file, plan)
    response = user.call(GetInteractiveMarkers, "/plan_review/get_interactive_markers")
    names = sorted(m.name for m in response.markers)
    assert names == sorted(t.id for t in plan.trajectories)
    marker = next(m for m in response.markers if m.name == "L3-biopsy")
    assert marker.header.frame_id == "patient"
    assert marker.pose.position.y == pytest.approx(0.080)  # LPS 80 mm -> 0.08 m
    assert [e.title for e in marker.menu_entries] == ["Approve", "Reject", "Approve all"]
    assert response.sequence_number >= 1


def test_nodes_dds_execute_without_approval_is_refused(graph: tuple[User, Path], tmp_path: Path) -> None:
    user, folder = graph
    user.idle()
    plan_file, plan = write_plan(tmp_path, "unapproved")
    user.load_plan(plan_file, plan)
    response = user.trigger("/control/execute")
    assert not response.success
    assert "not approved" in response.message
    refusals = [e for e in _events(folder, "control.jsonl") if e["event"] == "execute_refused"]
    assert refusals and refusals[-1]["plan_sha256"] == plan.sha256 and "not approved" in refusals[-1]["reason"]


def test_nodes_dds_approve_and_execute_reaches_targets(graph: tuple[User, Path], tmp_path: Path) -> None:
    user, folder = graph
    user.idle()
    plan_file, plan = write_plan(tmp_path, "happy")
    user.load_plan(plan_file, plan)
    user.menu("L4-biopsy", 2)  # Reject L4 first, then approve only L3
    user.menu("L3-biopsy", 1)
    user.wait_for(
        lambda: len(user.approvals.get("approvals", [])) == 1 and len(user.approvals["rejections"]) == 1,
        5.0,
        "one approval and one rejection",
    )
    user.wait_for(lambda: user.status.get("approved") == ["L3-biopsy"], 5.0, "the approval to reach control")
    record = user.approvals["approvals"][0]
    assert record["plan_sha256"] == plan.sha256
    assert record["trajectory_sha256"] == plan.trajectory("L3-biopsy").sha256
    assert record["surgeon_id"] == "sim-surgeon" and record["client_id"] == "/rviz2/test_client"
    response = user.trigger("/control/execute")
    assert response.success, response.message
    assert "L3-biopsy" in response.message and "skipped: L4-biopsy" in response.message
    user.wait_for(lambda: user.status.get("state") in ("done", "stopped", "fault"), 30.0, "execution to end")
    assert user.status["state"] == "done", user.status
    results = user.status["results"]
    assert [r["trajectory"] for r in results] == ["L3-biopsy"]
    assert results[0]["robot_tip_error_mm"] < 1.5  # the twin's tip reached the target
    review = [e["event"] for e in _events(folder, "review.jsonl")]
    assert "approve" in review and "reject" in review
    control = [e for e in _events(folder, "control.jsonl") if e.get("plan_sha256") == plan.sha256]
    assert [e["event"] for e in control if e["event"] in ("execute_started", "trajectory_reached", "execute_done")] == [
        "execute_started",
        "trajectory_reached",
        "execute_done",
    ]


def test_nodes_dds_plan_change_after_approval_is_refused(graph: tuple[User, Path], tmp_path: Path) -> None:
    user, folder = graph
    user.idle()
    plan_file, plan = write_plan(tmp_path, "before-change")
    user.load_plan(plan_file, plan)
    user.approve_all(plan)
    changed_file, changed = write_plan(tmp_path, "after-change", shift_mm=3.0)
    assert changed.sha256 != plan.sha256
    user.load_plan(changed_file, changed)
    response = user.trigger("/control/execute")
    assert not response.success and "not approved" in response.message, response.message
    received = [e for e in _events(folder, "review.jsonl") if e["event"] == "plan_received"]
    assert received[-1]["plan_sha256"] == changed.sha256
    assert received[-1]["previous_plan_sha256"] == plan.sha256
    assert received[-1]["approvals_voided"] == ["L3-biopsy", "L4-biopsy"]
    # Stale approvals for the old plan (e.g. a replayed message) do not pass the gate either.
    stale = {
        "schema": "needle_steering.approvals/1",
        "plan_sha256": plan.sha256,
        "rejections": [],
        "approvals": [
            {
                "decision": "approve",
                "plan_sha256": plan.sha256,
                "trajectory_id": t.id,
                "trajectory_sha256": t.sha256,
                "surgeon_id": "sim-surgeon",
                "client_id": "/replay",
                "time_utc": "2026-01-01T00:00:00Z",
            }
            for t in plan.trajectories
        ],
    }
    user.publish_raw("/plan/approvals", json.dumps(stale), "latched")
    user.spin(0.3)
    response = user.trigger("/control/execute")
    assert not response.success and "plan hash differs" in response.message, response.message


def test_nodes_dds_drag_after_approval_invalidates(graph: tuple[User, Path], tmp_path: Path) -> None:
    user, folder = graph
    user.idle()
    plan_file, plan = write_plan(tmp_path, "drag")
    user.load_plan(plan_file, plan)
    user.approve_all(plan)
    user.drag("L3-biopsy", (14.0, 82.0, 0.0))
    user.wait_for(
        lambda: [a["trajectory_id"] for a in user.approvals.get("approvals", [])] == ["L4-biopsy"],
        5.0,
        "L3 approval to be voided",
    )
    user.menu("L3-biopsy", 1)  # approving the un-rechecked proposal is refused
    user.spin(0.5)
    assert [a["trajectory_id"] for a in user.approvals["approvals"]] == ["L4-biopsy"]
    response = user.trigger("/control/execute")
    assert not response.success and "L3-biopsy" in response.message, response.message
    events = [e for e in _events(folder, "review.jsonl") if e.get("trajectory_id") == "L3-biopsy"]
    kinds = [e["event"] for e in events]
    assert "invalidate" in kinds and "adjust_proposed" in kinds and "approve_refused" in kinds
    assert next(e for e in events if e["event"] == "invalidate")["had_decision"] is True
    user.wait_for(lambda: any(e.get("event") == "adjust_rejected" for e in user.review_events), 5.0, "planner verdict")


def test_nodes_dds_accepted_drag_publishes_a_rechecked_plan(graph: tuple[User, Path]) -> None:
    """Planned on the phantom, a dragged entry is re-checked and re-graded by planning_node: a new
    plan (new hashes) replaces the approved one, every approval is void until given again."""
    user, folder = graph
    user.idle()
    for name, value in (("plan_file", ""), ("levels", "L3")):
        result = user.set_param("planning_node", name, value)
        assert result.successful, result.reason
    response = user.call(Trigger, "/planning/plan", timeout=120.0)
    assert response.success, response.message
    user.wait_for(
        lambda: bool(user.plan_text) and str(user.approvals.get("plan_sha256")) in user.plan_text, 15.0, "the plan"
    )
    plan = load_plan(user.plan_text)
    assert {t.id for t in plan.trajectories} == {"L3-left", "L3-right"}
    user.approve_all(plan)
    screw = plan.trajectory("L3-left")
    entry, tip = np.asarray(screw.entry_lps_mm), np.asarray(screw.tip_lps_mm)
    moved = entry + 1.0 * (tip - entry) / np.linalg.norm(tip - entry)  # 1 mm deeper along its own axis
    user.drag("L3-left", (float(moved[0]), float(moved[1]), float(moved[2])))
    user.wait_for(
        lambda: user.approvals.get("plan_sha256") not in (None, plan.sha256) and plan.sha256 not in user.plan_text,
        30.0,
        "the re-checked plan",
    )
    adjusted = load_plan(user.plan_text)
    new_screw = adjusted.trajectory("L3-left")
    assert np.allclose(new_screw.entry_lps_mm, moved, atol=1e-3) and new_screw.tip_lps_mm == screw.tip_lps_mm
    assert new_screw.metrics["adjusted_in_review"] is True and new_screw.metrics["predicted_grade"] == "A"
    assert new_screw.length_mm == pytest.approx(screw.length_mm - 1.0, abs=1e-3)
    assert adjusted.trajectory("L3-right").sha256 == plan.trajectory("L3-right").sha256
    assert user.approvals["approvals"] == []  # the new plan hash voids both decisions
    refused = user.trigger("/control/execute")
    assert not refused.success and "not approved" in refused.message, refused.message
    user.wait_for(lambda: any(e.get("event") == "adjust_accepted" for e in user.review_events), 5.0, "the verdict")
    verdicts = [e for e in _events(folder, "review.jsonl") if e["event"] == "adjust_accepted"]
    assert verdicts and verdicts[-1]["plan_sha256"] == plan.sha256 and verdicts[-1]["trajectory_id"] == "L3-left"
    user.approve_all(adjusted)
    record = next(a for a in user.approvals["approvals"] if a["trajectory_id"] == "L3-left")
    assert record["plan_sha256"] == adjusted.sha256 and record["trajectory_sha256"] == new_screw.sha256


def test_nodes_dds_review_node_restart_restores_approvals(graph: tuple[User, Path], tmp_path: Path) -> None:
    """plan_review_node restarts (crash, operator restart): the decisions on the plan it was
    reviewing come back from its audit log, unchanged, and still gate execution."""
    user, folder = graph
    user.idle()
    plan_file, plan = write_plan(tmp_path, "restart")
    user.load_plan(plan_file, plan)
    user.approve_all(plan)
    before = dict(user.approvals)
    review = _REVIEW["review"]
    assert review.stop() == 0, review.log()
    user.approvals = {}
    review.start()
    user.wait_for(
        lambda: user.approvals.get("plan_sha256") == plan.sha256 and len(user.approvals["approvals"]) == 2,
        30.0,
        "the restarted review node to republish the approvals",
    )
    assert user.approvals == before  # same records: hashes, surgeon, RViz client, decision times
    restored = [e for e in _events(folder, "review.jsonl") if e["event"] == "decisions_restored"]
    assert restored and restored[-1]["plan_sha256"] == plan.sha256
    assert "restored the previous run's decisions" in review.log()
    user.wait_for(lambda: len(user.status.get("approved", [])) == 2, 10.0, "control to hold the restored approvals")
    response = user.trigger("/control/execute")
    assert response.success, response.message
    user.wait_for(lambda: user.status.get("state") in ("done", "stopped", "fault"), 60.0, "execution to end")
    assert user.status["state"] == "done", user.status


def _start_and_wait_inserting(user: User, plan: PlanDocument, min_mm: float) -> None:
    response = user.trigger("/control/execute")
    assert response.success, response.message
    user.wait_for(lambda: user.status.get("phase") == "insert" and user.inserted_mm() > min_mm, 20.0, "insertion")


def test_nodes_dds_estop_mid_insertion(graph: tuple[User, Path], tmp_path: Path) -> None:
    user, folder = graph
    user.idle()
    plan_file, plan = write_plan(tmp_path, "estop")
    user.load_plan(plan_file, plan)
    user.approve_all(plan)
    _start_and_wait_inserting(user, plan, 4.0)
    user.estop.publish(Bool(data=True))
    user.wait_for(lambda: user.status.get("state") == "stopped", 2.0, "stop")
    assert user.status["reason"] == "e-stop" and user.status["estop_latched"]
    user.spin(0.3)
    depth = user.inserted_mm()
    user.spin(0.7)
    assert user.inserted_mm() == pytest.approx(depth, abs=1e-6), "needle kept moving after the e-stop"
    assert 0.0 < depth < 20.0
    assert "e-stop latched" in user.trigger("/control/execute").message
    refused = user.trigger("/control/reset")
    assert not refused.success and "e-stop input still pressed" in refused.message
    user.estop.publish(Bool(data=False))
    user.spin(0.2)
    assert user.trigger("/control/reset").success
    kinds = [e["event"] for e in _events(folder, "control.jsonl")]
    last_estop = len(kinds) - 1 - kinds[::-1].index("estop")
    assert kinds[last_estop:] == ["estop", "stopped", "execute_refused", "reset_refused", "estop_released", "reset"]


def test_nodes_dds_sensor_loss_stops(graph: tuple[User, Path], tmp_path: Path) -> None:
    user, folder = graph
    user.idle()
    plan_file, plan = write_plan(tmp_path, "sensor-loss")
    user.load_plan(plan_file, plan)
    user.approve_all(plan)
    _start_and_wait_inserting(user, plan, 3.0)  # starts by retracting what the e-stop test left inserted
    user.fault.publish(String(data=json.dumps({"tracker_dropout": True})))
    try:
        user.wait_for(lambda: user.status.get("state") == "stopped", 3.0, "watchdog stop")
        assert "stale" in user.status["reason"], user.status
        user.spin(0.3)
        depth = user.inserted_mm()
        user.spin(0.5)
        assert user.inserted_mm() == pytest.approx(depth, abs=1e-6)
        refused = user.trigger("/control/reset")
        assert not refused.success and "tracker data stale" in refused.message
    finally:
        user.fault.publish(String(data=json.dumps({"tracker_dropout": False})))
    user.spin(0.5)
    assert user.trigger("/control/reset").success
    stops = [e for e in _events(folder, "control.jsonl") if e["event"] == "stopped"]
    assert "stale" in stops[-1]["reason"] and stops[-1]["phase"] == "insert"


def test_nodes_dds_malformed_inputs_are_refused_with_reasons(graph: tuple[User, Path], tmp_path: Path) -> None:
    user, folder = graph
    user.idle()
    plan_file, plan = write_plan(tmp_path, "malformed")
    user.load_plan(plan_file, plan)
    garbage = "{not json"
    for topic, profile in (
        ("/planning/adjust_request", "command"),
        ("/planning/adjust_result", "events"),
        ("/needle_robot/operating_state", "status"),
        ("/sim/fault", "command"),
        ("/plan/approvals", "latched"),
        ("/plan/document", "latched"),
    ):
        user.publish_raw(topic, garbage, profile)
    user.spin(0.5)
    response = user.trigger("/control/execute")
    assert not response.success and "malformed JSON" in response.message, response.message
    control = [e for e in _events(folder, "control.jsonl") if e["event"] == "input_rejected"]
    assert {e["source"] for e in control} >= {"/plan/document", "/plan/approvals", "/needle_robot/operating_state"}
    review = [e for e in _events(folder, "review.jsonl") if e["event"] == "input_rejected"]
    assert {e["source"] for e in review} >= {"/plan/document", "/planning/adjust_result"}
    # a bad parameter is refused with the reason; every node still answers
    result = user.set_param("control_node", "insertion_speed_mm_s", 500.0)
    assert not result.successful and "500" in result.reason
    # same plan again: the graph recovers, but the review node (same plan) does not republish, so
    # control's approvals stay wiped by the garbage: fail closed
    user.load_plan(plan_file, plan, control_gets_approvals=False)
    assert not user.trigger("/control/execute").success
    try:
        core_adapters.require_segmentation()
    except core_adapters.CoreUnavailableError as exc:
        response = user.trigger("/perception/segment")  # answers at once with the missing core API
        assert not response.success and response.message == str(exc)
    else:
        assert user.call(Trigger, "/perception/segment", timeout=180.0).message  # answers, with levels or a reason
