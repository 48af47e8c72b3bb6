"""Sensor models: 5-DOF electromagnetic tip tracker, intermittent CBCT fixes, patient reference.

All noise comes from a ``numpy.random.Generator`` passed in by the caller. Every measurement
carries its acquisition time ``stamp_s`` (the instant the tip was where it says) and its
``arrival_s`` (when the consumer gets it), so latency is explicit and staleness is
``t_now_s - stamp_s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from needle_steering.control.geometry import FloatArray, check_finite
from needle_steering.errors import ControlError

__all__ = [
    "CbctFix",
    "CbctParams",
    "CbctScanner",
    "EMMeasurement",
    "EMTracker",
    "EMTrackerParams",
    "PatientReferenceSensor",
]


def _check_nonneg(owner: str, name: str, value: float) -> None:
    if not math.isfinite(value) or value < 0:
        raise ControlError(f"{owner}.{name} must be finite and >= 0, got {value!r}")


def _check_probability(owner: str, name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ControlError(f"{owner}.{name} must be a probability in [0, 1], got {value!r}")


@dataclass(frozen=True)
class EMTrackerParams:
    """5-DOF EM tracker (e.g. an Aurora-style coil in the needle tip).

    Attributes:
        rate_hz: sampling rate (Hz), > 0.
        position_sigma_mm: isotropic position noise (mm).
        axis_sigma_rad: small-angle noise of the measured needle axis (rad).
        bias_mm: shape (3,) static position bias (field distortion / registration), mm.
        latency_s: mean transport latency (s).
        latency_jitter_s: uniform jitter added to the latency, in [0, jitter] (s).
        dropout_probability: independent probability that a sample is lost.
        burst_start_probability: per-sample probability of entering a dropout burst.
        burst_end_probability: per-sample probability of leaving a burst (mean burst
            length ``1 / burst_end_probability`` samples), > 0.
    """

    rate_hz: float = 40.0
    position_sigma_mm: float = 0.5
    axis_sigma_rad: float = 0.01
    bias_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    latency_s: float = 0.03
    latency_jitter_s: float = 0.005
    dropout_probability: float = 0.0
    burst_start_probability: float = 0.0
    burst_end_probability: float = 0.5

    def __post_init__(self) -> None:
        owner = "EMTrackerParams"
        if not (math.isfinite(self.rate_hz) and self.rate_hz > 0):
            raise ControlError(f"{owner}.rate_hz must be > 0, got {self.rate_hz!r}")
        for name in ("position_sigma_mm", "axis_sigma_rad", "latency_s", "latency_jitter_s"):
            _check_nonneg(owner, name, getattr(self, name))
        for name in ("dropout_probability", "burst_start_probability", "burst_end_probability"):
            _check_probability(owner, name, getattr(self, name))
        if self.burst_end_probability <= 0:
            raise ControlError(f"{owner}.burst_end_probability must be > 0, got {self.burst_end_probability!r}")
        if len(self.bias_mm) != 3 or not all(math.isfinite(b) for b in self.bias_mm):
            raise ControlError(f"{owner}.bias_mm must be 3 finite numbers, got {self.bias_mm!r}")


@dataclass(frozen=True)
class EMMeasurement:
    """One EM sample: position and needle axis, no roll.

    Attributes:
        stamp_s: acquisition time (s).
        arrival_s: time the measurement reaches the consumer (s).
        position_mm: shape (3,) measured tip position (mm), world frame.
        axis: shape (3,) measured unit insertion direction (tip z-axis) in world.
    """

    stamp_s: float
    arrival_s: float
    position_mm: FloatArray
    axis: FloatArray


class EMTracker:
    """Samples the true tip pose at ``rate_hz`` and delivers measurements after their latency.

    Faults are injected per call (``sigma_scale`` for noise bursts, ``extra_latency_s`` for
    latency spikes, ``force_dropout`` for a dead sensor) so that the tracker stays a pure
    sensor model and the scenario decides when faults happen.
    """

    def __init__(self, params: EMTrackerParams, rng: np.random.Generator, t0_s: float = 0.0) -> None:
        self.params = params
        self._rng = rng
        self._next_sample_s = check_finite(t0_s, "t0_s")
        self._period_s = 1.0 / params.rate_hz
        self._bias = np.asarray(params.bias_mm, dtype=float)
        self._in_burst = False
        self._queue: list[EMMeasurement] = []
        self.samples_taken = 0
        self.samples_dropped = 0

    def due(self, t_s: float) -> bool:
        """Whether a sample is due at time ``t_s`` (s)."""
        return t_s + 1e-12 >= self._next_sample_s

    def sample(
        self,
        t_s: float,
        T_world_from_tip_true: FloatArray,
        *,
        sigma_scale: float = 1.0,
        extra_latency_s: float = 0.0,
        force_dropout: bool = False,
    ) -> EMMeasurement | None:
        """Take a sample now if one is due; queue it for delivery after its latency.

        Args:
            t_s: current time (s).
            T_world_from_tip_true: shape (4, 4) true tip pose (mm).
            sigma_scale: noise multiplier (noise-burst fault), > 0.
            extra_latency_s: added latency (latency-spike fault), >= 0.
            force_dropout: drop this sample (sensor-dropout fault).

        Returns:
            The queued measurement, or None when no sample was due or it was dropped.
        """
        if not self.due(t_s):
            return None
        if not (math.isfinite(sigma_scale) and sigma_scale > 0):
            raise ControlError(f"sigma_scale must be > 0, got {sigma_scale!r}")
        _check_nonneg("EMTracker.sample", "extra_latency_s", extra_latency_s)
        T = np.asarray(T_world_from_tip_true, dtype=float)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise ControlError(f"T_world_from_tip_true must be a finite (4, 4) array, got {T.tolist()}")
        p = self.params
        # Keep the sampling grid even when the caller's step does not divide the period.
        while self._next_sample_s <= t_s + 1e-12:
            self._next_sample_s += self._period_s
        self.samples_taken += 1
        rng = self._rng
        if self._in_burst:
            self._in_burst = rng.random() >= p.burst_end_probability
        else:
            self._in_burst = rng.random() < p.burst_start_probability
        dropped = force_dropout or self._in_burst or rng.random() < p.dropout_probability
        noise = rng.standard_normal(6)
        jitter = rng.random() * p.latency_jitter_s
        if dropped:
            self.samples_dropped += 1
            return None
        sigma = p.position_sigma_mm * sigma_scale
        position = T[:3, 3] + self._bias + sigma * noise[:3]
        axis = T[:3, 2] + p.axis_sigma_rad * sigma_scale * noise[3:]
        axis = axis / np.linalg.norm(axis)
        m = EMMeasurement(float(t_s), float(t_s + p.latency_s + jitter + extra_latency_s), position, axis)
        self._queue.append(m)
        return m

    def receive(self, t_now_s: float) -> list[EMMeasurement]:
        """Pop every measurement that has arrived by ``t_now_s``, ordered by acquisition stamp."""
        if not self._queue:
            return []
        arrived = [m for m in self._queue if m.arrival_s <= t_now_s + 1e-12]
        if arrived:
            self._queue = [m for m in self._queue if m.arrival_s > t_now_s + 1e-12]
            arrived.sort(key=lambda m: m.stamp_s)
        return arrived


@dataclass(frozen=True)
class CbctParams:
    """Intra-operative cone-beam CT position fixes.

    Attributes:
        position_sigma_mm: isotropic tip localisation noise (mm).
        max_scans: radiation budget (number of scans allowed per insertion).
        latency_s: reconstruction + segmentation + registration time (s).
        dose_per_scan_mgy: informative dose per scan (mGy).
    """

    position_sigma_mm: float = 0.2
    max_scans: int = 3
    latency_s: float = 0.5
    dose_per_scan_mgy: float = 2.0

    def __post_init__(self) -> None:
        for name in ("position_sigma_mm", "latency_s", "dose_per_scan_mgy"):
            _check_nonneg("CbctParams", name, getattr(self, name))
        if self.max_scans < 0:
            raise ControlError(f"CbctParams.max_scans must be >= 0, got {self.max_scans!r}")


@dataclass(frozen=True)
class CbctFix:
    """One CBCT tip localisation: ``position_mm`` (shape (3,)) of the tip at ``stamp_s``."""

    stamp_s: float
    arrival_s: float
    position_mm: FloatArray


class CbctScanner:
    """Scanner with a dose budget; each :meth:`request` spends one scan."""

    def __init__(self, params: CbctParams, rng: np.random.Generator) -> None:
        self.params = params
        self._rng = rng
        self._queue: list[CbctFix] = []
        self.scans_used = 0

    @property
    def scans_remaining(self) -> int:
        """Scans left in the radiation budget."""
        return self.params.max_scans - self.scans_used

    @property
    def pending(self) -> bool:
        """Whether a requested scan has not been delivered yet."""
        return bool(self._queue)

    @property
    def dose_mgy(self) -> float:
        """Dose spent so far (mGy)."""
        return self.scans_used * self.params.dose_per_scan_mgy

    def request(self, t_s: float, tip_position_true_mm: FloatArray) -> CbctFix:
        """Acquire a scan of the true tip at ``t_s``; the fix arrives after ``latency_s``.

        Raises:
            ControlError: when the radiation budget is exhausted (never scans silently past it).
        """
        if self.scans_remaining <= 0:
            raise ControlError(f"CBCT budget exhausted: {self.scans_used} of max_scans={self.params.max_scans} used")
        p = np.asarray(tip_position_true_mm, dtype=float)
        if p.shape != (3,) or not np.all(np.isfinite(p)):
            raise ControlError(f"tip_position_true_mm must be a finite (3,) point, got {p.tolist()}")
        self.scans_used += 1
        fix = CbctFix(
            float(t_s),
            float(t_s + self.params.latency_s),
            p + self.params.position_sigma_mm * self._rng.standard_normal(3),
        )
        self._queue.append(fix)
        return fix

    def receive(self, t_now_s: float) -> list[CbctFix]:
        """Pop the fixes that have arrived by ``t_now_s``."""
        arrived = [f for f in self._queue if f.arrival_s <= t_now_s + 1e-12]
        if arrived:
            self._queue = [f for f in self._queue if f.arrival_s > t_now_s + 1e-12]
        return arrived


class PatientReferenceSensor:
    """EM reference sensor fixed to the patient's skin: measures rigid patient shift (mm)."""

    def __init__(self, sigma_mm: float, rng: np.random.Generator) -> None:
        _check_nonneg("PatientReferenceSensor", "sigma_mm", sigma_mm)
        self.sigma_mm = sigma_mm
        self._rng = rng

    def measure(self, true_shift_mm: FloatArray) -> FloatArray:
        """Shape (3,) noisy measurement of the patient's displacement since registration (mm)."""
        return np.asarray(true_shift_mm, dtype=float) + self.sigma_mm * self._rng.standard_normal(3)
