"""The command line as a user drives it: phantom -> plan -> report, and CBCT registration."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

EXE = Path(sys.executable).parent / "needle-steering"


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(EXE), *args], cwd=cwd, capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture(scope="module")
def patient(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("patient")
    result = _run("phantom", "--out", "ct", "--seed", "4", "--levels", "L2-L4", "--spacing", "1.0", "--lesion",
                  "--json", cwd=folder)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["levels"] == ["L2", "L3", "L4"]
    return folder


def test_phantom_files_have_ordinary_permissions(patient: Path) -> None:
    for name in ("ct.nii.gz", "labels.nii.gz", "meta.json"):
        mode = stat.S_IMODE((patient / "ct" / name).stat().st_mode)
        assert mode & 0o044, f"{name} is not readable by others: {oct(mode)}"


def test_plan_then_report(patient: Path) -> None:
    meta = json.loads((patient / "ct" / "meta.json").read_text())
    target = ",".join(f"{v:.2f}" for v in meta["lesion"]["centre_lps_mm"])
    result = _run("plan", "ct/ct.nii.gz", "--labels", "ct/labels.nii.gz", "--levels", "L2-L4",
                  f"--biopsy-target={target}", "--out", "plan.json", "--json", cwd=patient)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert set(summary) == {"plan", "sha256", "trajectories", "seconds", "skipped"}
    plan = json.loads((patient / "plan.json").read_text())
    assert plan["schema"] == "needle_steering.plan/1" and plan["sha256"] == summary["sha256"]
    screws = [t for t in plan["trajectories"] if t["kind"] == "pedicle_screw"]
    # Every requested side is either planned or skipped with a reason, never silently dropped.
    assert len(screws) + sum(1 for k in summary["skipped"] if k[:2] in {"L2", "L3", "L4"}) == 6
    assert len(screws) >= 2
    assert all(t["metrics"]["predicted_grade"] == "A" for t in screws)
    assert any(t["kind"] == "biopsy" for t in plan["trajectories"])

    report = _run("report", "plan.json", "--out", "report.html", cwd=patient)
    assert report.returncode == 0, report.stderr
    html = (patient / "report.html").read_text()
    assert "<img" in html and screws[0]["id"] in html


def test_report_refuses_a_different_ct(patient: Path, tmp_path: Path) -> None:
    other = _run("phantom", "--out", str(tmp_path / "other"), "--seed", "5", "--levels", "L2-L4", "--spacing", "2",
                 cwd=patient)
    assert other.returncode == 0, other.stderr
    result = _run("plan", "ct/ct.nii.gz", "--labels", "ct/labels.nii.gz", "--levels", "L3", "--out",
                  str(tmp_path / "p.json"), cwd=patient)
    assert result.returncode == 0, result.stderr
    refused = _run("report", str(tmp_path / "p.json"), "--image", str(tmp_path / "other" / "ct.nii.gz"),
                   "--out", str(tmp_path / "r.html"), cwd=patient)
    assert refused.returncode == 2 and "not the one the plan was made on" in refused.stderr
    assert not (tmp_path / "r.html").exists()


def test_plan_rejects_a_bad_target(patient: Path) -> None:
    result = _run("plan", "ct/ct.nii.gz", "--labels", "ct/labels.nii.gz", "--biopsy-target", "1,nan,2",
                  "--out", "bad.json", cwd=patient)
    assert result.returncode == 2 and "--biopsy-target" in result.stderr
    assert not (patient / "bad.json").exists()


def test_register_cbct_to_ct(patient: Path) -> None:
    cbct = _run("phantom", "--out", "cbct", "--seed", "4", "--levels", "L2-L4", "--spacing", "1.0",
                "--modality", "cbct", cwd=patient)
    assert cbct.returncode == 0, cbct.stderr
    result = _run("register", "--fixed", "ct/ct.nii.gz", "--moving", "cbct/ct.nii.gz", "--labels",
                  "ct/labels.nii.gz", "--levels", "L2-L4", "--json", cwd=patient)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for level in ("L2", "L3", "L4"):
        entry = report["levels"][level]
        assert entry["status"] == "ok", entry
        # Same anatomy, same scanner frame: the transform must be close to identity.
        T = entry["T_ct_from_cbct"]
        assert abs(T[0][3]) < 0.5 and abs(T[1][3]) < 0.5 and abs(T[2][3]) < 0.5
