"""``needle-steering bringup --config config/sim.yaml``: the whole node graph in one process.

The config is an ordinary ROS 2 parameter file (``<node_name>: ros__parameters: {...}``), the
same file the launch files pass to each node. Bringup starts every node named in it (in the
order perception, planning, review, control, sim), spins them on one
``MultiThreadedExecutor`` and shuts all of them down on SIGINT/SIGTERM.

Before anything starts, the file is checked against the interface table: unknown nodes or
parameters and out-of-range values stop bringup with the reason (exit status 2).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
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


def _close_nodes(nodes: Sequence[Node]) -> None:
    """``close()`` (hold the robot, stop threads, close audit logs) then destroy, in reverse start order."""
    for node in reversed(nodes):
        close = getattr(node, "close", None)
        try:
            if callable(close):
                close()
        finally:
            node.destroy_node()


def run_bringup(config_path: str, overrides: Sequence[str] = (), only: Sequence[str] = ()) -> int:
    """Start the node graph of ``config_path`` and spin until SIGINT/SIGTERM. Returns the exit status."""
    import rclpy
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    path = find_config(config_path)
    config = load_config(path, overrides)
    names = _graph_names(path, config, only)
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
            print(
                f"bringup: {', '.join(names)} running from {path} (ROS_DOMAIN_ID={domain})",
                file=sys.stderr,
                flush=True,
            )
            executor.spin()
        except (KeyboardInterrupt, ExternalShutdownException):
            pass
        finally:
            _close_nodes(nodes)
            if rclpy.ok():
                rclpy.shutdown()
    return 0


class Graph:
    """The node graph running inside this process (:func:`start_graph`), on its own rclpy context.

    Each node spins on its own ``SingleThreadedExecutor`` in its own thread (see
    :func:`start_graph` for why); other rclpy nodes of the same process (on another context) talk
    to them over DDS like any other process would. Use as a context manager or call :meth:`shutdown`.
    """

    def __init__(self, names: Sequence[str], config_path: Path, domain_id: int | None) -> None:
        self.names = tuple(names)
        self.config_path = config_path
        self.domain_id = domain_id
        self.nodes: list[Node] = []
        self._context: Any = None
        self._executors: list[Any] = []
        self._threads: list[threading.Thread] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> Graph:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def node(self, name: str) -> Node:
        """The running node called ``name``."""
        for node in self.nodes:
            if node.get_name() == name:
                return node
        raise KeyError(f"node {name!r} is not running; running: {[n.get_name() for n in self.nodes]}")

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop spinning, close and destroy every node, shut the context down (idempotent)."""
        for executor in self._executors:
            executor.shutdown(timeout_sec=timeout_s)
        for thread in self._threads:
            thread.join(timeout=timeout_s)
        self._executors, self._threads = [], []
        try:
            _close_nodes(self.nodes)
        finally:
            self.nodes = []
            if self._context is not None and self._context.ok():
                self._context.shutdown()
            self._context = None
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None


def start_graph(
    config_path: str,
    overrides: Sequence[str] = (),
    only: Sequence[str] = (),
    domain_id: int | None = None,
    log_level: str = "",
) -> Graph:
    """Start the node graph of ``config_path`` in this process, each node spinning in a background thread.

    Same parameter file, overrides and checks as ``needle-steering bringup`` (a bad file raises
    :class:`BringupError` before any node starts); the nodes get their own rclpy context (with
    ``domain_id`` when given, else ``ROS_DOMAIN_ID``), so a client node on another context reaches
    them only through DDS. ``log_level`` (e.g. ``"warn"``) sets the nodes' logger level.

    Every node gets its own ``SingleThreadedExecutor`` (as if each were its own process, minus the
    GIL): with one ``MultiThreadedExecutor`` for the whole graph, a node whose mutually exclusive
    callback group is busy keeps its ready subscriptions in the wait set, the dispatcher spins on
    them, and a 50 Hz timer that takes a good part of its period can starve that node's
    subscriptions (measured: control_node's tracker callbacks delayed > 1 s on 2 loaded cores).

    Returns:
        The running :class:`Graph` (call :meth:`Graph.shutdown`).
    """
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.signals import SignalHandlerOptions

    path = find_config(config_path)
    config = load_config(path, overrides)
    names = _graph_names(path, config, only)
    graph = Graph(names, path, domain_id)
    graph._tmp = tempfile.TemporaryDirectory(prefix="needle_steering_graph_")
    try:
        params_file = _write_params(Path(graph._tmp.name), config, names)
        context = Context()
        args = ["--ros-args", "--params-file", str(params_file)]
        if log_level:
            args += ["--log-level", log_level]
        rclpy.init(
            args=args,
            context=context,
            domain_id=domain_id,
            signal_handler_options=SignalHandlerOptions.NO,  # the caller owns SIGINT (KeyboardInterrupt)
        )
        graph._context = context
        factories = _factories()
        for name in names:
            graph.nodes.append(factories[name](context=context))
        for node in graph.nodes:
            executor = SingleThreadedExecutor(context=context)
            executor.add_node(node)
            thread = threading.Thread(
                target=_spin_quietly, args=(executor,), name=f"graph-{node.get_name()}", daemon=True
            )
            graph._executors.append(executor)
            graph._threads.append(thread)
            thread.start()
    except BaseException:
        graph.shutdown()
        raise
    return graph


def _spin_quietly(executor: Any) -> None:
    from rclpy.executors import ExternalShutdownException

    with contextlib.suppress(ExternalShutdownException):
        executor.spin()


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


def _handler(args: argparse.Namespace) -> int:
    try:
        return run_bringup(args.config, args.set, args.only)
    except BringupError as exc:
        print(f"bringup: error: {exc}", file=sys.stderr)
        return EXIT_CONFIG


def add_bringup_subcommand(subparsers: Any) -> None:
    """Register ``bringup`` on the ``needle-steering`` subparsers (``handler`` default set)."""
    p = subparsers.add_parser("bringup", help="start the ROS 2 node graph in one process")
    _add_arguments(p)
    p.set_defaults(handler=_handler)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m needle_steering.nodes.bringup --config config/sim.yaml``."""
    parser = argparse.ArgumentParser(prog="needle-steering bringup", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    return _handler(parser.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
