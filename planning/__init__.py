"""Planning layer: pedicle screws, biopsy needles and steerable-needle paths on CT + label maps.

Pure numpy/scipy (no ROS, no control/sim imports). Coordinates are LPS millimetres throughout.
The entry point for the command line and the nodes is :func:`plan_case`; the plan document
(:class:`PlanDocument`, schema ``needle_steering.plan/1``) is what approvals bind to.
"""

from __future__ import annotations

from needle_steering.planning.api import PlanOptions, PlanResult, plan_case
from needle_steering.planning.biopsy import BiopsyOptions, BiopsyPath, BiopsyPlan, plan_biopsy
from needle_steering.planning.fields import DensityCalibration
from needle_steering.planning.pedicle import (
    ANGLE_RANGES,
    PedicleOptions,
    ScrewPlan,
    check_screw_against_mask,
    gertzbein_robbins_grade,
    plan_pedicle_screws,
)
from needle_steering.planning.plan_document import (
    SCHEMA,
    ImageInfo,
    PlanDocument,
    Trajectory,
    load_plan,
    save_plan,
    volume_sha256,
)
from needle_steering.planning.recheck import recheck_trajectory
from needle_steering.planning.report import write_report
from needle_steering.planning.steerable import (
    FieldObstacles,
    SphereObstacles,
    SteerablePath,
    SteerablePlanner,
    SteerablePlanResult,
)

__all__ = [
    "ANGLE_RANGES",
    "SCHEMA",
    "BiopsyOptions",
    "BiopsyPath",
    "BiopsyPlan",
    "DensityCalibration",
    "FieldObstacles",
    "ImageInfo",
    "PedicleOptions",
    "PlanDocument",
    "PlanOptions",
    "PlanResult",
    "ScrewPlan",
    "SphereObstacles",
    "SteerablePath",
    "SteerablePlanResult",
    "SteerablePlanner",
    "Trajectory",
    "check_screw_against_mask",
    "gertzbein_robbins_grade",
    "load_plan",
    "plan_biopsy",
    "plan_case",
    "plan_pedicle_screws",
    "recheck_trajectory",
    "save_plan",
    "volume_sha256",
    "write_report",
]
