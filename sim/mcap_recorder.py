"""rosbag2-compatible MCAP recording of simulated episodes (no ROS installation needed).

Files are written with ``mcap_ros2.writer.Writer`` (package ``mcap-ros2-support``) in the
``ros2`` profile: each topic carries a ``ros2msg`` text schema (the message definition with its
dependencies, the format ``ros2 bag`` stores) and CDR-encoded messages, so Foxglove Studio and
``ros2 bag info/play`` open them. Poses and paths are in frame ``patient`` in **metres** (the ROS
convention of this project: LPS axes, millimetres / 1000). Log times are simulated time in
nanoseconds from the start of the episode (deterministic: the same seed gives the same file).

Topics of :func:`write_episode_mcap` (names follow ``needle_steering.nodes.interfaces``):

==================================  ============================  ==========================================
topic                               type                          content
==================================  ============================  ==========================================
``/sim/tip_true``                   geometry_msgs/PoseStamped     true needle tip, every control period
``/control/tip_estimate``           geometry_msgs/PoseStamped     TipEKF estimate, every control period
``/plan/path``                      nav_msgs/Path                 the plan active at the end (control layer)
``/needle_robot/servo_jv``          sensor_msgs/JointState        commands: insertion (m/s), roll (rad/s),
                                                                  spin_duty (fraction) as velocities
``/needle_robot/measured_js``       sensor_msgs/JointState        insertion stage: insertion (m), roll (rad)
                                                                  integrated from the commands, with rates
``/sim/arm/joint_states``           sensor_msgs/JointState        iiwa joints after the guide alignment
``/registration/T_robot_base_from_patient``  geometry_msgs/TransformStamped  true patient placement
``/control/status``                 std_msgs/String               JSON: executing at start, final status
==================================  ============================  ==========================================
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from needle_steering.errors import SimulationError

PATIENT_FRAME = "patient"
ROBOT_BASE_FRAME = "robot_base"
_MM_PER_M = 1000.0
_SEP = "=" * 80

_HEADER = "builtin_interfaces/Time stamp\nstring frame_id\n"
_POINT = "float64 x\nfloat64 y\nfloat64 z\n"
_QUATERNION = "float64 x 0\nfloat64 y 0\nfloat64 z 0\nfloat64 w 1\n"
_POSE = "Point position\nQuaternion orientation\n"


def _msgdef(main: str, *deps: tuple[str, str]) -> str:
    parts = [main.rstrip("\n")]
    for name, text in deps:
        parts.append(f"{_SEP}\nMSG: {name}\n{text.rstrip(chr(10))}")
    return "\n".join(parts) + "\n"


#: ROS 2 message definitions (ros2msg text, dependencies appended as ``ros2 bag`` stores them).
MSGDEFS: dict[str, str] = {
    "geometry_msgs/msg/PoseStamped": _msgdef(
        "std_msgs/Header header\nPose pose\n",
        ("std_msgs/Header", _HEADER),
        ("geometry_msgs/Pose", _POSE),
        ("geometry_msgs/Point", _POINT),
        ("geometry_msgs/Quaternion", _QUATERNION),
    ),
    "nav_msgs/msg/Path": _msgdef(
        "std_msgs/Header header\ngeometry_msgs/PoseStamped[] poses\n",
        ("std_msgs/Header", _HEADER),
        ("geometry_msgs/PoseStamped", "std_msgs/Header header\nPose pose\n"),
        ("geometry_msgs/Pose", _POSE),
        ("geometry_msgs/Point", _POINT),
        ("geometry_msgs/Quaternion", _QUATERNION),
    ),
    "sensor_msgs/msg/JointState": _msgdef(
        "std_msgs/Header header\nstring[] name\nfloat64[] position\nfloat64[] velocity\nfloat64[] effort\n",
        ("std_msgs/Header", _HEADER),
    ),
    "geometry_msgs/msg/TransformStamped": _msgdef(
        "std_msgs/Header header\nstring child_frame_id\nTransform transform\n",
        ("std_msgs/Header", _HEADER),
        ("geometry_msgs/Transform", "Vector3 translation\nQuaternion rotation\n"),
        ("geometry_msgs/Vector3", _POINT),
        ("geometry_msgs/Quaternion", _QUATERNION),
    ),
    "std_msgs/msg/String": "string data\n",
}


def _stamp(t_s: float) -> dict[str, int]:
    ns = round(t_s * 1e9)
    return {"sec": ns // 1_000_000_000, "nanosec": ns % 1_000_000_000}


def _quat(R: ArrayLike) -> dict[str, float]:
    from needle_steering.sim.twin.frames import quaternion_xyzw

    q = quaternion_xyzw(R)
    return {"x": float(q[0]), "y": float(q[1]), "z": float(q[2]), "w": float(q[3])}


def _pose_mm(T_mm: ArrayLike) -> dict[str, Any]:
    T = np.asarray(T_mm, dtype=np.float64)
    p = T[:3, 3] / _MM_PER_M
    return {"position": {"x": float(p[0]), "y": float(p[1]), "z": float(p[2])}, "orientation": _quat(T[:3, :3])}


class McapRecorder:
    """Writes ROS 2 messages (as dicts) into one MCAP file; use as a context manager.

    Args:
        path: Output file (its folder must exist).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from mcap_ros2.writer import Writer

        self.file_path = Path(path)
        if not self.file_path.parent.is_dir():
            raise SimulationError(f"{self.file_path}: folder {self.file_path.parent} does not exist")
        self._file = self.file_path.open("wb")
        self._writer = Writer(self._file)
        self._schemas: dict[str, Any] = {}
        self._seq: dict[str, int] = {}
        self.messages_written = 0

    def __enter__(self) -> McapRecorder:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Finish the MCAP summary and close the file (idempotent)."""
        if self._file.closed:
            return
        try:
            self._writer.finish()
        finally:
            self._file.close()

    def write(self, topic: str, datatype: str, message: dict[str, Any], t_s: float) -> None:
        """Write ``message`` (a dict matching ``datatype``'s definition) on ``topic`` at sim time ``t_s``."""
        if datatype not in MSGDEFS:
            raise SimulationError(f"no message definition for {datatype!r}; known: {sorted(MSGDEFS)}")
        if not (math.isfinite(t_s) and t_s >= 0):
            raise SimulationError(f"log time must be finite and >= 0 s, got {t_s!r}")
        schema = self._schemas.get(datatype)
        if schema is None:
            schema = self._writer.register_msgdef(datatype, MSGDEFS[datatype])
            self._schemas[datatype] = schema
        seq = self._seq.get(topic, 0)
        ns = round(t_s * 1e9)
        self._writer.write_message(topic, schema, message, log_time=ns, publish_time=ns, sequence=seq)
        self._seq[topic] = seq + 1
        self.messages_written += 1

    # -------------------------------------------------------------- typed helpers
    def pose(self, topic: str, T_patient_from_x_mm: ArrayLike, t_s: float, frame_id: str = PATIENT_FRAME) -> None:
        """``geometry_msgs/PoseStamped`` from a 4x4 pose in patient **mm** (written in metres)."""
        msg = {"header": {"stamp": _stamp(t_s), "frame_id": frame_id}, "pose": _pose_mm(T_patient_from_x_mm)}
        self.write(topic, "geometry_msgs/msg/PoseStamped", msg, t_s)

    def path(self, topic: str, points_mm: ArrayLike, t_s: float, frame_id: str = PATIENT_FRAME) -> None:
        """``nav_msgs/Path`` through points (N, 3) in patient **mm**; orientations along the path."""
        from needle_steering.sim.twin.frames import frame_from_axis

        pts = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        poses = []
        for k, p in enumerate(pts):
            d = pts[min(k + 1, len(pts) - 1)] - pts[max(k - 1, 0)]
            R = frame_from_axis(d) if np.linalg.norm(d) > 1e-9 else np.eye(3)
            T = np.eye(4)
            T[:3, :3] = R
            T[:3, 3] = p
            poses.append({"header": {"stamp": _stamp(t_s), "frame_id": frame_id}, "pose": _pose_mm(T)})
        msg = {"header": {"stamp": _stamp(t_s), "frame_id": frame_id}, "poses": poses}
        self.write(topic, "nav_msgs/msg/Path", msg, t_s)

    def joint_state(
        self, topic: str, names: list[str], t_s: float, position: ArrayLike = (), velocity: ArrayLike = ()
    ) -> None:
        """``sensor_msgs/JointState``."""
        msg = {
            "header": {"stamp": _stamp(t_s), "frame_id": ""},
            "name": list(names),
            "position": [float(v) for v in np.asarray(position, dtype=np.float64).reshape(-1)],
            "velocity": [float(v) for v in np.asarray(velocity, dtype=np.float64).reshape(-1)],
            "effort": [],
        }
        self.write(topic, "sensor_msgs/msg/JointState", msg, t_s)

    def transform(self, topic: str, T_parent_from_child_m: ArrayLike, parent: str, child: str, t_s: float) -> None:
        """``geometry_msgs/TransformStamped`` of a 4x4 transform in **metres**."""
        T = np.asarray(T_parent_from_child_m, dtype=np.float64)
        t = T[:3, 3]
        msg = {
            "header": {"stamp": _stamp(t_s), "frame_id": parent},
            "child_frame_id": child,
            "transform": {"translation": {"x": float(t[0]), "y": float(t[1]), "z": float(t[2])},
                          "rotation": _quat(T[:3, :3])},
        }
        self.write(topic, "geometry_msgs/msg/TransformStamped", msg, t_s)

    def string(self, topic: str, text: str, t_s: float) -> None:
        """``std_msgs/String``."""
        self.write(topic, "std_msgs/msg/String", {"data": text}, t_s)


def write_episode_mcap(path: str | os.PathLike[str], name: str, result: Any, seed: int | None = None) -> Path:
    """Record one twin episode (:class:`~needle_steering.sim.twin.episode.TwinEpisodeResult`).

    Args:
        path: Output ``.mcap`` file.
        name: Scenario name (stored in the status messages).
        result: The twin episode result with its recorded trajectory.
        seed: Scenario seed (stored in the status messages).

    Returns:
        The written path.
    """
    from needle_steering.sim.twin.twin import N_JOINTS

    out = Path(path)
    with McapRecorder(out) as rec:
        rec.transform("/registration/T_robot_base_from_patient", result.T_robot_from_patient_m,
                      ROBOT_BASE_FRAME, PATIENT_FRAME, 0.0)
        rec.joint_state("/sim/arm/joint_states", [f"lbr_iiwa_joint_{j + 1}" for j in range(N_JOINTS)], 0.0,
                        position=result.joints_rad)
        rec.string("/control/status", json.dumps({"state": "executing", "scenario": name, "seed": seed}), 0.0)
        rec.path("/plan/path", result.plan_points_mm, 0.0)
        tr = result.trajectory
        t_end = 0.0
        if tr is not None:
            # Insertion stage (prismatic insertion + needle roll): the commanded joint positions,
            # integrated from the commands held over each control period.
            insertion_m, roll_rad = 0.0, 0.0
            for k, t in enumerate(tr.t_s):
                ts = float(t)
                rec.pose("/sim/tip_true", tr.true_T_world_from_tip[k], ts)
                rec.pose("/control/tip_estimate", tr.estimated_T_world_from_tip[k], ts)
                v, w, duty = (float(x) for x in tr.commands[k])
                rec.joint_state("/needle_robot/servo_jv", ["insertion", "roll", "spin_duty"], ts,
                                velocity=[v / _MM_PER_M, w, duty])
                rec.joint_state("/needle_robot/measured_js", ["insertion", "roll"], ts,
                                position=[insertion_m, roll_rad], velocity=[v / _MM_PER_M, w])
                if k + 1 < len(tr.t_s):
                    dt = float(tr.t_s[k + 1]) - ts
                    insertion_m += v / _MM_PER_M * dt
                    roll_rad += w * dt
                t_end = ts
        t_stop = result.stop_time_s if math.isfinite(result.stop_time_s) else t_end
        final = {
            "state": result.status,
            "reason": result.reason,
            "scenario": name,
            "seed": seed,
            "target_error_mm": round(float(result.target_error_mm), 4),
            "collided": bool(result.collided),
        }
        rec.string("/control/status", json.dumps(final), max(t_end, float(t_stop)))
    return out


def read_mcap_messages(path: str | os.PathLike[str]) -> dict[str, list[tuple[int, Any]]]:
    """Read an MCAP file back with ``mcap_ros2.reader.read_ros2_messages``.

    Returns:
        ``{topic: [(log_time_ns, decoded_message), ...]}`` in log-time order.
    """
    import warnings

    with warnings.catch_warnings():
        # mcap_ros2.reader warns at import that its module docstring mentions the ROS 1 reader.
        warnings.simplefilter("ignore", DeprecationWarning)
        from mcap_ros2.reader import read_ros2_messages

    out: dict[str, list[tuple[int, Any]]] = {}
    for m in read_ros2_messages(str(path)):
        out.setdefault(m.channel.topic, []).append((int(m.log_time_ns), m.ros_msg))
    return out


__all__ = ["MSGDEFS", "McapRecorder", "read_mcap_messages", "write_episode_mcap"]
