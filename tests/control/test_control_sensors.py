"""EM tracker and CBCT statistics, latency, dropouts, budget."""

from __future__ import annotations

import math

import numpy as np
import pytest

from needle_steering.control.geometry import rot_z
from needle_steering.control.sensors import (
    CbctParams,
    CbctScanner,
    EMMeasurement,
    EMTracker,
    EMTrackerParams,
    PatientReferenceSensor,
)
from needle_steering.errors import ControlError


def _collect(
    params: EMTrackerParams, n: int, seed: int = 0, pose: np.ndarray | None = None
) -> tuple[EMTracker, list[EMMeasurement]]:
    tracker = EMTracker(params, np.random.default_rng(seed))
    T = np.eye(4) if pose is None else pose
    got: list[EMMeasurement] = []
    for k in range(n):
        t = k / params.rate_hz
        tracker.sample(t, T)
        got.extend(tracker.receive(t))
    got.extend(tracker.receive(math.inf))
    return tracker, got


def test_em_noise_bias_and_axis_statistics() -> None:
    bias = (0.4, -0.3, 0.1)
    params = EMTrackerParams(position_sigma_mm=0.5, axis_sigma_rad=0.01, bias_mm=bias)
    T = np.eye(4)
    T[:3, 3] = [10.0, 20.0, 30.0]
    _, ms = _collect(params, 4000, pose=T)
    pos = np.array([m.position_mm for m in ms]) - T[:3, 3]
    np.testing.assert_allclose(pos.mean(axis=0), bias, atol=0.03)
    np.testing.assert_allclose(pos.std(axis=0), 0.5, rtol=0.05)
    axes = np.array([m.axis for m in ms])
    np.testing.assert_allclose(np.linalg.norm(axes, axis=1), 1.0, atol=1e-12)
    angle = np.arccos(np.clip(axes[:, 2], -1, 1))
    # small-angle: the angle is Rayleigh with scale sigma -> mean sigma * sqrt(pi/2)
    assert angle.mean() == pytest.approx(0.01 * math.sqrt(math.pi / 2), rel=0.06)


def test_em_does_not_measure_roll() -> None:
    params = EMTrackerParams()
    _, a = _collect(params, 50, seed=4, pose=np.eye(4))
    _, b = _collect(params, 50, seed=4, pose=rot_z(1.3))
    for ma, mb in zip(a, b, strict=True):
        np.testing.assert_allclose(ma.position_mm, mb.position_mm)
        np.testing.assert_allclose(ma.axis, mb.axis, atol=1e-12)


def test_em_latency_and_timestamps() -> None:
    params = EMTrackerParams(latency_s=0.03, latency_jitter_s=0.01)
    tracker = EMTracker(params, np.random.default_rng(1))
    delays = []
    for k in range(400):
        t = k * 0.005  # consumer polls faster than the sensor rate
        tracker.sample(t, np.eye(4))
        for m in tracker.receive(t):
            assert m.arrival_s <= t + 1e-12
            delays.append(t - m.stamp_s)
    delays_arr = np.array(delays)
    assert len(delays_arr) == pytest.approx(400 * 0.005 * 40, abs=3)
    assert delays_arr.min() >= 0.03 - 1e-9
    assert delays_arr.max() <= 0.04 + 0.005 + 1e-9  # jitter + polling granularity


def test_em_dropout_probability_and_bursts() -> None:
    tracker, ms = _collect(EMTrackerParams(dropout_probability=0.1), 5000, seed=2)
    assert tracker.samples_dropped / tracker.samples_taken == pytest.approx(0.1, abs=0.015)
    assert len(ms) == tracker.samples_taken - tracker.samples_dropped
    # bursts: mean run length of consecutive drops ~ 1 / burst_end_probability
    params = EMTrackerParams(burst_start_probability=0.02, burst_end_probability=0.2)
    tracker = EMTracker(params, np.random.default_rng(3))
    dropped = []
    for k in range(20000):
        m = tracker.sample(k / 40.0, np.eye(4))
        dropped.append(m is None)
    runs = []
    count = 0
    for d in dropped:
        if d:
            count += 1
        elif count:
            runs.append(count)
            count = 0
    assert np.mean(runs) == pytest.approx(5.0, rel=0.2)


def test_em_fault_hooks() -> None:
    tracker = EMTracker(EMTrackerParams(latency_s=0.02, latency_jitter_s=0.0), np.random.default_rng(0))
    assert tracker.sample(0.0, np.eye(4), force_dropout=True) is None
    m = tracker.sample(0.025, np.eye(4), extra_latency_s=0.5)
    assert m is not None and m.arrival_s == pytest.approx(0.545)
    assert tracker.receive(0.5) == []
    assert len(tracker.receive(0.6)) == 1
    burst = [tracker.sample(0.05 + k / 40, np.eye(4), sigma_scale=10.0) for k in range(400)]
    spread = np.std([b.position_mm for b in burst if b is not None], axis=0)
    np.testing.assert_allclose(spread, 5.0, rtol=0.15)
    with pytest.raises(ControlError):
        tracker.sample(20.0, np.full((4, 4), math.nan))


def test_em_is_deterministic_for_a_seed() -> None:
    _, a = _collect(EMTrackerParams(dropout_probability=0.2), 100, seed=9)
    _, b = _collect(EMTrackerParams(dropout_probability=0.2), 100, seed=9)
    assert [m.stamp_s for m in a] == [m.stamp_s for m in b]
    np.testing.assert_array_equal([m.position_mm for m in a], [m.position_mm for m in b])


def test_cbct_noise_latency_and_budget() -> None:
    scanner = CbctScanner(CbctParams(position_sigma_mm=0.2, max_scans=2, latency_s=0.5), np.random.default_rng(0))
    scanner.request(1.0, np.array([1.0, 2.0, 3.0]))
    assert scanner.pending and scanner.scans_remaining == 1
    assert scanner.receive(1.4) == []
    fixes = scanner.receive(1.5)
    assert len(fixes) == 1 and fixes[0].stamp_s == 1.0
    scanner.request(2.0, np.zeros(3))
    assert scanner.scans_used == 2 and scanner.dose_mgy == pytest.approx(4.0)
    with pytest.raises(ControlError, match="budget exhausted"):
        scanner.request(3.0, np.zeros(3))
    big = CbctScanner(CbctParams(position_sigma_mm=0.2, max_scans=3000, latency_s=0.0), np.random.default_rng(1))
    pos = np.array([big.request(0.0, np.zeros(3)).position_mm for _ in range(3000)])
    np.testing.assert_allclose(pos.std(axis=0), 0.2, rtol=0.07)


def test_patient_reference_sensor() -> None:
    ref = PatientReferenceSensor(0.05, np.random.default_rng(0))
    meas = np.array([ref.measure(np.array([1.0, 0.0, 0.0])) for _ in range(2000)])
    np.testing.assert_allclose(meas.mean(axis=0), [1.0, 0.0, 0.0], atol=0.005)
    with pytest.raises(ControlError):
        EMTrackerParams(dropout_probability=1.5)
