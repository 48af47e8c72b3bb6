"""The needle_steering stack on a real robot (``ros2 launch needle_steering robot.launch.py``).

Same graph as ``sim.launch.py`` without ``sim_node``: ``control_node``'s robot-facing topics are
remapped to the real driver's topics, named by launch arguments (CRTK names, as the dVRK), e.g.::

    ros2 launch needle_steering robot.launch.py measured_cp_topic:=/NDL1/measured_cp \\
        servo_jv_topic:=/NDL1/servo_jv move_cp_topic:=/NDL1/move_cp \\
        measured_js_topic:=/NDL1/measured_js operating_state_topic:=/NDL1/operating_state

The driver must publish ``measured_cp`` in ``robot_base`` and a registration
``T_patient_from_robot_base`` (``geometry_msgs/TransformStamped``, transient-local) on
``registration_topic``; the tracker pose (frame ``patient``) comes on ``tracker_topic``.
"""

from __future__ import annotations

from launch.actions import DeclareLaunchArgument
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription

PACKAGE = "needle_steering"


def _config(name: str) -> PathJoinSubstitution:
    return PathJoinSubstitution([FindPackageShare(PACKAGE), "config", name])


def generate_launch_description() -> LaunchDescription:
    """Perception, planning, review and control; control remapped to the driver's topics."""
    return LaunchDescription(
        [
            DeclareLaunchArgument("measured_cp_topic", default_value="/needle_robot/measured_cp"),
            DeclareLaunchArgument("measured_js_topic", default_value="/needle_robot/measured_js"),
            DeclareLaunchArgument("operating_state_topic", default_value="/needle_robot/operating_state"),
            DeclareLaunchArgument("move_cp_topic", default_value="/needle_robot/move_cp"),
            DeclareLaunchArgument("servo_jv_topic", default_value="/needle_robot/servo_jv"),
            DeclareLaunchArgument("tracker_topic", default_value="/tracker/measured_cp"),
            DeclareLaunchArgument("registration_topic", default_value="/registration/T_patient_from_robot_base"),
            Node(
                package=PACKAGE,
                executable="perception_node",
                name="perception_node",
                parameters=[_config("robot.yaml")],
                output="screen",
            ),
            Node(
                package=PACKAGE,
                executable="planning_node",
                name="planning_node",
                parameters=[_config("robot.yaml")],
                output="screen",
            ),
            Node(
                package=PACKAGE,
                executable="plan_review_node",
                name="plan_review_node",
                parameters=[_config("robot.yaml")],
                output="screen",
            ),
            Node(
                package=PACKAGE,
                executable="control_node",
                name="control_node",
                parameters=[_config("robot.yaml")],
                remappings=[
                    ("/needle_robot/measured_cp", LaunchConfiguration("measured_cp_topic")),
                    ("/needle_robot/measured_js", LaunchConfiguration("measured_js_topic")),
                    ("/needle_robot/operating_state", LaunchConfiguration("operating_state_topic")),
                    ("/needle_robot/move_cp", LaunchConfiguration("move_cp_topic")),
                    ("/needle_robot/servo_jv", LaunchConfiguration("servo_jv_topic")),
                    ("/tracker/measured_cp", LaunchConfiguration("tracker_topic")),
                    ("/registration/T_patient_from_robot_base", LaunchConfiguration("registration_topic")),
                ],
                output="screen",
            ),
        ]
    )
