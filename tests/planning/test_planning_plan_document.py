"""Plan document: canonical form, hashing, round trip, tampering and invalid documents."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from needle_steering.errors import PlanDocumentError
from needle_steering.perception.volume import Volume
from needle_steering.planning.plan_document import (
    SCHEMA,
    ImageInfo,
    PlanDocument,
    Trajectory,
    canonical_json,
    load_plan,
    save_plan,
    volume_sha256,
)


def _volume(values: np.ndarray | None = None, origin: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> Volume:
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4) if values is None else values
    return Volume(arr, np.ones(3), np.asarray(origin), np.eye(3))


def _trajectory(tid: str = "L3-left", tip_x: float = 10.123456789) -> Trajectory:
    return Trajectory(
        id=tid,
        kind="pedicle_screw",
        level="L3",
        side="left",
        entry_lps_mm=(1.0, 2.0, 3.0),
        tip_lps_mm=(tip_x, -5.0, 3.00001),
        path_lps_mm=((1.0, 2.0, 3.0), (tip_x, -5.0, 3.00001)),
        diameter_mm=6.5,
        length_mm=45.0,
        metrics={"mean_hu": 231.123456, "grade": "A", "min_clearance_mm": 1.4, "n": 3},
        warnings=("check",),
    )


def _plan(trajectories: tuple[Trajectory, ...] | None = None) -> PlanDocument:
    info = ImageInfo.from_volume(_volume())
    return PlanDocument(
        image=info,
        labels=info,
        trajectories=trajectories if trajectories is not None else (_trajectory(), _trajectory("L3-right", -8.0)),
        skipped={"L5-left": "pedicle too narrow"},
        levels={"L3": {"trabecular_hu": 150.25}},
        warnings=("osteoporosis suspected",),
        derived={"spinal_canal": "hole of the vertebral arch"},
        options={"clearance_mm": 1.0},
        created_utc="2025-01-01T00:00:00Z",
    )


def test_round_trip_through_file(tmp_path: Path) -> None:
    plan = _plan()
    path = save_plan(plan, tmp_path / "plan.json")
    loaded = load_plan(path)
    assert loaded.sha256 == plan.sha256
    assert loaded.to_json() == plan.to_json()
    assert loaded.trajectory("L3-left").sha256 == plan.trajectory("L3-left").sha256
    assert loaded.trajectory("L3-left").metrics["grade"] == "A"
    assert path.read_text() == plan.to_json()
    assert json.loads(path.read_text())["schema"] == SCHEMA
    assert not list(tmp_path.glob(".*tmp"))


def test_canonical_form_is_stable_and_rounded() -> None:
    a = _plan()
    b = _plan()
    assert a.to_json() == b.to_json()
    assert a.sha256 == b.sha256
    text = a.to_json()
    assert "10.1235" in text and "10.123456789" not in text
    # keys sorted, compact
    assert canonical_json({"b": 1, "a": -0.0}) == '{"a":0.0,"b":1}'
    # differences below the rounding do not change the hash, larger ones do
    assert _trajectory(tip_x=10.12345678).sha256 == _trajectory(tip_x=10.123456789).sha256
    assert _trajectory(tip_x=10.1236).sha256 != _trajectory(tip_x=10.123456789).sha256
    assert len(a.sha256) == 64


def test_tampering_is_detected() -> None:
    data = json.loads(_plan().to_json())
    data["trajectories"][0]["tip_lps_mm"][0] += 1.0
    with pytest.raises(PlanDocumentError, match="sha256 mismatch"):
        load_plan(json.dumps(data))
    data = json.loads(_plan().to_json())
    data["skipped"] = {}
    with pytest.raises(PlanDocumentError, match="plan was modified"):
        load_plan(json.dumps(data))
    # re-hashing the trajectory but not the plan is still caught by the plan hash
    data = json.loads(_plan().to_json())
    traj = data["trajectories"][0]
    traj["diameter_mm"] = 7.5
    traj["sha256"] = Trajectory.from_dict(traj, verify_hash=False).sha256
    with pytest.raises(PlanDocumentError, match="plan was modified"):
        load_plan(json.dumps(data))


def test_plan_is_immutable_so_its_hash_is_computed_once() -> None:
    """Approvals bind to hashes cached at construction: nothing reachable from a plan may change."""
    plan = _plan()
    before = plan.sha256
    with pytest.raises(TypeError):
        plan.options["clearance_mm"] = 0.0  # type: ignore[index]
    with pytest.raises(TypeError):
        plan.levels["L3"]["trabecular_hu"] = 0.0  # type: ignore[index]
    with pytest.raises(TypeError):
        plan.trajectories[0].metrics["grade"] = "E"  # type: ignore[index]
    with pytest.raises(AttributeError):
        plan.trajectories[0].length_mm = 1.0  # type: ignore[misc]
    assert plan.sha256 == before
    assert json.loads(plan.to_json())["sha256"] == before
    # a plan built from the same content (caller's dicts copied, not shared) hashes the same
    options = {"clearance_mm": 1.0}
    again = PlanDocument(plan.image, plan.labels, plan.trajectories, plan.skipped, plan.levels, plan.warnings,
                         plan.derived, options, plan.created_utc)
    options["clearance_mm"] = 9.0
    assert again.sha256 == before and again.options["clearance_mm"] == 1.0


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.__setitem__("schema", "needle_steering.plan/2"), "unsupported schema"),
        (lambda d: d.pop("image"), "missing required field 'image'"),
        (lambda d: d["trajectories"][0].pop("tip_lps_mm"), "missing required field 'tip_lps_mm'"),
        (lambda d: d["trajectories"][0].__setitem__("kind", "drill"), "is not one of"),
        (lambda d: d["trajectories"][0].__setitem__("diameter_mm", -1.0), "positive"),
        (lambda d: d["trajectories"][0].__setitem__("entry_lps_mm", [1.0, 2.0]), "expected 3 numbers"),
        (lambda d: d["trajectories"][0]["metrics"].__setitem__("x", [1, 2]), "metrics hold"),
        (lambda d: d["image"].__setitem__("sha256", "zz"), "64 lowercase hex"),
    ],
)
def test_invalid_documents_are_rejected(mutate: object, message: str) -> None:
    data = json.loads(_plan().to_json())
    mutate(data)  # type: ignore[operator]
    with pytest.raises(PlanDocumentError, match=message):
        load_plan(json.dumps(data))


def test_non_finite_numbers_rejected() -> None:
    text = _plan().to_json().replace('"mean_hu":231.1235', '"mean_hu":NaN')
    assert "NaN" in text
    with pytest.raises(PlanDocumentError, match="non-finite"):
        load_plan(text)
    with pytest.raises(PlanDocumentError, match="finite"):
        _trajectory(tip_x=math.nan)
    with pytest.raises(PlanDocumentError, match="finite"):
        dataclasses.replace(_trajectory(), metrics={"x": math.inf})


def test_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(PlanDocumentError, match="no such plan file"):
        load_plan(tmp_path / "missing.json")
    with pytest.raises(PlanDocumentError, match="not valid JSON"):
        load_plan("{not json")
    with pytest.raises(PlanDocumentError, match="duplicate trajectory ids"):
        _plan((_trajectory(), _trajectory()))
    with pytest.raises(PlanDocumentError, match="does not exist"):
        save_plan(_plan(), tmp_path / "nope" / "plan.json")


def test_volume_hash_covers_voxels_and_geometry() -> None:
    base = volume_sha256(_volume())
    assert base == volume_sha256(_volume())
    changed = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    changed[1, 1, 1] += 1
    assert volume_sha256(_volume(changed)) != base
    assert volume_sha256(_volume(origin=(0.0, 0.0, 1.0))) != base
    assert volume_sha256(_volume(np.arange(24, dtype=np.int32).reshape(2, 3, 4))) != base
    big_endian = np.arange(24, dtype=">i2").reshape(2, 3, 4)
    assert volume_sha256(_volume(big_endian)) == base
