"""PyBullet digital twin: KUKA iiwa + needle/drill guide, patient anatomy, needle, faults.

See ``docs/twin.md``. PyBullet and Open3D are imported lazily (inside the functions that need
them), so importing this package is cheap.

Public API:

* :class:`Twin`, :class:`TwinConfig`, :class:`TwinCommandQueue`, :class:`IKSolution` — the simulator
  (one owner thread, context manager, IK verified by forward kinematics, clearance checks).
* :func:`label_meshes`, :class:`AnatomyMesh`, :class:`SignedDistanceField`,
  :func:`mesh_surface_distance_mm` — anatomy from label maps.
* :func:`execute_screws`, :class:`ScrewExecutionConfig`, :class:`ScrewResult`,
  :func:`summarize_screws`, :func:`gertzbein_robbins_grade`, :func:`reference_screw_trajectories`,
  :func:`planner_screw_trajectories` — pedicle-screw execution and grading.
* :func:`run_twin_episode`, :class:`TwinEpisodeConfig`, :class:`TwinEpisodeResult` — steering episodes.
* :func:`prone_T_robot_from_patient_m`, :func:`approach_T_robot_from_patient_m` — patient placement.
"""

from __future__ import annotations

from needle_steering.sim.twin.anatomy import (
    AnatomyMesh,
    SignedDistanceField,
    label_meshes,
    mesh_surface_distance_mm,
)
from needle_steering.sim.twin.episode import TwinEpisodeConfig, TwinEpisodeResult, run_twin_episode
from needle_steering.sim.twin.frames import (
    DEFAULT_ANCHOR_ROBOT_M,
    approach_T_robot_from_patient_m,
    patient_mm_to_robot_m,
    prone_T_robot_from_patient_m,
    robot_m_to_patient_mm,
)
from needle_steering.sim.twin.screw_plans import planner_screw_trajectories, reference_screw_trajectories
from needle_steering.sim.twin.screws import (
    ScrewExecutionConfig,
    ScrewResult,
    execute_screws,
    gertzbein_robbins_grade,
    summarize_screws,
)
from needle_steering.sim.twin.twin import IKSolution, Twin, TwinCommandQueue, TwinConfig

__all__ = [
    "DEFAULT_ANCHOR_ROBOT_M",
    "AnatomyMesh",
    "IKSolution",
    "ScrewExecutionConfig",
    "ScrewResult",
    "SignedDistanceField",
    "Twin",
    "TwinCommandQueue",
    "TwinConfig",
    "TwinEpisodeConfig",
    "TwinEpisodeResult",
    "approach_T_robot_from_patient_m",
    "execute_screws",
    "gertzbein_robbins_grade",
    "label_meshes",
    "mesh_surface_distance_mm",
    "patient_mm_to_robot_m",
    "planner_screw_trajectories",
    "prone_T_robot_from_patient_m",
    "reference_screw_trajectories",
    "robot_m_to_patient_mm",
    "run_episode_in_twin",
    "run_twin_episode",
    "summarize_screws",
]

#: Alias of :func:`run_twin_episode`.
run_episode_in_twin = run_twin_episode
