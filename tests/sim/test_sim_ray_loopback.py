"""``needle-steering regress --ray`` against a real local Ray head.

The head runs inside a private network namespace that holds only the loopback interface, so no
Ray traffic can reach any address but 127.0.0.1 (Ray otherwise binds the machine's LAN address).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent

SCRIPT = """
set -eu
ip link set lo up
trap 'ray stop --force >/dev/null 2>&1 || true' EXIT
ray start --head --node-ip-address 127.0.0.1 --port 6391 --num-cpus 2 \
    --include-dashboard=false --disable-usage-stats >ray_start.log 2>&1
needle-steering regress --suite default --scenarios 2 --seed 0 --ray 127.0.0.1:6391 --json \
    --junit junit.xml >result.json 2>regress.log
"""


@pytest.mark.slow
def test_regression_runs_on_a_local_ray_head(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a loopback-only network namespace")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(["unshare", "-n", "bash", "-c", SCRIPT], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    logs = "\n".join(p.read_text() for p in tmp_path.glob("*.log"))
    assert proc.returncode == 0, proc.stderr + logs
    assert "Local node IP: 127.0.0.1" in (tmp_path / "ray_start.log").read_text()
    assert "Connected to Ray cluster" in (tmp_path / "regress.log").read_text()
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["passed"] is True
    summary = result["summary"]
    assert summary["nominal"]["n"] == 2 and summary["collisions"] == 0
    assert summary["faults"]["safe_stop_fraction"] == 1.0
    assert all(s["status"] in {"reached", "aborted"} for s in result["scenarios"])
    assert "<testsuite" in (tmp_path / "junit.xml").read_text()
