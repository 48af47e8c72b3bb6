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
import os
import sys
import tempfile
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


def run_bringup(config_path: str, overrides: Sequence[str] = (), only: Sequence[str] = ()) -> int:
    """Start the node graph of ``config_path`` and spin until SIGINT/SIGTERM. Returns the exit status."""
    import rclpy
    from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor

    path = find_config(config_path)
    config = load_config(path, overrides)
    names = [n for n in NODE_ORDER if n in config and (not only or n in only)]
    if not names:
        raise BringupError(f"{path}: no nodes to start (file names {list(config)}, --only {list(only)})")
    with tempfile.TemporaryDirectory(prefix="needle_steering_bringup_") as tmp:
        params_file = Path(tmp) / "params.yaml"
        params_file.write_text(yaml.safe_dump({n: {"ros__parameters": config[n]} for n in names}))
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
            for node in reversed(nodes):
                close = getattr(node, "close", None)
                try:
                    if callable(close):
                        close()
                finally:
                    node.destroy_node()
            if rclpy.ok():
                rclpy.shutdown()
    return 0


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
