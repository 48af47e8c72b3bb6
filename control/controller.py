"""Feedback law for a bevel-tip needle: sliding-mode roll + duty-cycled curvature.

Inspired by Rucker et al. 2013 ("Sliding mode control of steerable needles", IEEE T-RO): the
controller works in the tip frame and turns the bevel so that the bending direction (+y)
points toward the aim point, with the roll rate switching sign with the angular error. We use
a boundary layer ``omega = omega_max * sat(sigma / phi)`` instead of a pure ``sign`` to avoid
chattering in the simulated drive, and, since the needle supports duty-cycled spinning, we
command the *magnitude* of the curvature too: the unique arc tangent to the needle through
the aim point needs ``kappa_req = 2 d_lateral / |q|^2``, and ``spin_duty = 1 - kappa_cmd /
kappa_max`` realises it (straight when pointing at the aim, full bevel curvature when needed).

Aim point: a look-ahead point on the planned path (pure pursuit), or the target itself over the
last ``lookahead_mm``. Insertion stops exactly at the target depth (the last step is shortened).

Decisions the controller owns (with explicit reasons):

* ``reached``: the target is no longer ahead of the tip and the estimated distance is within
  ``target_tolerance_mm``.
* abort ``target_passed``: the target is behind the tip and farther than the tolerance.
* abort ``depth_limit``: inserted length reached ``max_depth_mm``.
* abort ``curvature_out_of_range``: the estimated tissue curvature scale left its plausible band.
* replanning: when the predicted miss at the target (best single arc at the usable curvature)
  exceeds ``replan_error_bound_mm``, the :class:`Replanner` is called from the current
  estimate; if it finds no path the controller aborts ``unreachable`` with the planner's reason.
  The controller also replans (without aborting if that fails) when the tip has drifted more
  than ``replan_deviation_mm`` from the path, and must replan after :meth:`update_target`.
* CBCT requests: within ``cbct_trigger_distance_mm`` of the target, if the estimated position
  standard deviation exceeds ``cbct_position_std_mm`` and the budget allows it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from needle_steering.control.estimator import TipEstimate
from needle_steering.control.geometry import FloatArray, Obstacles, check_point
from needle_steering.control.needle_model import HOLD, NeedleCommand, NeedleParams
from needle_steering.control.replanner import Path, Replanner
from needle_steering.errors import ControlError

__all__ = ["ControlOutput", "ControllerParams", "SlidingModeController"]

RUNNING = "running"
REACHED = "reached"
ABORTED = "aborted"


@dataclass(frozen=True)
class ControllerParams:
    """Tuning and rules of :class:`SlidingModeController` (units in the names)."""

    insertion_speed_mm_s: float = 2.0
    max_rotation_rate_rad_s: float = 4.0
    roll_boundary_layer_rad: float = 0.3
    lookahead_mm: float = 12.0
    control_period_s: float = 0.025
    target_tolerance_mm: float = 2.0
    stop_depth_mm: float = 0.02
    max_depth_mm: float = 160.0
    kappa_usable_fraction: float = 0.9
    replan_error_bound_mm: float = 0.5
    replan_cooldown_s: float = 2.0
    replan_deviation_mm: float = 1.5
    min_curvature_scale: float = 0.5
    max_curvature_scale: float = 1.6
    cbct_trigger_distance_mm: float = 30.0
    cbct_min_distance_mm: float = 6.0
    cbct_position_std_mm: float = 0.2
    cbct_min_interval_s: float = 2.0

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not math.isfinite(value) or value < 0:
                raise ControlError(f"ControllerParams.{name} must be finite and >= 0, got {value!r}")
        for name in ("max_rotation_rate_rad_s", "roll_boundary_layer_rad", "control_period_s", "lookahead_mm"):
            if getattr(self, name) <= 0:
                raise ControlError(f"ControllerParams.{name} must be > 0, got {getattr(self, name)!r}")
        if not 0 < self.kappa_usable_fraction <= 1:
            raise ControlError(f"kappa_usable_fraction must be in (0, 1], got {self.kappa_usable_fraction!r}")


@dataclass(frozen=True)
class ControlOutput:
    """Result of one controller step.

    Attributes:
        command: the command to send (HOLD once reached or aborted).
        status: ``"running"``, ``"reached"`` or ``"aborted"``.
        reason: why the status is reached/aborted (empty while running).
        request_cbct: the controller asks for a CBCT fix now.
        replanned: a new path was adopted during this step.
        predicted_target_error_mm: miss at the target of the best single arc (mm).
        distance_to_target_mm: estimated tip-target distance (mm).
    """

    command: NeedleCommand
    status: str
    reason: str = ""
    request_cbct: bool = False
    replanned: bool = False
    predicted_target_error_mm: float = 0.0
    distance_to_target_mm: float = math.inf


def _wrap(angle: float) -> float:
    return (angle + math.pi) % (2.0 * math.pi) - math.pi


class SlidingModeController:
    """Closed-loop steering toward ``target_mm`` along an optional planned path.

    Args:
        target_mm: shape (3,) target (mm, world).
        needle: needle parameters (nominal curvature).
        params: tuning and rules.
        path: planned path to follow (its last point should be the target), or None.
        replanner: called when the predicted target error exceeds the bound, or None.
        obstacles: critical structures given to the replanner.
    """

    def __init__(
        self,
        target_mm: FloatArray,
        needle: NeedleParams,
        params: ControllerParams | None = None,
        *,
        path: Path | None = None,
        replanner: Replanner | None = None,
        obstacles: Obstacles | None = None,
    ) -> None:
        self.target_mm = check_point(target_mm, "target_mm")
        self._target = (float(self.target_mm[0]), float(self.target_mm[1]), float(self.target_mm[2]))
        self.needle = needle
        self.params = params or ControllerParams()
        self.replanner = replanner
        self.obstacles = obstacles or Obstacles()
        self.status = RUNNING
        self.reason = ""
        self.replans = 0
        self.cbct_requests = 0
        self._last_replan_s = -math.inf
        self._last_cbct_s = -math.inf
        self.path: Path | None = None
        self._path_idx = 0
        self._force_replan = False
        if path is not None:
            self.set_path(path)

    def set_path(self, path: Path) -> None:
        """Follow ``path`` from now on (restarts the closest-point search)."""
        self.path = path
        self._path_idx = 0

    def update_target(self, target_mm: FloatArray, obstacles: Obstacles | None = None) -> None:
        """Move the target (and obstacles), e.g. after re-registration; forces a replan next step."""
        self.target_mm = check_point(target_mm, "target_mm")
        self._target = (float(self.target_mm[0]), float(self.target_mm[1]), float(self.target_mm[2]))
        if obstacles is not None:
            self.obstacles = obstacles
        self._force_replan = True

    def _finish(
        self,
        status: str,
        reason: str,
        predicted_target_error_mm: float = 0.0,
        distance_to_target_mm: float = math.inf,
    ) -> ControlOutput:
        self.status = status
        self.reason = reason
        return ControlOutput(HOLD, status, reason, False, False, predicted_target_error_mm, distance_to_target_mm)

    def _track(self, px: float, py: float, pz: float) -> float:
        """Advance the closest-sample index along the path; return the distance to it (mm)."""
        path = self.path
        if path is None:
            return 0.0
        pts = path.points_mm
        i0 = self._path_idx
        window = pts[i0 : i0 + 40]
        d2 = (window[:, 0] - px) ** 2 + (window[:, 1] - py) ** 2 + (window[:, 2] - pz) ** 2
        k = int(np.argmin(d2))
        self._path_idx = i0 + k
        return math.sqrt(float(d2[k]))

    def _aim_point(self) -> tuple[float, float, float]:
        path = self.path
        if path is None:
            return self._target
        pts = path.points_mm
        i = self._path_idx
        s_aim = float(path.arc_length_mm[i]) + self.params.lookahead_mm
        if s_aim >= path.length_mm:
            return self._target
        j = int(np.searchsorted(path.arc_length_mm, s_aim))
        a = pts[j]
        return float(a[0]), float(a[1]), float(a[2])

    def step(
        self,
        t_s: float,
        estimate: TipEstimate,
        inserted_length_mm: float,
        scans_remaining: int = 0,
        cbct_pending: bool = False,
    ) -> ControlOutput:
        """Compute the command for the next control period.

        Args:
            t_s: current time (s).
            estimate: current tip estimate (predicted to ``t_s``).
            inserted_length_mm: insertion so far (mm), from the insertion-stage encoder.
            scans_remaining: CBCT budget left.
            cbct_pending: a scan has been requested and not delivered yet.

        Returns:
            A :class:`ControlOutput`; HOLD with a reason once reached or aborted.
        """
        if self.status != RUNNING:
            return ControlOutput(HOLD, self.status, self.reason)
        prm = self.params
        T = estimate.T_world_from_tip
        (r00, r01, r02, px), (r10, r11, r12, py), (r20, r21, r22, pz), _ = T.tolist()
        if not math.isfinite(px + py + pz + r00 + r11 + r22):
            raise ControlError(f"non-finite tip estimate: {T.tolist()}")
        scale = estimate.curvature_scale
        if not prm.min_curvature_scale <= scale <= prm.max_curvature_scale:
            return self._finish(
                ABORTED,
                f"curvature_out_of_range: estimated curvature scale {scale:.3f} outside "
                f"[{prm.min_curvature_scale}, {prm.max_curvature_scale}]",
            )
        kappa_full = self.needle.kappa_per_mm * scale
        kappa_usable = kappa_full * prm.kappa_usable_fraction
        # Target in the tip frame: q = R^T (target - p)
        tx, ty, tz = self._target
        dx, dy, dz = tx - px, ty - py, tz - pz
        qx = r00 * dx + r10 * dy + r20 * dz
        qy = r01 * dx + r11 * dy + r21 * dz
        qz = r02 * dx + r12 * dy + r22 * dz
        dist = math.sqrt(qx * qx + qy * qy + qz * qz)
        if qz <= prm.stop_depth_mm:
            if dist <= prm.target_tolerance_mm:
                return self._finish(
                    REACHED, f"target depth reached, estimated error {dist:.2f} mm", distance_to_target_mm=dist
                )
            return self._finish(
                ABORTED,
                f"target_passed: target {dist:.2f} mm away and not ahead of the tip "
                f"(tolerance {prm.target_tolerance_mm} mm)",
                distance_to_target_mm=dist,
            )
        if inserted_length_mm >= prm.max_depth_mm:
            return self._finish(
                ABORTED, f"depth_limit: inserted {inserted_length_mm:.1f} mm >= max_depth_mm {prm.max_depth_mm}"
            )
        # Predicted miss of the best single arc at the usable curvature.
        lateral = math.hypot(qx, qy)
        dist2 = dist * dist
        kappa_t = 2.0 * lateral / dist2
        if kappa_t <= kappa_usable:
            miss = 0.0
        else:
            radius = 1.0 / kappa_usable
            miss = abs(math.hypot(lateral - radius, qz) - radius)
        replanned = False
        deviation = self._track(px, py, pz)
        must = miss > prm.replan_error_bound_mm or self._force_replan
        drifted = self.path is not None and deviation > prm.replan_deviation_mm
        if (must or drifted) and (self._force_replan or t_s - self._last_replan_s >= prm.replan_cooldown_s):
            self._last_replan_s = t_s
            forced = self._force_replan
            self._force_replan = False
            why = (
                f"predicted target error {miss:.2f} mm"
                if miss > prm.replan_error_bound_mm
                else ("target updated" if forced else f"deviation {deviation:.2f} mm")
            )
            if self.replanner is None:
                if must:
                    return self._finish(ABORTED, f"unreachable: {why} and no replanner", predicted_target_error_mm=miss)
            else:
                result = self.replanner.plan(T, self.target_mm, self.obstacles, kappa_usable)
                if result.path is not None:
                    self.set_path(result.path)
                    self._track(px, py, pz)
                    self.replans += 1
                    replanned = True
                elif must:
                    return self._finish(
                        ABORTED, f"unreachable: {why}; replanner: {result.reason}", predicted_target_error_mm=miss
                    )
        # Aim point and the arc through it.
        ax, ay, az = self._aim_point()
        dx, dy, dz = ax - px, ay - py, az - pz
        ux = r00 * dx + r10 * dy + r20 * dz
        uy = r01 * dx + r11 * dy + r21 * dz
        uz = r02 * dx + r12 * dy + r22 * dz
        lat_a = math.hypot(ux, uy)
        d2_a = ux * ux + uy * uy + uz * uz
        kappa_req = 2.0 * lat_a / d2_a if d2_a > 0 else 0.0
        if uz <= 0.0:
            kappa_req = kappa_full  # aim point beside/behind: turn as hard as possible
        # Sliding-mode roll: sigma is the roll that brings +y (bending direction) onto the aim.
        sigma = _wrap(math.atan2(-ux, uy)) if lat_a > 1e-9 else 0.0
        # Below ~1 % of the full curvature the bending direction does not matter: do not spin.
        if kappa_req < 0.01 * kappa_full:
            omega = 0.0
        else:
            omega = prm.max_rotation_rate_rad_s * max(-1.0, min(1.0, sigma / prm.roll_boundary_layer_rad))
        align = math.cos(sigma)
        kappa_cmd = min(kappa_req, kappa_full) * align if align > 0.0 else 0.0
        duty = 1.0 - kappa_cmd / kappa_full
        duty = 0.0 if duty < 0.0 else (1.0 if duty > 1.0 else duty)
        v = prm.insertion_speed_mm_s
        if qz < v * prm.control_period_s:
            v = qz / prm.control_period_s  # land exactly at the target depth
        request = False
        if (
            scans_remaining > 0
            and not cbct_pending
            and prm.cbct_min_distance_mm <= dist <= prm.cbct_trigger_distance_mm
            and t_s - self._last_cbct_s >= prm.cbct_min_interval_s
            and estimate.position_std_mm > prm.cbct_position_std_mm
        ):
            request = True
            self._last_cbct_s = t_s
            self.cbct_requests += 1
        return ControlOutput(NeedleCommand(v, omega, duty), RUNNING, "", request, replanned, miss, dist)
