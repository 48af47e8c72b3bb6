"""Approvals: records, the store kept by ``plan_review_node`` and the pure execution gate.

An approval binds **three** things: the plan's ``sha256``, the trajectory id and the
trajectory's own ``sha256`` (see :mod:`needle_steering.planning.plan_document`). Any change of
the plan (new hash) therefore voids every approval; dragging a trajectory voids its approval at
once, and the adjusted plan (new hash) has to be approved again.

:func:`check_execution` is the gate the control node asks before it moves anything, and
:func:`check_trajectory_still_approved` is what it asks every control period while inserting.
Both are pure functions of their arguments (no ROS, no clock, no I/O).

The wire format of ``/plan/approvals`` (``std_msgs/String``, transient-local) is
:meth:`ApprovalSet.to_json`: the decisions in force for one plan::

    {"schema": "needle_steering.approvals/1", "plan_sha256": "...",
     "approvals": [record, ...], "rejections": [record, ...]}

with records as in :class:`ApprovalRecord`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from needle_steering.errors import NeedleSteeringError, PlanDocumentError
from needle_steering.nodes.audit import AuditLog, utc_now_iso
from needle_steering.planning.plan_document import PlanDocument, Trajectory

APPROVALS_SCHEMA: Final = "needle_steering.approvals/1"
DECISIONS: Final = ("approve", "reject")
_SHA_RE: Final = re.compile(r"^[0-9a-f]{64}$")


class ApprovalError(NeedleSteeringError, ValueError):
    """An approval request or an approvals message is invalid; the message says why."""


@dataclass(frozen=True)
class ApprovalRecord:
    """One surgeon decision about one trajectory of one plan.

    Attributes:
        decision: ``"approve"`` or ``"reject"``.
        plan_sha256: Hash of the plan the decision was made on.
        trajectory_id: Trajectory id inside that plan.
        trajectory_sha256: Hash of the trajectory as it was shown.
        surgeon_id: Configured identity of the approving surgeon (never empty).
        client_id: RViz client id that sent the menu selection.
        time_utc: ISO-8601 UTC time of the decision.
    """

    decision: str
    plan_sha256: str
    trajectory_id: str
    trajectory_sha256: str
    surgeon_id: str
    client_id: str
    time_utc: str

    def __post_init__(self) -> None:
        if self.decision not in DECISIONS:
            raise ApprovalError(f"decision {self.decision!r} is not one of {list(DECISIONS)}")
        for name in ("plan_sha256", "trajectory_sha256"):
            value = getattr(self, name)
            if not isinstance(value, str) or not _SHA_RE.match(value):
                raise ApprovalError(f"{name} must be 64 lowercase hex digits, got {value!r}")
        for name in ("trajectory_id", "surgeon_id", "time_utc"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ApprovalError(f"{name} must be a non-empty string, got {value!r}")
        if not isinstance(self.client_id, str):
            raise ApprovalError(f"client_id must be a string, got {self.client_id!r}")

    def to_dict(self) -> dict[str, str]:
        """Plain dictionary (the JSON form)."""
        return {
            "decision": self.decision,
            "plan_sha256": self.plan_sha256,
            "trajectory_id": self.trajectory_id,
            "trajectory_sha256": self.trajectory_sha256,
            "surgeon_id": self.surgeon_id,
            "client_id": self.client_id,
            "time_utc": self.time_utc,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "record") -> ApprovalRecord:
        """Validate and build from a dictionary."""
        if not isinstance(data, Mapping):
            raise ApprovalError(f"{where}: expected an object, got {data!r}")
        keys = ("decision", "plan_sha256", "trajectory_id", "trajectory_sha256", "surgeon_id", "client_id", "time_utc")
        missing = [k for k in keys if k not in data]
        if missing:
            raise ApprovalError(f"{where}: missing fields {missing}")
        try:
            return cls(**{k: data[k] for k in keys})
        except ApprovalError as exc:
            raise ApprovalError(f"{where}: {exc}") from None


@dataclass(frozen=True)
class ApprovalSet:
    """The decisions in force for one plan (what ``/plan/approvals`` carries)."""

    plan_sha256: str
    approvals: tuple[ApprovalRecord, ...] = ()
    rejections: tuple[ApprovalRecord, ...] = ()

    def __post_init__(self) -> None:
        if not _SHA_RE.match(self.plan_sha256):
            raise ApprovalError(f"plan_sha256 must be 64 lowercase hex digits, got {self.plan_sha256!r}")
        for rec in (*self.approvals, *self.rejections):
            if rec.plan_sha256 != self.plan_sha256:
                raise ApprovalError(
                    f"record for {rec.trajectory_id!r} is bound to plan {rec.plan_sha256[:12]}, "
                    f"the set to plan {self.plan_sha256[:12]}"
                )
        for rec in self.approvals:
            if rec.decision != "approve":
                raise ApprovalError(f"approvals list holds a {rec.decision!r} record for {rec.trajectory_id!r}")
        for rec in self.rejections:
            if rec.decision != "reject":
                raise ApprovalError(f"rejections list holds a {rec.decision!r} record for {rec.trajectory_id!r}")
        ids = [r.trajectory_id for r in (*self.approvals, *self.rejections)]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ApprovalError(f"more than one decision in force for trajectories {dupes}")

    def approval_for(self, trajectory_id: str) -> ApprovalRecord | None:
        """The approval in force for ``trajectory_id``, if any."""
        return next((r for r in self.approvals if r.trajectory_id == trajectory_id), None)

    def rejection_for(self, trajectory_id: str) -> ApprovalRecord | None:
        """The rejection in force for ``trajectory_id``, if any."""
        return next((r for r in self.rejections if r.trajectory_id == trajectory_id), None)

    def to_json(self) -> str:
        """Wire form (sorted keys, one line)."""
        return json.dumps(
            {
                "schema": APPROVALS_SCHEMA,
                "plan_sha256": self.plan_sha256,
                "approvals": [r.to_dict() for r in self.approvals],
                "rejections": [r.to_dict() for r in self.rejections],
            },
            sort_keys=True,
            separators=(",", ":"),
        )


def parse_approvals(text: str) -> ApprovalSet:
    """Parse and validate an ``/plan/approvals`` message.

    Raises:
        ApprovalError: not JSON, wrong schema, malformed records (the reason names the field).
    """
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ApprovalError(f"approvals: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ApprovalError(f"approvals: expected a JSON object, got {type(data).__name__}")
    if data.get("schema") != APPROVALS_SCHEMA:
        raise ApprovalError(f"approvals: schema {data.get('schema')!r}, expected {APPROVALS_SCHEMA!r}")
    plan_sha = data.get("plan_sha256")
    if not isinstance(plan_sha, str):
        raise ApprovalError(f"approvals: plan_sha256 must be a string, got {plan_sha!r}")
    lists: dict[str, tuple[ApprovalRecord, ...]] = {}
    for key in ("approvals", "rejections"):
        raw = data.get(key, [])
        if not isinstance(raw, list):
            raise ApprovalError(f"approvals.{key}: expected a list, got {raw!r}")
        lists[key] = tuple(ApprovalRecord.from_dict(r, f"approvals.{key}[{n}]") for n, r in enumerate(raw))
    return ApprovalSet(plan_sha, lists["approvals"], lists["rejections"])


def _reject_constant(token: str) -> float:
    raise ApprovalError(f"approvals: non-finite number {token} is not allowed")


def _reject_plan_constant(token: str) -> float:
    raise PlanDocumentError(f"plan: non-finite number {token} is not allowed")


def parse_plan_message(text: str) -> PlanDocument:
    """Parse a ``/plan/document`` message (JSON text only, never a path) and verify its hashes.

    Raises:
        PlanDocumentError: not JSON, not an object, wrong schema, bad fields or a hash mismatch.
    """
    try:
        data = json.loads(text, parse_constant=_reject_plan_constant)
    except json.JSONDecodeError as exc:
        raise PlanDocumentError(f"plan message: malformed JSON ({exc.msg} at column {exc.colno})") from None
    return PlanDocument.from_dict(data)


# --------------------------------------------------------------------------------------------------
# the store (plan_review_node)
# --------------------------------------------------------------------------------------------------
@dataclass
class _Proposal:
    trajectory_id: str
    entry_lps_mm: tuple[float, float, float]
    status: str  # "pending" (sent to the planner) or "rejected" (planner said no)
    reason: str = ""


@dataclass
class ApprovalStore:
    """Decisions for the current plan, written through to an :class:`AuditLog`.

    Every change is appended to the audit log *before* it takes effect in memory, so a failed
    write (exception) leaves the store unchanged. Not thread-safe: the owning node serialises
    calls (one callback group).

    Args:
        audit: The audit log (append-only).
        surgeon_id: Configured surgeon identity; empty refuses every approval.
    """

    audit: AuditLog
    surgeon_id: str
    plan: PlanDocument | None = None
    _approvals: dict[str, ApprovalRecord] = field(default_factory=dict)
    _rejections: dict[str, ApprovalRecord] = field(default_factory=dict)
    _proposals: dict[str, _Proposal] = field(default_factory=dict)

    # ---------------------------------------------------------------- plan
    def set_plan(self, plan: PlanDocument) -> bool:
        """Adopt ``plan``; decisions for another plan hash are dropped (audited). Returns True if new."""
        if self.plan is not None and self.plan.sha256 == plan.sha256:
            return False
        dropped = sorted(self._approvals)
        self.audit.append(
            {
                "event": "plan_received",
                "plan_sha256": plan.sha256,
                "previous_plan_sha256": self.plan.sha256 if self.plan else None,
                "trajectories": [{"id": t.id, "sha256": t.sha256} for t in plan.trajectories],
                "approvals_voided": dropped,
            }
        )
        self.plan = plan
        self._approvals.clear()
        self._rejections.clear()
        self._proposals.clear()
        return True

    def restore(self, history: Sequence[Mapping[str, Any]]) -> list[str]:
        """Re-instate the decisions a previous run had in force for the current plan.

        ``history`` is the previous run's verified audit log (:attr:`AuditLog.records_at_open`).
        Decisions come back only when the previous run's last plan (its last ``plan_received``) is
        the current plan: a restart must not revive anything an uninterrupted review node would
        have voided. The records after that ``plan_received`` are replayed through the same rules
        as live input (approve, reject, invalidate, drag proposals and the planner's verdicts, and
        earlier restorations); every restored approval still binds the plan and trajectory hashes
        and is re-validated against the current plan. The restoration itself is audited.

        Returns:
            Trajectory ids with a decision or an open proposal restored (empty: nothing to restore).

        Raises:
            ApprovalError: a replayed record does not match the current plan; nothing is restored
                (and the refusal is audited), so the surgeon reviews again.
        """
        if self.plan is None:
            return []
        plan_sha = self.plan.sha256
        starts = [n for n, rec in enumerate(history) if rec.get("event") == "plan_received"]
        if not starts or history[starts[-1]].get("plan_sha256") != plan_sha:
            return []
        approvals: dict[str, ApprovalRecord] = {}
        rejections: dict[str, ApprovalRecord] = {}
        proposals: dict[str, _Proposal] = {}
        try:
            for rec in history[starts[-1] + 1 :]:
                if rec.get("plan_sha256") != plan_sha:
                    continue
                self._replay(rec, approvals, rejections, proposals)
        except (ApprovalError, KeyError, TypeError, ValueError) as exc:
            reason = f"previous decisions not restored: {exc}"
            self.audit.append({"event": "restore_refused", "plan_sha256": plan_sha, "reason": reason})
            raise ApprovalError(reason) from None
        ids = sorted({*approvals, *rejections, *proposals})
        if not ids:
            return []
        self.audit.append(
            {
                "event": "decisions_restored",
                "plan_sha256": plan_sha,
                "approvals": [r.to_dict() for r in approvals.values()],
                "rejections": [r.to_dict() for r in rejections.values()],
                "proposals": [
                    {"trajectory_id": p.trajectory_id, "entry_lps_mm": list(p.entry_lps_mm), "status": p.status,
                     "reason": p.reason}
                    for p in proposals.values()
                ],
            }
        )  # fmt: skip
        self._approvals, self._rejections, self._proposals = approvals, rejections, proposals
        return ids

    def _replay(
        self,
        rec: Mapping[str, Any],
        approvals: dict[str, ApprovalRecord],
        rejections: dict[str, ApprovalRecord],
        proposals: dict[str, _Proposal],
    ) -> None:
        event = rec.get("event")
        if event in DECISIONS:
            record = self._checked_record(rec, f"audit record {rec.get('seq')}")
            keep, drop = (approvals, rejections) if record.decision == "approve" else (rejections, approvals)
            keep[record.trajectory_id] = record
            drop.pop(record.trajectory_id, None)
        elif event == "invalidate":
            approvals.pop(str(rec["trajectory_id"]), None)
            rejections.pop(str(rec["trajectory_id"]), None)
        elif event == "adjust_proposed":
            proposal = self._checked_proposal(rec, "pending", "", f"audit record {rec.get('seq')}")
            proposals[proposal.trajectory_id] = proposal
        elif event == "adjust_rejected" and str(rec.get("trajectory_id")) in proposals:
            proposal = proposals[str(rec["trajectory_id"])]
            proposal.status, proposal.reason = "rejected by the planner", str(rec.get("reason", ""))
        elif event == "decisions_restored":
            for item in rec["approvals"]:
                record = self._checked_record(item, f"audit record {rec.get('seq')}")
                approvals[record.trajectory_id] = record
            for item in rec["rejections"]:
                record = self._checked_record(item, f"audit record {rec.get('seq')}")
                rejections[record.trajectory_id] = record
            for item in rec["proposals"]:
                proposal = self._checked_proposal(
                    item, str(item["status"]), str(item.get("reason", "")), f"audit record {rec.get('seq')}"
                )
                proposals[proposal.trajectory_id] = proposal

    def _checked_proposal(self, data: Mapping[str, Any], status: str, reason: str, where: str) -> _Proposal:
        """A drag proposal from the audit log: a trajectory of the current plan and a finite entry point."""
        tid = self._trajectory(str(data["trajectory_id"])).id
        entry = tuple(float(v) for v in data["entry_lps_mm"])
        if len(entry) != 3 or not all(math.isfinite(v) for v in entry):
            raise ApprovalError(f"{where}: bad entry_lps_mm {data['entry_lps_mm']!r}")
        return _Proposal(tid, (entry[0], entry[1], entry[2]), status, reason)

    def _checked_record(self, data: Mapping[str, Any], where: str) -> ApprovalRecord:
        """An approval/rejection from the audit log, still bound to the current plan and trajectory."""
        record = ApprovalRecord.from_dict(data, where)
        traj = self._trajectory(record.trajectory_id)
        assert self.plan is not None
        if record.plan_sha256 != self.plan.sha256 or record.trajectory_sha256 != traj.sha256:
            raise ApprovalError(f"{where}: {record.trajectory_id!r} is bound to other hashes than the current plan")
        return record

    def note_rejected_input(self, source: str, reason: str) -> None:
        """Audit an input that was refused (malformed plan, bad feedback)."""
        self.audit.append({"event": "input_rejected", "source": source, "reason": reason})

    # ------------------------------------------------------------- decisions
    def _trajectory(self, trajectory_id: str) -> Trajectory:
        if self.plan is None:
            raise ApprovalError("no plan under review")
        try:
            return self.plan.trajectory(trajectory_id)
        except ValueError:
            raise ApprovalError(f"plan {self.plan.sha256[:12]} has no trajectory {trajectory_id!r}") from None

    def decide(self, decision: str, trajectory_id: str, client_id: str, now_utc: str | None = None) -> ApprovalRecord:
        """Approve or reject one trajectory of the current plan.

        Raises:
            ApprovalError: no plan, unknown trajectory, no surgeon id configured, or the
                trajectory has a dragged proposal not yet turned into a re-checked plan. The
                refusal itself is audited.
        """
        try:
            if decision not in DECISIONS:
                raise ApprovalError(f"decision {decision!r} is not one of {list(DECISIONS)}")
            if not self.surgeon_id:
                raise ApprovalError("surgeon_id is not configured; approvals are refused")
            traj = self._trajectory(trajectory_id)
            proposal = self._proposals.get(trajectory_id)
            if proposal is not None and decision == "approve":
                raise ApprovalError(
                    f"trajectory {trajectory_id!r} was dragged to entry {list(proposal.entry_lps_mm)} LPS mm and the "
                    f"adjustment is {proposal.status}"
                    + (f" ({proposal.reason})" if proposal.reason else "")
                    + "; approve the re-checked plan, or Reject"
                )
            assert self.plan is not None
            record = ApprovalRecord(
                decision=decision,
                plan_sha256=self.plan.sha256,
                trajectory_id=traj.id,
                trajectory_sha256=traj.sha256,
                surgeon_id=self.surgeon_id,
                client_id=client_id,
                time_utc=now_utc or utc_now_iso(),
            )
        except ApprovalError as exc:
            self.audit.append(
                {
                    "event": f"{decision}_refused",
                    "trajectory_id": trajectory_id,
                    "plan_sha256": self.plan.sha256 if self.plan else None,
                    "client_id": client_id,
                    "surgeon_id": self.surgeon_id,
                    "reason": str(exc),
                }
            )
            raise
        self.audit.append({"event": decision, **record.to_dict()})
        if decision == "approve":
            self._approvals[traj.id] = record
            self._rejections.pop(traj.id, None)
        else:
            self._rejections[traj.id] = record
            self._approvals.pop(traj.id, None)
        return record

    def approve_all(self, client_id: str, now_utc: str | None = None) -> tuple[list[ApprovalRecord], list[str]]:
        """Approve every trajectory of the plan; returns ``(records, refusal reasons)``."""
        if self.plan is None:
            self.audit.append(
                {"event": "approve_all_refused", "client_id": client_id, "reason": "no plan under review"}
            )
            raise ApprovalError("no plan under review")
        records: list[ApprovalRecord] = []
        refusals: list[str] = []
        for traj in self.plan.trajectories:
            try:
                records.append(self.decide("approve", traj.id, client_id, now_utc))
            except ApprovalError as exc:
                refusals.append(str(exc))
        return records, refusals

    def invalidate(self, trajectory_id: str, reason: str, client_id: str = "") -> bool:
        """Void the decision for ``trajectory_id`` (audited). Returns True if one was in force."""
        had = trajectory_id in self._approvals or trajectory_id in self._rejections
        self.audit.append(
            {
                "event": "invalidate",
                "plan_sha256": self.plan.sha256 if self.plan else None,
                "trajectory_id": trajectory_id,
                "client_id": client_id,
                "had_decision": had,
                "reason": reason,
            }
        )
        self._approvals.pop(trajectory_id, None)
        self._rejections.pop(trajectory_id, None)
        return had

    # ------------------------------------------------------------ proposals
    def propose(self, trajectory_id: str, entry_lps_mm: Sequence[float], client_id: str) -> _Proposal:
        """Record a dragged entry point: voids the trajectory's decision and blocks its approval."""
        self._trajectory(trajectory_id)
        entry = tuple(float(v) for v in entry_lps_mm)
        if len(entry) != 3 or not all(math.isfinite(v) for v in entry):
            raise ApprovalError(f"dragged entry must be 3 finite numbers, got {list(entry_lps_mm)!r}")
        self.invalidate(trajectory_id, f"entry dragged to {[round(v, 2) for v in entry]} LPS mm", client_id)
        proposal = _Proposal(trajectory_id, (entry[0], entry[1], entry[2]), "pending")
        self._proposals[trajectory_id] = proposal
        self.audit.append(
            {
                "event": "adjust_proposed",
                "plan_sha256": self.plan.sha256 if self.plan else None,
                "trajectory_id": trajectory_id,
                "entry_lps_mm": list(entry),
                "client_id": client_id,
            }
        )
        return proposal

    def proposal_result(
        self, trajectory_id: str, accepted: bool, reason: str, plan_sha256: str | None = None, new_plan_sha256: str = ""
    ) -> None:
        """Record the planner's verdict on a proposal made on plan ``plan_sha256`` (default: the current plan).

        An accepted adjustment arrives as a new plan, usually before its verdict; a verdict about
        an earlier plan is audited but changes nothing (the new plan already voided every decision).
        """
        current = self.plan.sha256 if self.plan else None
        about = plan_sha256 if plan_sha256 is not None else current
        self.audit.append(
            {
                "event": "adjust_accepted" if accepted else "adjust_rejected",
                "plan_sha256": about,
                "new_plan_sha256": new_plan_sha256,
                "trajectory_id": trajectory_id,
                "reason": reason,
            }
        )
        proposal = self._proposals.get(trajectory_id)
        if about == current and proposal is not None and not accepted:
            proposal.status = "rejected by the planner"
            proposal.reason = reason

    def proposal(self, trajectory_id: str) -> _Proposal | None:
        """The open proposal for ``trajectory_id``, if any."""
        return self._proposals.get(trajectory_id)

    def decision_of(self, trajectory_id: str) -> str:
        """``"approved"``, ``"rejected"``, ``"proposed"`` or ``"undecided"``."""
        if trajectory_id in self._proposals:
            return "proposed"
        if trajectory_id in self._approvals:
            return "approved"
        if trajectory_id in self._rejections:
            return "rejected"
        return "undecided"

    def snapshot(self) -> ApprovalSet | None:
        """Decisions in force for the current plan (``None`` without a plan)."""
        if self.plan is None:
            return None
        order = [t.id for t in self.plan.trajectories]
        return ApprovalSet(
            self.plan.sha256,
            tuple(self._approvals[i] for i in order if i in self._approvals),
            tuple(self._rejections[i] for i in order if i in self._rejections),
        )


# --------------------------------------------------------------------------------------------------
# the gate (control_node)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateDecision:
    """Answer of the execution gate.

    Attributes:
        allowed: Whether execution may start (or continue).
        reason: Why not (empty when allowed).
        to_execute: Approved trajectory ids, in plan order.
        skipped: Rejected trajectory ids (the surgeon's explicit decision), in plan order.
    """

    allowed: bool
    reason: str = ""
    to_execute: tuple[str, ...] = ()
    skipped: tuple[str, ...] = ()


def _refuse(reason: str) -> GateDecision:
    return GateDecision(False, reason)


def check_trajectory_still_approved(
    plan: PlanDocument | None, approvals: ApprovalSet | None, trajectory_id: str
) -> str | None:
    """Why ``trajectory_id`` may not (continue to) execute under ``plan`` and ``approvals``; ``None`` if it may."""
    if plan is None:
        return "no plan"
    if approvals is None:
        return "no approvals received"
    if approvals.plan_sha256 != plan.sha256:
        return (
            f"approvals are for plan {approvals.plan_sha256[:12]} but the current plan is {plan.sha256[:12]} "
            "(plan changed after approval)"
        )
    try:
        traj = plan.trajectory(trajectory_id)
    except ValueError:
        return f"plan {plan.sha256[:12]} has no trajectory {trajectory_id!r}"
    record = approvals.approval_for(trajectory_id)
    if record is None:
        if approvals.rejection_for(trajectory_id) is not None:
            return f"trajectory {trajectory_id!r} was rejected"
        return f"trajectory {trajectory_id!r} is not approved"
    if record.plan_sha256 != plan.sha256:
        return f"trajectory {trajectory_id!r} was approved for plan {record.plan_sha256[:12]}, not {plan.sha256[:12]}"
    if record.trajectory_sha256 != traj.sha256:
        return (
            f"trajectory {trajectory_id!r} changed after approval (approved sha256 {record.trajectory_sha256[:12]}, "
            f"current {traj.sha256[:12]})"
        )
    if not record.surgeon_id:
        return f"approval of {trajectory_id!r} names no surgeon"
    return None


def check_execution(
    plan: PlanDocument | None,
    approvals: ApprovalSet | None,
    *,
    estop_latched: bool,
    sensor_age_s: float | None,
    sensor_timeout_s: float,
    robot_ready_reason: str | None = None,
    unsupported_kinds: Mapping[str, str] | None = None,
    busy_reason: str | None = None,
) -> GateDecision:
    """The execution gate: may the approved trajectories of ``plan`` be executed now?

    Every trajectory must carry a decision for this exact plan hash: approved ones (with a
    matching trajectory hash) are executed in plan order, rejected ones are skipped; any
    undecided trajectory refuses the whole execution (the surgeon has not finished reviewing).

    Args:
        plan: The current plan document (``None``: none received or the last one was invalid).
        approvals: The approvals in force (``None``: none received).
        estop_latched: An emergency stop is latched.
        sensor_age_s: Age of the newest tracker sample (s); ``None`` when none was received.
        sensor_timeout_s: Maximum accepted age (s).
        robot_ready_reason: Why the robot cannot execute (no registration, driver fault), or ``None``.
        unsupported_kinds: ``{kind: reason}`` for trajectory kinds this controller cannot execute.
        busy_reason: Why a new execution cannot start (already executing), or ``None``.

    Returns:
        A :class:`GateDecision`; ``reason`` names the first failed condition with its value.
    """
    if busy_reason:
        return _refuse(busy_reason)
    if estop_latched:
        return _refuse("e-stop latched; call /control/reset when safe")
    if plan is None:
        return _refuse("no plan: nothing valid received on /plan/document")
    if approvals is None:
        return _refuse(f"no approvals received for plan {plan.sha256[:12]}")
    if approvals.plan_sha256 != plan.sha256:
        return _refuse(
            f"plan hash differs from the approved one: approvals are for plan {approvals.plan_sha256[:12]}, "
            f"current plan is {plan.sha256[:12]}"
        )
    to_execute: list[str] = []
    skipped: list[str] = []
    for traj in plan.trajectories:
        if approvals.rejection_for(traj.id) is not None and approvals.approval_for(traj.id) is None:
            skipped.append(traj.id)
            continue
        why = check_trajectory_still_approved(plan, approvals, traj.id)
        if why:
            return _refuse(why)
        to_execute.append(traj.id)
    if not to_execute:
        return _refuse(f"no trajectory of plan {plan.sha256[:12]} is approved")
    for traj_id in to_execute:
        kind = plan.trajectory(traj_id).kind
        if unsupported_kinds and kind in unsupported_kinds:
            return _refuse(f"trajectory {traj_id!r} ({kind}) cannot be executed: {unsupported_kinds[kind]}")
    if robot_ready_reason:
        return _refuse(robot_ready_reason)
    if sensor_age_s is None:
        return _refuse("sensor data stale: no tracker sample received")
    if not math.isfinite(sensor_age_s) or sensor_age_s > sensor_timeout_s:
        return _refuse(f"sensor data stale: newest tracker sample is {sensor_age_s:.3f} s old > {sensor_timeout_s} s")
    return GateDecision(True, "", tuple(to_execute), tuple(skipped))


__all__ = [
    "APPROVALS_SCHEMA",
    "ApprovalError",
    "ApprovalRecord",
    "ApprovalSet",
    "ApprovalStore",
    "GateDecision",
    "check_execution",
    "check_trajectory_still_approved",
    "parse_approvals",
    "parse_plan_message",
]
