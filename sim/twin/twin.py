"""The PyBullet digital twin: KUKA iiwa + needle/drill guide, patient anatomy, needle, table.

One :class:`Twin` owns one PyBullet physics client in DIRECT mode (no GUI, no server). PyBullet
clients are not thread-safe, so a twin remembers the thread that connected it and every public
method refuses calls from any other thread (:class:`~needle_steering.errors.SimulationError`).
Other threads talk to the twin through a :class:`TwinCommandQueue`: their calls validate the
request at once (so a bad request fails in the caller's thread, with the offending value) and
enqueue it; the owner thread executes queued commands in order with
:meth:`Twin.process_commands`, which completes each command's ``Future``. This is the pattern of
jhu-dvrk's ``dvrk_pybullet`` (ROS callbacks validate and enqueue, one loop owns the simulator).

Kinematics only: the arm is positioned with ``resetJointState`` (an ideal position-controlled
robot); the guide, the needle and the anatomy are kinematic bodies. Nothing calls
``stepSimulation``, so the twin is deterministic and independent of the wall clock. Contacts
and clearances come from ``getClosestPoints``.

Units: PyBullet works in metres (robot frame). Poses and points in the patient frame are LPS
millimetres; :mod:`needle_steering.sim.twin.frames` converts.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from needle_steering.control.geometry import Obstacles
from needle_steering.errors import SimulationError
from needle_steering.sim.twin.anatomy import AnatomyMesh
from needle_steering.sim.twin.frames import (
    MM_PER_M,
    FloatArray,
    axis_angle_deg,
    check_points,
    check_transform,
    frame_from_axis,
    invert,
    make_transform,
    quaternion_xyzw,
    rotation_from_quaternion_xyzw,
    transform_points,
)

#: Number of actuated joints of the iiwa.
N_JOINTS = 7
#: Link index of the flange (``lbr_iiwa_link_7``).
FLANGE_LINK = 6
#: Where unused bodies are parked (robot metres), far from everything.
_PARK_M = (0.0, 0.0, -50.0)
#: Length of one needle shaft segment body (mm).
SHAFT_SEGMENT_MM = 10.0


def default_urdf_path() -> str:
    """Path of the KUKA iiwa URDF shipped with ``pybullet_data``."""
    import pybullet_data

    return str(pybullet_data.getDataPath()) + "/kuka_iiwa/model.urdf"


def guide_transform(length_m: float) -> FloatArray:
    """``T_flange_from_guide`` (4x4, m) of a straight guide of ``length_m`` along the flange +z."""
    return make_transform(np.eye(3), (0.0, 0.0, length_m))


@dataclass(frozen=True)
class TwinConfig:
    """Fixed properties of the twin (units in the names).

    Attributes:
        urdf_path: Arm URDF; the iiwa from ``pybullet_data`` when empty.
        T_flange_from_guide: Guide tool-centre point (distal tip, +z = insertion axis) in the
            flange frame, 4x4, metres. Default: a straight 120 mm sleeve along the flange z.
        guide_radius_m: Outer radius of the guide sleeve (collision cylinder).
        needle_radius_mm: Needle radius for contact checks (18 G ~ 0.64 mm).
        home_joints_rad: Joint configuration at start ("guide pointing down" posture).
        ik_position_tol_mm: Accepted guide-tip position error after IK (forward kinematics).
        ik_angle_tol_deg: Accepted guide-axis angle error after IK.
        ik_restarts: IK attempts (roll about the guide axis x rest pose) before giving up.
        ik_refine_iterations: Damped-least-squares iterations refining PyBullet's IK.
        min_arm_clearance_mm: Required clearance of the arm links from the patient and the table.
        min_guide_clearance_mm: Required clearance of the guide sleeve from bone, critical
            structures, obstacles and table (it passes through the skin incision).
        table_half_extents_m: Half sizes of the table slab (x, y, z).
        table_centre_xy_m: Table centre in the robot's x-y plane.
    """

    urdf_path: str = ""
    T_flange_from_guide: FloatArray = field(default_factory=lambda: guide_transform(0.12))
    guide_radius_m: float = 0.006
    needle_radius_mm: float = 0.64
    home_joints_rad: tuple[float, ...] = (0.0, 0.6, 0.0, -1.4, 0.0, 1.1, 0.0)
    ik_position_tol_mm: float = 0.1
    ik_angle_tol_deg: float = 0.1
    ik_restarts: int = 12
    ik_refine_iterations: int = 60
    min_arm_clearance_mm: float = 5.0
    min_guide_clearance_mm: float = 1.0
    table_half_extents_m: tuple[float, float, float] = (0.35, 0.7, 0.02)
    table_centre_xy_m: tuple[float, float] = (0.65, 0.0)

    def __post_init__(self) -> None:
        T = check_transform(self.T_flange_from_guide, "TwinConfig.T_flange_from_guide")
        object.__setattr__(self, "T_flange_from_guide", T)
        for name in ("guide_radius_m", "needle_radius_mm", "ik_position_tol_mm", "ik_angle_tol_deg"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise SimulationError(f"TwinConfig.{name} must be finite and > 0, got {value!r}")
        for name in ("min_arm_clearance_mm", "min_guide_clearance_mm"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise SimulationError(f"TwinConfig.{name} must be finite and >= 0, got {value!r}")
        if len(self.home_joints_rad) != N_JOINTS or not all(math.isfinite(q) for q in self.home_joints_rad):
            raise SimulationError(f"TwinConfig.home_joints_rad must be {N_JOINTS} finite angles, got "
                                  f"{self.home_joints_rad!r}")
        if self.ik_restarts < 1 or self.ik_refine_iterations < 0:
            raise SimulationError(f"ik_restarts must be >= 1 and ik_refine_iterations >= 0, got "
                                  f"{self.ik_restarts!r}, {self.ik_refine_iterations!r}")

    @property
    def guide_length_m(self) -> float:
        """Distance from the flange origin to the guide tip (m)."""
        return float(np.linalg.norm(self.T_flange_from_guide[:3, 3]))


@dataclass(frozen=True)
class IKSolution:
    """Result of :meth:`Twin.solve_ik` (verified by forward kinematics).

    Attributes:
        joints_rad: Joint angles (7,), rad.
        T_robot_from_guide_m: Achieved guide pose (4, 4), metres (forward kinematics).
        position_error_mm: Distance between achieved and requested guide tip (mm).
        angle_error_deg: Angle between achieved and requested guide axes (deg); the roll
            about the axis is free (the guide is axisymmetric).
        clearance: Arm and guide clearances at the solution (None when not checked).
        ok: Errors within tolerance and clearances satisfied.
        reason: Empty when ok, else what failed with the numbers (``unreachable: ...``,
            ``arm_collision: ...``, ``guide_collision: ...``).
        attempts: IK attempts made.
    """

    joints_rad: FloatArray
    T_robot_from_guide_m: FloatArray
    position_error_mm: float
    angle_error_deg: float
    clearance: ClearanceReport | None
    ok: bool
    reason: str
    attempts: int

    @property
    def arm_clearance_mm(self) -> float:
        """Arm-link clearance (mm), +inf when not checked."""
        return math.inf if self.clearance is None else self.clearance.arm_mm

    @property
    def guide_clearance_mm(self) -> float:
        """Guide clearance (mm), +inf when not checked."""
        return math.inf if self.clearance is None else self.clearance.guide_mm


@dataclass(frozen=True)
class ClearanceReport:
    """Clearances (mm) of arm links and guide to patient bodies and table, with the closest pairs."""

    arm_mm: float
    arm_pair: str
    guide_mm: float
    guide_pair: str

    def ok(self, config: TwinConfig) -> bool:
        """Whether both clearances satisfy ``config``'s minima."""
        return self.arm_mm >= config.min_arm_clearance_mm and self.guide_mm >= config.min_guide_clearance_mm

    def describe(self, config: TwinConfig) -> str:
        """The violated minimum with the numbers, or an empty string."""
        if self.arm_mm < config.min_arm_clearance_mm:
            return f"arm_collision: clearance {self.arm_mm:.1f} mm < {config.min_arm_clearance_mm} mm ({self.arm_pair})"
        if self.guide_mm < config.min_guide_clearance_mm:
            return (f"guide_collision: clearance {self.guide_mm:.1f} mm < {config.min_guide_clearance_mm} mm "
                    f"({self.guide_pair})")
        return ""


@dataclass(frozen=True)
class ContactReport:
    """Needle contact check: smallest clearance (mm, negative = penetration) and against what."""

    clearance_mm: float
    body: str
    in_contact: bool


@dataclass
class _PatientBody:
    body_id: int
    name: str
    kind: str  # bone | critical | other | obstacle
    T_patient_from_body_m: FloatArray


class Twin:
    """PyBullet twin of the robot cell; use as a context manager (always disconnects).

    Args:
        config: Fixed properties.
        seed: Seed of the twin's own randomness (IK restart postures; a function of the seed and
            the attempt index only, so results never depend on earlier calls).

    Example::

        with Twin() as twin:
            twin.set_patient(T_robot_from_patient_m)
            twin.add_anatomy(meshes)
            sol = twin.move_cp(T_robot_from_guide_m)
    """

    def __init__(self, config: TwinConfig | None = None, seed: int = 0) -> None:
        self.config = config or TwinConfig()
        self.seed = int(seed)
        self._client = -1
        self._owner: int | None = None
        self._arm = -1
        self._guide = -1
        self._table = -1
        self._needle_tip = -1
        self._shaft: list[int] = []
        self._lower = np.zeros(N_JOINTS)
        self._upper = np.zeros(N_JOINTS)
        self._link_names: list[str] = []
        self._guide_tip_in_com_m = np.zeros(3)
        self._patient_bodies: list[_PatientBody] = []
        self.T_robot_from_patient_m = np.eye(4)
        self.patient_shift_mm = np.zeros(3)
        self._p: Any = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> Twin:
        self.connect()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """Whether the PyBullet client is open."""
        return self._client >= 0

    def connect(self) -> None:
        """Open a DIRECT client in the calling thread (which becomes the owner) and build the cell."""
        from needle_steering.sim.twin._pybullet import import_pybullet

        p = import_pybullet()
        if self.connected:
            raise SimulationError("twin is already connected")
        self._p = p
        self._client = int(p.connect(p.DIRECT))
        if self._client < 0:
            raise SimulationError("pybullet.connect(DIRECT) failed")
        self._owner = threading.get_ident()
        try:
            self._build_cell()
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        """Disconnect (idempotent; only the owner thread may close a connected twin)."""
        if not self.connected:
            return
        self._require_owner()
        try:
            self._p.disconnect(physicsClientId=self._client)
        finally:
            self._client = -1
            self._owner = None
            self._patient_bodies = []

    def _require_owner(self) -> None:
        if not self.connected:
            raise SimulationError("twin is not connected (use it as a context manager)")
        if threading.get_ident() != self._owner:
            raise SimulationError(
                f"twin methods must be called from its owner thread {self._owner}, not "
                f"{threading.get_ident()}; submit commands through a TwinCommandQueue"
            )

    # ------------------------------------------------------------------ building
    def _build_cell(self) -> None:
        p, c = self._p, self._client
        urdf = self.config.urdf_path or default_urdf_path()
        try:
            self._arm = int(p.loadURDF(urdf, useFixedBase=True, physicsClientId=c))
        except p.error as exc:
            raise SimulationError(f"cannot load arm URDF {urdf!r}: {exc}") from None
        n = p.getNumJoints(self._arm, physicsClientId=c)
        if n < N_JOINTS:
            raise SimulationError(f"arm URDF {urdf!r} has {n} joints, need {N_JOINTS}")
        lower, upper, names = [], [], []
        for j in range(N_JOINTS):
            info = p.getJointInfo(self._arm, j, physicsClientId=c)
            lower.append(float(info[8]))
            upper.append(float(info[9]))
            names.append(info[12].decode() if isinstance(info[12], bytes) else str(info[12]))
        self._lower, self._upper = np.array(lower), np.array(upper)
        self._link_names = names
        # calculateJacobian takes points relative to the link's centre of mass, not its URDF frame.
        ls = p.getLinkState(self._arm, FLANGE_LINK, physicsClientId=c)
        R_inertial = rotation_from_quaternion_xyzw(ls[3])
        self._guide_tip_in_com_m = R_inertial.T @ (self.config.T_flange_from_guide[:3, 3] - np.asarray(ls[2]))
        # Guide sleeve: a cylinder from the flange to the guide tip; body frame = guide frame.
        L = self.config.guide_length_m
        r = self.config.guide_radius_m
        shape = p.createCollisionShape(
            p.GEOM_CYLINDER, radius=r, height=L, collisionFramePosition=[0.0, 0.0, -L / 2.0], physicsClientId=c
        )
        self._guide = int(p.createMultiBody(0.0, shape, physicsClientId=c))
        p.changeDynamics(self._guide, -1, collisionMargin=0.0, physicsClientId=c)
        # Needle: a short tip capsule and shaft segments (parked until inserted).
        rn = self.config.needle_radius_mm / MM_PER_M
        tip_shape = p.createCollisionShape(p.GEOM_CAPSULE, radius=rn, height=1.0 / MM_PER_M, physicsClientId=c)
        self._needle_tip = int(p.createMultiBody(0.0, tip_shape, basePosition=_PARK_M, physicsClientId=c))
        seg_shape = p.createCollisionShape(
            p.GEOM_CAPSULE, radius=rn, height=SHAFT_SEGMENT_MM / MM_PER_M, physicsClientId=c
        )
        self._shaft = [
            int(p.createMultiBody(0.0, seg_shape, basePosition=_PARK_M, physicsClientId=c)) for _ in range(20)
        ]
        self.set_joint_positions(np.asarray(self.config.home_joints_rad))

    def add_table(self, top_z_m: float) -> int:
        """Add (or move) the table slab with its top surface at ``top_z_m`` (robot metres)."""
        self._require_owner()
        if not math.isfinite(top_z_m):
            raise SimulationError(f"top_z_m must be finite, got {top_z_m!r}")
        p, c = self._p, self._client
        hx, hy, hz = self.config.table_half_extents_m
        cx, cy = self.config.table_centre_xy_m
        pos = [cx, cy, top_z_m - hz]
        if self._table < 0:
            shape = p.createCollisionShape(p.GEOM_BOX, halfExtents=[hx, hy, hz], physicsClientId=c)
            self._table = int(p.createMultiBody(0.0, shape, basePosition=pos, physicsClientId=c))
        else:
            p.resetBasePositionAndOrientation(self._table, pos, [0, 0, 0, 1], physicsClientId=c)
        return self._table

    def set_patient(self, T_robot_from_patient_m: ArrayLike) -> None:
        """Place the patient (true placement): ``T_robot_from_patient_m`` maps patient m to robot m."""
        self._require_owner()
        self.T_robot_from_patient_m = check_transform(T_robot_from_patient_m, "T_robot_from_patient_m")
        self._place_patient_bodies()

    def set_patient_shift(self, shift_mm: ArrayLike) -> None:
        """Rigid patient motion: translate all patient bodies by ``shift_mm`` (3,), patient frame."""
        self._require_owner()
        self.patient_shift_mm = check_points(shift_mm, "shift_mm").reshape(3).copy()
        self._place_patient_bodies()

    def _T_robot_from_patient_now_m(self) -> FloatArray:
        return self.T_robot_from_patient_m @ make_transform(np.eye(3), self.patient_shift_mm / MM_PER_M)

    def _place_patient_bodies(self) -> None:
        T = self._T_robot_from_patient_now_m()
        for pb in self._patient_bodies:
            self._set_pose(pb.body_id, T @ pb.T_patient_from_body_m)

    def _set_pose(self, body: int, T_robot_from_body_m: FloatArray) -> None:
        self._p.resetBasePositionAndOrientation(
            body, T_robot_from_body_m[:3, 3].tolist(), quaternion_xyzw(T_robot_from_body_m[:3, :3]).tolist(),
            physicsClientId=self._client,
        )

    def add_anatomy(self, meshes: Sequence[AnatomyMesh]) -> dict[str, int]:
        """Load anatomy meshes (LPS mm) as static concave collision bodies attached to the patient.

        Returns:
            ``{name: body_id}``.
        """
        self._require_owner()
        p, c = self._p, self._client
        out: dict[str, int] = {}
        for mesh in meshes:
            verts_m = (mesh.vertices_lps_mm / MM_PER_M).tolist()
            shape = p.createCollisionShape(
                p.GEOM_MESH, vertices=verts_m, indices=mesh.triangles.reshape(-1).tolist(),
                flags=p.GEOM_FORCE_CONCAVE_TRIMESH, physicsClientId=c,
            )
            if shape < 0:
                raise SimulationError(f"PyBullet refused the mesh of {mesh.name!r} ({len(verts_m)} vertices)")
            body = int(p.createMultiBody(0.0, shape, physicsClientId=c))
            # Concave meshes carry a default collision margin (~1 mm) that shortens convex-shape
            # (capsule, cylinder) distances by that much; the twin wants true surface distances.
            p.changeDynamics(body, -1, collisionMargin=0.0, physicsClientId=c)
            self._patient_bodies.append(_PatientBody(body, mesh.name, mesh.kind, np.eye(4)))
            out[mesh.name] = body
        self._place_patient_bodies()
        return out

    def add_obstacles(self, obstacles: Obstacles, prefix: str = "obstacle") -> dict[str, int]:
        """Load spheres and capsules (patient mm, :class:`~needle_steering.control.geometry.Obstacles`).

        Returns:
            ``{name: body_id}`` with names ``<prefix>_sphere_<k>`` / ``<prefix>_capsule_<k>``.
        """
        self._require_owner()
        p, c = self._p, self._client
        out: dict[str, int] = {}
        for k, (centre, radius) in enumerate(zip(obstacles.sphere_centers_mm, obstacles.sphere_radii_mm, strict=True)):
            shape = p.createCollisionShape(p.GEOM_SPHERE, radius=float(radius) / MM_PER_M, physicsClientId=c)
            body = int(p.createMultiBody(0.0, shape, physicsClientId=c))
            name = f"{prefix}_sphere_{k}"
            self._patient_bodies.append(
                _PatientBody(body, name, "obstacle", make_transform(np.eye(3), np.asarray(centre) / MM_PER_M))
            )
            out[name] = body
        for k, (a, b, radius) in enumerate(
            zip(obstacles.capsule_a_mm, obstacles.capsule_b_mm, obstacles.capsule_radii_mm, strict=True)
        ):
            axis = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
            length = float(np.linalg.norm(axis))
            R = frame_from_axis(axis) if length > 1e-9 else np.eye(3)
            shape = p.createCollisionShape(
                p.GEOM_CAPSULE, radius=float(radius) / MM_PER_M, height=length / MM_PER_M, physicsClientId=c
            )
            body = int(p.createMultiBody(0.0, shape, physicsClientId=c))
            name = f"{prefix}_capsule_{k}"
            mid = 0.5 * (np.asarray(a) + np.asarray(b)) / MM_PER_M
            self._patient_bodies.append(_PatientBody(body, name, "obstacle", make_transform(R, mid)))
            out[name] = body
        self._place_patient_bodies()
        return out

    def clear_patient(self) -> None:
        """Remove every patient body (anatomy, obstacles), reset the shift and hide the needle."""
        self._require_owner()
        for pb in self._patient_bodies:
            self._p.removeBody(pb.body_id, physicsClientId=self._client)
        self._patient_bodies = []
        self.patient_shift_mm = np.zeros(3)
        self.hide_needle()

    @property
    def patient_body_names(self) -> dict[str, str]:
        """``{name: kind}`` of the bodies attached to the patient."""
        return {pb.name: pb.kind for pb in self._patient_bodies}

    # ------------------------------------------------------------------ arm state
    @property
    def joint_limits_rad(self) -> tuple[FloatArray, FloatArray]:
        """``(lower (7,), upper (7,))`` joint limits (rad)."""
        return self._lower.copy(), self._upper.copy()

    def measured_js(self) -> FloatArray:
        """Current joint angles (7,), rad (CRTK ``measured_js``)."""
        self._require_owner()
        states = self._p.getJointStates(self._arm, list(range(N_JOINTS)), physicsClientId=self._client)
        return np.array([s[0] for s in states], dtype=np.float64)

    def set_joint_positions(self, q_rad: ArrayLike) -> None:
        """Set the joints (7,), rad (CRTK ``servo_jp`` of an ideal robot); refuses out-of-limit values."""
        self._require_owner()
        q = np.asarray(q_rad, dtype=np.float64).reshape(-1)
        self._check_joints(q)
        for j in range(N_JOINTS):
            self._p.resetJointState(self._arm, j, float(q[j]), physicsClientId=self._client)
        self._set_pose(self._guide, self._flange_pose_m() @ self.config.T_flange_from_guide)

    def _check_joints(self, q: FloatArray) -> None:
        if q.shape != (N_JOINTS,) or not np.all(np.isfinite(q)):
            raise SimulationError(f"joint vector must be {N_JOINTS} finite angles, got {q.tolist()}")
        bad = np.flatnonzero((q < self._lower - 1e-9) | (q > self._upper + 1e-9))
        if bad.size:
            j = int(bad[0])
            raise SimulationError(
                f"joint {j + 1} = {q[j]:.4f} rad outside its limits [{self._lower[j]:.4f}, {self._upper[j]:.4f}]"
            )

    def _flange_pose_m(self) -> FloatArray:
        s = self._p.getLinkState(self._arm, FLANGE_LINK, computeForwardKinematics=True, physicsClientId=self._client)
        return make_transform(rotation_from_quaternion_xyzw(s[5]), s[4])

    def measured_cp(self) -> FloatArray:
        """Guide pose ``T_robot_from_guide_m`` (4, 4) by forward kinematics (CRTK ``measured_cp``)."""
        self._require_owner()
        return self._flange_pose_m() @ self.config.T_flange_from_guide

    # ------------------------------------------------------------------ clearance
    def clearance(self, query_mm: float = 50.0) -> ClearanceReport:
        """Smallest distances (mm) of the arm links and of the guide to the patient and the table.

        Arm links (and the base) are checked against every patient body and the table. The
        guide is checked against bone, critical structures, obstacles and the table only: it
        passes through the skin incision by design. Distances beyond ``query_mm`` are reported
        as ``query_mm`` with an empty pair name.
        """
        self._require_owner()
        p, c = self._p, self._client
        d_query = query_mm / MM_PER_M
        arm, arm_pair, guide, guide_pair = query_mm, "", query_mm, ""
        others: list[tuple[int, str, str]] = [(pb.body_id, pb.name, pb.kind) for pb in self._patient_bodies]
        if self._table >= 0:
            others.append((self._table, "table", "table"))
        for body, name, kind in others:
            for q in p.getClosestPoints(self._arm, body, d_query, physicsClientId=c):
                d = float(q[8]) * MM_PER_M
                if d < arm:
                    link = int(q[3])
                    link_name = "base" if link < 0 else self._link_names[link]
                    arm, arm_pair = d, f"{link_name} <-> {name}"
            if kind in ("bone", "critical", "obstacle", "table"):
                for q in p.getClosestPoints(self._guide, body, d_query, physicsClientId=c):
                    d = float(q[8]) * MM_PER_M
                    if d < guide:
                        guide, guide_pair = d, f"guide <-> {name}"
        return ClearanceReport(arm, arm_pair, guide, guide_pair)

    # ------------------------------------------------------------------ inverse kinematics
    def _fk_guide(self, q: FloatArray) -> FloatArray:
        for j in range(N_JOINTS):
            self._p.resetJointState(self._arm, j, float(q[j]), physicsClientId=self._client)
        return self._flange_pose_m() @ self.config.T_flange_from_guide

    def _refine(self, q0: FloatArray, p_target_m: FloatArray, axis_target: FloatArray) -> FloatArray:
        """Damped least squares on the 5-D task (guide tip position + axis; roll free)."""
        p, c = self._p, self._client
        local = self._guide_tip_in_com_m.tolist()
        q = q0.copy()
        zeros = [0.0] * N_JOINTS
        for _ in range(self.config.ik_refine_iterations):
            T = self._fk_guide(q)
            e_pos = p_target_m - T[:3, 3]
            z = T[:3, 2]
            e_rot = np.cross(z, axis_target)  # rotates z toward the target axis, no roll component
            if np.linalg.norm(e_pos) < 1e-8 and np.linalg.norm(e_rot) < 1e-8:
                break
            # Jacobian of the guide tip (a point fixed in the flange frame).
            Jl, Ja = p.calculateJacobian(self._arm, FLANGE_LINK, local, q.tolist(), zeros, zeros, physicsClientId=c)
            Jv = np.asarray(Jl, dtype=np.float64)[:, :N_JOINTS]
            Jw = np.asarray(Ja, dtype=np.float64)[:, :N_JOINTS]
            P = np.eye(3) - np.outer(z, z)  # angular velocity about the axis does not matter
            J = np.vstack([Jv, P @ Jw])
            e = np.concatenate([e_pos, e_rot])
            lam2 = 1e-6
            dq = J.T @ np.linalg.solve(J @ J.T + lam2 * np.eye(6), e)
            step = float(np.max(np.abs(dq)))
            if step > 0.3:
                dq *= 0.3 / step
            q = np.clip(q + dq, self._lower, self._upper)
        return q

    def solve_ik(self, T_robot_from_guide_target_m: ArrayLike, check_clearance: bool = True) -> IKSolution:
        """Joint angles putting the guide tip and axis on the target (roll about the axis free).

        PyBullet's ``calculateInverseKinematics`` (null-space limits and rest pose) is run from
        several starts (the current joints, the home posture, random postures) with different
        rolls about the guide axis; each result is refined by damped least squares and verified
        by forward kinematics. The first solution within tolerance and clear of anatomy and
        table wins; otherwise the best one is returned with ``ok=False`` and the reason. The
        arm is left at its previous joints (use :meth:`move_cp` to move).
        """
        self._require_owner()
        T_target = check_transform(T_robot_from_guide_target_m, "T_robot_from_guide_target_m")
        p, c = self._p, self._client
        cfg = self.config
        q_start = self.measured_js()
        p_target = T_target[:3, 3]
        axis = T_target[:3, 2]
        T_gf = invert(cfg.T_flange_from_guide)
        seeds: list[FloatArray] = [q_start, np.asarray(cfg.home_joints_rad)]
        ranges = self._upper - self._lower
        best: IKSolution | None = None
        attempts = 0
        for k in range(cfg.ik_restarts):
            attempts += 1
            if k < len(seeds):
                seed = seeds[k]
            else:
                home = np.asarray(cfg.home_joints_rad)
                # Restart postures depend only on the twin's seed and the attempt index, so a
                # solve never depends on earlier calls.
                rng = np.random.default_rng([self.seed, k])
                seed = np.clip(home + rng.uniform(-0.5, 0.5, N_JOINTS) * 0.6 * ranges / 2, self._lower, self._upper)
            roll = 2.0 * math.pi * k / cfg.ik_restarts
            R_goal = T_target[:3, :3] @ np.array(
                [[math.cos(roll), -math.sin(roll), 0.0], [math.sin(roll), math.cos(roll), 0.0], [0.0, 0.0, 1.0]]
            )
            T_flange_goal = make_transform(R_goal, p_target) @ T_gf
            for j in range(N_JOINTS):
                p.resetJointState(self._arm, j, float(seed[j]), physicsClientId=c)
            q_ik = p.calculateInverseKinematics(
                self._arm, FLANGE_LINK, T_flange_goal[:3, 3].tolist(),
                quaternion_xyzw(T_flange_goal[:3, :3]).tolist(),
                lowerLimits=self._lower.tolist(), upperLimits=self._upper.tolist(),
                jointRanges=ranges.tolist(), restPoses=seed.tolist(),
                maxNumIterations=200, residualThreshold=1e-7, physicsClientId=c,
            )
            q = np.clip(np.asarray(q_ik[:N_JOINTS], dtype=np.float64), self._lower, self._upper)
            q = self._refine(q, p_target, axis)
            T = self._fk_guide(q)
            pos_err = float(np.linalg.norm(T[:3, 3] - p_target)) * MM_PER_M
            ang_err = axis_angle_deg(T[:3, 2], axis)
            within = pos_err < cfg.ik_position_tol_mm and ang_err < cfg.ik_angle_tol_deg
            report: ClearanceReport | None = None
            if check_clearance and within:
                self._set_pose(self._guide, T)
                report = self.clearance()
            ok = within and (report is None or report.ok(cfg))
            if ok:
                reason = ""
            elif not within:
                reason = (f"unreachable: guide error {pos_err:.3f} mm / {ang_err:.3f} deg exceeds "
                          f"{cfg.ik_position_tol_mm} mm / {cfg.ik_angle_tol_deg} deg")
            else:
                assert report is not None
                reason = report.describe(cfg)
            sol = IKSolution(q, T, pos_err, ang_err, report, ok, reason, attempts)
            if ok:
                best = sol
                break
            if best is None or _rank(sol, cfg) > _rank(best, cfg):
                best = sol
        # Restore the previous configuration (solve_ik does not move the arm).
        self.set_joint_positions(q_start)
        assert best is not None
        suffix = "" if best.ok else f" after {attempts} IK attempts"
        return IKSolution(best.joints_rad, best.T_robot_from_guide_m, best.position_error_mm, best.angle_error_deg,
                          best.clearance, best.ok, best.reason + suffix, attempts)

    def move_cp(self, T_robot_from_guide_target_m: ArrayLike) -> IKSolution:
        """Solve IK and, when the solution is ok, move the arm there (CRTK ``move_cp``)."""
        sol = self.solve_ik(T_robot_from_guide_target_m)
        if sol.ok:
            self.set_joint_positions(sol.joints_rad)
        return sol

    # ------------------------------------------------------------------ needle
    def set_needle(self, shaft_points_mm: ArrayLike, T_patient_from_tip_mm: ArrayLike, tip_only: bool = False) -> None:
        """Show the needle: shaft along ``shaft_points_mm`` (N, 3) and the tip pose, patient mm.

        The shaft follows the tip's past path (follow-the-leader insertion); it is represented
        by capsule segments of :data:`SHAFT_SEGMENT_MM` (chords of the path), the tip by a short
        capsule along the tip's z-axis. The needle lives in the un-shifted patient frame (the
        patient may move around it). ``tip_only`` moves only the tip body (the shaft bodies keep
        their last poses; use it between full updates).
        """
        self._require_owner()
        T_tip = check_transform(T_patient_from_tip_mm, "T_patient_from_tip_mm")
        pts = check_points(shaft_points_mm, "shaft_points_mm").reshape(-1, 3)
        T_rp = self.T_robot_from_patient_m
        tip_T = make_transform(T_tip[:3, :3], T_tip[:3, 3] / MM_PER_M)
        self._set_pose(self._needle_tip, T_rp @ tip_T)
        if tip_only:
            return
        # Shaft chords every SHAFT_SEGMENT_MM of arc length, ending at the tip.
        seg = np.linalg.norm(np.diff(pts, axis=0), axis=1) if len(pts) > 1 else np.zeros(0)
        s = np.concatenate([[0.0], np.cumsum(seg)])
        total = float(s[-1])
        n_used = min(len(self._shaft), int(total // SHAFT_SEGMENT_MM))
        park = make_transform(np.eye(3), _PARK_M)
        for k, body in enumerate(self._shaft):
            if k >= n_used:
                self._set_pose(body, park)
                continue
            s1 = total - k * SHAFT_SEGMENT_MM
            s0 = s1 - SHAFT_SEGMENT_MM
            a = np.array([np.interp(s0, s, pts[:, i]) for i in range(3)])
            b = np.array([np.interp(s1, s, pts[:, i]) for i in range(3)])
            d = b - a
            R = frame_from_axis(d) if np.linalg.norm(d) > 1e-9 else T_tip[:3, :3]
            self._set_pose(body, T_rp @ make_transform(R, 0.5 * (a + b) / MM_PER_M))

    def hide_needle(self) -> None:
        """Park the needle bodies (needle retracted)."""
        self._require_owner()
        park = make_transform(np.eye(3), _PARK_M)
        for body in [self._needle_tip, *self._shaft]:
            self._set_pose(body, park)

    def needle_contact(self, kinds: Sequence[str] = ("bone", "critical", "obstacle"), query_mm: float = 20.0,
                       tip_only: bool = False) -> ContactReport:
        """Smallest surface distance (mm) between the needle and patient bodies of ``kinds``.

        Returns ``query_mm`` when nothing is closer. ``in_contact`` is True when the distance is
        <= 0 (touching or penetrating). Meshes report distances to their surface only: a needle
        entirely inside a closed mesh is found when it crosses the surface, not afterwards.
        """
        self._require_owner()
        p, c = self._p, self._client
        d_query = query_mm / MM_PER_M
        needle = [self._needle_tip] if tip_only else [self._needle_tip, *self._shaft]
        best, name = query_mm, ""
        for pb in self._patient_bodies:
            if pb.kind not in kinds:
                continue
            for body in needle:
                for q in p.getClosestPoints(body, pb.body_id, d_query, physicsClientId=c):
                    d = float(q[8]) * MM_PER_M
                    if d < best:
                        best, name = d, pb.name
        return ContactReport(best, name, best <= 0.0)

    # ------------------------------------------------------------------ command queue
    def process_commands(self, commands: TwinCommandQueue, max_commands: int | None = None) -> int:
        """Execute queued commands in order (owner thread only); returns how many ran."""
        self._require_owner()
        return commands.drain(self, max_commands)


def _rank(sol: IKSolution, cfg: TwinConfig) -> tuple[bool, float, float]:
    """Ordering of failed IK attempts: within tolerance first, then clearance, then accuracy."""
    within = sol.position_error_mm < cfg.ik_position_tol_mm and sol.angle_error_deg < cfg.ik_angle_tol_deg
    clear = min(sol.arm_clearance_mm - cfg.min_arm_clearance_mm, sol.guide_clearance_mm - cfg.min_guide_clearance_mm)
    return within, clear if within else 0.0, -sol.position_error_mm


@dataclass
class _Command:
    name: str
    run: Callable[[Twin], Any]
    future: Future[Any]


class TwinCommandQueue:
    """Thread-safe command queue in front of a :class:`Twin` (producers: any thread).

    Each submit method validates its arguments in the caller's thread (raising
    :class:`SimulationError` with the offending value) and returns a ``Future`` that the owner
    thread completes in :meth:`Twin.process_commands`.

    Args:
        maxsize: Largest number of pending commands; submits beyond it raise (back-pressure,
            never silent dropping).
    """

    def __init__(self, maxsize: int = 256) -> None:
        self._queue: queue.Queue[_Command] = queue.Queue(maxsize=maxsize)

    def __len__(self) -> int:
        return self._queue.qsize()

    def _put(self, name: str, run: Callable[[Twin], Any]) -> Future[Any]:
        fut: Future[Any] = Future()
        try:
            self._queue.put_nowait(_Command(name, run, fut))
        except queue.Full:
            raise SimulationError(f"twin command queue is full ({self._queue.maxsize}); {name} refused") from None
        return fut

    def servo_jp(self, q_rad: ArrayLike) -> Future[Any]:
        """Queue a joint setpoint (7,), rad."""
        q = np.asarray(q_rad, dtype=np.float64).reshape(-1)
        if q.shape != (N_JOINTS,) or not np.all(np.isfinite(q)):
            raise SimulationError(f"servo_jp needs {N_JOINTS} finite joint angles, got {np.asarray(q_rad).tolist()}")
        return self._put("servo_jp", lambda twin: twin.set_joint_positions(q))

    def move_cp(self, T_robot_from_guide_m: ArrayLike) -> Future[Any]:
        """Queue a guide goal (4, 4), robot metres; the future's result is the :class:`IKSolution`."""
        T = check_transform(T_robot_from_guide_m, "move_cp goal")
        return self._put("move_cp", lambda twin: twin.move_cp(T))

    def set_patient_shift(self, shift_mm: ArrayLike) -> Future[Any]:
        """Queue a rigid patient displacement (3,), mm."""
        d = check_points(shift_mm, "shift_mm").reshape(3).copy()
        return self._put("set_patient_shift", lambda twin: twin.set_patient_shift(d))

    def measured_cp(self) -> Future[Any]:
        """Queue a query of the guide pose; the future's result is ``T_robot_from_guide_m``."""
        return self._put("measured_cp", lambda twin: twin.measured_cp())

    def drain(self, twin: Twin, max_commands: int | None = None) -> int:
        """Run pending commands on ``twin`` (call only through :meth:`Twin.process_commands`)."""
        done = 0
        while max_commands is None or done < max_commands:
            try:
                cmd = self._queue.get_nowait()
            except queue.Empty:
                break
            if cmd.future.set_running_or_notify_cancel():
                try:
                    cmd.future.set_result(cmd.run(twin))
                except Exception as exc:  # the caller's future carries the error
                    cmd.future.set_exception(exc)
            done += 1
        return done


def transform_obstacles(obstacles: Obstacles, T_b_from_a_mm: ArrayLike) -> Obstacles:
    """Obstacles (mm) expressed in another frame (rigid transform, mm)."""
    T = np.asarray(T_b_from_a_mm, dtype=np.float64)
    return Obstacles(
        transform_points(T, obstacles.sphere_centers_mm).reshape(-1, 3),
        obstacles.sphere_radii_mm,
        transform_points(T, obstacles.capsule_a_mm).reshape(-1, 3),
        transform_points(T, obstacles.capsule_b_mm).reshape(-1, 3),
        obstacles.capsule_radii_mm,
    )


__all__ = [
    "FLANGE_LINK",
    "N_JOINTS",
    "ClearanceReport",
    "ContactReport",
    "IKSolution",
    "Twin",
    "TwinCommandQueue",
    "TwinConfig",
    "default_urdf_path",
    "guide_transform",
    "transform_obstacles",
]
