"""RViz visuals from core data: meshes from a label map, plan markers and paths (metres, frame patient)."""

from __future__ import annotations

import numpy as np
import pytest
from builtin_interfaces.msg import Time
from visualization_msgs.msg import Marker

from needle_steering.nodes.markers import label_meshes, plan_markers, topic_safe, trajectory_path
from needle_steering.perception.volume import Volume
from needle_steering.planning.plan_document import ImageInfo, PlanDocument, Trajectory


def test_nodes_markers_label_mesh_is_in_patient_metres() -> None:
    labels = np.zeros((20, 20, 20), np.uint8)
    labels[5:15, 5:15, 5:15] = 22  # L3: a 10 mm cube at 1 mm spacing
    volume = Volume(labels, (1.0, 1.0, 1.0), (-100.0, 50.0, 200.0), np.eye(3))
    out = label_meshes(volume, [(22, "L3"), (100, "spinal_canal")], 1, Time())
    assert len(out.markers) == 1  # the absent canal is skipped
    mesh = out.markers[0]
    assert mesh.type == Marker.TRIANGLE_LIST and mesh.header.frame_id == "patient" and mesh.text == "L3"
    pts = np.array([(p.x, p.y, p.z) for p in mesh.points])
    assert len(pts) % 3 == 0
    np.testing.assert_allclose(pts.min(axis=0), [-0.0955, 0.0545, 0.2045], atol=6e-4)
    np.testing.assert_allclose(pts.max(axis=0), [-0.0855, 0.0645, 0.2145], atol=6e-4)


def test_nodes_markers_plan_markers_and_paths() -> None:
    entry, mid, tip = (0.0, 80.0, 0.0), (0.0, 65.0, 1.0), (0.0, 50.0, 0.0)
    traj = Trajectory("L3-left", "steerable_needle", "L3", "left", entry, tip, (entry, mid, tip), 1.0, 30.1, {})
    info = ImageInfo.from_volume(Volume(np.zeros((2, 2, 2), np.int16), (1, 1, 1), (0, 0, 0), np.eye(3)))
    plan = PlanDocument(info, info, (traj,))
    arr = plan_markers(plan, Time())
    assert arr.markers[0].action == Marker.DELETEALL
    line = arr.markers[1]
    assert [(p.y) for p in line.points] == pytest.approx([0.08, 0.065, 0.05])
    path = trajectory_path(traj, Time())
    assert path.header.frame_id == "patient" and len(path.poses) == 3
    q = path.poses[0].pose.orientation
    assert (q.x, q.y, q.z, q.w) != (0.0, 0.0, 0.0, 1.0)  # +z turned toward -y (anterior)
    assert topic_safe("L3-left") == "L3_left" and topic_safe("3x") == "t_3x"
