"""The end-to-end demo (``needle_steering.demo.run_demo``) as the integration test of the whole graph.

It runs the real demo into a temporary folder: the node graph of config/sim.yaml, one process per
node (PyBullet twin, generated phantom patient with a lesion), a client node over DDS doing
segmentation -> planning -> scripted approvals (RViz MENU_SELECT feedback) -> execution, and the
outputs. Isolation as in the DDS tests: random ``ROS_DOMAIN_ID``, localhost discovery.

While a core API the demo needs has not landed (``perception.segment.segment_volume``,
``planning.plan_case``), the end-to-end test is skipped with that reason and the other test checks
that the demo refuses at once, with one line naming the missing piece and no output files.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

os.environ["ROS_DOMAIN_ID"] = str(random.SystemRandom().randint(1, 100))
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"

from needle_steering.demo import REVIEWER_CLIENT_ID, REVIEWER_ID, run_demo
from needle_steering.nodes.audit import read_audit_log
from needle_steering.nodes.interfaces import PLAN_PATH_PATTERN
from needle_steering.nodes.markers import topic_safe
from needle_steering.planning.plan_document import load_plan
from needle_steering.sim.mcap_recorder import read_mcap_messages

pytestmark = pytest.mark.ros
#: Wall-time budget of the demo on the 2-core CI machine (the brief: under 2 minutes; headroom for load).
BUDGET_S = 150.0


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    """Run the demo once for the module: (exit status, output folder)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    return run_demo(out, seed=7), out


def test_nodes_demo_end_to_end(demo: tuple[int, Path]) -> None:
    status, out = demo
    summary: dict[str, Any] = json.loads((out / "summary.json").read_text())
    assert status == 0, json.dumps({k: summary.get(k) for k in ("error", "execution", "timings_s", "twin")}, indent=1)
    for name in ("plan.json", "report.html", "run.mcap", "summary.json"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    plan = load_plan(out / "plan.json")  # schema and sha256 verified
    assert summary["planning"]["plan_sha256"] == plan.sha256
    assert plan.sha256 in (out / "report.html").read_text(encoding="utf-8")

    # segmentation and planning through the graph
    assert {"L1", "L2", "L3", "L4", "L5"} <= set(summary["segmentation"]["levels_found"])
    screws = [t for t in plan.trajectories if t.kind == "pedicle_screw"]
    assert len(screws) == summary["planning"]["screws_planned"] >= 1
    assert all(isinstance(r, str) and r for r in summary["planning"]["screws_skipped"].values())
    assert len(screws) + len(summary["planning"]["screws_skipped"]) >= 2  # bilateral levels were requested
    assert any(t.kind == "biopsy" for t in plan.trajectories), "no biopsy of the lesion was planned"

    # scripted approvals, labelled as such, for every trajectory of this plan
    assert summary["scripted_review"]["approver"] == REVIEWER_ID
    assert {a["trajectory_id"] for a in summary["approvals"]} == {t.id for t in plan.trajectories}
    assert all(a["scripted"] and a["surgeon_id"] == REVIEWER_ID for a in summary["approvals"])
    review = read_audit_log(out / "audit" / "plan_review.jsonl")  # verifies the hash chain
    approvals = [e for e in review if e["event"] == "approve" and e.get("plan_sha256") == plan.sha256]
    assert {e["trajectory_id"] for e in approvals} == {t.id for t in plan.trajectories}
    assert all(e["surgeon_id"] == REVIEWER_ID and e["client_id"] == REVIEWER_CLIENT_ID for e in approvals)
    assert all(e["trajectory_sha256"] == plan.trajectory(e["trajectory_id"]).sha256 for e in approvals)

    # every approved trajectory executed, the twin's true tip within the acceptance tolerance
    execution = summary["execution"]
    assert execution["state"] == "done", execution
    tolerance = execution["acceptance_tolerance_mm"]
    assert tolerance <= 1.5
    executed = {e["trajectory"]: e for e in execution["trajectories"]}
    assert set(executed) == {t.id for t in plan.trajectories}
    for traj_id, e in executed.items():
        assert e["status"] == "reached" and e["within_tolerance"], e
        assert 0.0 <= e["target_error_mm"] <= tolerance, e
        assert e["min_critical_clearance_mm"] is None or e["min_critical_clearance_mm"] > 0.0, (traj_id, e)
    control = read_audit_log(out / "audit" / "control.jsonl")
    run = [e["event"] for e in control if e.get("plan_sha256") == plan.sha256]
    assert run.count("trajectory_reached") == len(plan.trajectories) and run[-1] == "execute_done"
    twin = summary["twin"]
    assert twin["backend"] == "pybullet" and str(twin["anatomy"]).startswith("loaded")
    assert twin["critical_contacts"] == 0 and twin["moves_refused"] == 0
    assert isinstance(twin["stalls"], int) and twin["max_stall_s"] >= 0.0  # the twin's stall telemetry is reported

    # the recording: rosbag2-compatible MCAP with the graph's topics, decodable with mcap-ros2-support
    messages = read_mcap_messages(out / "run.mcap")
    expected = {
        "/control/status", "/control/tip_estimate", "/tracker/measured_cp", "/needle_robot/measured_cp",
        "/needle_robot/measured_js", "/needle_robot/servo_jv", "/needle_robot/move_cp", "/plan/document",
        "/plan/approvals", "/plan_review/events", "/sim/state", "/registration/T_patient_from_robot_base",
    } | {PLAN_PATH_PATTERN.replace("{trajectory}", topic_safe(t.id)) for t in plan.trajectories}  # fmt: skip
    assert expected <= set(messages), sorted(expected - set(messages))
    assert all(messages[topic] for topic in expected)
    assert len(messages["/needle_robot/move_cp"]) == len(plan.trajectories)
    _, js = messages["/needle_robot/measured_js"][-1]
    assert list(js.name)[:2] == ["insertion", "roll"] and "lbr_iiwa_joint_7" in list(js.name)
    _, doc = messages["/plan/document"][-1]
    assert load_plan(doc.data).sha256 == plan.sha256
    _, last_status = messages["/control/status"][-1]
    assert json.loads(last_status.data)["state"] == "done"
    _, path = messages[PLAN_PATH_PATTERN.replace("{trajectory}", topic_safe(plan.trajectories[0].id))][0]
    assert path.header.frame_id == "patient" and len(path.poses) >= 2
    times = [t for t, _ in messages["/needle_robot/measured_js"]]
    assert times == sorted(times)

    # time budget
    assert summary["timings_s"]["total_s"] < BUDGET_S, summary["timings_s"]
