"""Audit log, approval store and the pure execution gate (plain pytest, no ROS)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from needle_steering.nodes.approvals import (
    ApprovalError,
    ApprovalSet,
    ApprovalStore,
    check_execution,
    check_trajectory_still_approved,
    parse_approvals,
    parse_plan_message,
)
from needle_steering.nodes.audit import AuditLog, AuditLogError, read_audit_log
from needle_steering.perception.volume import Volume
from needle_steering.planning.plan_document import ImageInfo, PlanDocument, Trajectory


def _traj(tid: str, z: float = 0.0) -> Trajectory:
    entry, tip = (0.0, 80.0, z), (0.0, 50.0, z)
    return Trajectory(tid, "biopsy", "L3", "none", entry, tip, (entry, tip), 1.5, 30.0, {"grade": "B"})


def _plan(z: float = 0.0, ids: tuple[str, ...] = ("A", "B")) -> PlanDocument:
    info = ImageInfo.from_volume(Volume(np.zeros((4, 4, 4), np.int16), (1, 1, 1), (0, 0, 0), np.eye(3)))
    return PlanDocument(info, info, tuple(_traj(i, z) for i in ids), created_utc="2026-01-01T00:00:00Z")


def _store(tmp_path: Path, surgeon: str = "dr-who") -> ApprovalStore:
    return ApprovalStore(AuditLog(tmp_path / "audit.jsonl"), surgeon)


GOOD: dict[str, Any] = {"estop_latched": False, "sensor_age_s": 0.01, "sensor_timeout_s": 0.25}


# --------------------------------------------------------------------------------------------------
# audit log
# --------------------------------------------------------------------------------------------------
def test_nodes_approvals_audit_log_is_append_only_and_chained(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "audit.jsonl"
    log = AuditLog(path)
    log.append({"event": "a"})
    log.append({"event": "b"})
    log.close()
    first = path.read_bytes()
    reopened = AuditLog(path)  # continues the chain
    reopened.append({"event": "c"})
    reopened.close()
    assert path.read_bytes().startswith(first)  # earlier lines untouched
    records = read_audit_log(path)
    assert [r["event"] for r in records] == ["a", "b", "c"]
    assert [r["seq"] for r in records] == [1, 2, 3]


def test_nodes_approvals_audit_log_detects_tampering(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for n in range(3):
        log.append({"event": "approve", "n": n})
    log.close()
    lines = path.read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"n":1', '"n":7')
    path.write_text("".join(lines))
    with pytest.raises(AuditLogError, match=":3: hash chain broken"):
        read_audit_log(path)
    with pytest.raises(AuditLogError):
        AuditLog(path)  # a node refuses to continue a broken log


# --------------------------------------------------------------------------------------------------
# store
# --------------------------------------------------------------------------------------------------
def test_nodes_approvals_record_binds_plan_and_trajectory_hashes(tmp_path: Path) -> None:
    store = _store(tmp_path)
    plan = _plan()
    store.set_plan(plan)
    record = store.decide("approve", "A", "/rviz/1")
    assert record.plan_sha256 == plan.sha256
    assert record.trajectory_sha256 == plan.trajectory("A").sha256
    assert (record.surgeon_id, record.client_id) == ("dr-who", "/rviz/1")
    snap = store.snapshot()
    assert snap is not None and parse_approvals(snap.to_json()) == snap
    events = [r["event"] for r in read_audit_log(tmp_path / "audit.jsonl")]
    assert events == ["plan_received", "approve"]


def test_nodes_approvals_refused_without_surgeon_id_and_audited(tmp_path: Path) -> None:
    store = _store(tmp_path, surgeon="")
    store.set_plan(_plan())
    with pytest.raises(ApprovalError, match="surgeon_id"):
        store.decide("approve", "A", "/rviz/1")
    last = read_audit_log(tmp_path / "audit.jsonl")[-1]
    assert last["event"] == "approve_refused" and "surgeon_id" in last["reason"]


def test_nodes_approvals_unknown_trajectory_is_refused(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.set_plan(_plan())
    with pytest.raises(ApprovalError, match="no trajectory 'nope'"):
        store.decide("approve", "nope", "/rviz/1")


def test_nodes_approvals_new_plan_voids_every_decision(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.set_plan(_plan())
    store.approve_all("/rviz/1")
    assert store.set_plan(_plan()) is False  # same hash: nothing happens
    assert len(store.snapshot().approvals) == 2  # type: ignore[union-attr]
    new = _plan(z=1.0)
    assert store.set_plan(new) is True
    snap = store.snapshot()
    assert snap is not None and snap.plan_sha256 == new.sha256 and snap.approvals == ()
    assert read_audit_log(tmp_path / "audit.jsonl")[-1]["approvals_voided"] == ["A", "B"]


def test_nodes_approvals_drag_voids_and_blocks_approval(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.set_plan(_plan())
    store.approve_all("/rviz/1")
    store.propose("A", (1.0, 82.0, 0.0), "/rviz/1")
    assert [r.trajectory_id for r in store.snapshot().approvals] == ["B"]  # type: ignore[union-attr]
    assert store.decision_of("A") == "proposed"
    with pytest.raises(ApprovalError, match="dragged"):
        store.decide("approve", "A", "/rviz/1")
    store.proposal_result("A", False, "re-check unavailable")
    with pytest.raises(ApprovalError, match="rejected by the planner"):
        store.decide("approve", "A", "/rviz/1")
    store.decide("reject", "A", "/rviz/1")  # rejecting a proposal is always allowed
    events = [r["event"] for r in read_audit_log(tmp_path / "audit.jsonl")]
    assert events[-6:] == [
        "invalidate",
        "adjust_proposed",
        "approve_refused",
        "adjust_rejected",
        "approve_refused",
        "reject",
    ]


# --------------------------------------------------------------------------------------------------
# restart: decisions restored from the audit log
# --------------------------------------------------------------------------------------------------
def _restarted(tmp_path: Path, plan: PlanDocument) -> tuple[ApprovalStore, list[str]]:
    """A new store on the same audit log (a restarted review node) that receives ``plan`` first."""
    log = AuditLog(tmp_path / "audit.jsonl")
    store = ApprovalStore(log, "dr-who")
    store.set_plan(plan)
    return store, store.restore(log.records_at_open)


def test_nodes_approvals_restart_restores_the_decisions_in_force(tmp_path: Path) -> None:
    plan = _plan(ids=("A", "B", "C"))
    store = _store(tmp_path)
    store.set_plan(plan)
    store.approve_all("/rviz/1")
    store.decide("reject", "B", "/rviz/1")
    store.propose("C", (1.0, 82.0, 0.0), "/rviz/1")
    store.proposal_result("C", False, "breaches the cortex")
    before = store.snapshot()
    store.audit.close()

    restored, ids = _restarted(tmp_path, plan)
    assert ids == ["A", "B", "C"]
    assert restored.snapshot() == before  # same records: hashes, surgeon, client, time
    assert restored.decision_of("C") == "proposed"
    with pytest.raises(ApprovalError, match="rejected by the planner"):
        restored.decide("approve", "C", "/rviz/2")
    assert check_execution(plan, restored.snapshot(), **GOOD).allowed is False  # B rejected, C dragged
    restored.audit.close()

    # a second restart replays the first restoration and what followed it
    again, ids = _restarted(tmp_path, plan)
    assert ids == ["A", "B", "C"] and again.snapshot() == before
    events = [r["event"] for r in read_audit_log(tmp_path / "audit.jsonl")]
    assert events.count("decisions_restored") == 2


def test_nodes_approvals_restart_never_revives_voided_decisions(tmp_path: Path) -> None:
    plan_a, plan_b = _plan(0.0), _plan(5.0)
    store = _store(tmp_path)
    store.set_plan(plan_a)
    store.approve_all("/rviz/1")
    store.set_plan(plan_b)  # plan A's approvals are void; B was under review at shutdown
    store.audit.close()
    restored, ids = _restarted(tmp_path, plan_a)  # A comes back after the restart
    assert ids == [] and restored.snapshot() == ApprovalSet(plan_a.sha256)
    restored.audit.close()

    # an approval followed by a drag (invalidate) comes back as voided
    folder = tmp_path / "drag"
    folder.mkdir()
    store = _store(folder)
    store.set_plan(plan_a)
    store.approve_all("/rviz/1")
    store.invalidate("A", "entry dragged", "/rviz/1")
    store.audit.close()
    restored, ids = _restarted(folder, plan_a)
    assert ids == ["B"] and restored.decision_of("A") == "undecided"


def test_nodes_approvals_restore_refuses_records_bound_to_other_hashes(tmp_path: Path) -> None:
    plan = _plan()
    store = _store(tmp_path)
    store.set_plan(plan)
    store.approve_all("/rviz/1")
    # a record whose trajectory hash does not match (written by a buggy or older tool, chain intact)
    bad = store.snapshot().approvals[0].to_dict()  # type: ignore[union-attr]
    bad["trajectory_sha256"] = "0" * 64
    store.audit.append({"event": "approve", **bad})
    store.audit.close()
    log = AuditLog(tmp_path / "audit.jsonl")
    restored = ApprovalStore(log, "dr-who")
    restored.set_plan(plan)
    with pytest.raises(ApprovalError, match="bound to other hashes"):
        restored.restore(log.records_at_open)
    assert restored.snapshot() == ApprovalSet(plan.sha256)  # nothing restored: review again
    assert read_audit_log(tmp_path / "audit.jsonl")[-1]["event"] == "restore_refused"


# --------------------------------------------------------------------------------------------------
# gate
# --------------------------------------------------------------------------------------------------
def _approved(tmp_path: Path, plan: PlanDocument) -> ApprovalSet:
    store = _store(tmp_path)
    store.set_plan(plan)
    store.approve_all("/rviz/1")
    snap = store.snapshot()
    assert snap is not None
    return snap


def test_nodes_approvals_gate_allows_fully_approved_plan(tmp_path: Path) -> None:
    plan = _plan()
    decision = check_execution(plan, _approved(tmp_path, plan), **GOOD)
    assert decision.allowed and decision.to_execute == ("A", "B") and decision.reason == ""


def test_nodes_approvals_gate_refusals(tmp_path: Path) -> None:
    plan = _plan()
    approvals = _approved(tmp_path, plan)
    assert "no plan" in check_execution(None, approvals, **GOOD).reason
    assert "no approvals" in check_execution(plan, None, **GOOD).reason
    assert "e-stop" in check_execution(plan, approvals, **{**GOOD, "estop_latched": True}).reason
    stale = check_execution(plan, approvals, **{**GOOD, "sensor_age_s": 0.4})
    assert not stale.allowed and "stale" in stale.reason and "0.400" in stale.reason
    assert "no tracker sample" in check_execution(plan, approvals, **{**GOOD, "sensor_age_s": None}).reason
    assert check_execution(plan, approvals, **GOOD, robot_ready_reason="no registration").reason == "no registration"
    assert check_execution(plan, approvals, **GOOD, busy_reason="already executing").reason == "already executing"
    unsupported = check_execution(plan, approvals, **GOOD, unsupported_kinds={"biopsy": "no tool"})
    assert not unsupported.allowed and "no tool" in unsupported.reason


def test_nodes_approvals_gate_refuses_changed_plan_and_changed_trajectory(tmp_path: Path) -> None:
    plan = _plan()
    approvals = _approved(tmp_path, plan)
    changed = _plan(z=0.5)
    decision = check_execution(changed, approvals, **GOOD)
    assert not decision.allowed and "plan hash differs" in decision.reason
    # An approvals message whose plan hash matches but whose trajectory hash does not (tampered).
    forged = ApprovalSet(
        plan.sha256,
        (dataclasses.replace(approvals.approvals[0], trajectory_sha256="f" * 64), approvals.approvals[1]),
    )
    decision = check_execution(plan, forged, **GOOD)
    assert not decision.allowed and "changed after approval" in decision.reason
    assert check_trajectory_still_approved(plan, forged, "A") is not None
    assert check_trajectory_still_approved(plan, forged, "B") is None


def test_nodes_approvals_gate_needs_a_decision_for_every_trajectory(tmp_path: Path) -> None:
    plan = _plan()
    store = _store(tmp_path)
    store.set_plan(plan)
    store.decide("approve", "A", "/rviz/1")
    decision = check_execution(plan, store.snapshot(), **GOOD)
    assert not decision.allowed and "'B' is not approved" in decision.reason
    store.decide("reject", "B", "/rviz/1")
    decision = check_execution(plan, store.snapshot(), **GOOD)
    assert decision.allowed and decision.to_execute == ("A",) and decision.skipped == ("B",)
    store.decide("reject", "A", "/rviz/1")
    assert "no trajectory" in check_execution(plan, store.snapshot(), **GOOD).reason


@pytest.mark.parametrize(
    "text, match",
    [
        ("{not json", "not valid JSON"),
        ("[]", "JSON object"),
        ('{"schema": "x"}', "schema"),
        ('{"schema": "needle_steering.approvals/1", "plan_sha256": "abc"}', "64 lowercase hex"),
        ('{"schema": "needle_steering.approvals/1", "plan_sha256": "' + "a" * 64 + '", "approvals": [{}]}', "missing"),
    ],
)
def test_nodes_approvals_malformed_messages_are_refused(text: str, match: str) -> None:
    with pytest.raises(ApprovalError, match=match):
        parse_approvals(text)


def test_nodes_approvals_plan_message_is_text_never_a_path(tmp_path: Path) -> None:
    plan = _plan()
    assert parse_plan_message(plan.to_json()).sha256 == plan.sha256
    (tmp_path / "p.json").write_text(plan.to_json())
    with pytest.raises(ValueError, match="malformed JSON"):
        parse_plan_message(str(tmp_path / "p.json"))
    tampered = json.loads(plan.to_json())
    tampered["trajectories"][0]["tip_lps_mm"] = [0.0, 40.0, 0.0]
    with pytest.raises(ValueError, match="sha256 mismatch"):
        parse_plan_message(json.dumps(tampered))
