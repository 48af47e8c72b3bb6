"""RViz visuals built from core-layer data: plan markers, trajectory paths, label meshes.

Inputs are in LPS millimetres; every message produced is in frame ``patient``, metres
(via :mod:`needle_steering.nodes.conversions`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from needle_steering.nodes.conversions import PATIENT_FRAME, frame_with_z_axis, path_points_m, pose_msg_from_T_mm
from needle_steering.planning.plan_document import PlanDocument, Trajectory

if TYPE_CHECKING:
    from needle_steering.perception.volume import Volume

_KIND_COLOURS = {
    "pedicle_screw": (0.2, 0.6, 1.0, 0.9),
    "biopsy": (1.0, 0.3, 0.8, 0.9),
    "steerable_needle": (0.3, 1.0, 0.9, 0.9),
}
_BONE = (0.93, 0.9, 0.8, 0.6)
_CRITICAL = {
    "spinal_canal": (1.0, 0.8, 0.2, 0.5),
    "aorta": (0.9, 0.1, 0.1, 0.6),
    "inferior_vena_cava": (0.2, 0.3, 0.9, 0.6),
}


def topic_safe(name: str) -> str:
    """``name`` reduced to ``[A-Za-z0-9_]`` for use in a topic name (``L3-left`` -> ``L3_left``)."""
    safe = re.sub(r"[^A-Za-z0-9_]", "_", name)
    return safe if safe and not safe[0].isdigit() else f"t_{safe}"


def _rgba(values: tuple[float, float, float, float]) -> Any:
    from std_msgs.msg import ColorRGBA

    return ColorRGBA(r=values[0], g=values[1], b=values[2], a=values[3])


def trajectory_path(traj: Trajectory, stamp: Any) -> Any:
    """``nav_msgs/Path`` of one trajectory (poses along the path, +z along the tool)."""
    from geometry_msgs.msg import PoseStamped
    from nav_msgs.msg import Path

    pts_mm = np.asarray(traj.path_lps_mm, dtype=np.float64)
    msg = Path()
    msg.header.frame_id = PATIENT_FRAME
    msg.header.stamp = stamp
    for n, p in enumerate(pts_mm):
        nxt = pts_mm[min(n + 1, len(pts_mm) - 1)]
        prev = pts_mm[max(n - 1, 0)]
        direction = nxt - prev
        pose = PoseStamped()
        pose.header = msg.header
        pose.pose = pose_msg_from_T_mm(frame_with_z_axis(p, direction))
        msg.poses.append(pose)
    return msg


def plan_markers(plan: PlanDocument, stamp: Any) -> Any:
    """``MarkerArray``: a line and a text label per trajectory (namespace ``plan``); clears old ones."""
    from geometry_msgs.msg import Point
    from visualization_msgs.msg import Marker, MarkerArray

    out = MarkerArray()
    clear = Marker()
    clear.action = Marker.DELETEALL
    clear.header.frame_id = PATIENT_FRAME
    out.markers.append(clear)
    for n, traj in enumerate(plan.trajectories):
        colour = _rgba(_KIND_COLOURS.get(traj.kind, (0.8, 0.8, 0.8, 0.9)))
        line = Marker()
        line.header.frame_id = PATIENT_FRAME
        line.header.stamp = stamp
        line.ns = "plan"
        line.id = 2 * n
        line.type = Marker.LINE_STRIP
        line.action = Marker.ADD
        line.pose.orientation.w = 1.0
        line.scale.x = traj.diameter_mm / 1000.0
        line.color = colour
        line.points = [Point(x=float(p[0]), y=float(p[1]), z=float(p[2])) for p in path_points_m(traj.path_lps_mm)]
        text = Marker()
        text.header = line.header
        text.ns = "plan_labels"
        text.id = 2 * n + 1
        text.type = Marker.TEXT_VIEW_FACING
        text.action = Marker.ADD
        entry_m = path_points_m([traj.entry_lps_mm])[0]
        text.pose.position.x, text.pose.position.y, text.pose.position.z = (float(v) for v in entry_m)
        text.pose.orientation.w = 1.0
        text.scale.z = 0.008
        text.color = colour
        grade = traj.metrics.get("grade")
        text.text = traj.id + (f" ({grade})" if grade is not None else "")
        out.markers.extend([line, text])
    return out


def label_meshes(labels: Volume, label_names: Iterable[tuple[int, str]], step_voxels: int, stamp: Any) -> Any:
    """``MarkerArray`` of triangle meshes (marching cubes) for the given label ids.

    Args:
        labels: Integer label map (LPS grid).
        label_names: ``(label_id, name)`` pairs to mesh; absent labels are skipped.
        step_voxels: Marching-cubes step size (>= 1; larger is coarser).
        stamp: Header stamp.
    """
    from geometry_msgs.msg import Point
    from skimage.measure import marching_cubes
    from visualization_msgs.msg import Marker, MarkerArray

    arr = np.asarray(labels.array)
    out = MarkerArray()
    for n, (label_id, name) in enumerate(label_names):
        mask = arr == label_id
        if not mask.any():
            continue
        idx = np.argwhere(mask)
        lo = np.maximum(idx.min(axis=0) - 1, 0)
        hi = np.minimum(idx.max(axis=0) + 2, arr.shape)
        sub = np.pad(mask[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].astype(np.float32), 1)
        if min(sub.shape) < 2:
            continue
        verts, faces, _normals, _values = marching_cubes(sub, level=0.5, step_size=max(1, int(step_voxels)))
        verts_ijk = verts - 1.0 + lo
        verts_m = path_points_m(labels.index_to_lps(verts_ijk))
        tri = verts_m[faces.reshape(-1)]
        m = Marker()
        m.header.frame_id = PATIENT_FRAME
        m.header.stamp = stamp
        m.ns = "bone" if name not in _CRITICAL else "critical"
        m.id = n
        m.type = Marker.TRIANGLE_LIST
        m.action = Marker.ADD
        m.pose.orientation.w = 1.0
        m.scale.x = m.scale.y = m.scale.z = 1.0
        m.color = _rgba(_CRITICAL.get(name, _BONE))
        m.text = name
        m.points = [Point(x=float(p[0]), y=float(p[1]), z=float(p[2])) for p in tri]
        out.markers.append(m)
    return out


__all__ = ["label_meshes", "plan_markers", "topic_safe", "trajectory_path"]
