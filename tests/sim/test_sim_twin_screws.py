"""Pedicle-screw execution in the twin on a generated phantom, graded Gertzbein-Robbins."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from needle_steering.errors import SimulationError
from needle_steering.perception.labels import level_id
from needle_steering.planning.plan_document import Trajectory
from needle_steering.sim.phantom import PhantomConfig, generate_phantom
from needle_steering.sim.twin.anatomy import (
    AnatomyMesh,
    SignedDistanceField,
    label_meshes,
    mesh_surface_distance_mm,
)
from needle_steering.sim.twin.screw_plans import reference_screw_trajectories
from needle_steering.sim.twin.screws import (
    ScrewExecutionConfig,
    execute_screws,
    gertzbein_robbins_grade,
    screw_breach_mm,
    summarize_screws,
)
from needle_steering.sim.twin.twin import Twin

Case = tuple[Any, list[Trajectory], list[AnatomyMesh]]


@pytest.fixture(scope="module")
def case() -> Case:
    config = PhantomConfig(seed=1, levels=("L3", "L4"), spacing_mm=1.0, fov_mm=(200.0, 200.0),
                           context_levels=False, table=False, margin_mm=5.0)
    phantom = generate_phantom(config)
    trajectories = reference_screw_trajectories(phantom.labels, phantom.meta)
    meshes = label_meshes(phantom.labels, target_triangles=2000)
    return phantom, trajectories, meshes


def test_gertzbein_robbins_boundaries() -> None:
    assert [gertzbein_robbins_grade(b) for b in (0.0, 0.01, 1.99, 2.0, 3.99, 4.0, 5.99, 6.0, 12.0)] == list(
        "ABBCCDDEE")
    with pytest.raises(SimulationError):
        gertzbein_robbins_grade(float("nan"))


def test_phantom_meshes_match_its_label_map(case: Case) -> None:
    phantom, _trajectories, meshes = case
    names = {m.name for m in meshes}
    assert {"L3", "L4", "spinal_canal"} <= names
    for mesh in meshes:
        if mesh.name in ("L3", "spinal_canal"):
            dist = mesh_surface_distance_mm(mesh, phantom.labels, n_points=4000)
            assert dist["mean_mm"] < 0.35, (mesh.name, dist)
            assert dist["p95_mm"] < 1.0, (mesh.name, dist)


def test_reference_plans_sit_inside_the_pedicles(case: Case) -> None:
    phantom, trajectories, _ = case
    assert [t.id for t in trajectories] == ["L3-left", "L3-right", "L4-left", "L4-right"]
    for t in trajectories:
        sdf = SignedDistanceField(phantom.labels, phantom.labels.array == level_id(t.level))
        assert screw_breach_mm(sdf, t.entry_lps_mm, t.tip_lps_mm, t.diameter_mm) == 0.0
        assert 35.0 < t.length_mm < 55.0 and 4.0 <= t.diameter_mm <= 7.5


def test_grading_detects_a_medial_breach(case: Case) -> None:
    phantom, trajectories, _ = case
    t = trajectories[0]  # L3-left: medial is toward -x (patient right)
    sdf = SignedDistanceField(phantom.labels, phantom.labels.array == level_id(t.level))
    grades = []
    for shift_mm in (0.0, 3.0, 6.0, 9.0):
        d = np.array([-shift_mm, 0.0, 0.0])
        breach = screw_breach_mm(sdf, np.asarray(t.entry_lps_mm) + d, np.asarray(t.tip_lps_mm) + d, t.diameter_mm)
        grades.append(gertzbein_robbins_grade(breach))
    assert grades[0] == "A"
    assert grades == sorted(grades)  # monotone: more shift, worse grade
    assert grades[-1] in ("C", "D", "E")


def test_screw_execution_under_registration_error(case: Case) -> None:
    phantom, trajectories, meshes = case
    cfg = ScrewExecutionConfig(registration_error_mm=0.9, registration_error_deg=1.0)
    with Twin(seed=0) as twin:
        results = execute_screws(phantom.labels, trajectories, cfg, seed=4, twin=twin, meshes=meshes)
        again = execute_screws(phantom.labels, trajectories, cfg, seed=4, twin=twin, meshes=meshes)
        other = execute_screws(phantom.labels, trajectories, cfg, seed=5, twin=twin, meshes=meshes)
    assert all(r.executed for r in results), [r.reason for r in results]
    for r in results:
        assert r.ik_position_error_mm < 0.1 and r.ik_angle_error_deg < 0.1
        assert 0.2 < r.entry_deviation_mm < 2.0  # the registration error shows up, bounded
        assert r.angle_error_deg < 1.3
        assert r.grade in ("A", "B"), (r.trajectory_id, r.breach_mm)
    summary = summarize_screws(results)
    assert summary["grade_ab_fraction"] == 1.0
    assert summary["mean_tip_deviation_mm"] < 1.5
    # Deterministic for a seed, different for another seed.
    assert [r.achieved_tip_lps_mm for r in again] == [r.achieved_tip_lps_mm for r in results]
    assert [r.achieved_tip_lps_mm for r in other] != [r.achieved_tip_lps_mm for r in results]


def test_large_registration_error_degrades_the_grades(case: Case) -> None:
    phantom, trajectories, meshes = case
    cfg = ScrewExecutionConfig(registration_error_mm=5.0, registration_error_deg=6.0)
    results = execute_screws(phantom.labels, trajectories, cfg, seed=2, meshes=meshes)
    summary = summarize_screws(results)
    assert summary["mean_tip_deviation_mm"] > 3.0
    assert summary["max_breach_mm"] > 0.5


def test_wrong_kind_is_refused(case: Case) -> None:
    phantom, trajectories, _ = case
    with pytest.raises(SimulationError, match="biopsy"):
        execute_screws(phantom.labels, [replace(trajectories[0], kind="biopsy")])
