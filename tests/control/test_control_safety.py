"""Safety monitor: every condition trips, latches, records, and reset() refuses while unsafe."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from needle_steering.control.geometry import Obstacles
from needle_steering.control.needle_model import HOLD, NeedleCommand
from needle_steering.control.safety import SafetyLimits, SafetyMonitor, SafetyObservation

PATH = np.stack([np.zeros(101), np.zeros(101), np.linspace(0.0, 100.0, 101)], axis=1)
OBSTACLES = Obstacles(np.array([[6.0, 0.0, 50.0]]), np.array([3.0]))
GO = NeedleCommand(2.0, 1.0, 0.5)


def _safe(t: float = 1.0, **kw: Any) -> SafetyObservation:
    base = SafetyObservation(
        t_s=t,
        tip_position_mm=np.array([0.0, 0.0, 20.0]),
        command=GO,
        inserted_length_mm=20.0,
        last_measurement_stamp_s=t - 0.03,
        patient_shift_mm=np.zeros(3),
    )
    return replace(base, **kw)


def _monitor() -> SafetyMonitor:
    return SafetyMonitor(SafetyLimits(), PATH, OBSTACLES)


UNSAFE: dict[str, dict[str, Any]] = {
    "corridor": {"tip_position_mm": np.array([-4.5, 0.0, 30.0])},
    "clearance": {"tip_position_mm": np.array([2.5, 0.0, 50.0])},
    "sensor_stale": {"last_measurement_stamp_s": 0.5},
    "sensor_inconsistent": {"consecutive_rejections": 12},
    "command_limit": {"command": NeedleCommand(7.5, 0.0, 0.0)},
    "depth_limit": {"inserted_length_mm": 159.99},
    "patient_motion": {"patient_shift_mm": np.array([0.0, 2.5, 0.0])},
    "invalid_observation": {"tip_position_mm": np.array([math.nan, 0.0, 0.0])},
}


def test_safe_observation_passes_the_command_through() -> None:
    mon = _monitor()
    assert mon.check(_safe()) is GO
    assert not mon.tripped and mon.trips == []


@pytest.mark.parametrize("code", sorted(UNSAFE))
def test_each_condition_trips_latches_and_reset_refuses_while_unsafe(code: str) -> None:
    mon = _monitor()
    assert mon.check(_safe(0.9)) is GO
    bad = _safe(1.0, **UNSAFE[code])
    assert mon.check(bad) == HOLD
    assert mon.tripped
    trip = mon.trips[0]
    assert trip.reason == code
    assert trip.t_s == 1.0
    np.testing.assert_array_equal(trip.tip_position_mm, np.asarray(bad.tip_position_mm))
    assert mon.active_trip is not None and mon.active_trip.reason == code
    # latched: a safe observation still gets HOLD
    assert mon.check(_safe(1.1)) == HOLD
    # reset refuses while the condition persists
    assert not mon.reset(_safe(1.2, **UNSAFE[code]))
    assert mon.tripped and code in mon.last_reset_refusal
    assert mon.check(_safe(1.25)) == HOLD
    # ... and succeeds once it is cleared
    assert mon.reset(_safe(1.3))
    assert not mon.tripped
    assert mon.check(_safe(1.35)) is GO
    assert len(mon.trips) == 1  # the history of trips is kept


def test_out_of_limit_commands_are_rejected_not_clamped() -> None:
    mon = _monitor()
    out = mon.check(_safe(command=NeedleCommand(1.0, -12.5, 0.0)))
    assert out == HOLD  # not a clamped rotation rate
    assert "rotation_rate_rad_s=-12.5" in mon.trips[0].detail
    mon2 = _monitor()
    mon2.check(_safe(command=NeedleCommand(7.5, 0.0, 0.0)))
    assert "insertion_speed_mm_s=7.5" in mon2.trips[0].detail


def test_depth_limit_allows_holding_and_rotating() -> None:
    mon = _monitor()
    # at the limit, a command that does not insert is fine
    assert mon.check(_safe(inserted_length_mm=160.0, command=NeedleCommand(0.0, 1.0, 0.0))).rotation_rate_rad_s == 1.0


def test_stalled_insertion_trips() -> None:
    mon = _monitor()
    t = 0.0
    rng = np.random.default_rng(0)
    tripped_at = None
    for k in range(200):
        t = k * 0.025
        meas = np.array([0.0, 0.0, 20.0]) + 0.5 * rng.standard_normal(3)  # tip does not move
        cmd = mon.check(
            _safe(t, measured_position_mm=meas, measured_stamp_s=t - 0.03, last_measurement_stamp_s=t - 0.03)
        )
        if mon.tripped:
            tripped_at = t
            assert cmd == HOLD
            break
    assert tripped_at is not None and tripped_at < 2.5
    assert mon.trips[0].reason == "insertion_stalled"


def test_moving_needle_does_not_trip_the_stall_detector() -> None:
    mon = _monitor()
    rng = np.random.default_rng(1)
    for k in range(400):
        t = k * 0.025
        meas = np.array([0.0, 0.0, 2.0 * t]) + 0.5 * rng.standard_normal(3)
        obs = _safe(
            t,
            tip_position_mm=np.array([0.0, 0.0, 2.0 * t]),
            measured_position_mm=meas,
            measured_stamp_s=t,
            last_measurement_stamp_s=t,
        )
        mon.check(obs)
    assert not mon.tripped, mon.trips


def test_limits_validation() -> None:
    from needle_steering.errors import ControlError

    with pytest.raises(ControlError):
        SafetyLimits(corridor_radius_mm=-1.0)
    with pytest.raises(ControlError):
        SafetyMonitor(path_mm=np.array([[0.0, math.nan, 0.0]]))
