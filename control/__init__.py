"""Control layer: needle model, sensors, estimator, controller, replanner, safety, closed loop.

Pure numpy/scipy (no ROS, no PyBullet). Units are in the names (``_mm``, ``_s``, ``_rad``);
poses are 4x4 ``T_world_from_tip`` arrays in mm whose z-axis is the insertion direction and
whose +y axis is the bevel's bending direction (see :mod:`.needle_model`).
"""

from __future__ import annotations

from needle_steering.control.closed_loop import (
    FAULT_KINDS,
    CampaignSummary,
    EpisodeResult,
    Fault,
    Scenario,
    Trajectory,
    random_scenario,
    run_campaign,
    run_episode,
)
from needle_steering.control.controller import ControllerParams, ControlOutput, SlidingModeController
from needle_steering.control.estimator import EstimatorParams, TipEKF, TipEstimate
from needle_steering.control.geometry import Obstacles, se3_exp, se3_exp_batch
from needle_steering.control.needle_model import (
    HOLD,
    NeedleCommand,
    NeedleParams,
    NeedleState,
    TissueParams,
    arc_points_tip_mm,
    arc_to_point,
    step_needle,
    step_needles_batch,
)
from needle_steering.control.replanner import ArcReplanner, Path, PlanResult, Replanner
from needle_steering.control.safety import SafetyLimits, SafetyMonitor, SafetyObservation, SafetyTrip
from needle_steering.control.sensors import (
    CbctFix,
    CbctParams,
    CbctScanner,
    EMMeasurement,
    EMTracker,
    EMTrackerParams,
    PatientReferenceSensor,
)

__all__ = [
    "FAULT_KINDS",
    "HOLD",
    "ArcReplanner",
    "CampaignSummary",
    "CbctFix",
    "CbctParams",
    "CbctScanner",
    "ControlOutput",
    "ControllerParams",
    "EMMeasurement",
    "EMTracker",
    "EMTrackerParams",
    "EpisodeResult",
    "EstimatorParams",
    "Fault",
    "NeedleCommand",
    "NeedleParams",
    "NeedleState",
    "Obstacles",
    "Path",
    "PatientReferenceSensor",
    "PlanResult",
    "Replanner",
    "SafetyLimits",
    "SafetyMonitor",
    "SafetyObservation",
    "SafetyTrip",
    "Scenario",
    "SlidingModeController",
    "TipEKF",
    "TipEstimate",
    "TissueParams",
    "Trajectory",
    "arc_points_tip_mm",
    "arc_to_point",
    "random_scenario",
    "run_campaign",
    "run_episode",
    "se3_exp",
    "se3_exp_batch",
    "step_needle",
    "step_needles_batch",
]
