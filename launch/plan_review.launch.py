"""RViz for the plan review (``ros2 launch needle_steering plan_review.launch.py``).

Opens ``rviz/plan_review.rviz``: bone and critical-structure meshes, planned trajectories, the
interactive markers of ``plan_review_node`` (namespace ``/plan_review``: right-click a trajectory
for Approve / Reject / Approve all, drag its sphere to propose a new entry), the tip estimate and
the control status. Start the stack first (``sim.launch.py``, ``robot.launch.py`` or bringup).
"""

from __future__ import annotations

from launch.substitutions import PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare

from launch import LaunchDescription

PACKAGE = "needle_steering"


def generate_launch_description() -> LaunchDescription:
    """RViz 2 with the plan-review configuration."""
    rviz_config = PathJoinSubstitution([FindPackageShare(PACKAGE), "rviz", "plan_review.rviz"])
    return LaunchDescription(
        [
            Node(
                package="rviz2",
                executable="rviz2",
                name="plan_review_rviz",
                arguments=["-d", rviz_config],
                output="screen",
            )
        ]
    )
