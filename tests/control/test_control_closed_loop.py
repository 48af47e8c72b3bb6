"""Closed loop: random-scenario accuracy, every fault ends in a safe stop, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest

from needle_steering.control.closed_loop import Fault, random_scenario, run_campaign, run_episode
from needle_steering.control.replanner import ArcReplanner
from needle_steering.errors import ControlError


def test_random_campaign_reaches_accurately_without_collisions() -> None:
    summary = run_campaign(20, seed=2024, curvature_mismatch=0.2, em_sigma_mm=0.5)
    assert summary.reached >= 19, summary  # >= 95 %
    assert summary.median_error_mm <= 0.5, summary
    assert summary.p95_error_mm <= 1.0, summary
    assert summary.collisions == 0, summary
    assert summary.failed == 0, summary  # anything not reached is an explicit abort
    assert summary.max_scans <= 3


def test_scenarios_are_reachable_and_obstacles_are_beside_the_nominal_path() -> None:
    for seed in range(8):
        sc = random_scenario(seed)
        assert sc.obstacles.count >= 1
        res = ArcReplanner(clearance_mm=2.5).plan(
            sc.believed_start_T_world_from_tip, sc.target_mm, sc.obstacles, 0.56 * sc.needle_nominal.kappa_per_mm
        )
        assert res.path is not None, res.reason
        assert res.reason == "direct arc"  # the nominal arc itself is clear by >= 2.5 mm
        assert res.path.min_clearance_mm < 8.0  # ... and the obstacles are near it
        assert 0.8 <= sc.tissue.curvature_scale <= 1.2


FAULTS = {
    "sensor_dropout": (Fault("sensor_dropout", 4.0, 2.0), "sensor_stale"),
    "noise_burst": (Fault("noise_burst", 4.0, 2.0, magnitude=10.0), "sensor_inconsistent"),
    "latency_spike": (Fault("latency_spike", 4.0, 2.0, magnitude=0.6), "sensor_stale"),
    "stuck_insertion": (Fault("stuck_insertion", 4.0), "insertion_stalled"),
    "curvature_mismatch": (Fault("curvature_mismatch", 4.0, magnitude=0.3), None),
    "patient_motion": (Fault("patient_motion", 4.0, magnitude=4.0, direction=(0.3, 1.0, 0.0)), "patient_motion"),
}


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_each_fault_ends_in_a_safe_stop(kind: str) -> None:
    fault, expected = FAULTS[kind]
    # a curved nominal path, so that a drop of curvature really matters
    sc = random_scenario(3, faults=(fault,))
    res = run_episode(sc, 3)
    assert res.status == "aborted", (res.status, res.abort_reason)
    assert res.abort_reason
    if expected is not None:
        assert res.abort_reason.startswith(expected), res.abort_reason
    else:
        assert res.abort_reason.split(":")[0] in {"curvature_out_of_range", "unreachable", "corridor"}
    assert res.stop_time_s >= fault.start_s
    assert res.travel_after_stop_mm <= 1.0
    assert not res.collided


def test_small_patient_motion_is_followed_not_aborted() -> None:
    sc = random_scenario(5, faults=(Fault("patient_motion", 5.0, magnitude=1.2, direction=(1.0, 0.0, 0.0)),))
    res = run_episode(sc, 5)
    assert res.status == "reached", res.abort_reason
    assert res.replans >= 1
    assert res.target_error_mm < 1.0  # error against the moved target


def test_episode_is_deterministic_and_records_trajectories() -> None:
    sc = random_scenario(11, depth_range_mm=(40.0, 50.0))
    a = run_episode(sc, 7, record=True)
    b = run_episode(sc, 7, record=True)
    c = run_episode(sc, 8)
    assert a.status == "reached"
    assert a.target_error_mm == b.target_error_mm
    assert a.max_path_deviation_mm == b.max_path_deviation_mm
    assert a.target_error_mm != c.target_error_mm
    assert a.trajectory is not None and b.trajectory is not None
    np.testing.assert_array_equal(a.trajectory.true_T_world_from_tip, b.trajectory.true_T_world_from_tip)
    k = len(a.trajectory.t_s)
    assert a.trajectory.estimated_T_world_from_tip.shape == (k, 4, 4)
    assert a.trajectory.commands.shape == (k, 3)
    assert a.sim_seconds == pytest.approx(k * 0.025, abs=0.03)
    assert a.wall_seconds > 0 and a.scans_used >= 0
    assert math.isfinite(a.min_obstacle_clearance_mm)


def test_invalid_episode_inputs_raise() -> None:
    sc = random_scenario(0)
    with pytest.raises(ControlError):
        run_episode(sc, 0, dt_s=-0.01)
    with pytest.raises(ControlError):
        Fault("earthquake", 1.0)
