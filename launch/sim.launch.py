"""The whole needle_steering stack on the digital twin (``ros2 launch needle_steering sim.launch.py``).

Same node graph as ``needle-steering bringup --config config/sim.yaml``, one process per node.
Every node reads ``config/sim.yaml`` (installed to ``share/needle_steering/config``).
"""

from __future__ import annotations

from launch.substitutions import PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription

PACKAGE = "needle_steering"


def _config(name: str) -> PathJoinSubstitution:
    return PathJoinSubstitution([FindPackageShare(PACKAGE), "config", name])


def generate_launch_description() -> LaunchDescription:
    """Five nodes, parameters from config/sim.yaml."""
    return LaunchDescription(
        [
            Node(
                package=PACKAGE,
                executable="perception_node",
                name="perception_node",
                parameters=[_config("sim.yaml")],
                output="screen",
            ),
            Node(
                package=PACKAGE,
                executable="planning_node",
                name="planning_node",
                parameters=[_config("sim.yaml")],
                output="screen",
            ),
            Node(
                package=PACKAGE,
                executable="plan_review_node",
                name="plan_review_node",
                parameters=[_config("sim.yaml")],
                output="screen",
            ),
            Node(
                package=PACKAGE,
                executable="control_node",
                name="control_node",
                parameters=[_config("sim.yaml")],
                output="screen",
            ),
            Node(
                package=PACKAGE,
                executable="sim_node",
                name="sim_node",
                parameters=[_config("sim.yaml")],
                output="screen",
            ),
        ]
    )
