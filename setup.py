"""ament_python / pip build for needle_steering.

The layer folders (perception/, planning/, control/, sim/, nodes/) live at the repository
root, as the product's design card asks, and are installed as ``needle_steering.<layer>``:
no generic top-level module name (``planning``, ``sim``) ever lands in site-packages.
"""

from __future__ import annotations

from glob import glob
from pathlib import Path

from setuptools import find_packages, setup

PACKAGE = "needle_steering"
LAYERS = ("perception", "planning", "control", "sim", "nodes", "benchmarks")
HERE = Path(__file__).resolve().parent


def _layer_packages() -> tuple[list[str], dict[str, str]]:
    packages = [PACKAGE]
    package_dir = {PACKAGE: PACKAGE}
    for layer in LAYERS:
        packages.append(f"{PACKAGE}.{layer}")
        package_dir[f"{PACKAGE}.{layer}"] = layer
        for sub in find_packages(where=layer):
            packages.append(f"{PACKAGE}.{layer}.{sub}")
            package_dir[f"{PACKAGE}.{layer}.{sub}"] = f"{layer}/" + sub.replace(".", "/")
    return packages, package_dir


def _data_files() -> list[tuple[str, list[str]]]:
    share = f"share/{PACKAGE}"
    files = [
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (share, ["package.xml"]),
    ]
    for folder in ("launch", "config", "rviz"):
        found = sorted(p for p in glob(f"{folder}/**/*", recursive=True) if Path(p).is_file())
        by_dir: dict[str, list[str]] = {}
        for path in found:
            by_dir.setdefault(str(Path(share) / Path(path).parent), []).append(path)
        files.extend(sorted(by_dir.items()))
    return files


NODE_EXECUTABLES = {
    "perception_node": "needle_steering.nodes.perception_node:main",
    "planning_node": "needle_steering.nodes.planning_node:main",
    "plan_review_node": "needle_steering.nodes.plan_review_node:main",
    "control_node": "needle_steering.nodes.control_node:main",
    "sim_node": "needle_steering.nodes.sim_node:main",
}


def _console_scripts() -> list[str]:
    scripts = ["needle-steering = needle_steering.cli:main"]
    for name, target in NODE_EXECUTABLES.items():
        module = target.split(":")[0]
        # Only register node executables whose module exists, so a partial tree still installs.
        if (HERE / "nodes" / (module.rsplit(".", 1)[1] + ".py")).exists():
            scripts.append(f"{name} = {target}")
    return scripts


_packages, _package_dir = _layer_packages()

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=_packages,
    package_dir=_package_dir,
    package_data={PACKAGE: ["py.typed", "models/*.pt", "models/*.json", "models/*.md"]},
    data_files=_data_files(),
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="needle_steering team",
    maintainer_email="dev@needle-steering.invalid",
    description="Image-guided needle steering and pedicle-screw planning stack for ROS 2 Jazzy",
    license="Apache-2.0",
    python_requires=">=3.10",
    entry_points={"console_scripts": _console_scripts()},
)
