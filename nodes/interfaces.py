"""The single interface table: every node's topics, services and parameters, and the frames.

Nodes declare their parameters *from this table* (:func:`declare_parameters`), create their
publishers/subscriptions with the QoS named here (:func:`topic`), ``docs/interfaces.md`` is
rendered from it (:func:`render_markdown`, checked by ``tests/nodes/test_nodes_interfaces.py``)
and the static launch-file test checks remappings and parameter files against it. So the code,
the document and the launch files cannot drift apart.

Topic names are absolute. A name with ``{trajectory}`` is a pattern: one topic per trajectory id
(sanitised to ``[A-Za-z0-9_]``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from needle_steering.nodes import qos as qos_profiles

if TYPE_CHECKING:
    from rclpy.node import Node
    from rclpy.qos import QoSProfile

ParamValue = bool | int | float | str | list[float] | list[str]
PARAM_TYPES: Final = ("bool", "integer", "double", "string", "double_array")


@dataclass(frozen=True)
class Param:
    """One declared parameter.

    Attributes:
        name: Parameter name (no node prefix).
        type: One of :data:`PARAM_TYPES`.
        default: Default value (its Python type matches ``type``).
        description: What it does, with unit.
        min_value, max_value: Inclusive range for numbers (``None``: unbounded). For
            ``double_array`` the range applies to every element.
        choices: Allowed values of a string parameter (empty: any).
        array_lengths: Allowed lengths of a ``double_array`` (empty: any).
    """

    name: str
    type: str
    default: ParamValue
    description: str
    min_value: float | None = None
    max_value: float | None = None
    choices: tuple[str, ...] = ()
    array_lengths: tuple[int, ...] = ()

    def check(self, value: Any) -> str | None:
        """Return why ``value`` is not acceptable for this parameter, or ``None`` when it is."""
        where = f"parameter {self.name!r}"
        if self.type == "bool":
            return None if isinstance(value, bool) else f"{where}: expected a bool, got {value!r}"
        if self.type == "string":
            if not isinstance(value, str):
                return f"{where}: expected a string, got {value!r}"
            if self.choices and value not in self.choices:
                return f"{where}: {value!r} is not one of {list(self.choices)}"
            return None
        if self.type in ("integer", "double"):
            if isinstance(value, bool) or not isinstance(value, int | float):
                return f"{where}: expected a number, got {value!r}"
            if self.type == "integer" and not isinstance(value, int):
                return f"{where}: expected an integer, got {value!r}"
            return self._check_range(float(value), where)
        if self.type == "double_array":
            if isinstance(value, str) or not isinstance(value, Sequence):
                return f"{where}: expected a list of numbers, got {value!r}"
            if self.array_lengths and len(value) not in self.array_lengths:
                return f"{where}: expected {' or '.join(map(str, self.array_lengths))} numbers, got {list(value)!r}"
            for item in value:
                if isinstance(item, bool) or not isinstance(item, int | float):
                    return f"{where}: expected numbers, got {list(value)!r}"
                reason = self._check_range(float(item), where)
                if reason:
                    return reason
            return None
        return f"{where}: unknown parameter type {self.type!r}"

    def _check_range(self, number: float, where: str) -> str | None:
        if not math.isfinite(number):
            return f"{where}: must be finite, got {number!r}"
        if self.min_value is not None and number < self.min_value:
            return f"{where}: {number!r} is below the minimum {self.min_value!r}"
        if self.max_value is not None and number > self.max_value:
            return f"{where}: {number!r} is above the maximum {self.max_value!r}"
        return None

    def range_text(self) -> str:
        """Human-readable range or choices for the document."""
        if self.choices:
            return " \\| ".join(f"`{c}`" for c in self.choices)
        parts = []
        if self.min_value is not None or self.max_value is not None:
            lo = "-inf" if self.min_value is None else f"{self.min_value:g}"
            hi = "inf" if self.max_value is None else f"{self.max_value:g}"
            parts.append(f"[{lo}, {hi}]")
        if self.array_lengths:
            parts.append("length " + " or ".join(map(str, self.array_lengths)))
        return ", ".join(parts)


@dataclass(frozen=True)
class Topic:
    """One topic a node publishes (``pub``) or subscribes to (``sub``)."""

    name: str
    msg_type: str
    direction: str
    qos: str
    description: str
    frame: str = ""


@dataclass(frozen=True)
class Service:
    """One service a node offers."""

    name: str
    srv_type: str
    description: str


@dataclass(frozen=True)
class NodeInterface:
    """Everything one node exposes; ``name`` is also its executable and ROS node name."""

    name: str
    description: str
    params: tuple[Param, ...] = ()
    topics: tuple[Topic, ...] = ()
    services: tuple[Service, ...] = ()
    extra_checks: tuple[Callable[[Mapping[str, Any]], str | None], ...] = field(default=(), compare=False)

    def param(self, name: str) -> Param:
        """The parameter called ``name`` (``KeyError`` with the known names otherwise)."""
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(f"{self.name} declares no parameter {name!r}; declared: {[p.name for p in self.params]}")

    def topic(self, name: str) -> Topic:
        """The topic called ``name`` (``KeyError`` otherwise)."""
        for t in self.topics:
            if t.name == name:
                return t
        raise KeyError(f"{self.name} has no topic {name!r}")


# --------------------------------------------------------------------------------------------------
# shared names
# --------------------------------------------------------------------------------------------------
PLAN_DOCUMENT = "/plan/document"
PLAN_APPROVALS = "/plan/approvals"
PLAN_MARKERS = "/plan/markers"
PLAN_PATH_PATTERN = "/plan/path/{trajectory}"
ADJUST_REQUEST = "/planning/adjust_request"
ADJUST_RESULT = "/planning/adjust_result"
REVIEW_NS = "/plan_review"
ROBOT_NS = "/needle_robot"
TRACKER_POSE = "/tracker/measured_cp"
T_PATIENT_FROM_ROBOT = "/registration/T_patient_from_robot_base"
T_ROBOT_FROM_PATIENT = "/registration/T_robot_base_from_patient"
CONTROL_STATUS = "/control/status"
CONTROL_ESTOP = "/control/estop"
CONTROL_TIP = "/control/tip_estimate"
CONTROL_STATUS_MARKER = "/control/status_marker"
SIM_FAULT = "/sim/fault"
SIM_STATE = "/sim/state"

_PHANTOM_PARAMS: Final = (
    Param(
        "phantom_seed",
        "integer",
        7,
        "seed of the generated phantom patient used when no image is configured",
        0,
        2**31 - 1,
    ),
    Param("phantom_levels", "string", "T12-L5", "vertebral levels of the phantom patient (e.g. T12-L5)"),
    Param("phantom_spacing_mm", "double", 1.0, "isotropic voxel size of the phantom patient (mm)", 0.5, 3.0),
)


def _check_json_object(key: str) -> Callable[[Mapping[str, Any]], str | None]:
    def check(values: Mapping[str, Any]) -> str | None:
        text = values.get(key)
        if not isinstance(text, str):
            return None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"parameter {key!r}: not valid JSON ({exc.msg} at column {exc.colno}): {text!r}"
        if not isinstance(data, dict):
            return f"parameter {key!r}: expected a JSON object, got {text!r}"
        return None

    return check


def _check_levels(values: Mapping[str, Any]) -> str | None:
    from needle_steering.perception.labels import parse_level_range

    for key in ("levels", "phantom_levels"):
        text = values.get(key)
        if isinstance(text, str):
            try:
                parse_level_range(text)
            except ValueError as exc:
                return f"parameter {key!r}: {exc}"
    return None


PERCEPTION = NodeInterface(
    name="perception_node",
    description="Segments the configured image (or the generated phantom) and publishes bone and "
    "critical-structure meshes in frame `patient` (metres).",
    params=(
        Param("image_path", "string", "", "CT/CBCT file or DICOM folder; empty: generated phantom patient"),
        Param("modality", "string", "auto", "image modality", choices=("auto", "ct", "cbct")),
        Param("backend", "string", "auto", "segmentation backend passed to perception.segment"),
        Param("device", "string", "cpu", "torch device for learned backends", choices=("cpu", "cuda")),
        Param("mesh_step_voxels", "integer", 2, "marching-cubes step (coarser meshes are smaller)", 1, 8),
        Param("output_dir", "string", "", "folder for the label map (labels.nii.gz); empty: not written"),
        *_PHANTOM_PARAMS,
    ),
    topics=(
        Topic(
            "/perception/meshes",
            "visualization_msgs/msg/MarkerArray",
            "pub",
            "latched",
            "bone (per level) and critical-structure triangle meshes",
            "patient",
        ),
        Topic(
            "/perception/levels",
            "std_msgs/msg/String",
            "pub",
            "latched",
            'JSON {"levels": [...], "structures": [...], "source": ..., "backend": ...}',
        ),
    ),
    services=(
        Service(
            "/perception/segment",
            "std_srvs/srv/Trigger",
            "segment the configured image; message: levels found or the reason of failure",
        ),
    ),
    extra_checks=(_check_levels,),
)

PLANNING = NodeInterface(
    name="planning_node",
    description="Plans trajectories (pedicle screws, biopsy) and publishes the plan document; re-checks "
    "trajectories adjusted in the plan review.",
    params=(
        Param("levels", "string", "L1-L5", "levels to plan screws for (e.g. L1-L5; empty: none)"),
        Param("biopsy", "bool", False, "also plan a biopsy needle to biopsy_target_lps_mm"),
        Param(
            "biopsy_target_lps_mm",
            "double_array",
            [0.0, 0.0, 0.0],
            "biopsy target, LPS mm (used when biopsy)",
            -2000.0,
            2000.0,
            array_lengths=(3,),
        ),
        Param("options_json", "string", "{}", "further planning options as a JSON object"),
        Param("plan_file", "string", "", "plan document to publish instead of planning (LPS mm, sha256-checked)"),
        Param("image_path", "string", "", "planning CT; empty: generated phantom patient"),
        Param("labels_path", "string", "", "label map on the CT grid; empty: segment / phantom ground truth"),
        Param("output_dir", "string", "", "folder where each new plan is saved as plan-<sha256[:12]>.json"),
        *_PHANTOM_PARAMS,
    ),
    topics=(
        Topic(
            PLAN_DOCUMENT,
            "std_msgs/msg/String",
            "pub",
            "latched",
            "plan document JSON (schema needle_steering.plan/1, LPS mm, canonical, sha256)",
        ),
        Topic(PLAN_PATH_PATTERN, "nav_msgs/msg/Path", "pub", "latched", "one path per trajectory", "patient"),
        Topic(
            PLAN_MARKERS,
            "visualization_msgs/msg/MarkerArray",
            "pub",
            "latched",
            "trajectories as cylinders/lines with labels",
            "patient",
        ),
        Topic(
            ADJUST_REQUEST,
            "std_msgs/msg/String",
            "sub",
            "command",
            'JSON {"plan_sha256", "trajectory_id", "entry_lps_mm": [x, y, z], "requested_by"}',
        ),
        Topic(
            ADJUST_RESULT,
            "std_msgs/msg/String",
            "pub",
            "events",
            'JSON {"accepted": bool, "reason", "trajectory_id", "plan_sha256", "new_plan_sha256"}',
        ),
    ),
    services=(
        Service(
            "/planning/plan",
            "std_srvs/srv/Trigger",
            "plan with the current parameters (or load plan_file); message: plan sha256 or the reason",
        ),
    ),
    extra_checks=(_check_json_object("options_json"), _check_levels),
)

PLAN_REVIEW = NodeInterface(
    name="plan_review_node",
    description="Interactive-marker server for RViz (namespace `/plan_review`); the only source of "
    "approvals. Appends every decision to an append-only audit log.",
    params=(
        Param("surgeon_id", "string", "", "identity recorded in approvals; empty: approvals are refused"),
        Param(
            "audit_log",
            "string",
            "~/.local/state/needle_steering/audit/plan_review.jsonl",
            "append-only JSON-lines audit log (fsync per record)",
        ),
        Param("marker_scale_m", "double", 0.02, "size of the entry handles (m)", 0.001, 0.5),
        Param("keep_alive_period_s", "double", 1.0, "period of interactive-marker KEEP_ALIVE messages (s)", 0.1, 30.0),
    ),
    topics=(
        Topic(PLAN_DOCUMENT, "std_msgs/msg/String", "sub", "latched", "the plan under review"),
        Topic(
            f"{REVIEW_NS}/update",
            "visualization_msgs/msg/InteractiveMarkerUpdate",
            "pub",
            "events",
            "interactive-marker updates (consecutive seq_num; KEEP_ALIVE repeats it)",
            "patient",
        ),
        Topic(
            f"{REVIEW_NS}/feedback",
            "visualization_msgs/msg/InteractiveMarkerFeedback",
            "sub",
            "events",
            "RViz feedback: MENU_SELECT (Approve / Reject / Approve all), POSE_UPDATE + MOUSE_UP (drag)",
        ),
        Topic(
            PLAN_APPROVALS,
            "std_msgs/msg/String",
            "pub",
            "latched",
            'JSON {"plan_sha256", "approvals": [record...], "rejections": [record...]} for the current plan',
        ),
        Topic(ADJUST_REQUEST, "std_msgs/msg/String", "pub", "command", "dragged entry proposals for the planner"),
        Topic(ADJUST_RESULT, "std_msgs/msg/String", "sub", "events", "planner verdicts on proposals"),
        Topic(
            f"{REVIEW_NS}/events",
            "std_msgs/msg/String",
            "pub",
            "events",
            "JSON copy of each audit record (for displays and tests)",
        ),
    ),
    services=(
        Service(
            f"{REVIEW_NS}/get_interactive_markers",
            "visualization_msgs/srv/GetInteractiveMarkers",
            "full marker state with its sequence number (RViz calls it on connect)",
        ),
    ),
)

CONTROL = NodeInterface(
    name="control_node",
    description="Executes approved trajectories on the robot (twin or real driver) behind the execution "
    "gate; e-stop, watchdog, reset, tip estimate.",
    params=(
        Param("insertion_speed_mm_s", "double", 5.0, "needle insertion speed (mm/s)", 0.1, 50.0),
        Param("control_rate_hz", "double", 50.0, "control loop rate (Hz)", 5.0, 500.0),
        Param("sensor_timeout_s", "double", 0.25, "tracker samples older than this stop the insertion (s)", 0.02, 5.0),
        Param(
            "max_lateral_error_mm",
            "double",
            2.0,
            "estimated tip distance from the planned path that stops the insertion (mm)",
            0.2,
            20.0,
        ),
        Param("target_tolerance_mm", "double", 1.0, "tip-to-target distance counted as reached (mm)", 0.05, 10.0),
        Param("align_timeout_s", "double", 20.0, "time allowed for the guide to reach an entry pose (s)", 0.5, 600.0),
        Param("align_tolerance_mm", "double", 0.5, "guide position error accepted before inserting (mm)", 0.01, 5.0),
        Param(
            "tracker_position_sigma_mm",
            "double",
            0.5,
            "tracker position noise assumed by the estimator (mm)",
            0.01,
            10.0,
        ),
        Param(
            "needle_kappa_per_mm",
            "double",
            0.005,
            "nominal bevel-tip curvature known to the controller (1/mm)",
            1e-5,
            0.1,
        ),
        Param(
            "audit_log",
            "string",
            "~/.local/state/needle_steering/audit/control.jsonl",
            "append-only JSON-lines audit log of executions, refusals, stops and resets",
        ),
    ),
    topics=(
        Topic(PLAN_DOCUMENT, "std_msgs/msg/String", "sub", "latched", "the plan to execute"),
        Topic(PLAN_APPROVALS, "std_msgs/msg/String", "sub", "latched", "approvals from plan_review_node"),
        Topic(CONTROL_ESTOP, "std_msgs/msg/Bool", "sub", "command", "true latches an emergency stop"),
        Topic(
            CONTROL_STATUS,
            "std_msgs/msg/String",
            "pub",
            "status",
            'JSON {"state": idle|executing|done|stopped|fault, "trajectory", "reason", "phase", "plan_sha256", '
            '"approvals_plan_sha256", "approved", ...}',
        ),
        Topic(CONTROL_TIP, "geometry_msgs/msg/PoseStamped", "pub", "sensor", "estimated needle tip", "patient"),
        Topic(
            CONTROL_STATUS_MARKER,
            "visualization_msgs/msg/Marker",
            "pub",
            "status",
            "control state as a text marker for RViz",
            "patient",
        ),
        Topic(TRACKER_POSE, "geometry_msgs/msg/PoseStamped", "sub", "sensor", "tracked needle tip", "patient"),
        Topic(
            T_PATIENT_FROM_ROBOT,
            "geometry_msgs/msg/TransformStamped",
            "sub",
            "latched",
            "registration: maps robot_base points to patient",
            "patient <- robot_base",
        ),
        Topic(
            f"{ROBOT_NS}/measured_cp",
            "geometry_msgs/msg/PoseStamped",
            "sub",
            "sensor",
            "robot-measured needle tip (CRTK)",
            "robot_base",
        ),
        Topic(
            f"{ROBOT_NS}/measured_js",
            "sensor_msgs/msg/JointState",
            "sub",
            "sensor",
            "insertion stage encoder (m) and speed (CRTK)",
        ),
        Topic(
            f"{ROBOT_NS}/operating_state",
            "std_msgs/msg/String",
            "sub",
            "status",
            'CRTK operating state as JSON {"state", "is_homed", "is_busy", "error"}',
        ),
        Topic(
            f"{ROBOT_NS}/move_cp",
            "geometry_msgs/msg/PoseStamped",
            "pub",
            "command",
            "guide goal: tip at the entry, +z along the trajectory (CRTK)",
            "robot_base",
        ),
        Topic(
            f"{ROBOT_NS}/servo_jv",
            "sensor_msgs/msg/JointState",
            "pub",
            "command",
            "joint velocities: insertion (m/s), roll (rad/s), spin_duty (fraction, pseudo-joint) (CRTK)",
        ),
    ),
    services=(
        Service(
            "/control/execute",
            "std_srvs/srv/Trigger",
            "start executing the approved trajectories in plan order; answers at once: started or the "
            "reason of refusal",
        ),
        Service("/control/reset", "std_srvs/srv/Trigger", "clear a latched stop, only when safe"),
    ),
)

SIM = NodeInterface(
    name="sim_node",
    description="Digital twin behind the robot-driver topics (CRTK names as the dVRK); one thread owns the "
    "simulator, callbacks only validate and enqueue.",
    params=(
        Param("rate_hz", "double", 200.0, "simulation step rate (Hz)", 10.0, 2000.0),
        Param("publish_rate_hz", "double", 50.0, "measured_cp / measured_js publish rate (Hz)", 1.0, 500.0),
        Param("tracker_rate_hz", "double", 40.0, "tip tracker sample rate (Hz)", 1.0, 500.0),
        Param("tracker_position_sigma_mm", "double", 0.2, "tracker position noise (mm)", 0.0, 10.0),
        Param("tracker_latency_s", "double", 0.01, "tracker transport latency (s)", 0.0, 1.0),
        Param("needle_kappa_per_mm", "double", 0.005, "bevel-tip curvature in nominal tissue (1/mm)", 1e-5, 0.1),
        Param("tissue_curvature_scale", "double", 1.0, "true tissue curvature scale (-)", 0.1, 5.0),
        Param("guide_speed_mm_s", "double", 100.0, "speed of the guide during move_cp (mm/s)", 1.0, 1000.0),
        Param(
            "max_insertion_speed_mm_s",
            "double",
            50.0,
            "servo_jv insertion speeds above this are refused (mm/s)",
            0.1,
            200.0,
        ),
        Param(
            "max_servo_step_mm",
            "double",
            2.0,
            "servo_cp setpoints farther than this from the guide are refused (mm)",
            0.01,
            50.0,
        ),
        Param("command_timeout_s", "double", 0.2, "servo_jv older than this is replaced by hold (s)", 0.01, 5.0),
        Param(
            "robot_base_in_patient_mm",
            "double_array",
            [300.0, 0.0, 0.0],
            "robot base origin in patient LPS (mm)",
            -5000.0,
            5000.0,
            array_lengths=(3,),
        ),
        Param("robot_base_yaw_deg", "double", 180.0, "robot base rotation about patient +z (deg)", -360.0, 360.0),
        Param(
            "home_tip_lps_mm",
            "double_array",
            [150.0, -150.0, 0.0],
            "needle tip home position, LPS mm",
            -5000.0,
            5000.0,
            array_lengths=(3,),
        ),
        Param("seed", "integer", 0, "seed of the sensor noise", 0, 2**31 - 1),
        Param(
            "backend",
            "string",
            "pybullet",
            "simulator: pybullet (KUKA iiwa aligns the guide by IK, anatomy collision bodies) or kinematic "
            "(ideal guide, no arm, no anatomy)",
            choices=("pybullet", "kinematic"),
        ),
        Param(
            "anatomy",
            "string",
            "phantom",
            "pybullet: label map loaded as collision bodies: phantom (ground truth of the phantom patient), "
            "none, or a label-map file (LPS grid)",
        ),
        Param(
            "phantom_seed",
            "integer",
            7,
            "pybullet, anatomy phantom: seed of the phantom patient (as the other nodes)",
            0,
            2**31 - 1,
        ),
        Param("phantom_levels", "string", "T12-L5", "pybullet, anatomy phantom: vertebral levels (e.g. T12-L5)"),
        Param(
            "phantom_spacing_mm", "double", 1.0, "pybullet, anatomy phantom: isotropic voxel size (mm)", 0.5, 3.0
        ),
        Param(
            "patient_anchor_lps_mm",
            "double_array",
            [0.0, 0.0, -320.0],
            "pybullet: patient point (LPS mm) placed at the arm's workspace anchor (0.60, 0, 0.25) m, patient "
            "prone (default: about the centre of the default phantom's L1-L5); this placement is the published "
            "registration (robot_base_in_patient_mm / robot_base_yaw_deg / home_tip_lps_mm: kinematic backend only)",
            -5000.0,
            5000.0,
            array_lengths=(3,),
        ),
        Param(
            "patient_yaw_deg",
            "double",
            0.0,
            "pybullet: prone patient turned about the vertical through the anchor: 0 the arm beside the table at "
            "the patient's left, 90 the arm at the head end (reaches lateral approaches from both sides) (deg)",
            -180.0,
            180.0,
        ),
        Param(
            "guide_standoff_mm",
            "double",
            20.0,
            "pybullet: guide exit held this far behind the commanded tip (needle tip at zero insertion) (mm)",
            0.0,
            200.0,
        ),
        Param(
            "approach_mm",
            "double",
            60.0,
            "pybullet: the guide backs out / approaches this far along its axis when a direct path collides (mm)",
            0.0,
            300.0,
        ),
        Param("max_joint_speed_rad_s", "double", 1.0, "pybullet: arm joint speed limit (rad/s)", 0.05, 5.0),
        Param(
            "contact_rate_hz",
            "double",
            20.0,
            "pybullet: rate of the needle-vs-critical-structure clearance check (Hz)",
            1.0,
            200.0,
        ),
        Param("state_rate_hz", "double", 10.0, "rate of /sim/state (Hz)", 0.5, 100.0),
    ),
    topics=(
        Topic(
            f"{ROBOT_NS}/servo_cp",
            "geometry_msgs/msg/PoseStamped",
            "sub",
            "command",
            "guide setpoint, small steps only (CRTK)",
            "robot_base",
        ),
        Topic(
            f"{ROBOT_NS}/move_cp",
            "geometry_msgs/msg/PoseStamped",
            "sub",
            "command",
            "guide goal, interpolated at guide_speed_mm_s (CRTK); refused while the needle is inserted",
            "robot_base",
        ),
        Topic(
            f"{ROBOT_NS}/servo_jv",
            "sensor_msgs/msg/JointState",
            "sub",
            "command",
            "insertion (m/s), roll (rad/s), spin_duty (fraction) (CRTK)",
        ),
        Topic(
            f"{ROBOT_NS}/measured_cp",
            "geometry_msgs/msg/PoseStamped",
            "pub",
            "sensor",
            "needle tip from the guide kinematics and the insertion stage (CRTK; the twins report their true tip)",
            "robot_base",
        ),
        Topic(
            f"{ROBOT_NS}/measured_js",
            "sensor_msgs/msg/JointState",
            "pub",
            "sensor",
            "joints insertion (m), roll (rad), then the arm's lbr_iiwa_joint_1..7 (rad; pybullet), with "
            "velocities (CRTK)",
        ),
        Topic(
            f"{ROBOT_NS}/operating_state",
            "std_msgs/msg/String",
            "pub",
            "status",
            'JSON {"state": ENABLED|FAULT, "is_homed", "is_busy", "error"} (crtk_msgs/OperatingState fields)',
        ),
        Topic(
            TRACKER_POSE,
            "geometry_msgs/msg/PoseStamped",
            "pub",
            "sensor",
            "simulated EM tip tracker (noise, latency; stamp = acquisition time)",
            "patient",
        ),
        Topic(
            T_PATIENT_FROM_ROBOT,
            "geometry_msgs/msg/TransformStamped",
            "pub",
            "latched",
            "registration of the twin's base",
            "patient <- robot_base",
        ),
        Topic(
            T_ROBOT_FROM_PATIENT,
            "geometry_msgs/msg/TransformStamped",
            "pub",
            "latched",
            "inverse registration",
            "robot_base <- patient",
        ),
        Topic(
            SIM_FAULT,
            "std_msgs/msg/String",
            "sub",
            "command",
            'fault injection JSON {"tracker_dropout": bool, "tracker_frozen": bool}',
        ),
        Topic(
            SIM_STATE,
            "std_msgs/msg/String",
            "pub",
            "status",
            'JSON {"backend", "anatomy", "anatomy_loaded", "busy", "needle_critical_clearance_mm", '
            '"insertion_index", "insertion_depth_mm", "insertion_deepest_tip_lps_mm", '
            '"insertion_min_critical_clearance_mm", "critical_contacts", "last_move": {"ok", "reason", ...}, ...} '
            "(simulation ground truth for displays, tests and recordings; the controller never reads it)",
        ),
    ),
)

NODES: Final[dict[str, NodeInterface]] = {n.name: n for n in (PERCEPTION, PLANNING, PLAN_REVIEW, CONTROL, SIM)}

FRAMES: Final[tuple[tuple[str, str], ...]] = (
    (
        "patient",
        "The planning CT's LPS frame (+x Left, +y Posterior, +z Superior) in metres. All clinical data "
        "(meshes, plans, paths, markers, tracker, tip estimate). Files and plan documents use the same axes in mm.",
    ),
    (
        "robot_base",
        "The robot driver's base frame (metres). Robot-facing CRTK topics use it. "
        "`T_patient_from_robot_base` (topic `/registration/T_patient_from_robot_base`, header.frame_id "
        "`patient`, child_frame_id `robot_base`) maps robot_base points into patient; the inverse is on "
        "`/registration/T_robot_base_from_patient`.",
    ),
    (
        "needle tip",
        "Tool frame of measured_cp / tracker / move_cp poses: origin at the needle tip, +z the "
        "insertion direction, +y the bevel's bending direction.",
    ),
)


# --------------------------------------------------------------------------------------------------
# runtime helpers (rclpy imported lazily)
# --------------------------------------------------------------------------------------------------
def topic_qos(topic: Topic) -> QoSProfile:
    """The QoS profile of ``topic``."""
    return qos_profiles.qos(topic.qos)


def declare_parameters(node: Node, interface: NodeInterface) -> dict[str, Any]:
    """Declare every parameter of ``interface`` on ``node`` with descriptors and ranges.

    Also registers a set-parameters callback that rejects values out of range, not among the
    choices or failing the node's extra checks, with the reason in the result.

    Returns:
        The current values (after YAML overrides) by name.

    Raises:
        ValueError: an override from the parameter file is invalid (the node must not start).
    """
    from rcl_interfaces.msg import (
        FloatingPointRange,
        IntegerRange,
        ParameterDescriptor,
        ParameterType,
        SetParametersResult,
    )

    type_ids = {
        "bool": ParameterType.PARAMETER_BOOL,
        "integer": ParameterType.PARAMETER_INTEGER,
        "double": ParameterType.PARAMETER_DOUBLE,
        "string": ParameterType.PARAMETER_STRING,
        "double_array": ParameterType.PARAMETER_DOUBLE_ARRAY,
    }
    for p in interface.params:
        constraints = p.range_text()
        descriptor = ParameterDescriptor(
            name=p.name, type=type_ids[p.type], description=p.description, additional_constraints=constraints
        )
        if p.type == "double" and (p.min_value is not None or p.max_value is not None):
            descriptor.floating_point_range = [
                FloatingPointRange(
                    from_value=float(p.min_value if p.min_value is not None else -math.inf),
                    to_value=float(p.max_value if p.max_value is not None else math.inf),
                    step=0.0,
                )
            ]
        if p.type == "integer" and p.min_value is not None and p.max_value is not None:
            descriptor.integer_range = [IntegerRange(from_value=int(p.min_value), to_value=int(p.max_value), step=1)]
        default: Any = p.default
        if p.type == "double_array":
            if not isinstance(p.default, list) or not p.default:
                raise ValueError(f"{interface.name}.{p.name}: double_array defaults must be non-empty lists")
            default = [float(v) for v in p.default]
        elif p.type == "double":
            default = float(p.default)  # type: ignore[arg-type]
        node.declare_parameter(p.name, default, descriptor)
    values = current_values(node, interface)
    reason = check_values(interface, values)
    if reason:
        raise ValueError(f"{interface.name}: {reason}")

    def on_set(params: list[Any]) -> SetParametersResult:
        proposed = dict(current_values(node, interface))
        for param in params:
            if param.name not in {p.name for p in interface.params}:
                continue
            proposed[param.name] = _plain(param.value)
        why = check_values(interface, proposed)
        return SetParametersResult(successful=why is None, reason=why or "")

    node.add_on_set_parameters_callback(on_set)
    return values


def _plain(value: Any) -> Any:
    if value is None:
        return []
    if isinstance(value, bool | int | float | str):
        return value
    return list(value)


def current_values(node: Node, interface: NodeInterface) -> dict[str, Any]:
    """Current parameter values of ``node`` for the parameters of ``interface``."""
    return {p.name: _plain(node.get_parameter(p.name).value) for p in interface.params}


def check_values(interface: NodeInterface, values: Mapping[str, Any]) -> str | None:
    """Why ``values`` are not acceptable for ``interface`` (``None`` when they are)."""
    for p in interface.params:
        if p.name in values:
            reason = p.check(values[p.name])
            if reason:
                return reason
    for check in interface.extra_checks:
        reason = check(values)
        if reason:
            return reason
    return None


# --------------------------------------------------------------------------------------------------
# document
# --------------------------------------------------------------------------------------------------
def _fmt_default(value: ParamValue) -> str:
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{json.dumps(value)}`"


def _escape_cell(text: str) -> str:
    return text.replace("|", "\\|")


def render_markdown() -> str:
    """``docs/interfaces.md`` text, generated from this table."""
    lines = [
        "# needle_steering node interfaces",
        "",
        "<!-- Generated from needle_steering/nodes/interfaces.py by "
        "`python -m needle_steering.nodes.interfaces > docs/interfaces.md`; "
        "tests/nodes/test_nodes_interfaces.py fails when this file and the table differ. -->",
        "",
        "All clinical data on topics is in frame `patient` (the CT's LPS axes) in **metres**; files and plan "
        "documents are in LPS millimetres. Conversion happens only in `needle_steering/nodes/conversions.py`.",
        "",
        "## Frames",
        "",
        "| frame | meaning |",
        "|---|---|",
    ]
    lines += [f"| `{name}` | {text} |" for name, text in FRAMES]
    lines += ["", "## QoS profiles", "", "| profile | policy |", "|---|---|"]
    lines += [f"| `{name}` | {qos_profiles.describe(name)} |" for name in qos_profiles.PROFILES]
    for iface in NODES.values():
        lines += ["", f"## `{iface.name}`", "", iface.description, ""]
        if iface.services:
            lines += ["### Services", "", "| service | type | description |", "|---|---|---|"]
            lines += [f"| `{s.name}` | `{s.srv_type}` | {s.description} |" for s in iface.services]
            lines.append("")
        if iface.topics:
            lines += [
                "### Topics",
                "",
                "| topic | dir | type | QoS | frame | description |",
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| `{t.name}` | {t.direction} | `{t.msg_type}` | `{t.qos}` | {t.frame or '-'} | "
                f"{_escape_cell(t.description)} |"
                for t in iface.topics
            ]
            lines.append("")
        if iface.params:
            lines += [
                "### Parameters",
                "",
                "| parameter | type | default | range | description |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| `{p.name}` | {p.type} | {_fmt_default(p.default)} | {p.range_text() or '-'} | {p.description} |"
                for p in iface.params
            ]
    return "\n".join(lines) + "\n"


def remappable_topics(node_name: str) -> set[str]:
    """Names of the topics and services of ``node_name`` (what a launch file may remap)."""
    iface = NODES[node_name]
    return {t.name for t in iface.topics} | {s.name for s in iface.services}


if __name__ == "__main__":  # pragma: no cover
    import sys

    sys.stdout.write(render_markdown())

__all__ = [
    "FRAMES",
    "NODES",
    "NodeInterface",
    "Param",
    "Service",
    "Topic",
    "check_values",
    "current_values",
    "declare_parameters",
    "remappable_topics",
    "render_markdown",
    "topic_qos",
]
