"""``needle-steering regress``: JSON shape, exit codes, JUnit, MCAP recording, determinism."""

from __future__ import annotations

import json
import warnings
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from needle_steering.errors import SimulationError
from needle_steering.sim import regress
from needle_steering.sim.mcap_recorder import read_mcap_messages

SUITE = """
name: tiny
scenarios: 2
generator:
  em_sigma_mm: 0.5
  curvature_mismatch: 0.2
  depth_range_mm: [40.0, 50.0]
twin:
  registration_error_mm: 0.9
  registration_error_deg: 1.0
faults:
  repeats: 1
  list:
    - {name: dropout, kind: sensor_dropout, start_fraction: 0.3, duration_s: 2.0, expect: [sensor_stale]}
    - {name: registration, kind: registration_error, translation_mm: 6.0, rotation_deg: 3.0,
       expect: [sensor_inconsistent, corridor]}
screws:
  enabled: @SCREWS@
  repeats: 1
  cases:
    - phantom_seed: 1
      levels: [L4]
      spacing_mm: 1.0
      phantom_options: {fov_mm: [200.0, 200.0], context_levels: false, table: false, margin_mm: 5.0}
thresholds:
  min_reach_fraction: 0.5
  max_median_target_error_mm: @MEDIAN@
  max_p95_target_error_mm: 1.5
  max_collisions: 0
  max_unexplained_failures: 0
  min_fault_safe_stop_fraction: 1.0
  max_travel_after_stop_mm: 1.0
  min_screw_grade_ab_fraction: 0.995
  max_screw_mean_tip_deviation_mm: 1.5
"""


def _suite(tmp_path: Path, screws: bool = False, median: float = 1.0) -> str:
    path = tmp_path / f"suite_{screws}_{median}.yaml"
    path.write_text(SUITE.replace("@SCREWS@", str(screws).lower()).replace("@MEDIAN@", str(median)))
    return str(path)


def test_regression_report_shape_and_screws(tmp_path: Path) -> None:
    report = regress.run_regression(_suite(tmp_path, screws=True), seed=3)
    doc = regress.json_report(report)
    json.dumps(doc, allow_nan=False)  # strict JSON
    assert len(doc["scenarios"]) == 4
    for row in doc["scenarios"]:
        for key in ("name", "seed", "status", "target_error_mm", "max_path_deviation_mm",
                    "min_obstacle_clearance_mm", "collided", "sim_seconds", "wall_seconds"):
            assert key in row
        assert row["status"] in ("reached", "aborted", "failed")
        assert isinstance(row["seed"], int)
    for key in ("n", "reached", "median_target_error_mm", "p95_target_error_mm", "collisions", "realtime_factor"):
        assert key in doc["summary"]
    assert doc["summary"]["n"] == 4
    faults = [r for r in doc["scenarios"] if r["kind"] == "fault"]
    assert all(r["status"] == "aborted" and r["abort_reason"] and r["passed"] for r in faults)
    screws = doc["screws"]
    assert screws["n"] == 2 and screws["executed"] == 2
    assert screws["grades"]["A"] + screws["grades"]["B"] == 2
    assert {c["name"] for c in doc["thresholds"]} >= {"min_screw_grade_ab_fraction", "min_reach_fraction"}
    assert doc["passed"] is True


def test_cli_json_exit_codes_and_junit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = regress.main(["--suite", _suite(tmp_path), "--scenarios", "1", "--json", "--seed", "1"])
    out = capsys.readouterr().out
    doc = json.loads(out)
    assert code == 0 and doc["passed"] is True
    assert doc["summary"]["n"] == 3
    # An impossible threshold fails the run with exit status 1 and a JUnit failure.
    junit = tmp_path / "r.xml"
    code = regress.main(["--suite", _suite(tmp_path, median=0.0), "--scenarios", "1", "--seed", "1",
                         "--junit", str(junit)])
    assert code == regress.EXIT_THRESHOLD_FAILED
    root = ET.parse(junit).getroot()
    cases = root.findall(".//testcase")
    assert len(cases) == 3 + 9  # scenarios + thresholds (screw thresholds skipped, no screws)
    failed = [c.get("name") for c in cases if c.find("failure") is not None]
    assert failed == ["max_median_target_error_mm"]
    assert "FAILED" in capsys.readouterr().out


def test_local_workers_give_the_same_results(tmp_path: Path) -> None:
    suite = _suite(tmp_path)
    one = regress.run_regression(suite, scenarios=2, seed=5, workers=1)
    two = regress.run_regression(suite, scenarios=2, seed=5, workers=2)
    key = [(r["name"], r["status"], r["target_error_mm"]) for r in one["scenarios"]]
    assert key == [(r["name"], r["status"], r["target_error_mm"]) for r in two["scenarios"]]
    other = regress.run_regression(suite, scenarios=2, seed=6, workers=1)
    assert [r["target_error_mm"] for r in other["scenarios"]] != [r["target_error_mm"] for r in one["scenarios"]]


def test_record_dir_writes_openable_mcap_files(tmp_path: Path) -> None:
    rec = tmp_path / "bags"
    report = regress.run_regression(_suite(tmp_path), scenarios=1, seed=2, record_dir=rec)
    files = sorted(p.name for p in rec.glob("*.mcap"))
    assert files == sorted(f"{r['name']}.mcap" for r in report["scenarios"])
    row = report["scenarios"][0]
    msgs = read_mcap_messages(rec / f"{row['name']}.mcap")
    assert {"/sim/tip_true", "/control/tip_estimate", "/plan/path", "/needle_robot/servo_jv",
            "/control/status", "/sim/arm/joint_states", "/registration/T_robot_base_from_patient"} <= set(msgs)
    poses = msgs["/sim/tip_true"]
    assert len(poses) > 100
    assert poses[0][1].header.frame_id == "patient"
    times = [t for t, _ in poses]
    assert times == sorted(times) and times[1] - times[0] == 25_000_000  # 25 ms control period
    final = json.loads(msgs["/control/status"][-1][1].data)
    assert final["state"] == row["status"] and final["seed"] == row["seed"]
    cmd = msgs["/needle_robot/servo_jv"][10][1]
    assert list(cmd.name) == ["insertion", "roll", "spin_duty"]
    assert 0.0 < cmd.velocity[0] < 0.01  # m/s
    path = msgs["/plan/path"][0][1]
    assert len(path.poses) >= 2
    # Metres in the patient frame: the last tip pose is ~target depth (40-50 mm) from the entry.
    first, last = poses[0][1].pose.position, poses[-1][1].pose.position
    depth_m = np.linalg.norm([last.x - first.x, last.y - first.y, last.z - first.z])
    assert 0.02 < depth_m < 0.06


def test_invalid_requests_raise(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nscenarios: 1\ngenerator: {em_sigma: 0.5}\n")
    with pytest.raises(SimulationError, match="em_sigma"):
        regress.load_suite(str(bad))
    with pytest.raises(SimulationError, match="nightly"):
        regress.load_suite("weekly")
    with pytest.raises(SimulationError, match="workers"):
        regress.run_regression(_suite(tmp_path), workers=0)
    try:
        import ray  # noqa: F401
    except ImportError:
        with pytest.raises(SimulationError, match="ray"):
            regress.run_regression(_suite(tmp_path), scenarios=0, ray_address="127.0.0.1:6379")
    # A scenario that raises becomes a failed row with the error, not a crash of the whole run.
    spec = regress.load_suite(_suite(tmp_path))
    task = regress.build_tasks(spec, scenarios=1, seed=0)[0]
    row = regress.run_task({**task, "twin": {"standoff_mm": -1.0}})
    assert row["status"] == "failed" and not row["passed"]
    assert "standoff_mm" in row["abort_reason"] and "Traceback" in row["failure"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert regress.load_suite("default").scenarios >= 24
        assert regress.load_suite("nightly").scenarios >= 200
