"""Safety monitor: the last gate between the controller and the needle driver.

Every control period the monitor receives the proposed command and what the system knows
(estimated tip, sensor ages, patient reference...). If anything is unsafe it **latches**: it
commands HOLD (``v = 0``, ``omega = 0``) from then on and records a :class:`SafetyTrip`
(reason code, detail with the offending value, time, tip position). Only :meth:`SafetyMonitor.reset`
unlatches it, and only when every condition is clear for the observation given to it.

Out-of-limit commands are rejected (trip with the offending value), never clamped.

Conditions (reason codes):

``command_limit``      insertion speed or rotation rate beyond the limits
``depth_limit``        the command would insert beyond ``max_depth_mm``
``corridor``           tip farther than ``corridor_radius_mm`` from the active plan
``clearance``          tip closer than ``clearance_margin_mm`` to a critical structure
``sensor_stale``       newest tracker sample older than ``sensor_timeout_s``
``sensor_inconsistent`` too many consecutive measurements rejected by the estimator's gate
``insertion_stalled``  the tracker shows much less advance than commanded (stuck / buckling)
``patient_motion``     the patient reference moved more than ``max_patient_shift_mm``
``invalid_observation`` non-finite estimate or observation
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from needle_steering.control.geometry import FloatArray, Obstacles, polyline_distance_mm
from needle_steering.control.needle_model import HOLD, NeedleCommand
from needle_steering.errors import ControlError

__all__ = ["SafetyLimits", "SafetyMonitor", "SafetyObservation", "SafetyTrip"]


@dataclass(frozen=True)
class SafetyLimits:
    """Thresholds of :class:`SafetyMonitor` (units in the names)."""

    max_insertion_speed_mm_s: float = 5.0
    max_rotation_rate_rad_s: float = 10.0
    max_depth_mm: float = 160.0
    corridor_radius_mm: float = 4.0
    clearance_margin_mm: float = 1.0
    sensor_timeout_s: float = 0.3
    max_consecutive_rejections: int = 10
    stall_window_s: float = 2.0
    stall_average_samples: int = 10
    stall_min_commanded_mm: float = 2.0
    stall_ratio: float = 0.35
    max_patient_shift_mm: float = 2.0

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if not math.isfinite(value) or value <= 0:
                raise ControlError(f"SafetyLimits.{name} must be finite and > 0, got {value!r}")


@dataclass(frozen=True)
class SafetyObservation:
    """What the monitor sees at one control period.

    Attributes:
        t_s: current time (s).
        tip_position_mm: shape (3,) estimated tip position (mm).
        command: proposed command for the next period.
        inserted_length_mm: insertion so far (mm), from the stage encoder.
        last_measurement_stamp_s: acquisition time of the newest tracker sample received (s).
        dt_s: how long the command will be held (s), used to project the depth.
        measured_position_mm: shape (3,) newest raw tracker position (mm), or None.
        measured_stamp_s: its acquisition time (s).
        patient_shift_mm: shape (3,) patient reference displacement (mm), or None.
        consecutive_rejections: measurements rejected in a row by the estimator's gate.
    """

    t_s: float
    tip_position_mm: FloatArray
    command: NeedleCommand
    inserted_length_mm: float
    last_measurement_stamp_s: float
    dt_s: float = 0.025
    measured_position_mm: FloatArray | None = None
    measured_stamp_s: float = -math.inf
    patient_shift_mm: FloatArray | None = None
    consecutive_rejections: int = 0


@dataclass(frozen=True)
class SafetyTrip:
    """One recorded trip: ``reason`` code, ``detail`` with the offending value, time and tip."""

    reason: str
    detail: str
    t_s: float
    tip_position_mm: FloatArray


class SafetyMonitor:
    """Latched safety monitor (see module docstring).

    Args:
        limits: thresholds.
        path_mm: shape (M, 3) active plan polyline for the corridor check, or None (no corridor).
        obstacles: critical structures for the clearance check.
    """

    def __init__(
        self,
        limits: SafetyLimits | None = None,
        path_mm: FloatArray | None = None,
        obstacles: Obstacles | None = None,
    ) -> None:
        self.limits = limits or SafetyLimits()
        self.path_mm: FloatArray | None = None
        self.set_path(path_mm)
        self.obstacles = obstacles or Obstacles()
        self.trips: list[SafetyTrip] = []
        self._latched_codes: set[str] = set()
        self._tripped = False
        self.last_reset_refusal = ""
        self._stall: deque[tuple[float, float, float, float, float]] = deque()
        self._last_stall_stamp = -math.inf
        self._commanded_mm = 0.0
        self._last_t: float | None = None
        self._last_v = 0.0

    @property
    def tripped(self) -> bool:
        """True while latched."""
        return self._tripped

    @property
    def active_trip(self) -> SafetyTrip | None:
        """The trip that latched the monitor, or None."""
        if not self._tripped:
            return None
        return next(t for t in reversed(self.trips) if t.reason in self._latched_codes)

    def set_path(self, path_mm: FloatArray | None) -> None:
        """Replace the plan polyline (shape (M, 3)) used by the corridor check."""
        if path_mm is None:
            self.path_mm = None
            return
        pts = np.asarray(path_mm, dtype=float)
        if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) < 1 or not np.all(np.isfinite(pts)):
            raise ControlError(f"path_mm must be a finite (M, 3) array, got shape {pts.shape}")
        self.path_mm = pts

    def set_obstacles(self, obstacles: Obstacles) -> None:
        """Replace the critical structures (e.g. after re-registration)."""
        self.obstacles = obstacles

    # ------------------------------------------------------------------ checks
    def _instant_violations(self, obs: SafetyObservation) -> list[tuple[str, str]]:
        lim = self.limits
        out: list[tuple[str, str]] = []
        p = np.asarray(obs.tip_position_mm, dtype=float)
        if p.shape != (3,) or not np.all(np.isfinite(p)) or not math.isfinite(obs.t_s):
            return [("invalid_observation", f"non-finite tip position or time: {p.tolist()}, t_s={obs.t_s!r}")]
        cmd = obs.command
        v, w = cmd.insertion_speed_mm_s, cmd.rotation_rate_rad_s
        if v > lim.max_insertion_speed_mm_s:
            out.append(("command_limit", f"insertion_speed_mm_s={v:.4g} exceeds {lim.max_insertion_speed_mm_s}"))
        if abs(w) > lim.max_rotation_rate_rad_s:
            out.append(("command_limit", f"rotation_rate_rad_s={w:.4g} exceeds +/-{lim.max_rotation_rate_rad_s}"))
        projected = obs.inserted_length_mm + v * obs.dt_s
        if v > 0 and projected > lim.max_depth_mm:
            out.append(("depth_limit", f"projected depth {projected:.2f} mm exceeds max_depth_mm {lim.max_depth_mm}"))
        if self.path_mm is not None:
            dev = polyline_distance_mm(p, self.path_mm)
            if dev > lim.corridor_radius_mm:
                out.append(("corridor", f"tip {dev:.2f} mm from the plan > corridor {lim.corridor_radius_mm} mm"))
        if self.obstacles.count:
            clear = float(self.obstacles.clearance_mm(p[None, :])[0])
            if clear < lim.clearance_margin_mm:
                out.append(("clearance", f"clearance {clear:.2f} mm < margin {lim.clearance_margin_mm} mm"))
        age = obs.t_s - obs.last_measurement_stamp_s
        if not age <= lim.sensor_timeout_s:
            out.append(("sensor_stale", f"newest tracker sample is {age:.3f} s old > {lim.sensor_timeout_s} s"))
        if obs.consecutive_rejections >= lim.max_consecutive_rejections:
            out.append(
                (
                    "sensor_inconsistent",
                    f"{obs.consecutive_rejections} consecutive measurements rejected "
                    f"(limit {lim.max_consecutive_rejections})",
                )
            )
        if obs.patient_shift_mm is not None:
            shift = float(np.linalg.norm(obs.patient_shift_mm))
            if not shift <= lim.max_patient_shift_mm:
                out.append(("patient_motion", f"patient moved {shift:.2f} mm > {lim.max_patient_shift_mm} mm"))
        return out

    def _stall_violation(self, obs: SafetyObservation) -> tuple[str, str] | None:
        lim = self.limits
        if self._last_t is not None:
            self._commanded_mm += self._last_v * max(0.0, obs.t_s - self._last_t)
        self._last_t = obs.t_s
        m = obs.measured_position_mm
        if m is not None and obs.measured_stamp_s > self._last_stall_stamp:
            self._last_stall_stamp = obs.measured_stamp_s
            self._stall.append((obs.measured_stamp_s, float(m[0]), float(m[1]), float(m[2]), self._commanded_mm))
        while self._stall and self._stall[0][0] < obs.t_s - lim.stall_window_s:
            self._stall.popleft()
        n_avg = lim.stall_average_samples
        if len(self._stall) < 2 * n_avg or self._stall[-1][0] - self._stall[0][0] < 0.8 * lim.stall_window_s:
            return None
        arr = np.array(self._stall)
        # average the first and last samples of the window: the noise of the advance estimate is
        # about sigma * sqrt(2 / n_avg) (0.22 mm for 0.5 mm EM noise and 10 samples)
        first, last = arr[:n_avg].mean(axis=0), arr[-n_avg:].mean(axis=0)
        commanded = float(last[4] - first[4])
        if commanded < lim.stall_min_commanded_mm:
            return None
        measured = float(np.linalg.norm(last[1:4] - first[1:4]))
        if measured < lim.stall_ratio * commanded:
            return (
                "insertion_stalled",
                f"tracker advanced {measured:.2f} mm while {commanded:.2f} mm were commanded "
                f"(ratio < {lim.stall_ratio})",
            )
        return None

    def _record(self, code: str, detail: str, obs: SafetyObservation) -> None:
        p = np.array(obs.tip_position_mm, dtype=float)
        self.trips.append(SafetyTrip(code, detail, float(obs.t_s), p))
        self._latched_codes.add(code)

    def check(self, obs: SafetyObservation) -> NeedleCommand:
        """Return the command to execute: ``obs.command`` when safe, HOLD when latched."""
        violations = self._instant_violations(obs)
        stall = self._stall_violation(obs)
        if stall is not None:
            violations.append(stall)
        for code, detail in violations:
            if code not in self._latched_codes:
                self._record(code, detail, obs)
        if violations:
            self._tripped = True
        cmd = HOLD if self._tripped else obs.command
        self._last_v = cmd.insertion_speed_mm_s
        return cmd

    def reset(self, obs: SafetyObservation) -> bool:
        """Unlatch if every condition is clear for ``obs``; otherwise refuse and keep holding.

        Returns:
            True when the monitor was reset; False (with :attr:`last_reset_refusal`) otherwise.
        """
        violations = self._instant_violations(obs)
        if violations:
            self.last_reset_refusal = "; ".join(f"{c}: {d}" for c, d in violations)
            return False
        self._tripped = False
        self._latched_codes.clear()
        self._stall.clear()
        self._last_stall_stamp = -math.inf
        self.last_reset_refusal = ""
        return True
