"""The installed package: import paths, console scripts, command-line behaviour."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAYERS = ("perception", "planning", "control", "sim", "nodes")


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_install_under_the_package_namespace(layer: str) -> None:
    module = importlib.import_module(f"needle_steering.{layer}")
    assert module.__file__ is not None
    assert Path(module.__file__).resolve().parent == REPO / layer


@pytest.mark.parametrize("generic", [*LAYERS, "benchmarks"])
def test_no_generic_top_level_module_is_importable(generic: str) -> None:
    # The tests run from the repository root with importlib import mode, so the source folders
    # are not on sys.path: a generic name must not resolve from site-packages either.
    spec = importlib.util.find_spec(generic)
    assert spec is None or (spec.origin or "").startswith(str(REPO)), spec


def test_wheel_contents_use_the_package_namespace(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path),
         str(REPO)],
        check=True, capture_output=True, text=True,
    )
    wheel = next(tmp_path.glob("needle_steering-*.whl"))
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"needle_steering"}, top
    assert "needle_steering/perception/io.py" in names
    data = {n for n in names if ".data/data/" in n}
    assert any(n.endswith("share/ament_index/resource_index/packages/needle_steering") for n in data)
    assert any(n.endswith("share/needle_steering/package.xml") for n in data)


def test_package_xml_declares_run_dependencies() -> None:
    root = ET.parse(REPO / "package.xml").getroot()
    assert root.get("format") == "3"
    deps = {e.text for e in root.iter("exec_depend")}
    for needed in ("rclpy", "std_msgs", "geometry_msgs", "sensor_msgs", "visualization_msgs", "nav_msgs",
                   "std_srvs", "python3-numpy"):
        assert needed in deps
    assert root.findtext("export/build_type") == "ament_python"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).parent / "needle-steering"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300, check=False)


def test_cli_info_json_on_real_dicom(shared_data: Path) -> None:
    result = _cli("info", str(shared_data / "dicom_ct_1mm" / "series"), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert {"size", "spacing", "origin", "direction", "orientation", "min", "max"} <= set(info)
    assert info["size"] == [512, 512, 20] and info["orientation"] == "LPS"


def test_cli_errors_are_one_line_without_traceback(tmp_path: Path) -> None:
    broken = tmp_path / "broken.nii.gz"
    broken.write_text("not an image")
    result = _cli("info", str(broken))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "broken.nii.gz" in result.stderr and "not a readable image" in result.stderr


def test_cli_bench_rejects_unknown_names() -> None:
    result = _cli("bench", "--only", "no_such_benchmark", "--json")
    assert result.returncode == 2 and "unknown benchmark" in result.stderr
