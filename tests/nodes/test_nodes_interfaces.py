"""The interface table is the single truth: docs, parameter files and the live nodes must match it."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("ROS_DOMAIN_ID", str(random.SystemRandom().randint(1, 100)))
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"

import rclpy
from rclpy.parameter import Parameter

from needle_steering.nodes.bringup import BringupError, load_config
from needle_steering.nodes.interfaces import NODES, render_markdown

REPO = Path(__file__).resolve().parents[2]


def test_nodes_interfaces_document_is_generated_from_the_table() -> None:
    text = (REPO / "docs" / "interfaces.md").read_text(encoding="utf-8")
    assert text == render_markdown(), (
        "docs/interfaces.md is out of date: python -m needle_steering.nodes.interfaces > docs/interfaces.md"
    )


@pytest.mark.parametrize("name, nodes", [("sim.yaml", set(NODES)), ("robot.yaml", set(NODES) - {"sim_node"})])
def test_nodes_interfaces_parameter_files_are_valid(name: str, nodes: set[str]) -> None:
    config = load_config(REPO / "config" / name)
    assert set(config) == nodes
    assert config["plan_review_node"]["audit_log"].endswith(".jsonl")


@pytest.mark.parametrize(
    "override, match",
    [
        ("control_node.insertion_speed_mm_s=80", "above the maximum 50"),
        ("control_node.sensor_timeout_s=0", "below the minimum"),
        ("control_node.no_such=1", "declares no parameters"),
        ("nobody.x=1", "unknown node"),
        ("planning_node.options_json={bad", "not valid JSON"),
        ("planning_node.levels=L5-L1", "caudal to cranial"),
        ("perception_node.modality=mri", "not one of"),
        ("sim_node.robot_base_in_patient_mm=[1, 2]", "expected 3 numbers"),
    ],
)
def test_nodes_interfaces_bad_parameters_are_refused_with_reasons(override: str, match: str) -> None:
    with pytest.raises(BringupError, match=match):
        load_config(REPO / "config" / "sim.yaml", [override])


@pytest.fixture(scope="module")
def ros() -> Iterator[None]:
    rclpy.init()
    try:
        yield
    finally:
        rclpy.shutdown()


def _make(name: str, tmp_path: Path) -> rclpy.node.Node:
    from needle_steering.nodes import bringup

    overrides = []
    if any(p.name == "audit_log" for p in NODES[name].params):
        overrides.append(Parameter("audit_log", value=str(tmp_path / f"{name}.jsonl")))
    return bringup._factories()[name](parameter_overrides=overrides)


@pytest.mark.parametrize("name", list(NODES))
def test_nodes_interfaces_live_nodes_match_the_table(ros: None, name: str, tmp_path: Path) -> None:
    node = _make(name, tmp_path)
    try:
        iface = NODES[name]
        static_pubs = {t.name for t in iface.topics if t.direction == "pub" and "{" not in t.name}
        subs = {t.name for t in iface.topics if t.direction == "sub"}
        created_pubs = {p.topic_name for p in node.publishers} - {"/rosout", "/parameter_events"}
        assert created_pubs == static_pubs
        assert {s.topic_name for s in node.subscriptions} - {"/parameter_events"} == subs
        services = {s.srv_name for s in node.services if f"{name}/" not in s.srv_name}
        assert services == {s.name for s in iface.services}
        assert node.get_name() == name
        for p in iface.params:
            descriptor = node.describe_parameter(p.name)
            assert descriptor.description == p.description
            if p.type == "double" and p.max_value is not None:
                assert descriptor.floating_point_range[0].to_value == p.max_value
            if p.type == "integer" and p.max_value is not None:
                assert descriptor.integer_range[0].to_value == p.max_value
        numeric = next((p for p in iface.params if p.type == "double" and p.max_value is not None), None)
        if numeric is not None:
            too_big = float(numeric.max_value or 0.0) * 10 + 1
            result = node.set_parameters([Parameter(numeric.name, value=too_big)])[0]
            assert not result.successful and numeric.name in result.reason
    finally:
        close = getattr(node, "close", None)
        if callable(close):
            close()
        node.destroy_node()
