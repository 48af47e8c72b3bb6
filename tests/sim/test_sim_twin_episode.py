"""Steering episodes in the twin: reach the target, safe stop under every fault, determinism."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from needle_steering.control.closed_loop import Fault, random_scenario
from needle_steering.control.geometry import Obstacles
from needle_steering.sim.twin.anatomy import AnatomyMesh
from needle_steering.sim.twin.episode import TwinEpisodeConfig, patient_shift_mm, run_twin_episode
from needle_steering.sim.twin.twin import Twin

SHORT_MM = (45.0, 55.0)


@pytest.fixture(scope="module")
def twin() -> Iterator[Twin]:
    with Twin(seed=0) as tw:
        yield tw


def test_episode_in_twin_reaches_target(twin: Twin) -> None:
    sc = random_scenario(11, depth_range_mm=SHORT_MM)
    res = run_twin_episode(sc, 5, TwinEpisodeConfig(), twin)
    assert res.aligned and res.ik_position_error_mm < 0.1 and res.ik_angle_error_deg < 0.1
    assert res.status == "reached", res.reason
    assert res.target_error_mm < 1.0
    assert not res.collided
    # The registration error moved the true start off the plan, and the loop still got there.
    assert 0.3 < res.start_position_error_mm < 3.0
    # The twin's needle clearance includes the needle radius: smaller than the tip-point clearance.
    r = twin.config.needle_radius_mm
    assert res.twin_needle_clearance_mm == pytest.approx(res.min_obstacle_clearance_mm - r, abs=0.3)
    assert res.realtime_factor > 1.0


def test_structure_unknown_to_the_plan_is_a_collision_in_the_twin(twin: Twin) -> None:
    import open3d as o3d

    sc = random_scenario(12, depth_range_mm=SHORT_MM)
    start = np.asarray(sc.believed_start_T_world_from_tip)
    # A 3 mm critical structure right on the straight path, 20 mm deep, that the planner's
    # obstacle model does not contain: only the twin's mesh contact check can see the collision.
    sphere = o3d.geometry.TriangleMesh.create_sphere(radius=3.0, resolution=12)
    verts = np.asarray(sphere.vertices) + start[:3, 3] + 20.0 * start[:3, 2]
    mesh = AnatomyMesh("hidden_vessel", 101, "critical", verts, np.asarray(sphere.triangles))
    sc = replace(sc, obstacles=Obstacles())
    res = run_twin_episode(sc, 1, TwinEpisodeConfig(), twin, anatomy=[mesh])
    assert res.collided
    assert res.status == "failed"
    assert res.twin_contact_body == "hidden_vessel"
    assert res.reason.startswith("collision")
    # Without the hidden structure the same episode is clean.
    clean = run_twin_episode(sc, 1, TwinEpisodeConfig(), twin)
    assert not clean.collided and clean.status == "reached", clean.reason


FAULTS = [
    ("sensor_dropout", {"duration_s": 3.0}, {}, ("sensor_stale",)),
    ("noise_burst", {"duration_s": 3.0, "magnitude": 30.0}, {}, ("sensor_inconsistent", "corridor", "clearance")),
    ("latency_spike", {"duration_s": 3.0, "magnitude": 0.8}, {}, ("sensor_stale",)),
    ("stuck_insertion", {}, {}, ("insertion_stalled",)),
    ("patient_motion", {"magnitude": 4.0, "direction": (0.3, 1.0, 0.0), "ramp_s": 0.5}, {}, ("patient_motion",)),
    ("curvature_mismatch", {"magnitude": 0.3}, {}, ("curvature_out_of_range", "unreachable", "corridor",
                                                   "target_passed")),
    ("registration_error", None, {"registration_error_mm": 6.0, "registration_error_deg": 3.0},
     ("sensor_inconsistent", "corridor")),
]


@pytest.mark.parametrize(("kind", "fault_kwargs", "twin_kwargs", "expected"), FAULTS, ids=[f[0] for f in FAULTS])
def test_each_fault_ends_in_a_safe_stop(
    twin: Twin, kind: str, fault_kwargs: dict[str, Any] | None, twin_kwargs: dict[str, Any],
    expected: tuple[str, ...],
) -> None:
    sc = random_scenario(21, depth_range_mm=SHORT_MM)
    if fault_kwargs is not None:
        start_s = 0.3 * float(np.linalg.norm(sc.target_mm - sc.believed_start_T_world_from_tip[:3, 3])) / (
            sc.controller.insertion_speed_mm_s)
        sc = replace(sc, faults=(Fault(kind, start_s, **fault_kwargs),))
    res = run_twin_episode(sc, 3, TwinEpisodeConfig(**twin_kwargs), twin)
    assert res.status == "aborted", (res.status, res.reason)
    code = res.reason.split(":")[0]
    assert code in expected, res.reason
    assert not res.collided
    assert res.travel_after_stop_mm <= 1.0
    if fault_kwargs is not None:
        # Detection latency stays short: the tip moved little after the fault began (a curvature
        # change is only observable through the motion it causes, so it needs more travel).
        assert res.travel_after_fault_onset_mm < (30.0 if kind == "curvature_mismatch" else 10.0)
    # The twin replayed the stop: patient motion moved the patient bodies in PyBullet.
    if kind == "patient_motion":
        assert np.linalg.norm(twin.patient_shift_mm) > 0.5


def test_patient_shift_ramps_like_the_control_layer() -> None:
    f = Fault("patient_motion", 1.0, magnitude=4.0, direction=(0.0, 2.0, 0.0), ramp_s=0.5)
    np.testing.assert_allclose(patient_shift_mm([f], 0.5), 0.0)
    np.testing.assert_allclose(patient_shift_mm([f], 1.25), [0.0, 2.0, 0.0])
    np.testing.assert_allclose(patient_shift_mm([f], 9.0), [0.0, 4.0, 0.0])


def test_episode_is_deterministic_for_a_seed(twin: Twin) -> None:
    sc = random_scenario(31, depth_range_mm=SHORT_MM)
    a = run_twin_episode(sc, 9, TwinEpisodeConfig(), twin)
    with Twin(seed=0) as other:
        b = run_twin_episode(sc, 9, TwinEpisodeConfig(), other)
    assert a.status == b.status and a.reason == b.reason
    assert a.target_error_mm == b.target_error_mm
    np.testing.assert_array_equal(a.joints_rad, b.joints_rad)
    assert a.trajectory is not None and b.trajectory is not None
    np.testing.assert_array_equal(a.trajectory.true_T_world_from_tip, b.trajectory.true_T_world_from_tip)
    c = run_twin_episode(sc, 10, TwinEpisodeConfig(), twin)
    assert c.target_error_mm != a.target_error_mm
