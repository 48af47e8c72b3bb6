"""Bevel-tip needle kinematics: the nonholonomic "unicycle on SE(3)" model (Webster et al. 2006).

Frames and sign conventions (ours, fixed for the whole project):

* ``T_world_from_tip`` (4x4, mm): the tip frame's **z-axis is the insertion direction**; the
  bevel makes the needle bend toward the tip's **+y axis**. With insertion speed ``v`` (mm/s)
  the body twist is ``linear = (0, 0, v)``, ``angular = (-kappa_eff * v, 0, omega_tip)``:
  the negative rotation about x turns z toward +y, so a constant-curvature insertion from the
  identity pose traces ``y = (1 - cos(kappa s)) / kappa``, ``z = sin(kappa s) / kappa``.
* ``omega`` is the **base** rotation rate about the needle axis (rad/s, right-handed about
  +z). A positive roll of ``theta`` turns the bending direction from +y to
  ``(-sin theta, cos theta, 0)`` in the old tip frame.
* Duty-cycled spinning (Minhas et al. 2007 / Engh et al.): during a fraction ``spin_duty`` of
  the time the needle spins fast, which averages out the bevel force. We use the averaged
  model: ``kappa_eff = kappa * curvature_scale * (1 - spin_duty)`` while the net roll rate stays
  ``omega``. ``spin_duty = 0`` is full curvature, ``1`` a straight insertion.
* Torsional lag between base and tip roll: the shaft winds up by ``windup = base_roll -
  tip_roll``. Within a dead-band ``|windup| <= torsion_deadband_rad`` the tip does not turn
  (backlash / static friction); beyond it the excess relaxes with first-order time constant
  ``torsion_time_constant_s``: ``d(windup)/dt = omega - excess / tau``. The wind-up is
  integrated in closed form (piecewise exponential) and its increment gives the tip roll of the
  step; the resulting constant twist is then integrated exactly with the SE(3) exponential.

Every step is exact for its constant twist (no Euler integration), so a constant command
reproduces circle arcs to machine precision whatever the step size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from needle_steering.control.geometry import FloatArray, check_pose, se3_exp_batch, se3_exp_rows
from needle_steering.errors import ControlError

__all__ = [
    "HOLD",
    "NeedleCommand",
    "NeedleParams",
    "NeedleState",
    "TissueParams",
    "arc_points_tip_mm",
    "arc_to_point",
    "step_needle",
    "step_needles_batch",
]


@dataclass(frozen=True)
class NeedleParams:
    """Needle properties.

    Attributes:
        kappa_per_mm: nominal bevel curvature (1/mm) in nominal tissue, > 0.
        torsion_time_constant_s: first-order lag of tip roll behind base roll (s), >= 0.
        torsion_deadband_rad: backlash between base and tip roll (rad), >= 0.
    """

    kappa_per_mm: float = 0.01
    torsion_time_constant_s: float = 0.0
    torsion_deadband_rad: float = 0.0

    def __post_init__(self) -> None:
        for name in ("kappa_per_mm", "torsion_time_constant_s", "torsion_deadband_rad"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ControlError(f"NeedleParams.{name} must be finite and >= 0, got {value!r}")
        if self.kappa_per_mm <= 0:
            raise ControlError(f"NeedleParams.kappa_per_mm must be > 0, got {self.kappa_per_mm!r}")


@dataclass(frozen=True)
class TissueParams:
    """Tissue seen by the needle.

    Attributes:
        curvature_scale: true curvature = ``NeedleParams.kappa_per_mm * curvature_scale``
            (tissue stiffness changes the bevel's bending); > 0. The controller only knows a
            nominal value of 1 and estimates it online.
    """

    curvature_scale: float = 1.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.curvature_scale) or self.curvature_scale <= 0:
            raise ControlError(f"TissueParams.curvature_scale must be > 0, got {self.curvature_scale!r}")

    @staticmethod
    def sample(rng: np.random.Generator, mismatch: float = 0.2) -> TissueParams:
        """Draw a tissue with ``curvature_scale ~ U(1 - mismatch, 1 + mismatch)``."""
        if not 0.0 <= mismatch < 1.0:
            raise ControlError(f"mismatch must be in [0, 1), got {mismatch!r}")
        return TissueParams(float(rng.uniform(1.0 - mismatch, 1.0 + mismatch)))


NOMINAL_TISSUE = TissueParams()


@dataclass(frozen=True)
class NeedleCommand:
    """One command held constant over a control period.

    Attributes:
        insertion_speed_mm_s: ``v`` >= 0 (mm/s); the model does not retract.
        rotation_rate_rad_s: net base roll rate ``omega`` (rad/s) about the needle axis.
        spin_duty: fraction of the period spent spinning, in [0, 1] (1 = straight).
    """

    insertion_speed_mm_s: float
    rotation_rate_rad_s: float
    spin_duty: float = 0.0

    def __post_init__(self) -> None:
        v, w, d = self.insertion_speed_mm_s, self.rotation_rate_rad_s, self.spin_duty
        if not (math.isfinite(v) and math.isfinite(w) and math.isfinite(d)):
            raise ControlError(
                f"non-finite needle command: insertion_speed_mm_s={v!r}, rotation_rate_rad_s={w!r}, spin_duty={d!r}"
            )
        if v < 0:
            raise ControlError(f"insertion_speed_mm_s must be >= 0, got {v!r}")
        if not 0.0 <= d <= 1.0:
            raise ControlError(f"spin_duty must be in [0, 1], got {d!r}")


HOLD = NeedleCommand(0.0, 0.0, 0.0)
"""Stop insertion and rotation (CRTK "hold")."""


@dataclass(frozen=True)
class NeedleState:
    """State of one needle.

    Attributes:
        T_world_from_tip: shape (4, 4), tip pose (mm).
        torsion_windup_rad: base roll minus tip roll (rad).
        inserted_length_mm: insertion so far (mm).
    """

    T_world_from_tip: FloatArray
    torsion_windup_rad: float = 0.0
    inserted_length_mm: float = 0.0

    @staticmethod
    def from_pose(T_world_from_tip: FloatArray, torsion_windup_rad: float = 0.0) -> NeedleState:
        """Validated constructor (raises :class:`ControlError` for NaN or non-rigid poses)."""
        T = check_pose(T_world_from_tip)
        if not math.isfinite(torsion_windup_rad):
            raise ControlError(f"torsion_windup_rad must be finite, got {torsion_windup_rad!r}")
        return NeedleState(T.copy(), float(torsion_windup_rad), 0.0)

    @property
    def position_mm(self) -> FloatArray:
        """Shape (3,) tip position (mm)."""
        return self.T_world_from_tip[:3, 3]


def _torsion_scalar(windup: float, omega: float, dt: float, tau: float, band: float) -> tuple[float, float]:
    """Exact wind-up update over ``dt`` with constant base rate ``omega``.

    Returns:
        ``(new_windup_rad, tip_roll_increment_rad)``.
    """
    if tau <= 0.0 and band <= 0.0:
        return 0.0, omega * dt
    w0 = windup
    if tau <= 0.0:
        w = min(max(windup + omega * dt, -band), band)
        return w, omega * dt - (w - w0)
    w = windup
    r = dt
    for _ in range(4):
        if r <= 0.0:
            break
        aw = abs(w)
        if aw < band or (aw == band and omega * w < 0.0):
            # Inside the dead-band: the base turns, the tip does not.
            if omega == 0.0:
                break
            edge = band if omega > 0.0 else -band
            t_edge = (edge - w) / omega
            if t_edge >= r:
                w += omega * r
                break
            w = edge
            r -= t_edge
            continue
        side = 1.0 if (w > 0.0 or (w == 0.0 and omega >= 0.0)) else -1.0
        e0 = w - side * band
        eq = omega * tau
        if side * eq >= 0.0:
            w = side * band + eq + (e0 - eq) * math.exp(-r / tau)
            break
        t0 = tau * math.log((e0 - eq) / (-eq))
        if t0 >= r:
            w = side * band + eq + (e0 - eq) * math.exp(-r / tau)
            break
        w = side * band
        r -= t0
    return w, omega * dt - (w - w0)


def _torsion_batch(
    windup: FloatArray, omega: FloatArray, dt: float, tau: float, band: float
) -> tuple[FloatArray, FloatArray]:
    """Vectorised :func:`_torsion_scalar` (shapes (N,)); loops over at most 4 phases, not needles."""
    if tau <= 0.0 and band <= 0.0:
        return np.zeros_like(omega), omega * dt
    w0 = windup
    if tau <= 0.0:
        w = np.clip(windup + omega * dt, -band, band)
        return w, omega * dt - (w - w0)
    w = windup.copy()
    r = np.full(w.shape, dt)
    active = np.ones(w.shape, dtype=bool)
    eq = omega * tau
    omega_safe = np.where(omega == 0.0, 1.0, omega)
    for _ in range(4):
        if not active.any():
            break
        aw = np.abs(w)
        inband = active & ((aw < band) | ((aw == band) & (omega * w < 0.0)))
        outside = active & ~inband
        # dead-band phase
        edge = np.where(omega > 0.0, band, -band)
        t_edge = np.where(omega == 0.0, np.inf, (edge - w) / omega_safe)
        done_b = inband & (t_edge >= r)
        cont_b = inband & ~done_b
        # elastic phase
        side = np.where((w > 0.0) | ((w == 0.0) & (omega >= 0.0)), 1.0, -1.0)
        e0 = w - side * band
        decay = np.exp(-r / tau)
        e_end = side * band + eq + (e0 - eq) * decay
        inward = outside & (side * eq < 0.0)
        ratio = np.where(inward, (e0 - eq) / np.where(inward, -eq, 1.0), 1.0)
        t0 = tau * np.log(np.maximum(ratio, 1.0))
        cont_o = inward & (t0 < r)
        done_o = outside & ~cont_o
        w = np.where(done_b, np.where(omega == 0.0, w, w + omega * r), w)
        w = np.where(cont_b, edge, w)
        w = np.where(done_o, e_end, w)
        w = np.where(cont_o, side * band, w)
        r = np.where(cont_b, r - np.where(np.isfinite(t_edge), t_edge, 0.0), r)
        r = np.where(cont_o, r - t0, r)
        active = cont_b | cont_o
    return w, omega * dt - (w - w0)


def step_needle(
    state: NeedleState,
    command: NeedleCommand,
    dt_s: float,
    needle: NeedleParams,
    tissue: TissueParams = NOMINAL_TISSUE,
) -> NeedleState:
    """Advance one needle by ``dt_s`` seconds under a constant command (exact integration).

    Args:
        state: current state.
        command: validated command held over the step.
        dt_s: step duration (s), > 0 and finite.
        needle: needle parameters.
        tissue: tissue parameters (true curvature scale).

    Returns:
        The new state.

    Raises:
        ControlError: non-positive or non-finite ``dt_s``, or a non-finite pose.
    """
    if not (dt_s > 0.0 and math.isfinite(dt_s)):
        raise ControlError(f"dt_s must be finite and > 0, got {dt_s!r}")
    v = command.insertion_speed_mm_s
    windup, droll = _torsion_scalar(
        state.torsion_windup_rad,
        command.rotation_rate_rad_s,
        dt_s,
        needle.torsion_time_constant_s,
        needle.torsion_deadband_rad,
    )
    ds = v * dt_s
    kappa = needle.kappa_per_mm * tissue.curvature_scale * (1.0 - command.spin_duty)
    r = se3_exp_rows((0.0, 0.0, ds), (-kappa * ds, 0.0, droll))
    dT = np.array(
        (r[0], r[1], r[2], r[9], r[3], r[4], r[5], r[10], r[6], r[7], r[8], r[11], 0.0, 0.0, 0.0, 1.0)
    ).reshape(4, 4)
    T = state.T_world_from_tip @ dT
    if not math.isfinite(T[0, 3] + T[1, 3] + T[2, 3] + T[0, 0] + T[1, 1] + T[2, 2]):
        raise ControlError(f"non-finite needle pose: {state.T_world_from_tip.tolist()}")
    return NeedleState(T, windup, state.inserted_length_mm + ds)


def step_needles_batch(
    T_world_from_tip: FloatArray,
    insertion_speed_mm_s: FloatArray | float,
    rotation_rate_rad_s: FloatArray | float,
    spin_duty: FloatArray | float,
    *,
    dt_s: float,
    needle: NeedleParams,
    curvature_scale: FloatArray | float = 1.0,
    torsion_windup_rad: FloatArray | None = None,
) -> tuple[FloatArray, FloatArray]:
    """Advance N needles at once (vectorised; same model as :func:`step_needle`).

    Args:
        T_world_from_tip: shape (N, 4, 4) tip poses (mm).
        insertion_speed_mm_s: shape (N,) or scalar, >= 0.
        rotation_rate_rad_s: shape (N,) or scalar.
        spin_duty: shape (N,) or scalar in [0, 1].
        dt_s: step (s), > 0.
        needle: shared needle parameters.
        curvature_scale: shape (N,) or scalar tissue curvature scale, > 0.
        torsion_windup_rad: shape (N,) wind-up, zeros when omitted.

    Returns:
        ``(T_world_from_tip, torsion_windup_rad)`` after the step, shapes (N, 4, 4) and (N,).

    Raises:
        ControlError: on shape mismatch or invalid values (the offending values are listed).
    """
    T = np.asarray(T_world_from_tip, dtype=float)
    if T.ndim != 3 or T.shape[1:] != (4, 4):
        raise ControlError(f"T_world_from_tip must have shape (N, 4, 4), got {T.shape}")
    n = T.shape[0]
    if not (dt_s > 0.0 and math.isfinite(dt_s)):
        raise ControlError(f"dt_s must be finite and > 0, got {dt_s!r}")

    def _vec(value: FloatArray | float, name: str) -> FloatArray:
        arr = np.broadcast_to(np.asarray(value, dtype=float), (n,))
        if not np.all(np.isfinite(arr)):
            raise ControlError(f"{name} has non-finite entries: {arr[~np.isfinite(arr)].tolist()[:5]}")
        return arr

    v = _vec(insertion_speed_mm_s, "insertion_speed_mm_s")
    w = _vec(rotation_rate_rad_s, "rotation_rate_rad_s")
    d = _vec(spin_duty, "spin_duty")
    s = _vec(curvature_scale, "curvature_scale")
    if np.any(v < 0):
        raise ControlError(f"insertion_speed_mm_s must be >= 0, got {v[v < 0].tolist()[:5]}")
    if np.any((d < 0) | (d > 1)):
        raise ControlError(f"spin_duty must be in [0, 1], got {d[(d < 0) | (d > 1)].tolist()[:5]}")
    if np.any(s <= 0):
        raise ControlError(f"curvature_scale must be > 0, got {s[s <= 0].tolist()[:5]}")
    windup0 = np.zeros(n) if torsion_windup_rad is None else _vec(torsion_windup_rad, "torsion_windup_rad")
    windup, droll = _torsion_batch(
        np.array(windup0, dtype=float), w, dt_s, needle.torsion_time_constant_s, needle.torsion_deadband_rad
    )
    ds = v * dt_s
    rho = np.zeros((n, 3))
    rho[:, 2] = ds
    phi = np.zeros((n, 3))
    phi[:, 0] = -needle.kappa_per_mm * s * (1.0 - d) * ds
    phi[:, 2] = droll
    dT = se3_exp_batch(rho, phi)
    out = np.empty_like(T)
    out[:, :3, :] = np.einsum("nij,njk->nik", T[:, :3, :3], dT[:, :3, :])
    out[:, :3, 3] += T[:, :3, 3]
    out[:, 3, :] = (0.0, 0.0, 0.0, 1.0)
    if not np.all(np.isfinite(out[:, :3, 3])):
        bad = np.flatnonzero(~np.all(np.isfinite(out[:, :3, 3]), axis=1))
        raise ControlError(f"non-finite needle poses at indices {bad.tolist()[:5]}")
    return out, windup


def arc_points_tip_mm(kappa_per_mm: float, bend_angle_rad: float, arc_length_mm: FloatArray) -> FloatArray:
    """Points of a constant-curvature arc in the start tip frame (closed form).

    Args:
        kappa_per_mm: curvature (1/mm), >= 0.
        bend_angle_rad: roll applied before inserting: the bending direction is
            ``(-sin a, cos a, 0)`` in the start tip frame.
        arc_length_mm: shape (M,) arc lengths (mm).

    Returns:
        shape (M, 3) points (mm) in the start tip frame.
    """
    s = np.asarray(arc_length_mm, dtype=float)
    if kappa_per_mm < 1e-12:
        lateral = 0.5 * kappa_per_mm * s * s
        axial = s
    else:
        lateral = (1.0 - np.cos(kappa_per_mm * s)) / kappa_per_mm
        axial = np.sin(kappa_per_mm * s) / kappa_per_mm
    return np.stack([-math.sin(bend_angle_rad) * lateral, math.cos(bend_angle_rad) * lateral, axial], axis=-1)


def arc_to_point(q_tip_mm: FloatArray) -> tuple[float, float, float]:
    """The unique constant-curvature arc from the tip (at origin, heading +z) through a point.

    Args:
        q_tip_mm: shape (3,) point in the tip frame (mm).

    Returns:
        ``(kappa_per_mm, bend_angle_rad, arc_length_mm)``; ``bend_angle_rad`` is the roll that
        turns the bending direction (+y) toward the point. The arc length is ``inf`` when the
        point is behind the tip on the straight line.
    """
    qx, qy, qz = float(q_tip_mm[0]), float(q_tip_mm[1]), float(q_tip_mm[2])
    lateral = math.hypot(qx, qy)
    dist2 = qx * qx + qy * qy + qz * qz
    if dist2 <= 0.0:
        return 0.0, 0.0, 0.0
    kappa = 2.0 * lateral / dist2
    bend = math.atan2(-qx, qy) if lateral > 0.0 else 0.0
    if kappa < 1e-12:
        return 0.0, bend, (qz if qz > 0 else math.inf)
    turn = 2.0 * math.atan2(lateral, qz)
    return kappa, bend, turn / kappa
