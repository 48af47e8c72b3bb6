"""Static checks of launch files and the RViz config (``ast`` only: ``launch`` is not installed here).

For every ``Node(...)`` of our package: the executable is a console script in setup.py whose
module exists, the node name equals the executable, every parameter file exists and its section
for that node only holds parameters the node declares, and every remapped topic is in the node's
interface table.
"""

from __future__ import annotations

import ast
import contextlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from needle_steering.nodes.bringup import load_config
from needle_steering.nodes.interfaces import NODES, REVIEW_NS, remappable_topics

REPO = Path(__file__).resolve().parents[2]
LAUNCH_FILES = sorted((REPO / "launch").glob("*.launch.py"))


def _setup_executables() -> dict[str, str]:
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "NODE_EXECUTABLES" for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            assert isinstance(value, dict)
            return value
    raise AssertionError("setup.py has no NODE_EXECUTABLES")


def _constants(tree: ast.Module) -> dict[str, Any]:
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            with contextlib.suppress(ValueError):
                out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


def _value(node: ast.AST, constants: dict[str, Any]) -> Any:
    if isinstance(node, ast.Name) and node.id in constants:
        return constants[node.id]
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def _node_calls(path: Path) -> list[dict[str, Any]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    constants = _constants(tree)
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Node":
            kw = {k.arg: k.value for k in node.keywords}
            params = []
            for item in getattr(kw.get("parameters"), "elts", []):
                assert isinstance(item, ast.Call) and getattr(item.func, "id", "") == "_config", ast.dump(item)
                params.append(_value(item.args[0], constants))
            remaps = [_value(t.elts[0], constants) for t in getattr(kw.get("remappings"), "elts", [])]
            calls.append(
                {
                    "package": _value(kw["package"], constants),
                    "executable": _value(kw["executable"], constants),
                    "name": _value(kw.get("name", kw["executable"]), constants),
                    "parameters": params,
                    "remappings": remaps,
                }
            )
    names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    assert "generate_launch_description" in names, f"{path.name} lacks generate_launch_description()"
    return calls


def test_nodes_launch_static_files_exist() -> None:
    assert {p.name for p in LAUNCH_FILES} >= {"sim.launch.py", "robot.launch.py", "plan_review.launch.py"}


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_nodes_launch_static_nodes_parameters_and_remappings(path: Path) -> None:
    executables = _setup_executables()
    calls = _node_calls(path)
    assert calls, f"{path.name} starts no node"
    for call in calls:
        if call["package"] != "needle_steering":
            continue
        exe = call["executable"]
        assert exe in executables, f"{path.name}: {exe} is not a console script in setup.py"
        assert (REPO / "nodes" / f"{exe}.py").is_file(), f"{path.name}: module for {exe} missing"
        assert call["name"] == exe, f"{path.name}: node name {call['name']} != executable {exe}"
        for param_file in call["parameters"]:
            file = REPO / "config" / param_file
            assert file.is_file(), f"{path.name}: parameter file {file} missing"
            section = (yaml.safe_load(file.read_text()) or {}).get(exe, {}).get("ros__parameters", {})
            declared = {p.name for p in NODES[exe].params}
            assert set(section) <= declared, f"{file.name}: {exe} does not declare {sorted(set(section) - declared)}"
            load_config(file)  # values in range too
        for topic in call["remappings"]:
            assert topic in remappable_topics(exe), f"{path.name}: {exe} has no topic {topic!r} to remap"


def test_nodes_launch_static_sim_and_robot_graphs() -> None:
    sim = {c["executable"] for c in _node_calls(REPO / "launch" / "sim.launch.py")}
    robot = {c["executable"] for c in _node_calls(REPO / "launch" / "robot.launch.py")}
    assert sim == set(NODES)
    assert robot == set(NODES) - {"sim_node"}
    control = next(c for c in _node_calls(REPO / "launch" / "robot.launch.py") if c["executable"] == "control_node")
    robot_topics = {t.name for t in NODES["control_node"].topics if t.name.startswith("/needle_robot/")}
    assert robot_topics <= set(control["remappings"])  # every driver topic can be re-pointed


def test_nodes_launch_static_rviz_config() -> None:
    text = (REPO / "launch" / "plan_review.launch.py").read_text()
    assert '"rviz", "plan_review.rviz"' in text
    config = yaml.safe_load((REPO / "rviz" / "plan_review.rviz").read_text())
    manager = config["Visualization Manager"]
    assert manager["Global Options"]["Fixed Frame"] == "patient"
    published = {t.name: t for iface in NODES.values() for t in iface.topics if t.direction == "pub"}
    displays = manager["Displays"]
    for display in displays:
        topic = display.get("Topic", {}).get("Value")
        if topic:
            assert topic in published, f"RViz shows {topic}, which no node publishes"
            latched = published[topic].qos in ("latched", "status")
            assert (display["Topic"]["Durability Policy"] == "Transient Local") == latched, topic
    namespaces = [d["Interactive Markers Namespace"] for d in displays if d["Class"].endswith("InteractiveMarkers")]
    assert namespaces == [REVIEW_NS]
