"""Interactive-marker protocol state and marker building for the plan review (no rclpy node).

The server side of the ROS 2 interactive-marker protocol, spoken directly (the
``interactive_markers`` package is not needed):

* ``<ns>/get_interactive_markers`` (``visualization_msgs/srv/GetInteractiveMarkers``) returns
  every marker and the current sequence number; RViz calls it when it connects.
* ``<ns>/update`` (``InteractiveMarkerUpdate``): every ``UPDATE`` carries ``seq_num`` exactly one
  higher than the previous one; ``KEEP_ALIVE`` repeats the current number and carries no payload.
  A client that sees a gap asks the service again.
* ``<ns>/feedback`` (``InteractiveMarkerFeedback``) from RViz: ``MENU_SELECT`` with the menu
  entry id, ``POSE_UPDATE`` while a handle is dragged, ``MOUSE_UP`` when it is released.

Each trajectory is one interactive marker named after the trajectory id, posed at its entry
point (``patient`` metres, identity orientation), with a menu control (the tool path) and a
``MOVE_3D`` control named :data:`ENTRY_CONTROL` (the entry handle).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from needle_steering.nodes.conversions import PATIENT_FRAME, lps_mm_to_patient_m, patient_m_to_lps_mm
from needle_steering.planning.plan_document import Trajectory

MENU_APPROVE: Final = 1
MENU_REJECT: Final = 2
MENU_APPROVE_ALL: Final = 3
MENU_TITLES: Final = {MENU_APPROVE: "Approve", MENU_REJECT: "Reject", MENU_APPROVE_ALL: "Approve all"}
MENU_CONTROL: Final = "menu"
ENTRY_CONTROL: Final = "entry"
#: Entry moves smaller than this (mm) are not a drag (RViz echoes the pose on click).
DRAG_THRESHOLD_MM: Final = 0.1

#: RGBA per review state.
STATE_COLOURS: Final[dict[str, tuple[float, float, float, float]]] = {
    "undecided": (1.0, 0.85, 0.1, 0.9),
    "approved": (0.1, 0.85, 0.2, 0.9),
    "rejected": (0.9, 0.1, 0.1, 0.9),
    "proposed": (1.0, 0.45, 0.0, 0.9),
}


# --------------------------------------------------------------------------------------------------
# sequence numbers and state
# --------------------------------------------------------------------------------------------------
class MarkerServerState:
    """Markers by name plus the sequence number, producing protocol messages.

    Args:
        server_id: Identifies this server in every update (the namespace, e.g. ``/plan_review``).
    """

    def __init__(self, server_id: str) -> None:
        self.server_id = server_id
        self.seq_num = 0
        self.markers: dict[str, Any] = {}

    def full_state(self) -> tuple[int, list[Any]]:
        """``(seq_num, markers)`` for the ``get_interactive_markers`` response."""
        return self.seq_num, list(self.markers.values())

    def _update(self, inserts: list[Any], erases: list[str]) -> Any:
        from visualization_msgs.msg import InteractiveMarkerUpdate

        self.seq_num += 1
        msg = InteractiveMarkerUpdate()
        msg.server_id = self.server_id
        msg.seq_num = self.seq_num
        msg.type = InteractiveMarkerUpdate.UPDATE
        msg.markers = inserts
        msg.erases = erases
        return msg

    def replace_all(self, markers: Iterable[Any]) -> Any:
        """Replace every marker; returns the ``UPDATE`` (inserts all, erases the vanished)."""
        new = {m.name: m for m in markers}
        erases = sorted(set(self.markers) - set(new))
        self.markers = new
        return self._update(list(new.values()), erases)

    def upsert(self, markers: Iterable[Any]) -> Any:
        """Insert or replace some markers; returns the ``UPDATE``."""
        inserts = list(markers)
        for m in inserts:
            self.markers[m.name] = m
        return self._update(inserts, [])

    def keep_alive(self) -> Any:
        """A ``KEEP_ALIVE`` message (same sequence number, no payload)."""
        from visualization_msgs.msg import InteractiveMarkerUpdate

        msg = InteractiveMarkerUpdate()
        msg.server_id = self.server_id
        msg.seq_num = self.seq_num
        msg.type = InteractiveMarkerUpdate.KEEP_ALIVE
        return msg


# --------------------------------------------------------------------------------------------------
# marker building
# --------------------------------------------------------------------------------------------------
def _colour(state: str) -> Any:
    from std_msgs.msg import ColorRGBA

    r, g, b, a = STATE_COLOURS.get(state, STATE_COLOURS["undecided"])
    return ColorRGBA(r=r, g=g, b=b, a=a)


def describe(traj: Trajectory, state: str, note: str = "") -> str:
    """Text under the marker: id, review state, grade and the most important warning."""
    grade = traj.metrics.get("grade")
    text = f"{traj.id} [{state}]"
    if grade is not None:
        text += f" grade {grade}"
    if traj.warnings:
        text += f"\n{traj.warnings[0]}"
    if note:
        text += f"\n{note}"
    return text


def trajectory_marker(
    traj: Trajectory,
    state: str,
    *,
    handle_scale_m: float,
    entry_lps_mm: tuple[float, float, float] | None = None,
    note: str = "",
) -> Any:
    """One ``InteractiveMarker`` for ``traj`` (frame ``patient``, metres).

    Args:
        traj: The trajectory (LPS mm).
        state: Review state (``undecided``, ``approved``, ``rejected``, ``proposed``).
        handle_scale_m: Size of the entry handle (m).
        entry_lps_mm: A dragged entry to show instead of the planned one (proposal preview).
        note: Extra line under the description (e.g. the planner's verdict).
    """
    from geometry_msgs.msg import Point
    from visualization_msgs.msg import InteractiveMarker, InteractiveMarkerControl, Marker, MenuEntry

    entry_mm = np.asarray(entry_lps_mm if entry_lps_mm is not None else traj.entry_lps_mm, dtype=np.float64)
    path_mm = np.asarray(traj.path_lps_mm, dtype=np.float64)
    if entry_lps_mm is not None:
        path_mm = np.vstack([entry_mm, np.asarray(traj.tip_lps_mm, dtype=np.float64)])
    entry_m = lps_mm_to_patient_m(entry_mm)
    rel_m = lps_mm_to_patient_m(path_mm) - entry_m

    im = InteractiveMarker()
    im.header.frame_id = PATIENT_FRAME
    im.name = traj.id
    im.description = describe(traj, state, note)
    im.scale = float(handle_scale_m * 3.0)
    im.pose.position.x, im.pose.position.y, im.pose.position.z = (float(v) for v in entry_m)
    im.pose.orientation.w = 1.0
    im.menu_entries = [
        MenuEntry(id=i, parent_id=0, title=title, command="", command_type=MenuEntry.FEEDBACK)
        for i, title in MENU_TITLES.items()
    ]

    line = Marker()
    line.type = Marker.LINE_STRIP
    line.scale.x = max(traj.diameter_mm / 1000.0, 0.0005)
    line.color = _colour(state)
    line.pose.orientation.w = 1.0
    line.points = [Point(x=float(p[0]), y=float(p[1]), z=float(p[2])) for p in rel_m]
    tip = Marker()
    tip.type = Marker.SPHERE
    tip.scale.x = tip.scale.y = tip.scale.z = handle_scale_m * 0.5
    tip.color = _colour(state)
    tip.pose.position.x, tip.pose.position.y, tip.pose.position.z = (float(v) for v in rel_m[-1])
    tip.pose.orientation.w = 1.0
    menu = InteractiveMarkerControl()
    menu.name = MENU_CONTROL
    menu.interaction_mode = InteractiveMarkerControl.MENU
    menu.always_visible = True
    menu.orientation.w = 1.0
    menu.markers = [line, tip]
    menu.description = "Approve / Reject"

    handle = Marker()
    handle.type = Marker.SPHERE
    handle.scale.x = handle.scale.y = handle.scale.z = handle_scale_m
    handle.color = _colour(state)
    handle.pose.orientation.w = 1.0
    entry = InteractiveMarkerControl()
    entry.name = ENTRY_CONTROL
    entry.interaction_mode = InteractiveMarkerControl.MOVE_3D
    entry.always_visible = True
    entry.orientation.w = 1.0
    entry.markers = [handle]
    entry.description = "drag to adjust the entry"
    im.controls = [menu, entry]
    return im


# --------------------------------------------------------------------------------------------------
# feedback interpretation
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FeedbackAction:
    """What one feedback message asks for.

    Attributes:
        kind: ``approve``, ``reject``, ``approve_all``, ``drag`` (handle moving), ``drop`` (handle
            released away from the planned entry), or ``ignore``.
        trajectory_id: Marker name (trajectory id).
        client_id: RViz client id.
        entry_lps_mm: New entry (LPS mm) for ``drag``/``drop``.
        reason: Why it is ignored.
    """

    kind: str
    trajectory_id: str = ""
    client_id: str = ""
    entry_lps_mm: tuple[float, float, float] | None = None
    reason: str = ""


def interpret_feedback(
    feedback: Any, planned_entries_lps_mm: Mapping[str, tuple[float, float, float]]
) -> FeedbackAction:
    """Turn an ``InteractiveMarkerFeedback`` into an action (pure; validates everything).

    Args:
        feedback: The message.
        planned_entries_lps_mm: Entry point (LPS mm) of each marker name currently shown.
    """
    from visualization_msgs.msg import InteractiveMarkerFeedback as Fb

    name = str(feedback.marker_name)
    client = str(feedback.client_id)
    if name not in planned_entries_lps_mm:
        return FeedbackAction("ignore", name, client, reason=f"unknown marker {name!r}")
    if feedback.event_type == Fb.MENU_SELECT:
        entry_id = int(feedback.menu_entry_id)
        kind = {MENU_APPROVE: "approve", MENU_REJECT: "reject", MENU_APPROVE_ALL: "approve_all"}.get(entry_id)
        if kind is None:
            return FeedbackAction("ignore", name, client, reason=f"unknown menu entry id {entry_id}")
        return FeedbackAction(kind, name, client)
    if feedback.event_type in (Fb.POSE_UPDATE, Fb.MOUSE_UP):
        if feedback.header.frame_id not in ("", PATIENT_FRAME):
            return FeedbackAction("ignore", name, client, reason=f"pose in frame {feedback.header.frame_id!r}")
        p = feedback.pose.position
        values = (p.x, p.y, p.z)
        if not all(math.isfinite(v) for v in values):
            return FeedbackAction("ignore", name, client, reason=f"non-finite pose {values}")
        entry_mm = patient_m_to_lps_mm(np.array(values, dtype=np.float64))
        planned = np.asarray(planned_entries_lps_mm[name], dtype=np.float64)
        if float(np.linalg.norm(entry_mm - planned)) < DRAG_THRESHOLD_MM:
            return FeedbackAction("ignore", name, client, reason="handle not moved")
        kind = "drag" if feedback.event_type == Fb.POSE_UPDATE else "drop"
        return FeedbackAction(kind, name, client, (float(entry_mm[0]), float(entry_mm[1]), float(entry_mm[2])))
    return FeedbackAction("ignore", name, client, reason=f"event type {int(feedback.event_type)} needs no action")


__all__ = [
    "DRAG_THRESHOLD_MM",
    "ENTRY_CONTROL",
    "MENU_APPROVE",
    "MENU_APPROVE_ALL",
    "MENU_CONTROL",
    "MENU_REJECT",
    "FeedbackAction",
    "MarkerServerState",
    "interpret_feedback",
    "trajectory_marker",
]
