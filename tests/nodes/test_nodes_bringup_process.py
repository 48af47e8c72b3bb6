"""``needle-steering bringup`` supervises one process per node: a dead node takes the graph down,
and no node outlives bringup."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): look at its state
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def _start(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], dict[str, int], Path]:
    log_path = tmp_path / "bringup.log"
    args = [
        sys.executable, "-m", "needle_steering.nodes.bringup", "--config", str(REPO / "config" / "sim.yaml"), *extra,
        "--only", "control_node", "--only", "sim_node",
        "--set", "sim_node.backend=kinematic",
        "--set", f"control_node.audit_log={tmp_path / 'control.jsonl'}",
    ]  # fmt: skip
    env = {**os.environ, "ROS_DOMAIN_ID": str(150 + os.getpid() % 50), "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    end = time.monotonic() + 30.0
    while time.monotonic() < end:
        text = log_path.read_text(errors="replace")
        match = re.search(r"bringup: (.*) running (?:in one process \(pid \d+\) )?from", text)
        if match:
            pids = {name: int(pid) for name, pid in re.findall(r"(\w+) \(pid (\d+)\)", match.group(1))}
            return proc, pids, log_path
        assert proc.poll() is None, log_path.read_text()
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"bringup did not start its nodes: {log_path.read_text()}")


def _wait_ready(proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Both nodes constructed (a signal during a child's imports would be an interrupted start)."""
    end = time.monotonic() + 60.0
    while time.monotonic() < end:
        text = log_path.read_text(errors="replace")
        if "[control_node]: ready" in text and "[sim_node]: twin backend" in text:
            return
        assert proc.poll() is None, text
        time.sleep(0.1)
    pytest.fail(f"nodes not ready: {log_path.read_text()}")


def _wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and any(_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def test_bringup_runs_each_node_in_its_own_process_and_stops_cleanly(tmp_path: Path) -> None:
    proc, pids, log_path = _start(tmp_path)
    try:
        assert set(pids) == {"control_node", "sim_node"} and proc.pid not in pids.values()
        assert len(set(pids.values())) == 2
        _wait_ready(proc, log_path)
        assert all(_alive(p) for p in pids.values()), log_path.read_text()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log_path.read_text()
        assert _wait_gone(list(pids.values()), 5.0) == []
        assert "Traceback" not in log_path.read_text() and "killing it" not in log_path.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_a_dead_node_takes_the_graph_down(tmp_path: Path) -> None:
    proc, pids, log_path = _start(tmp_path)
    try:
        _wait_ready(proc, log_path)
        os.kill(pids["sim_node"], signal.SIGKILL)
        code = proc.wait(timeout=30)
        text = log_path.read_text()
        assert code != 0, text
        assert re.search(r"bringup: sim_node exited with status -9; stopping the graph", text), text
        assert _wait_gone([pids["control_node"]], 5.0) == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_no_node_outlives_a_killed_bringup(tmp_path: Path) -> None:
    proc, pids, log_path = _start(tmp_path)
    try:
        _wait_ready(proc, log_path)
        proc.kill()  # SIGKILL: bringup cannot forward anything
        proc.wait(timeout=10)
        assert _wait_gone(list(pids.values()), 15.0) == []
    finally:
        for pid in pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_single_process_bringup_runs_and_stops_cleanly(tmp_path: Path) -> None:
    """``--single-process``: every node in the bringup process on one MultiThreadedExecutor."""
    proc, pids, log_path = _start(tmp_path, "--single-process")
    try:
        assert pids == {}  # no child processes
        assert re.search(r"bringup: control_node, sim_node running in one process", log_path.read_text())
        _wait_ready(proc, log_path)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0, log_path.read_text()
        assert "Traceback" not in log_path.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
