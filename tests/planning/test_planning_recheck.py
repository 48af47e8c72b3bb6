"""Re-checking a trajectory whose entry the surgeon dragged in review."""

from __future__ import annotations

import numpy as np
import pytest

from needle_steering.errors import PlanningError
from needle_steering.planning import plan_case, recheck_trajectory
from needle_steering.sim.phantom import PhantomConfig, generate_phantom


@pytest.fixture(scope="module")
def planned() -> tuple:
    phantom = generate_phantom(PhantomConfig(seed=2, levels=("L3", "L4"), spacing_mm=1.0))
    result = plan_case(phantom.ct, phantom.labels, ["L3", "L4"])
    screws = [t for t in result.plan_document.trajectories if t.kind == "pedicle_screw"]
    assert screws, result.skipped
    return phantom, result.plan_document, screws[0]


def test_small_drag_is_regraded_and_changes_the_hash(planned: tuple) -> None:
    phantom, plan, screw = planned
    axis = np.subtract(screw.tip_lps_mm, screw.entry_lps_mm)
    axis /= np.linalg.norm(axis)
    entry = np.asarray(screw.entry_lps_mm) - 2.0 * axis  # back along its own axis: still safe
    adjusted = recheck_trajectory(plan, screw.id, entry.tolist(), ct=phantom.ct, labels=phantom.labels)
    moved = adjusted.trajectory(screw.id)
    assert adjusted.sha256 != plan.sha256 and moved.sha256 != screw.sha256
    assert moved.metrics["adjusted_in_review"] is True and moved.metrics["predicted_grade"] in {"A", "B"}
    assert "density_gain" not in moved.metrics
    np.testing.assert_allclose(moved.tip_lps_mm, screw.tip_lps_mm)


def test_drag_into_the_canal_is_refused(planned: tuple) -> None:
    phantom, plan, screw = planned
    body_centre = np.asarray(phantom.meta["vertebrae"][screw.level]["body_centre_lps_mm"])
    entry = np.asarray(screw.entry_lps_mm, dtype=float)
    # Swing the entry across the midline: the screw would cross the canal and the medial wall.
    entry[0] = 2 * body_centre[0] - entry[0]
    with pytest.raises(PlanningError, match=r"refused|outside"):
        recheck_trajectory(plan, screw.id, entry.tolist(), ct=phantom.ct, labels=phantom.labels)


def test_other_images_and_bad_entries_are_refused(planned: tuple) -> None:
    phantom, plan, screw = planned
    with pytest.raises(PlanningError, match="not the ones"):
        recheck_trajectory(plan, screw.id, list(screw.entry_lps_mm), ct=phantom.labels, labels=phantom.labels)
    with pytest.raises(PlanningError, match="finite"):
        recheck_trajectory(plan, screw.id, [0.0, float("nan"), 0.0], ct=phantom.ct, labels=phantom.labels)
