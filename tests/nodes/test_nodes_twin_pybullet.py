"""The PyBullet backend of sim_node: real PyBullet (IK, anatomy meshes, contacts) and a real DDS graph.

The anatomy is a small synthetic label map (a vertebral "body" with a spinous-process wall, and a
spinal canal) so meshing takes a fraction of a second. The unit-level tests drive the backend on
the test thread (which becomes the PyBullet owner); the DDS test runs ``bringup`` in a subprocess
with ``sim_node.backend=pybullet`` and reaches approved targets through the whole graph, as the
DDS integration tests do (random ``ROS_DOMAIN_ID``, localhost discovery, SIGINT at the end).
"""

from __future__ import annotations

import copy
import functools
import json
import os
import random
import threading
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
from std_msgs.msg import String
from std_srvs.srv import Trigger
from visualization_msgs.msg import InteractiveMarkerFeedback

from needle_steering.errors import SimulationError
from needle_steering.nodes.audit import read_audit_log
from needle_steering.nodes.bringup import start_graph_process
from needle_steering.nodes.conversions import frame_with_z_axis
from needle_steering.nodes.qos import qos
from needle_steering.nodes.twin import TwinConfig, TwinError
from needle_steering.nodes.twin_pybullet import ARM_JOINT_NAMES, ArmSceneConfig, PyBulletTwinBackend
from needle_steering.perception import labels as label_ids
from needle_steering.perception.io import write_volume
from needle_steering.perception.volume import Volume
from needle_steering.planning.plan_document import ImageInfo, PlanDocument, Trajectory, save_plan

REPO = Path(__file__).resolve().parents[2]
DT_S = 0.005


# --------------------------------------------------------------------------------------------------
# synthetic patient
# --------------------------------------------------------------------------------------------------
def synthetic_labels() -> Volume:
    """A vertebra-like L3 (body x, z in [-20, 20], y in [-20, 10]; a spinous-process wall x in [-3, 3],
    y in [30, 60]) and a spinal canal between them (cylinder along z at x 0, y 20, radius 6).
    LPS mm (+y posterior), 1 mm voxels."""
    n = 121
    origin = np.array([-60.0, -60.0, -60.0])
    i, j, k = np.meshgrid(*(np.arange(n, dtype=float),) * 3, indexing="ij")
    x, y, z = origin[0] + i, origin[1] + j, origin[2] + k
    arr = np.zeros((n, n, n), dtype=np.int16)
    body = (np.abs(x) <= 20) & (y >= -20) & (y <= 10) & (np.abs(z) <= 20)
    wall = (np.abs(x) <= 3) & (y >= 30) & (y <= 60) & (np.abs(z) <= 20)
    arr[body | wall] = label_ids.level_id("L3")
    arr[(x**2 + (y - 20.0) ** 2 <= 36.0) & (np.abs(z) <= 40)] = label_ids.SPINAL_CANAL
    return Volume(arr, (1.0, 1.0, 1.0), origin, np.eye(3), {"source": "synthetic test anatomy"})


@pytest.fixture(scope="module")
def labels() -> Volume:
    return synthetic_labels()


def make_backend(labels: Volume | None) -> PyBulletTwinBackend:
    config = TwinConfig(home_T_patient_from_tip_mm=np.eye(4), tracker_position_sigma_mm=0.2, seed=3)
    scene = ArmSceneConfig(patient_anchor_lps_mm=(0.0, 0.0, 0.0), anatomy_source="synthetic")
    # the loader runs in the anatomy process: it must be picklable (no lambda)
    return PyBulletTwinBackend(config, scene, functools.partial(copy.deepcopy, labels) if labels is not None else None)


class Clock:
    """Steps a backend in simulated time (the test thread owns PyBullet)."""

    def __init__(self, backend: PyBulletTwinBackend) -> None:
        self.backend = backend
        self.t = 0.0

    def run(
        self, seconds: float, until: Callable[[], bool] | None = None, every: Callable[[], None] | None = None
    ) -> None:
        for n in range(round(seconds / DT_S)):
            if until is not None and until():
                return
            self.backend.step(self.t, DT_S)
            self.t += DT_S
            if every is not None and n % 5 == 0:
                every()
        if until is not None:
            assert until(), f"condition not met within {seconds} s of simulated time"

    def wait_anatomy(self) -> None:
        end = time.monotonic() + 60.0
        while not self.backend.anatomy_loaded:
            assert time.monotonic() < end, self.backend.status()["anatomy"]
            self.backend.step(self.t, DT_S)
            self.t += DT_S
            time.sleep(0.01)


@pytest.fixture
def twin(labels: Volume) -> Iterator[tuple[PyBulletTwinBackend, Clock]]:
    backend = make_backend(labels)
    backend.start()
    try:
        clock = Clock(backend)
        clock.wait_anatomy()
        yield backend, clock
    finally:
        backend.close()


def _axis_angle_deg(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.degrees(np.arccos(np.clip(a @ b / np.linalg.norm(a) / np.linalg.norm(b), -1.0, 1.0))))


# --------------------------------------------------------------------------------------------------
# backend on the test thread
# --------------------------------------------------------------------------------------------------
def test_nodes_twin_pybullet_aligns_by_ik_inserts_and_tracks(twin: tuple[PyBulletTwinBackend, Clock]) -> None:
    backend, clock = twin
    status = backend.status()
    assert status["backend"] == "pybullet" and status["anatomy_loaded"]
    assert set(status["anatomy_meshes"]) == {"L3", "spinal_canal"}
    home = np.array(backend.joints().arm_positions_rad)
    goal = frame_with_z_axis((15.0, 30.0, 0.0), (0.0, -1.0, 0.0))
    backend.move_guide(goal)
    assert backend.busy()
    clock.run(20.0, until=lambda: not backend.busy())
    tip = backend.tip_pose_mm()
    assert np.linalg.norm(tip[:3, 3] - goal[:3, 3]) < 1e-3
    assert _axis_angle_deg(tip[:3, 2], goal[:3, 2]) < 1e-3
    joints = backend.joints()
    assert joints.arm_names == ARM_JOINT_NAMES and len(joints.arm_positions_rad) == 7
    assert np.max(np.abs(np.array(joints.arm_positions_rad) - home)) > 0.05, "the arm did not move"
    move = backend.status()["last_move"]
    assert move["ok"] and move["anatomy_checked"] and move["ik_position_error_mm"] < 0.1
    # insertion stage + needle model, spinning (straight)
    backend.servo_joints(10.0, 0.0, 1.0)
    clock.run(2.0)
    assert backend.joints().insertion_mm == pytest.approx(20.0, abs=0.06)
    np.testing.assert_allclose(backend.tip_pose_mm()[:3, 3], (15.0, 10.0, 0.0), atol=0.1)
    with pytest.raises(TwinError, match="retract it first"):
        backend.move_guide(goal)
    backend.hold()
    clock.run(0.2)  # a contact check runs with the needle at rest
    status = backend.status()
    assert status["insertion_index"] == 1 and status["insertion_depth_mm"] == pytest.approx(20.0, abs=0.06)
    np.testing.assert_allclose(status["insertion_deepest_tip_lps_mm"], (15.0, 10.0, 0.0), atol=0.1)
    # canal axis at (x 0, y 20): the needle (radius 0.64 mm) passes 15 mm beside it, never in it
    assert 5.0 < status["needle_critical_clearance_mm"] < 12.0 and status["critical_contacts"] == 0
    # tracker: the true tip with noise (sigma 0.2 mm) and latency
    errors = []
    for _ in range(200):
        clock.run(DT_S)
        errors += [m.position_mm - backend.tip_pose_mm()[:3, 3] for m in backend.sample_tracker(clock.t, False)]
    err = np.array(errors)
    assert len(err) >= 30
    assert 0.1 < float(np.std(err)) < 0.35 and float(np.linalg.norm(err.mean(axis=0))) < 0.15
    lost = []
    for _ in range(40):  # a dead tracker delivers nothing new (at most a sample already in transit)
        clock.run(DT_S)
        lost += backend.sample_tracker(clock.t, dropout=True)
    assert len(lost) <= 1
    backend.servo_joints(-20.0, 0.0, 1.0)
    clock.run(1.5)
    assert backend.joints().insertion_mm == 0.0
    np.testing.assert_allclose(backend.tip_pose_mm()[:3, 3], goal[:3, 3], atol=1e-3)


def test_nodes_twin_pybullet_plans_around_bone(twin: tuple[PyBulletTwinBackend, Clock]) -> None:
    backend, clock = twin
    left = frame_with_z_axis((15.0, 30.0, 0.0), (0.0, -1.0, 0.0))
    right = frame_with_z_axis((-15.0, 30.0, 0.0), (0.0, -1.0, 0.0))
    backend.move_guide(left)
    clock.run(20.0, until=lambda: not backend.busy())
    # the guide (radius 6 mm) cannot cross the 60 mm high wall between the entries at this height
    backend.move_guide(right)
    worst: dict[str, float] = {"arm": np.inf, "guide": np.inf}

    def check() -> None:
        report = backend.clearance(query_mm=20.0)
        worst["arm"] = min(worst["arm"], report.arm_mm)
        worst["guide"] = min(worst["guide"], report.guide_mm)

    clock.run(30.0, until=lambda: not backend.busy(), every=check)
    move = backend.status()["last_move"]
    assert move["ok"] and move["legs"] != ["direct"] and any("back out" in leg for leg in move["legs"]), move
    np.testing.assert_allclose(backend.tip_pose_mm()[:3, 3], right[:3, 3], atol=1e-3)
    assert worst["guide"] >= 1.0 and worst["arm"] >= 5.0, worst


def test_nodes_twin_pybullet_refuses_unreachable_goals(twin: tuple[PyBulletTwinBackend, Clock]) -> None:
    backend, clock = twin
    before = np.array(backend.joints().arm_positions_rad)
    backend.move_guide(frame_with_z_axis((0.0, 3000.0, 0.0), (0.0, -1.0, 0.0)))
    with pytest.raises(TwinError, match=r"move_cp refused: .*unreachable"):
        clock.run(5.0, until=lambda: not backend.busy())
    assert not backend.busy()
    np.testing.assert_allclose(backend.joints().arm_positions_rad, before)
    assert backend.status()["last_move"]["ok"] is False and backend.status()["moves_refused"] == 1
    # a guide pose inside the bone is refused as a collision, not reached
    backend.move_guide(frame_with_z_axis((10.0, 0.0, 0.0), (0.0, -1.0, 0.0)))
    with pytest.raises(TwinError, match="collision"):
        clock.run(5.0, until=lambda: not backend.busy())


def test_nodes_twin_pybullet_reports_needle_contact_with_the_canal(twin: tuple[PyBulletTwinBackend, Clock]) -> None:
    backend, clock = twin
    # posterolateral, beside the spinous-process wall, into the canal (axis at x 0, y 20)
    entry = np.array([15.0, 45.0, 0.0])
    axis = np.array([0.0, 20.0, 0.0]) - entry
    backend.move_guide(frame_with_z_axis(entry, axis))
    clock.run(20.0, until=lambda: not backend.busy())
    backend.servo_joints(20.0, 0.0, 1.0)
    clock.run(float(np.linalg.norm(axis)) / 20.0)
    backend.hold()
    clock.run(0.2)
    status = backend.status()
    assert status["critical_contacts"] >= 1, status
    assert status["insertion_min_critical_body"] == "spinal_canal"
    assert status["insertion_min_critical_clearance_mm"] <= 0.0
    assert any("needle contact with spinal_canal" in e for e in backend.pop_events())


def test_nodes_twin_pybullet_belongs_to_the_thread_that_started_it(labels: Volume) -> None:
    backend = make_backend(None)
    backend.start()
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            backend.step(0.0, DT_S)
        except BaseException as exc:
            errors.append(exc)

    try:
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
        assert errors and isinstance(errors[0], SimulationError) and "owner thread" in str(errors[0])
        backend.step(0.0, DT_S)  # the owner may
        assert backend.status()["anatomy"] == "none"
    finally:
        backend.close()


# --------------------------------------------------------------------------------------------------
# the graph over DDS with the PyBullet twin
# --------------------------------------------------------------------------------------------------
def _trajectory(tid: str, entry: tuple[float, float, float], tip: tuple[float, float, float]) -> Trajectory:
    return Trajectory(
        id=tid,
        kind="biopsy",
        level="L3",
        side="none",
        entry_lps_mm=entry,
        tip_lps_mm=tip,
        path_lps_mm=(entry, tip),
        diameter_mm=1.5,
        length_mm=float(np.linalg.norm(np.subtract(tip, entry))),
        metrics={"case": "pybullet twin"},
    )


class User:
    """A separate rclpy node acting as the surgeon's console and RViz."""

    def __init__(self) -> None:
        self.node = rclpy.create_node("test_pybullet_user")
        self.status: dict[str, Any] = {}
        self.approvals: dict[str, Any] = {}
        self.sim_states: list[dict[str, Any]] = []
        self.joint_states: list[JointState] = []
        n = self.node
        n.create_subscription(String, "/control/status", self._on_status, qos("status"))
        n.create_subscription(String, "/plan/approvals", self._on_approvals, qos("latched"))
        n.create_subscription(String, "/sim/state", self._on_sim_state, qos("status"))
        n.create_subscription(JointState, "/needle_robot/measured_js", self.joint_states.append, qos("sensor"))
        self.feedback = n.create_publisher(InteractiveMarkerFeedback, "/plan_review/feedback", qos("events"))

    def _on_status(self, msg: String) -> None:
        self.status = json.loads(msg.data)

    def _on_approvals(self, msg: String) -> None:
        self.approvals = json.loads(msg.data)

    def _on_sim_state(self, msg: String) -> None:
        self.sim_states.append(json.loads(msg.data))

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
            self.wait_for(future.done, timeout, f"{name} to answer")
            return future.result()
        finally:
            self.node.destroy_client(client)


@pytest.fixture(scope="module")
def graph(tmp_path_factory: pytest.TempPathFactory, labels: Volume) -> Iterator[tuple[User, Path]]:
    folder = tmp_path_factory.mktemp("pybullet_dds")
    labels_file = write_volume(labels, folder / "labels.nii.gz")
    overrides = [
        "sim_node.backend=pybullet",
        f"sim_node.anatomy={labels_file}",
        "sim_node.patient_anchor_lps_mm=[0.0, 0.0, 0.0]",
        f"plan_review_node.audit_log={folder / 'review.jsonl'}",
        f"control_node.audit_log={folder / 'control.jsonl'}",
        "control_node.insertion_speed_mm_s=15.0",
    ]
    bringup = start_graph_process(str(REPO / "config" / "sim.yaml"), overrides, folder / "bringup.log")
    rclpy.init()
    user = User()
    try:
        user.wait_for(lambda: bool(user.sim_states) and user.sim_states[-1].get("anatomy_loaded") is True, 60.0,
                      "the PyBullet twin's anatomy")
        assert bringup.problem() is None, bringup.problem()
        yield user, folder
    finally:
        user.node.destroy_node()
        rclpy.shutdown()
        status = bringup.shutdown(timeout_s=20.0)
    tail = bringup.log_path.read_text()[-3000:]
    assert status == 0, f"bringup exited with {status}:\n{tail}"


def test_nodes_twin_pybullet_dds_reaches_approved_targets(graph: tuple[User, Path], tmp_path: Path,
                                                          labels: Volume) -> None:
    user, folder = graph
    info = ImageInfo.from_volume(labels)
    plan = PlanDocument(
        info,
        info,
        (
            _trajectory("left-biopsy", (15.0, 30.0, 0.0), (15.0, 0.0, 0.0)),
            _trajectory("right-biopsy", (-15.0, 30.0, 0.0), (-14.0, 2.0, 2.0)),
        ),
    )
    plan_file = save_plan(plan, tmp_path / "plan.json")
    pv = ParameterValue(type=ParameterType.PARAMETER_STRING, string_value=str(plan_file))
    result = user.call(SetParameters, "/planning_node/set_parameters",
                       SetParameters.Request(parameters=[ParameterMsg(name="plan_file", value=pv)])).results[0]
    assert result.successful, result.reason
    response = user.call(Trigger, "/planning/plan")
    assert response.success, response.message
    user.wait_for(lambda: user.approvals.get("plan_sha256") == plan.sha256, 10.0, "the plan under review")
    for traj in plan.trajectories:  # RViz: right-click -> Approve, per trajectory
        fb = InteractiveMarkerFeedback(client_id="/rviz2/pybullet_test", marker_name=traj.id, control_name="menu")
        fb.event_type, fb.menu_entry_id = InteractiveMarkerFeedback.MENU_SELECT, 1
        user.feedback.publish(fb)
    user.wait_for(lambda: len(user.approvals.get("approvals", [])) == 2, 10.0, "two approvals")
    user.wait_for(
        lambda: user.status.get("plan_sha256") == plan.sha256 and len(user.status.get("approved", [])) == 2,
        10.0,
        "the plan and both approvals to reach control_node",
    )
    # DDS discovery of the registration and robot state can lag the plan under load: wait until control says ready
    user.wait_for(lambda: user.status.get("robot_problem") == "", 20.0, "control_node to see a ready robot")
    n_js = len(user.joint_states)
    response = user.call(Trigger, "/control/execute")
    assert response.success, response.message
    user.wait_for(lambda: user.status.get("state") in ("done", "stopped", "fault"), 90.0, "the execution to end")
    twin = {k: user.sim_states[-1].get(k) for k in ("stalls", "max_stall_s")} if user.sim_states else {}
    assert user.status["state"] == "done", json.dumps({"control": user.status, "twin": twin})
    results = {r["trajectory"]: r for r in user.status["results"]}
    assert set(results) == {"left-biopsy", "right-biopsy"}
    assert all(r["robot_tip_error_mm"] < 1.5 for r in results.values()), results
    # the twin's own truth: where each insertion stopped, its arm moves and clearances
    last = {s["insertion_index"]: s for s in user.sim_states if s.get("insertion_index")}
    deepest = [last[i]["insertion_deepest_tip_lps_mm"] for i in sorted(last)][-2:]
    for tip, traj in zip(deepest, plan.trajectories, strict=True):
        assert np.linalg.norm(np.subtract(tip, traj.tip_lps_mm)) < 1.5, (tip, traj.tip_lps_mm)
    final = user.sim_states[-1]
    assert final["backend"] == "pybullet" and final["moves_planned"] >= 2 and final["moves_refused"] == 0
    assert final["critical_contacts"] == 0 and final["last_move"]["ok"]
    arm = [js for js in user.joint_states[n_js:] if list(js.name) == ["insertion", "roll", *ARM_JOINT_NAMES]]
    assert arm, "measured_js carries no arm joints"
    q = np.array([js.position[2:] for js in arm])
    assert float(np.max(np.ptp(q, axis=0))) > 0.05, "the arm never moved"
    control = [e["event"] for e in read_audit_log(folder / "control.jsonl") if e.get("plan_sha256") == plan.sha256]
    assert control.count("trajectory_reached") == 2 and control[-1] == "execute_done"


def test_nodes_twin_pybullet_anatomy_loader_must_be_picklable(labels: Volume) -> None:
    """The anatomy is built in a child process: a closure loader is reported as a failure, never hangs."""
    config = TwinConfig(home_T_patient_from_tip_mm=np.eye(4), seed=3)
    backend = PyBulletTwinBackend(config, ArmSceneConfig(anatomy_source="closure"), lambda: labels)
    backend.start()
    try:
        clock = Clock(backend)
        end = time.monotonic() + 60.0
        while backend.status()["anatomy"].startswith("loading"):
            assert time.monotonic() < end, "the anatomy process never answered"
            clock.run(DT_S)
            time.sleep(0.01)
        status = backend.status()
        assert status["anatomy"].startswith("failed") and "pickle" in status["anatomy"].lower(), status["anatomy"]
        assert not status["anatomy_loaded"]
    finally:
        backend.close()
