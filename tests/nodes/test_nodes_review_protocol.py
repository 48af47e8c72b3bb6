"""Interactive-marker protocol state, marker building and feedback interpretation (no node)."""

from __future__ import annotations

import pytest
from visualization_msgs.msg import InteractiveMarkerControl, InteractiveMarkerFeedback, InteractiveMarkerUpdate

from needle_steering.nodes.review_protocol import (
    ENTRY_CONTROL,
    MENU_APPROVE,
    MENU_APPROVE_ALL,
    MENU_REJECT,
    MarkerServerState,
    interpret_feedback,
    trajectory_marker,
)
from needle_steering.planning.plan_document import Trajectory

Fb = InteractiveMarkerFeedback
TRAJ = Trajectory(
    "L3-left",
    "pedicle_screw",
    "L3",
    "left",
    (20.0, 40.0, -100.0),
    (25.0, 0.0, -102.0),
    ((20.0, 40.0, -100.0), (22.0, 20.0, -101.0), (25.0, 0.0, -102.0)),
    6.5,
    45.0,
    {"grade": "B"},
    ("thin pedicle",),
)


def test_nodes_review_protocol_sequence_numbers_are_consecutive_and_keep_alive_repeats() -> None:
    state = MarkerServerState("/plan_review")
    seqs = []
    for n in range(3):
        update = state.upsert([trajectory_marker(TRAJ, "undecided", handle_scale_m=0.01, note=str(n))])
        assert update.type == InteractiveMarkerUpdate.UPDATE and update.server_id == "/plan_review"
        seqs.append(update.seq_num)
    assert seqs == [1, 2, 3]
    keep = state.keep_alive()
    assert keep.type == InteractiveMarkerUpdate.KEEP_ALIVE and keep.seq_num == 3 and not keep.markers
    seq, markers = state.full_state()
    assert seq == 3 and [m.name for m in markers] == ["L3-left"]
    update = state.replace_all([])
    assert update.seq_num == 4 and update.erases == ["L3-left"] and state.full_state() == (4, [])


def test_nodes_review_protocol_marker_is_in_patient_metres_with_menu_and_handle() -> None:
    im = trajectory_marker(TRAJ, "approved", handle_scale_m=0.01)
    assert im.header.frame_id == "patient" and im.name == "L3-left"
    assert (im.pose.position.x, im.pose.position.y, im.pose.position.z) == pytest.approx((0.02, 0.04, -0.1))
    assert [(e.id, e.title) for e in im.menu_entries] == [(1, "Approve"), (2, "Reject"), (3, "Approve all")]
    modes = {c.name: c.interaction_mode for c in im.controls}
    assert modes == {"menu": InteractiveMarkerControl.MENU, ENTRY_CONTROL: InteractiveMarkerControl.MOVE_3D}
    line = im.controls[0].markers[0]
    # path relative to the entry, in metres
    assert (line.points[-1].x, line.points[-1].y, line.points[-1].z) == pytest.approx((0.005, -0.04, -0.002))
    assert line.color.g > line.color.r  # approved is green
    assert "grade B" in im.description and "thin pedicle" in im.description
    preview = trajectory_marker(TRAJ, "proposed", handle_scale_m=0.01, entry_lps_mm=(30.0, 40.0, -100.0))
    assert preview.pose.position.x == pytest.approx(0.03) and len(preview.controls[0].markers[0].points) == 2


def _fb(
    event: int, name: str = "L3-left", entry_id: int = 0, xyz_m: tuple[float, float, float] = (0.02, 0.04, -0.1)
) -> InteractiveMarkerFeedback:
    fb = InteractiveMarkerFeedback(client_id="/rviz/c1", marker_name=name, event_type=event, menu_entry_id=entry_id)
    fb.header.frame_id = "patient"
    fb.pose.position.x, fb.pose.position.y, fb.pose.position.z = xyz_m
    return fb


ENTRIES = {"L3-left": TRAJ.entry_lps_mm}


@pytest.mark.parametrize(
    "entry_id, kind",
    [(MENU_APPROVE, "approve"), (MENU_REJECT, "reject"), (MENU_APPROVE_ALL, "approve_all"), (9, "ignore")],
)
def test_nodes_review_protocol_menu_select(entry_id: int, kind: str) -> None:
    action = interpret_feedback(_fb(Fb.MENU_SELECT, entry_id=entry_id), ENTRIES)
    assert action.kind == kind and action.client_id == "/rviz/c1"


def test_nodes_review_protocol_drag_and_drop() -> None:
    assert interpret_feedback(_fb(Fb.POSE_UPDATE), ENTRIES).kind == "ignore"  # not moved
    moved = (0.025, 0.04, -0.1)
    drag = interpret_feedback(_fb(Fb.POSE_UPDATE, xyz_m=moved), ENTRIES)
    assert drag.kind == "drag" and drag.entry_lps_mm == pytest.approx((25.0, 40.0, -100.0))
    assert interpret_feedback(_fb(Fb.MOUSE_UP, xyz_m=moved), ENTRIES).kind == "drop"
    other = _fb(Fb.MOUSE_UP, xyz_m=moved)
    other.header.frame_id = "map"
    assert interpret_feedback(other, ENTRIES).reason == "pose in frame 'map'"
    assert interpret_feedback(_fb(Fb.MOUSE_UP, xyz_m=(float("nan"), 0.0, 0.0)), ENTRIES).kind == "ignore"
    assert interpret_feedback(_fb(Fb.MENU_SELECT, name="ghost", entry_id=1), ENTRIES).reason == "unknown marker 'ghost'"
