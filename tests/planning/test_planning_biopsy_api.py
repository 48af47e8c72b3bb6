"""Biopsy planning (margins, transpedicular option, failures) and plan_case end to end with the report."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from needle_steering.errors import GeometryError, PlanningError
from needle_steering.perception.labels import SPINAL_CANAL, level_id
from needle_steering.perception.volume import Volume
from needle_steering.planning import load_plan, plan_case, save_plan, write_report
from needle_steering.planning.biopsy import BiopsyOptions, fibonacci_directions, plan_biopsy, verify_biopsy_path
from needle_steering.planning.steerable import path_curvature_per_mm


@dataclass(frozen=True)
class Case:
    """A phantom CT, its label map and the generator's ground-truth metadata."""

    ct: Volume
    labels: Volume
    meta: dict[str, Any]


@pytest.fixture(scope="module")
def phantom_lesion() -> Case:
    """Normal-density phantom, L2-L4, lesion in L3."""
    from needle_steering.sim.phantom import PhantomConfig, generate_phantom

    ph = generate_phantom(
        PhantomConfig(seed=3, levels=("L2", "L3", "L4"), spacing_mm=1.0, lesion=True, lesion_level="L3")
    )
    return Case(ph.ct, ph.labels, ph.meta)


def test_fibonacci_directions_are_unit_and_spread() -> None:
    d = fibonacci_directions(500)
    assert np.allclose(np.linalg.norm(d, axis=1), 1.0)
    assert abs(float(d.mean(axis=0) @ d.mean(axis=0))) < 1e-3


def test_lesion_biopsy_respects_margins(phantom_lesion: Any) -> None:
    ct, labels, meta = phantom_lesion.ct, phantom_lesion.labels, phantom_lesion.meta
    target = np.asarray(meta["lesion"]["centre_lps_mm"])
    opts = BiopsyOptions()
    plan = plan_biopsy(ct, labels, target, opts)
    paths = [plan.best, *plan.alternatives]
    assert plan.best.level == "L3"
    for path in paths:
        assert path.length_mm <= opts.max_length_mm
        assert path.skin_angle_deg <= opts.max_skin_angle_deg
        assert np.allclose(path.target_lps_mm, target)
        exempt = level_id("L3") if path.approach.startswith("transpedicular") else None
        clearance = verify_biopsy_path(labels, path, opts.needle_diameter_mm, exempt_label=exempt)
        assert clearance >= opts.margin_mm - 0.5, (path.approach, clearance)  # 0.5: voxel-centre tolerance
        assert path.min_clearance_mm >= opts.margin_mm
    if plan.best.approach.startswith("transpedicular"):
        # the medial pedicle wall is kept: the needle never touches the canal
        assert verify_biopsy_path(labels, plan.best, opts.needle_diameter_mm) > 0.0
    # the entry is on the posterior skin
    post = np.asarray(meta["vertebrae"]["L3"]["posterior_direction_lps"])
    assert (plan.best.entry_lps_mm - target) @ post > 40.0
    traj = plan.to_trajectory(opts.needle_diameter_mm)
    assert traj.kind == "biopsy" and traj.metrics["min_critical_clearance_mm"] >= opts.margin_mm


def test_impossible_requests_raise_with_reasons(phantom_lesion: Any) -> None:
    ct, labels, meta = phantom_lesion.ct, phantom_lesion.labels, phantom_lesion.meta
    target = np.asarray(meta["lesion"]["centre_lps_mm"])
    with pytest.raises(PlanningError, match=r"no safe biopsy path.*margin"):
        plan_biopsy(ct, labels, target, BiopsyOptions(margin_mm=60.0, transpedicular=False, n_directions=300))
    canal_voxel = np.argwhere(labels.array == SPINAL_CANAL)[0]
    with pytest.raises(PlanningError, match="inside the spinal_canal"):
        plan_biopsy(ct, labels, labels.index_to_lps(canal_voxel.astype(float)))
    with pytest.raises(GeometryError, match="outside the image"):
        plan_biopsy(ct, labels, np.array([1e4, 0.0, 0.0]))
    with pytest.raises(PlanningError, match="finite"):
        plan_biopsy(ct, labels, np.array([np.nan, 0.0, 0.0]))


def test_plan_case_with_biopsy_steerable_and_report(phantom_lesion: Any, tmp_path: Path) -> None:
    ct, labels, meta = phantom_lesion.ct, phantom_lesion.labels, phantom_lesion.meta
    target = np.asarray(meta["lesion"]["centre_lps_mm"])
    res = plan_case(ct, labels, ["L3", "L4"], biopsy_target_lps_mm=target, steerable=True)
    doc = res.plan_document
    kinds = [t.kind for t in doc.trajectories]
    assert "biopsy" in kinds
    screws = [t for t in doc.trajectories if t.kind == "pedicle_screw"]
    assert len(screws) + sum(1 for k in res.skipped if k.startswith("L")) == 4
    assert all(t.metrics["predicted_grade"] == "A" for t in screws)
    if "steerable_needle" in kinds:
        traj = doc.trajectory("steerable-1")
        pts = np.asarray(traj.path_lps_mm)
        assert np.linalg.norm(pts[-1] - target) < 1e-3
        assert traj.metrics["max_curvature_per_mm"] <= 0.01 + 1e-9
        assert path_curvature_per_mm(pts[1:]).max() <= 0.0105
    else:
        assert res.skipped["steerable"]
    assert "L3" in doc.levels and "bone_quality" in doc.levels["L3"]
    saved = save_plan(doc, tmp_path / "plan.json")
    assert load_plan(saved).sha256 == doc.sha256
    out = write_report(doc, ct, labels, tmp_path / "report.html")
    text = out.read_text()
    assert text.index("Pedicle screws") < text.index("Trajectories")
    assert len(re.findall(r"data:image/png;base64,", text)) == 2 * len(doc.trajectories)
    assert text.count("<svg") == len(doc.trajectories)
    assert doc.sha256 in text
    for t in screws:
        assert f">{t.level}<" in text


def test_plan_case_request_errors(phantom_lesion: Any) -> None:
    ct, labels = phantom_lesion.ct, phantom_lesion.labels
    with pytest.raises(PlanningError, match="needs a biopsy target"):
        plan_case(ct, labels, ["L3"], steerable=True)
    with pytest.raises(PlanningError, match="folder"):
        res = plan_case(ct, labels, [], biopsy_target_lps_mm=np.asarray(phantom_lesion.meta["lesion"]["centre_lps_mm"]))
        write_report(res.plan_document, ct, labels, "/nonexistent/dir/report.html")
