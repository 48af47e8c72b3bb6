"""MCAP (rosbag2, ros2msg schemas) round trip of a twin episode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from needle_steering.control.closed_loop import random_scenario
from needle_steering.errors import SimulationError
from needle_steering.sim.mcap_recorder import MSGDEFS, McapRecorder, read_mcap_messages, write_episode_mcap
from needle_steering.sim.twin.episode import TwinEpisodeResult, run_twin_episode
from needle_steering.sim.twin.frames import rotation_from_quaternion_xyzw


@pytest.fixture(scope="module")
def episode() -> TwinEpisodeResult:
    return run_twin_episode(random_scenario(41, depth_range_mm=(40.0, 45.0)), 2)


def test_episode_round_trip(tmp_path: Path, episode: TwinEpisodeResult) -> None:
    path = write_episode_mcap(tmp_path / "ep.mcap", "ep", episode, seed=41)
    msgs = read_mcap_messages(path)
    tr = episode.trajectory
    assert tr is not None
    true = msgs["/sim/tip_true"]
    est = msgs["/control/tip_estimate"]
    assert len(true) == len(est) == len(tr.t_s)
    for k in (0, len(tr.t_s) // 2, len(tr.t_s) - 1):
        t_ns, msg = true[k]
        assert t_ns == round(tr.t_s[k] * 1e9)
        p = msg.pose.position
        np.testing.assert_allclose([p.x, p.y, p.z], tr.true_T_world_from_tip[k][:3, 3] / 1000.0, atol=1e-12)
        q = msg.pose.orientation
        np.testing.assert_allclose(rotation_from_quaternion_xyzw([q.x, q.y, q.z, q.w]),
                                   tr.true_T_world_from_tip[k][:3, :3], atol=1e-9)
        e = est[k][1].pose.position
        np.testing.assert_allclose([e.x, e.y, e.z], tr.estimated_T_world_from_tip[k][:3, 3] / 1000.0, atol=1e-12)
        cmd = msgs["/needle_robot/servo_jv"][k][1]
        np.testing.assert_allclose(cmd.velocity, [tr.commands[k][0] / 1000.0, tr.commands[k][1], tr.commands[k][2]])
    path_msg = msgs["/plan/path"][0][1]
    pts = np.array([[ps.pose.position.x, ps.pose.position.y, ps.pose.position.z] for ps in path_msg.poses])
    np.testing.assert_allclose(pts, episode.plan_points_mm / 1000.0, atol=1e-12)
    tf = msgs["/registration/T_robot_base_from_patient"][0][1]
    assert tf.header.frame_id == "robot_base" and tf.child_frame_id == "patient"
    np.testing.assert_allclose([tf.transform.translation.x, tf.transform.translation.y, tf.transform.translation.z],
                               episode.T_robot_from_patient_m[:3, 3], atol=1e-12)
    # Insertion stage joints: the integrated insertion equals the tip's path length.
    stage = msgs["/needle_robot/measured_js"]
    assert list(stage[-1][1].name) == ["insertion", "roll"]
    steps = np.linalg.norm(np.diff(tr.true_T_world_from_tip[:, :3, 3], axis=0), axis=1)
    assert stage[-1][1].position[0] * 1000.0 == pytest.approx(float(steps.sum()), abs=0.05)
    joints = msgs["/sim/arm/joint_states"][0][1]
    np.testing.assert_allclose(joints.position, episode.joints_rad)
    status = [json.loads(m.data) for _, m in msgs["/control/status"]]
    assert status[0]["state"] == "executing" and status[-1]["state"] == episode.status


def test_same_episode_gives_the_same_bytes(tmp_path: Path, episode: TwinEpisodeResult) -> None:
    a = write_episode_mcap(tmp_path / "a.mcap", "ep", episode, seed=41).read_bytes()
    b = write_episode_mcap(tmp_path / "b.mcap", "ep", episode, seed=41).read_bytes()
    assert a == b


def test_schemas_are_ros2msg_text_and_validated(tmp_path: Path) -> None:
    assert "MSG: std_msgs/Header" in MSGDEFS["geometry_msgs/msg/PoseStamped"]
    assert "MSG: geometry_msgs/PoseStamped" in MSGDEFS["nav_msgs/msg/Path"]
    with McapRecorder(tmp_path / "s.mcap") as rec:
        rec.string("/x", "hello", 0.5)
        with pytest.raises(SimulationError, match="no message definition"):
            rec.write("/y", "foo_msgs/msg/Bar", {}, 0.0)
        with pytest.raises(SimulationError, match="log time"):
            rec.string("/x", "late", float("nan"))
    assert read_mcap_messages(tmp_path / "s.mcap")["/x"][0][1].data == "hello"
    with pytest.raises(SimulationError, match="does not exist"):
        McapRecorder(tmp_path / "missing" / "x.mcap")
