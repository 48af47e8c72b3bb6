"""``needle-steering bringup --config config/sim.yaml``: the whole node graph without ``ros2 launch``.

The config is an ordinary ROS 2 parameter file (``<node_name>: ros__parameters: {...}``), the
same file the launch files pass to each node. Bringup starts every node named in it (in the
order perception, planning, review, control, sim), each in its own process as the launch files
do, and shuts all of them down on SIGINT/SIGTERM or when any one of them exits.
``--single-process`` runs them all in the bringup process on one ``MultiThreadedExecutor``;
:func:`start_graph_process` starts bringup as a child process (the demo).

Before anything starts, the file is checked against the interface table: unknown nodes or
parameters and out-of-range values stop bringup with the reason (exit status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from needle_steering.nodes.interfaces import NODES, check_values

if TYPE_CHECKING:
    from rclpy.node import Node

#: Start order (the producer of latched data first).
NODE_ORDER = ("perception_node", "planning_node", "plan_review_node", "control_node", "sim_node")
EXIT_CONFIG = 2
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class BringupError(ValueError):
    """The parameter file cannot be used (the message names the node, parameter and value)."""


def find_config(path: str) -> Path:
    """Resolve ``path`` as given, relative to the repository, or in the installed share folder."""
    candidates = [Path(path).expanduser()]
    if not Path(path).is_absolute():
        here = Path(__file__).resolve().parent
        candidates += [
            here.parent / path,
            here.parent.parent / path,
            Path(sys.prefix) / "share" / "needle_steering" / path,
        ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise BringupError(f"config {path!r} not found (looked in {[str(c) for c in candidates]})")


def load_config(path: Path, overrides: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """Read and validate a parameter file; apply ``NODE.PARAM=VALUE`` overrides (YAML values).

    Returns:
        ``{node_name: {param: value}}``.

    Raises:
        BringupError: unreadable YAML, unknown nodes/parameters, invalid values.
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise BringupError(f"{path}: cannot read parameter file ({exc})") from None
    if not isinstance(raw, dict):
        raise BringupError(f"{path}: expected a mapping of node names")
    config: dict[str, dict[str, Any]] = {}
    for node_name, section in raw.items():
        if node_name not in NODES:
            raise BringupError(f"{path}: unknown node {node_name!r}; known: {list(NODES)}")
        if not isinstance(section, dict) or not isinstance(section.get("ros__parameters", {}), dict):
            raise BringupError(f"{path}: {node_name} needs a 'ros__parameters' mapping")
        config[node_name] = dict(section.get("ros__parameters") or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        node_name, dot, param = key.partition(".")
        if not sep or not dot:
            raise BringupError(f"override {item!r}: expected NODE.PARAM=VALUE")
        if node_name not in NODES:
            raise BringupError(f"override {item!r}: unknown node {node_name!r}")
        try:
            parsed = yaml.safe_load(value) if value else ""
        except yaml.YAMLError:
            parsed = value  # not YAML: keep the text (a string parameter, checked below)
        config.setdefault(node_name, {})[param] = parsed
    for node_name, params in config.items():
        iface = NODES[node_name]
        declared = {p.name for p in iface.params}
        unknown = sorted(set(params) - declared)
        if unknown:
            raise BringupError(f"{path}: {node_name} declares no parameters {unknown}; declared: {sorted(declared)}")
        for name, value in params.items():
            if iface.param(name).type == "double" and isinstance(value, int) and not isinstance(value, bool):
                params[name] = float(value)
        reason = check_values(iface, params)
        if reason:
            raise BringupError(f"{path}: {node_name}: {reason}")
    return config


def _factories() -> dict[str, Callable[..., Node]]:
    from needle_steering.nodes.control_node import ControlNode
    from needle_steering.nodes.perception_node import PerceptionNode
    from needle_steering.nodes.plan_review_node import PlanReviewNode
    from needle_steering.nodes.planning_node import PlanningNode
    from needle_steering.nodes.sim_node import SimNode

    return {
        "perception_node": PerceptionNode,
        "planning_node": PlanningNode,
        "plan_review_node": PlanReviewNode,
        "control_node": ControlNode,
        "sim_node": SimNode,
    }


def _graph_names(path: Path, config: dict[str, dict[str, Any]], only: Sequence[str]) -> list[str]:
    names = [n for n in NODE_ORDER if n in config and (not only or n in only)]
    if not names:
        raise BringupError(f"{path}: no nodes to start (file names {list(config)}, --only {list(only)})")
    return names


def _write_params(folder: Path, config: dict[str, dict[str, Any]], names: Sequence[str]) -> Path:
    params_file = folder / "params.yaml"
    params_file.write_text(yaml.safe_dump({n: {"ros__parameters": config[n]} for n in names}))
    return params_file


def run_bringup(
    config_path: str, overrides: Sequence[str] = (), only: Sequence[str] = (), single_process: bool = False
) -> int:
    """Start the node graph of ``config_path``, one process per node, until SIGINT/SIGTERM.

    Like ``ros2 launch``: every node runs its own console-script entry point in its own process
    (``python -m needle_steering.nodes.<name> --ros-args --params-file ...``), so a busy node cannot
    starve another through the GIL and a crash stays in its process. When any node exits on its
    own, the rest are stopped too: a control stack with a missing node must not keep running.

    ``single_process=True`` runs every node in this process on one ``MultiThreadedExecutor``
    instead (fewer processes, shared GIL: a busy node delays the others' callbacks).

    Returns:
        0 when stopped by a signal and every node shut down cleanly; otherwise the first non-zero
        exit status of a node (or 1 when a node had to be killed).
    """
    path = find_config(config_path)
    config = load_config(path, overrides)
    names = _graph_names(path, config, only)
    if single_process:
        return _run_in_this_process(path, config, names)
    stop = threading.Event()

    def _request_stop(signum: int, frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, _request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    procs: dict[str, subprocess.Popen[bytes]] = {}
    status = 0
    with tempfile.TemporaryDirectory(prefix="needle_steering_bringup_") as tmp:
        params_file = _write_params(Path(tmp), config, names)
        try:
            for name in names:
                procs[name] = subprocess.Popen(
                    [sys.executable, "-m", f"needle_steering.nodes.{name}", "--ros-args", "--params-file",
                     str(params_file)],
                    process_group=0,  # the terminal's Ctrl-C reaches bringup only; bringup forwards it once
                    preexec_fn=_die_with_parent,  # noqa: PLW1509 (bringup runs no threads)
                )  # fmt: skip
            domain = os.environ.get("ROS_DOMAIN_ID", "0")
            pids = ", ".join(f"{n} (pid {p.pid})" for n, p in procs.items())
            print(f"bringup: {pids} running from {path} (ROS_DOMAIN_ID={domain})", file=sys.stderr, flush=True)
            while not stop.wait(0.2):
                exited = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
                if exited:
                    name, code = next(iter(exited.items()))
                    print(f"bringup: {name} exited with status {code}; stopping the graph", file=sys.stderr,
                          flush=True)  # fmt: skip
                    status = code or 1
                    break
        finally:
            status = _stop_processes(procs) or status
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return status


def _run_in_this_process(path: Path, config: dict[str, dict[str, Any]], names: Sequence[str]) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    with tempfile.TemporaryDirectory(prefix="needle_steering_bringup_") as tmp:
        params_file = _write_params(Path(tmp), config, names)
        rclpy.init(args=["--ros-args", "--params-file", str(params_file)])
        nodes: list[Node] = []
        try:
            factories = _factories()
            for name in names:
                nodes.append(factories[name]())
            executor = MultiThreadedExecutor(num_threads=4)
            for node in nodes:
                executor.add_node(node)
            domain = os.environ.get("ROS_DOMAIN_ID", "0")
            print(f"bringup: {', '.join(names)} running in one process (pid {os.getpid()}) from {path} "
                  f"(ROS_DOMAIN_ID={domain})", file=sys.stderr, flush=True)  # fmt: skip
            executor.spin()
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        finally:
            for node in reversed(nodes):  # close() holds the robot, stops threads, closes audit logs
                try:
                    close = getattr(node, "close", None)
                    if callable(close):
                        close()
                finally:
                    node.destroy_node()
            if rclpy.ok():
                rclpy.shutdown()
    return 0


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM if bringup dies, so no node outlives its supervisor."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _stop_processes(procs: dict[str, subprocess.Popen[bytes]], timeout_s: float = 15.0) -> int:
    """SIGINT every running node (reverse start order), wait, SIGKILL stragglers. Returns 0 if all exited cleanly."""
    status = 0
    for proc in reversed(list(procs.values())):
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    for name, proc in reversed(list(procs.items())):
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            print(f"bringup: {name} did not stop within {timeout_s} s; its threads, then killing it", file=sys.stderr,
                  flush=True)  # fmt: skip
            proc.send_signal(signal.SIGUSR1)  # faulthandler in run_node prints every thread's stack
            time.sleep(1.0)
            proc.kill()
            code = proc.wait()
            status = status or 1
        if code not in (0, -signal.SIGINT):
            status = status or (code if code > 0 else 1)
    return status


class GraphProcess:
    """``needle-steering bringup`` running in a child process (:func:`start_graph_process`).

    Use as a context manager or call :meth:`shutdown`; :attr:`log_path` holds the nodes' output.
    """

    def __init__(self, proc: subprocess.Popen[bytes], names: Sequence[str], log_path: Path) -> None:
        self.proc = proc
        self.names = tuple(names)
        self.log_path = log_path

    def __enter__(self) -> GraphProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def problem(self) -> str | None:
        """Why the graph is not running (its exit status and the end of its log), or ``None``."""
        code = self.proc.poll()
        if code is None:
            return None
        tail = self.log_path.read_text(encoding="utf-8", errors="replace")[-2000:]
        return f"the node graph exited with status {code}; end of {self.log_path}:\n{tail}"

    def shutdown(self, timeout_s: float = 30.0) -> int:
        """SIGINT bringup (it stops every node), wait, kill the process group if it hangs. Returns its status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5.0)
        return int(self.proc.returncode)


def start_graph_process(
    config_path: str,
    overrides: Sequence[str],
    log_path: Path,
    domain_id: int | None = None,
    only: Sequence[str] = (),
) -> GraphProcess:
    """Check the parameter file and start ``needle-steering bringup`` on it in a child process.

    A bad file raises :class:`BringupError` here, before anything starts. The child gets its own
    session (so shutting it down never signals the caller) and ``ROS_DOMAIN_ID=domain_id`` when
    given; its output (every node's log) goes to ``log_path``. ``only`` limits the nodes (``--only``).
    """
    path = find_config(config_path)
    names = _graph_names(path, load_config(path, overrides), only)
    env = os.environ.copy()
    if domain_id is not None:
        env["ROS_DOMAIN_ID"] = str(domain_id)
    args = [sys.executable, "-m", "needle_steering.nodes.bringup", "--config", str(path)]
    for item in overrides:
        args += ["--set", item]
    for name in only:
        args += ["--only", name]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return GraphProcess(proc, names, log_path)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="config/sim.yaml", help="ROS 2 parameter file (default config/sim.yaml)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NODE.PARAM=VALUE",
        help="override one parameter (repeatable), e.g. control_node.insertion_speed_mm_s=10",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="NODE",
        choices=NODE_ORDER,
        help="start only these nodes (repeatable)",
    )
    parser.add_argument(
        "--single-process",
        action="store_true",
        help="run every node in this process on one MultiThreadedExecutor (default: one process per node)",
    )


def _handler(args: argparse.Namespace) -> int:
    try:
        return run_bringup(args.config, args.set, args.only, args.single_process)
    except BringupError as exc:
        print(f"bringup: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def add_bringup_subcommand(subparsers: Any) -> None:
    """Register ``bringup`` on the ``needle-steering`` subparsers (``handler`` default set)."""
    p = subparsers.add_parser("bringup", help="start the ROS 2 node graph, one process per node (no launch needed)")
    _add_arguments(p)
    p.set_defaults(handler=_handler)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m needle_steering.nodes.bringup --config config/sim.yaml``."""
    parser = argparse.ArgumentParser(prog="needle-steering bringup", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    return _handler(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
