"""Simulation regression: steerable-needle scenarios, injected faults and pedicle screws in the twin.

A **suite** (YAML, ``config/regress_default.yaml`` / ``config/regress_nightly.yaml`` or any path)
lists

* ``scenarios``: how many randomised nominal steering scenarios to run, drawn by the control
  layer's :func:`~needle_steering.control.closed_loop.random_scenario` with the ``generator``
  settings (sensor noise, curvature mismatch, obstacles, depths);
* ``twin``: the twin-side settings (:class:`~needle_steering.sim.twin.episode.TwinEpisodeConfig`:
  registration error of the robot, tremor, standoff);
* ``faults``: fault scenarios, each injected into ``repeats`` random base scenarios, with the
  stop reasons that count as the expected safe stop;
* ``screws``: phantom patients whose reference pedicle screws are executed by the arm under
  registration error, graded Gertzbein-Robbins;
* ``thresholds``: the pass criteria. A failed threshold makes the command exit 1.

Every scenario runs in its own :class:`~needle_steering.sim.twin.twin.Twin` (PyBullet DIRECT),
locally in a ``ProcessPoolExecutor`` (spawn context) or on a Ray cluster (``--ray ADDRESS``; the
``ray`` package is imported only then). Results do not depend on the number of workers: each
scenario's randomness comes from ``SeedSequence([seed, stream, index])``.

Per-scenario pass rules: a nominal scenario passes when it reaches the target or aborts with an
explicit reason, without collision; a fault scenario passes when it ends in a safe stop: status
``aborted`` with one of the expected reason codes, no collision, and at most
``max_travel_after_stop_mm`` of tip travel after the stop.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from needle_steering.errors import SimulationError

SUITE_NAMES: tuple[str, ...] = ("default", "nightly")
EXIT_OK = 0
EXIT_THRESHOLD_FAILED = 1
#: Fault kinds of the control layer plus the twin's own ``registration_error``.
TWIN_FAULT_KINDS: tuple[str, ...] = ("registration_error",)

#: Known thresholds: name -> (comparison, what is compared).
THRESHOLDS: dict[str, tuple[str, str]] = {
    "min_reach_fraction": (">=", "reached / nominal scenarios"),
    "max_median_target_error_mm": ("<=", "median true target error of the reached nominal scenarios (mm)"),
    "max_p95_target_error_mm": ("<=", "95th percentile true target error of the reached nominal scenarios (mm)"),
    "max_collisions": ("<=", "scenarios with a collision (analytic tip check or twin needle contact)"),
    "max_unexplained_failures": ("<=", "nominal scenarios ending 'failed' (not reached, not a safe abort)"),
    "min_fault_safe_stop_fraction": (">=", "fault scenarios ending in the expected safe stop"),
    "max_travel_after_stop_mm": ("<=", "largest tip travel after a stop, all scenarios (mm)"),
    "min_realtime_factor": (">=", "simulated seconds / wall seconds of the twin episodes"),
    "min_screw_grade_ab_fraction": (">=", "screws graded Gertzbein-Robbins A or B / planned screws"),
    "max_screw_mean_tip_deviation_mm": ("<=", "mean screw tip deviation (mm)"),
}


# ----------------------------------------------------------------------------------------------
# suite files
# ----------------------------------------------------------------------------------------------
def suite_path(suite: str) -> Path:
    """Path of a suite: ``"default"``/``"nightly"`` (shipped in ``config/``) or a YAML file path.

    Raises:
        SimulationError: Unknown name or missing file (the message lists where it looked).
    """
    if suite in SUITE_NAMES:
        name = f"regress_{suite}.yaml"
        here = Path(__file__).resolve()
        candidates = [
            here.parents[1] / "config" / name,  # source tree / editable install
            Path(sys.prefix) / "share" / "needle_steering" / "config" / name,  # data_files install
        ]
        for path in candidates:
            if path.is_file():
                return path
        raise SimulationError(f"suite {suite!r}: {name} not found in {[str(c) for c in candidates]}")
    path = Path(suite)
    if not path.is_file():
        raise SimulationError(f"suite {suite!r} is neither {list(SUITE_NAMES)} nor an existing YAML file")
    return path


@dataclass(frozen=True)
class FaultSpec:
    """One fault scenario template of a suite (see ``config/regress_default.yaml``)."""

    name: str
    kind: str
    expect: tuple[str, ...]
    start_fraction: float = 0.4
    duration_s: float = math.inf
    magnitude: float = 0.0
    direction: tuple[float, float, float] | None = None
    ramp_s: float = 0.2
    translation_mm: float = 0.0
    rotation_deg: float = 0.0


@dataclass(frozen=True)
class ScrewSuiteSpec:
    """Screw execution part of a suite."""

    cases: tuple[dict[str, Any], ...] = ()
    repeats: int = 1
    execution: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SuiteSpec:
    """A validated regression suite."""

    name: str
    description: str
    scenarios: int
    generator: dict[str, Any]
    twin: dict[str, Any]
    faults: tuple[FaultSpec, ...]
    fault_repeats: int
    screws: ScrewSuiteSpec | None
    thresholds: dict[str, float]
    source: str = ""


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SimulationError(f"{where}: expected a mapping, got {value!r}")
    return dict(value)


def _check_keys(data: dict[str, Any], allowed: Sequence[str], where: str) -> None:
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise SimulationError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}")


def _number(value: Any, where: str, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SimulationError(f"{where}: expected a number, got {value!r}")
    out = float(value)
    if math.isnan(out) or (minimum is not None and out < minimum):
        raise SimulationError(f"{where}: expected a number >= {minimum}, got {value!r}")
    return out


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SimulationError(f"{where}: expected a non-negative integer, got {value!r}")
    return int(value)


def _generator_keys() -> list[str]:
    from needle_steering.control.closed_loop import random_scenario

    params = inspect.signature(random_scenario).parameters
    return [n for n, p in params.items() if p.kind == inspect.Parameter.KEYWORD_ONLY and n != "faults"]


def _twin_keys() -> list[str]:
    from needle_steering.sim.twin.episode import TwinEpisodeConfig

    return [f.name for f in fields(TwinEpisodeConfig)]


def _fault_spec(raw: Any, where: str) -> FaultSpec:
    from needle_steering.control.closed_loop import FAULT_KINDS

    data = _mapping(raw, where)
    allowed = [f.name for f in fields(FaultSpec)]
    _check_keys(data, allowed, where)
    for key in ("name", "kind", "expect"):
        if key not in data:
            raise SimulationError(f"{where}: missing {key!r}")
    kind = data["kind"]
    kinds = (*FAULT_KINDS, *TWIN_FAULT_KINDS)
    if kind not in kinds:
        raise SimulationError(f"{where}.kind: {kind!r} is not one of {list(kinds)}")
    expect = data["expect"]
    if isinstance(expect, str):
        expect = [expect]
    if not isinstance(expect, list) or not expect or not all(isinstance(e, str) and e for e in expect):
        raise SimulationError(f"{where}.expect: expected a non-empty list of reason codes, got {data['expect']!r}")
    direction = data.get("direction")
    if direction is not None:
        if not isinstance(direction, list) or len(direction) != 3:
            raise SimulationError(f"{where}.direction: expected [x, y, z], got {direction!r}")
        direction = tuple(_number(v, f"{where}.direction") for v in direction)
        if not any(direction):
            raise SimulationError(f"{where}.direction must not be zero")
    duration = data.get("duration_s", math.inf)
    frac = _number(data.get("start_fraction", 0.4), f"{where}.start_fraction", 0.0)
    if frac >= 1.0:
        raise SimulationError(f"{where}.start_fraction must be < 1, got {frac!r}")
    return FaultSpec(
        name=str(data["name"]),
        kind=str(kind),
        expect=tuple(expect),
        start_fraction=frac,
        duration_s=math.inf if duration in (None, "inf") else _number(duration, f"{where}.duration_s", 0.0),
        magnitude=_number(data.get("magnitude", 0.0), f"{where}.magnitude"),
        direction=direction,
        ramp_s=_number(data.get("ramp_s", 0.2), f"{where}.ramp_s", 1e-6),
        translation_mm=_number(data.get("translation_mm", 0.0), f"{where}.translation_mm", 0.0),
        rotation_deg=_number(data.get("rotation_deg", 0.0), f"{where}.rotation_deg", 0.0),
    )


def load_suite(suite: str) -> SuiteSpec:
    """Read and validate a suite (name or path); raise :class:`SimulationError` naming the bad key."""
    import yaml

    path = suite_path(suite)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SimulationError(f"{path}: cannot read suite ({exc})") from None
    where = str(path)
    data = _mapping(data, where)
    _check_keys(data, ["name", "description", "scenarios", "generator", "twin", "faults", "screws", "thresholds"],
                where)
    generator = _mapping(data.get("generator"), f"{where}: generator")
    _check_keys(generator, _generator_keys(), f"{where}: generator")
    for key, value in generator.items():
        if isinstance(value, list):
            generator[key] = tuple(value)
    twin = _mapping(data.get("twin"), f"{where}: twin")
    _check_keys(twin, _twin_keys(), f"{where}: twin")
    for key, value in twin.items():
        if isinstance(value, list):
            twin[key] = tuple(value)
    faults_raw = _mapping(data.get("faults"), f"{where}: faults")
    _check_keys(faults_raw, ["repeats", "list"], f"{where}: faults")
    fault_list = faults_raw.get("list") or []
    if not isinstance(fault_list, list):
        raise SimulationError(f"{where}: faults.list must be a list, got {fault_list!r}")
    faults = tuple(_fault_spec(f, f"{where}: faults.list[{i}]") for i, f in enumerate(fault_list))
    names = [f.name for f in faults]
    if len(set(names)) != len(names):
        raise SimulationError(f"{where}: fault names must be unique, got {names}")
    screws: ScrewSuiteSpec | None = None
    screws_raw = _mapping(data.get("screws"), f"{where}: screws")
    if screws_raw and screws_raw.get("enabled", True):
        _check_keys(screws_raw, ["enabled", "cases", "repeats", "execution"], f"{where}: screws")
        cases = screws_raw.get("cases") or []
        if not isinstance(cases, list) or not all(isinstance(c, dict) for c in cases):
            raise SimulationError(f"{where}: screws.cases must be a list of mappings, got {cases!r}")
        for i, case in enumerate(cases):
            case_keys = ["phantom_seed", "levels", "spacing_mm", "planner", "phantom_options"]
            _check_keys(case, case_keys, f"{where}: screws.cases[{i}]")
            if case.get("planner", "reference") not in ("reference", "pedicle"):
                raise SimulationError(f"{where}: screws.cases[{i}].planner must be 'reference' or 'pedicle', "
                                      f"got {case.get('planner')!r}")
            _mapping(case.get("phantom_options"), f"{where}: screws.cases[{i}].phantom_options")
        execution = _mapping(screws_raw.get("execution"), f"{where}: screws.execution")
        from needle_steering.sim.twin.screws import ScrewExecutionConfig

        _check_keys(execution, [f.name for f in fields(ScrewExecutionConfig)], f"{where}: screws.execution")
        screws = ScrewSuiteSpec(tuple(cases), max(1, _count(screws_raw.get("repeats", 1), f"{where}: screws.repeats")),
                                execution)
    thresholds_raw = _mapping(data.get("thresholds"), f"{where}: thresholds")
    _check_keys(thresholds_raw, list(THRESHOLDS), f"{where}: thresholds")
    thresholds = {k: _number(v, f"{where}: thresholds.{k}") for k, v in thresholds_raw.items()}
    return SuiteSpec(
        name=str(data.get("name", path.stem)),
        description=str(data.get("description", "")),
        scenarios=_count(data.get("scenarios", 0), f"{where}: scenarios"),
        generator=generator,
        twin=twin,
        faults=faults,
        fault_repeats=_count(faults_raw.get("repeats", 1), f"{where}: faults.repeats"),
        screws=screws,
        thresholds=thresholds,
        source=str(path),
    )


# ----------------------------------------------------------------------------------------------
# tasks (run in worker processes: plain dicts in, plain dicts out)
# ----------------------------------------------------------------------------------------------
def _derived_seed(seed: int, stream: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), stream, index]).generate_state(1, dtype=np.uint32)[0])


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float | np.floating):
        v = float(value)
        return v if math.isfinite(v) else None
    return value


def _reason_code(reason: str) -> str:
    return reason.split(":", 1)[0].strip()


def _build_fault(spec: dict[str, Any], scenario: Any, rng: np.random.Generator) -> Any:
    from needle_steering.control.closed_loop import Fault

    start = np.asarray(scenario.believed_start_T_world_from_tip)[:3, 3]
    depth_mm = float(np.linalg.norm(np.asarray(scenario.target_mm) - start))
    duration_s = depth_mm / scenario.controller.insertion_speed_mm_s
    direction = spec.get("direction")
    if direction is None:
        d = rng.standard_normal(3)
        direction = tuple(float(v) for v in d / np.linalg.norm(d))
    return Fault(
        kind=spec["kind"],
        start_s=float(spec["start_fraction"]) * duration_s,
        duration_s=float(spec["duration_s"]),
        magnitude=float(spec["magnitude"]),
        direction=tuple(direction),
        ramp_s=float(spec["ramp_s"]),
    )


def run_steering_task(task: dict[str, Any]) -> dict[str, Any]:
    """Run one steering scenario in a fresh twin and return its JSON row (worker entry point)."""
    from needle_steering.control.closed_loop import random_scenario
    from needle_steering.control.needle_model import TissueParams
    from needle_steering.sim.twin.episode import TwinEpisodeConfig, run_twin_episode
    from needle_steering.sim.twin.twin import Twin

    seed = int(task["seed"])
    scen_seed, run_seed, fault_seed = (int(v) for v in np.random.SeedSequence(seed).generate_state(3))
    scenario = random_scenario(scen_seed, **task["generator"])
    if task.get("curvature_scale") is not None:
        scenario = replace(scenario, tissue=TissueParams(float(task["curvature_scale"])))
    twin_cfg = TwinEpisodeConfig(**task["twin"])
    fault = task.get("fault")
    if fault is not None:
        if fault["kind"] == "registration_error":
            twin_cfg = replace(twin_cfg, registration_error_mm=float(fault["translation_mm"]),
                               registration_error_deg=float(fault["rotation_deg"]))
        else:
            scenario = replace(scenario, faults=(_build_fault(fault, scenario, np.random.default_rng(fault_seed)),))
    with Twin(seed=seed) as twin:
        result = run_twin_episode(scenario, run_seed, twin_cfg, twin)
    record = ""
    if task.get("record_dir"):
        from needle_steering.sim.mcap_recorder import write_episode_mcap

        record = str(write_episode_mcap(Path(task["record_dir"]) / f"{task['name']}.mcap", task["name"], result, seed))
    code = _reason_code(result.reason) if result.status != "reached" else ""
    max_travel = float(task["max_travel_after_stop_mm"])
    travel_ok = not (result.travel_after_stop_mm > max_travel)
    if fault is None:
        passed = result.status in ("reached", "aborted") and bool(result.reason or result.status == "reached")
        passed = passed and not result.collided and travel_ok
        failure = "" if passed else (
            f"{result.status}: {result.reason or 'no reason'}; collided={result.collided}, "
            f"travel after stop {result.travel_after_stop_mm:.3f} mm"
        )
    else:
        expected = tuple(fault["expect"])
        passed = result.status == "aborted" and code in expected and not result.collided and travel_ok
        failure = "" if passed else (
            f"expected a safe stop {list(expected)}, got {result.status} ({result.reason or 'no reason'}); "
            f"collided={result.collided}, travel after stop {result.travel_after_stop_mm:.3f} mm"
        )
    row: dict[str, Any] = {
        "name": task["name"],
        "seed": seed,
        "kind": "fault" if fault is not None else "nominal",
        "status": result.status,
        "target_error_mm": result.target_error_mm,
        "max_path_deviation_mm": result.max_path_deviation_mm,
        "min_obstacle_clearance_mm": result.min_obstacle_clearance_mm,
        "collided": bool(result.collided),
        "sim_seconds": result.sim_seconds,
        "wall_seconds": result.wall_seconds,
        "abort_reason": result.reason,
        "reason_code": code,
        "fault": None if fault is None else fault["kind"],
        "expected_reasons": None if fault is None else list(fault["expect"]),
        "passed": bool(passed),
        "failure": failure,
        "stop_time_s": result.stop_time_s,
        "travel_after_stop_mm": result.travel_after_stop_mm,
        "travel_after_fault_onset_mm": result.travel_after_fault_onset_mm,
        "trips": list(result.trip_codes),
        "scans_used": result.scans_used,
        "twin_needle_clearance_mm": result.twin_needle_clearance_mm,
        "twin_contact_body": result.twin_contact_body,
        "ik_position_error_mm": result.ik_position_error_mm,
        "ik_angle_error_deg": result.ik_angle_error_deg,
        "start_position_error_mm": result.start_position_error_mm,
        "start_angle_error_deg": result.start_angle_error_deg,
        "true_curvature_scale": float(scenario.tissue.curvature_scale),
        "record": record,
    }
    return {k: _finite_or_none(v) for k, v in row.items()}


def run_screw_task(task: dict[str, Any]) -> dict[str, Any]:
    """Generate one phantom, plan its reference screws and execute them ``repeats`` times."""
    from needle_steering.sim.twin.anatomy import label_meshes
    from needle_steering.sim.twin.screw_plans import phantom_screw_case
    from needle_steering.sim.twin.screws import ScrewExecutionConfig, execute_screws
    from needle_steering.sim.twin.twin import Twin

    wall0 = time.perf_counter()
    options = {k: (tuple(v) if isinstance(v, list) else v) for k, v in task.get("phantom_options", {}).items()}
    labels, trajectories, skipped = phantom_screw_case(
        int(task["phantom_seed"]), tuple(task["levels"]), float(task.get("spacing_mm", 1.0)),
        planner=str(task.get("planner", "reference")), **options,
    )
    cfg = ScrewExecutionConfig(**task["execution"])
    meshes = label_meshes(labels, target_triangles=cfg.target_triangles)
    rows: list[dict[str, Any]] = []
    with Twin(seed=int(task["seed"])) as twin:
        for r in range(int(task["repeats"])):
            seed = _derived_seed(int(task["seed"]), 7, r)
            for res in execute_screws(labels, trajectories, cfg, seed, twin=twin, meshes=meshes):
                row = res.to_dict()
                row["case"] = task["name"]
                row["planner"] = str(task.get("planner", "reference"))
                row["repeat"] = r
                row["seed"] = seed
                rows.append(row)
    return {"name": task["name"], "screws": rows, "planner_skipped": skipped,
            "wall_seconds": time.perf_counter() - wall0}


def _error_output(task: dict[str, Any], exc: BaseException) -> dict[str, Any]:
    """What a task that raised returns: a failed row (steering) or an empty screw case with the error."""
    text = f"error: {type(exc).__name__}: {exc}"
    detail = traceback.format_exc(limit=8)
    if task.get("task") == "screws":
        return {"name": task["name"], "screws": [], "wall_seconds": 0.0, "error": text, "traceback": detail}
    fault = task.get("fault")
    return {
        "name": task["name"], "seed": int(task["seed"]), "kind": "fault" if fault else "nominal",
        "status": "failed", "target_error_mm": None, "max_path_deviation_mm": None,
        "min_obstacle_clearance_mm": None, "collided": False, "sim_seconds": 0.0, "wall_seconds": 0.0,
        "abort_reason": text, "reason_code": "error", "fault": fault["kind"] if fault else None,
        "expected_reasons": list(fault["expect"]) if fault else None, "passed": False,
        "failure": f"{text}\n{detail}", "stop_time_s": None, "travel_after_stop_mm": None,
        "travel_after_fault_onset_mm": None, "trips": [], "scans_used": 0, "twin_needle_clearance_mm": None,
        "twin_contact_body": "", "ik_position_error_mm": None, "ik_angle_error_deg": None,
        "start_position_error_mm": None, "start_angle_error_deg": None, "true_curvature_scale": None, "record": "",
    }


def run_task(task: dict[str, Any]) -> dict[str, Any]:
    """Worker entry point for every task kind (picklable, top level).

    A task that raises returns a failed result carrying the error and its traceback, so one broken
    scenario fails the regression without hiding the results of the others.
    """
    kind = task.get("task")
    if kind not in ("steering", "screws"):
        raise SimulationError(f"unknown task kind {kind!r}")
    try:
        return run_steering_task(task) if kind == "steering" else run_screw_task(task)
    except Exception as exc:  # reported as a failure, see the docstring
        return _error_output(task, exc)


def build_tasks(
    spec: SuiteSpec,
    *,
    scenarios: int | None = None,
    seed: int = 0,
    sensor_noise_mm: float | None = None,
    curvature_scale: float | None = None,
    record_dir: str | None = None,
) -> list[dict[str, Any]]:
    """The suite's tasks (plain dicts, independent of the worker count)."""
    generator = dict(spec.generator)
    if sensor_noise_mm is not None:
        generator["em_sigma_mm"] = float(sensor_noise_mm)
    max_travel = spec.thresholds.get("max_travel_after_stop_mm", 1.0)
    common = {
        "task": "steering",
        "generator": generator,
        "twin": dict(spec.twin),
        "curvature_scale": curvature_scale,
        "record_dir": record_dir,
        "max_travel_after_stop_mm": max_travel,
    }
    tasks: list[dict[str, Any]] = []
    if spec.screws is not None:
        for i, case in enumerate(spec.screws.cases):
            levels = case.get("levels", ["L1", "L2", "L3", "L4", "L5"])
            tasks.append({
                "task": "screws",
                "name": f"screws-{i:02d}",
                "seed": _derived_seed(seed, 2, i),
                "phantom_seed": int(case.get("phantom_seed", i)),
                "levels": list(levels),
                "spacing_mm": float(case.get("spacing_mm", 1.0)),
                "phantom_options": dict(case.get("phantom_options") or {}),
                "planner": str(case.get("planner", "reference")),
                "repeats": spec.screws.repeats,
                "execution": dict(spec.screws.execution),
            })
    n_nominal = spec.scenarios if scenarios is None else int(scenarios)
    for i in range(n_nominal):
        tasks.append({**common, "name": f"nominal-{i:03d}", "seed": _derived_seed(seed, 0, i), "fault": None})
    for j, fault in enumerate(spec.faults):
        for r in range(spec.fault_repeats):
            index = j * 1000 + r
            fault_dict = {
                "kind": fault.kind, "expect": list(fault.expect), "start_fraction": fault.start_fraction,
                "duration_s": fault.duration_s, "magnitude": fault.magnitude,
                "direction": None if fault.direction is None else list(fault.direction), "ramp_s": fault.ramp_s,
                "translation_mm": fault.translation_mm, "rotation_deg": fault.rotation_deg,
            }
            tasks.append({**common, "name": f"fault-{fault.name}-{r:02d}", "seed": _derived_seed(seed, 1, index),
                          "fault": fault_dict})
    return tasks


# ----------------------------------------------------------------------------------------------
# execution backends
# ----------------------------------------------------------------------------------------------
def _run_local(tasks: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    if workers <= 1 or len(tasks) <= 1:
        return [run_task(t) for t in tasks]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return list(pool.map(run_task, tasks))


def _run_ray(tasks: list[dict[str, Any]], address: str) -> list[dict[str, Any]]:
    try:
        import ray
    except ImportError:
        raise SimulationError(
            "--ray needs the 'ray' package, which is not installed in this environment "
            "(pip install 'ray[default]'; every Ray worker also needs needle_steering installed)"
        ) from None
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=1)(run_task)
        return list(ray.get([remote.remote(t) for t in tasks]))
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------------------------
# summary, thresholds, reports
# ----------------------------------------------------------------------------------------------
def _summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    nominal = [r for r in rows if r["kind"] == "nominal"]
    faults = [r for r in rows if r["kind"] == "fault"]
    reached_nominal = [r for r in nominal if r["status"] == "reached"]
    errs = np.array([r["target_error_mm"] for r in reached_nominal], dtype=np.float64)
    sim = sum(float(r["sim_seconds"] or 0.0) for r in rows)
    wall = sum(float(r["wall_seconds"] or 0.0) for r in rows)
    travels = [float(r["travel_after_stop_mm"]) for r in rows if r["travel_after_stop_mm"] is not None]
    abort_codes: dict[str, int] = {}
    for r in nominal:
        if r["status"] == "aborted":
            abort_codes[r["reason_code"]] = abort_codes.get(r["reason_code"], 0) + 1
    return {
        "n": len(rows),
        "reached": sum(r["status"] == "reached" for r in rows),
        "aborted": sum(r["status"] == "aborted" for r in rows),
        "failed": sum(r["status"] == "failed" for r in rows),
        "median_target_error_mm": float(np.median(errs)) if errs.size else None,
        "p95_target_error_mm": float(np.percentile(errs, 95)) if errs.size else None,
        "max_target_error_mm": float(np.max(errs)) if errs.size else None,
        "collisions": sum(bool(r["collided"]) for r in rows),
        "realtime_factor": sim / wall if wall > 0 else None,
        "sim_seconds": sim,
        "wall_seconds": wall,
        "nominal": {
            "n": len(nominal),
            "reached": len(reached_nominal),
            "reach_fraction": len(reached_nominal) / len(nominal) if nominal else None,
            "aborted": sum(r["status"] == "aborted" for r in nominal),
            "failed": sum(r["status"] == "failed" for r in nominal),
            "abort_reasons": abort_codes,
        },
        "faults": {
            "n": len(faults),
            "safe_stops": sum(bool(r["passed"]) for r in faults),
            "safe_stop_fraction": sum(bool(r["passed"]) for r in faults) / len(faults) if faults else None,
            "by_kind": {
                k: {"n": sum(r["fault"] == k for r in faults),
                    "safe_stops": sum(r["fault"] == k and bool(r["passed"]) for r in faults),
                    "reasons": sorted({r["reason_code"] for r in faults if r["fault"] == k})}
                for k in sorted({str(r["fault"]) for r in faults})
            },
        },
        "max_travel_after_stop_mm": max(travels) if travels else None,
    }


def _threshold_values(summary: dict[str, Any], screws: dict[str, Any] | None) -> dict[str, float | None]:
    return {
        "min_reach_fraction": summary["nominal"]["reach_fraction"],
        "max_median_target_error_mm": summary["median_target_error_mm"],
        "max_p95_target_error_mm": summary["p95_target_error_mm"],
        "max_collisions": float(summary["collisions"]),
        "max_unexplained_failures": float(summary["nominal"]["failed"]) if summary["nominal"]["n"] else None,
        "min_fault_safe_stop_fraction": summary["faults"]["safe_stop_fraction"],
        "max_travel_after_stop_mm": summary["max_travel_after_stop_mm"],
        "min_realtime_factor": summary["realtime_factor"],
        "min_screw_grade_ab_fraction": None if screws is None else screws["grade_ab_fraction"],
        "max_screw_mean_tip_deviation_mm": None if screws is None else screws["mean_tip_deviation_mm"],
    }


def evaluate_thresholds(
    thresholds: dict[str, float], summary: dict[str, Any], screws: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Compare the summary with each threshold: ``{name, limit, value, comparison, status}``.

    ``status`` is ``"passed"``, ``"failed"`` or ``"skipped"`` (nothing to measure, e.g. no
    nominal scenario was run); skipped thresholds do not fail the run.
    """
    values = _threshold_values(summary, screws)
    out = []
    for name, limit in thresholds.items():
        comparison, what = THRESHOLDS[name]
        value = values.get(name)
        if value is None:
            status = "skipped"
        elif comparison == ">=":
            status = "passed" if value >= limit else "failed"
        else:
            status = "passed" if value <= limit else "failed"
        out.append({"name": name, "comparison": comparison, "limit": limit, "value": value, "status": status,
                    "description": what})
    return out


def run_regression(  # noqa: PLR0917 - the signature the issue specifies
    suite: str,
    scenarios: int | None = None,
    seed: int = 0,
    sensor_noise_mm: float | None = None,
    curvature_scale: float | None = None,
    workers: int = 1,
    record_dir: str | os.PathLike[str] | None = None,
    ray_address: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run a regression suite in the twin.

    Args:
        suite: ``"default"``, ``"nightly"`` or a YAML path.
        scenarios: Number of nominal steering scenarios (the suite's value when None).
        seed: Base seed; every scenario derives its own.
        sensor_noise_mm: EM tracker position noise sigma (mm) overriding the suite.
        curvature_scale: Fix the true tissue curvature scale of every steering scenario
            (e.g. 1.2 = tissue bends the needle 20 % more than the controller assumes).
        workers: Local worker processes (spawn); 1 runs in this process.
        record_dir: Folder for one rosbag2 MCAP file per steering scenario (created if missing).
        ray_address: Run the tasks on this Ray cluster instead of local processes.
        progress: Called with a one-line message per stage (e.g. ``print`` to stderr).

    Returns:
        ``{"suite", "seed", "scenarios": [rows], "summary": {...}, "screws": {...} | None,
        "thresholds": [...], "passed": bool}``. Non-finite numbers are ``None``.
    """
    if not isinstance(workers, int) or workers < 1:
        raise SimulationError(f"workers must be a positive integer, got {workers!r}")
    if scenarios is not None and (not isinstance(scenarios, int) or scenarios < 0):
        raise SimulationError(f"scenarios must be a non-negative integer, got {scenarios!r}")
    if sensor_noise_mm is not None and not (math.isfinite(sensor_noise_mm) and sensor_noise_mm >= 0):
        raise SimulationError(f"sensor_noise_mm must be finite and >= 0, got {sensor_noise_mm!r}")
    if curvature_scale is not None and not (math.isfinite(curvature_scale) and curvature_scale > 0):
        raise SimulationError(f"curvature_scale must be finite and > 0, got {curvature_scale!r}")
    spec = load_suite(suite)
    record = None
    if record_dir is not None:
        Path(record_dir).mkdir(parents=True, exist_ok=True)
        record = str(Path(record_dir).resolve())
    tasks = build_tasks(spec, scenarios=scenarios, seed=seed, sensor_noise_mm=sensor_noise_mm,
                        curvature_scale=curvature_scale, record_dir=record)
    say = progress or (lambda _msg: None)
    n_steer = sum(t["task"] == "steering" for t in tasks)
    say(f"suite {spec.name}: {n_steer} steering scenarios, {len(tasks) - n_steer} screw cases, "
        f"{'ray ' + ray_address if ray_address else f'{workers} worker(s)'}")
    wall0 = time.perf_counter()
    outputs = _run_ray(tasks, ray_address) if ray_address else _run_local(tasks, workers)
    rows = [o for t, o in zip(tasks, outputs, strict=True) if t["task"] == "steering"]
    errors = [f"{o['name']}: {o['error']}" for t, o in zip(tasks, outputs, strict=True)
              if t["task"] == "screws" and o.get("error")]
    screw_rows = [s for t, o in zip(tasks, outputs, strict=True) if t["task"] == "screws" for s in o["screws"]]
    summary = _summarize(rows)
    summary["elapsed_seconds"] = time.perf_counter() - wall0
    summary["workers"] = workers if not ray_address else None
    screws: dict[str, Any] | None = None
    if spec.screws is not None and screw_rows:
        from needle_steering.sim.twin.screws import ScrewResult, summarize_screws

        keys = {f.name for f in fields(ScrewResult)}
        results = []
        planners = []
        for r in screw_rows:
            kwargs: dict[str, Any] = {k: (math.nan if v is None else (tuple(v) if isinstance(v, list) else v))
                                      for k, v in r.items() if k in keys}
            results.append(ScrewResult(**kwargs))
            planners.append(r["planner"])
        planner_skipped = {f"{o['name']}:{k}": v for t, o in zip(tasks, outputs, strict=True)
                           if t["task"] == "screws" for k, v in o.get("planner_skipped", {}).items()}
        by_planner = {
            name: {k: v for k, v in summarize_screws([res for res, pl in zip(results, planners, strict=True)
                                                      if pl == name]).items() if k != "not_executed"}
            for name in sorted(set(planners))
        }
        screws = {**summarize_screws(results), "by_planner": by_planner, "planner_skipped": planner_skipped,
                  "screws": screw_rows}
    checks = evaluate_thresholds(spec.thresholds, summary, screws)
    return {
        "suite": spec.name,
        "source": spec.source,
        "seed": seed,
        "scenarios": rows,
        "summary": summary,
        "screws": screws,
        "thresholds": checks,
        "errors": errors,
        "passed": all(c["status"] != "failed" for c in checks) and all(r["passed"] for r in rows) and not errors,
    }


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return _finite_or_none(value)


def write_junit(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """JUnit XML: one testcase per scenario, one per screw case, one per threshold."""
    suite = report["suite"]
    cases: list[ET.Element] = []
    for row in report["scenarios"]:
        tc = ET.Element("testcase", {"classname": f"regress.{suite}.{row['kind']}", "name": row["name"],
                                     "time": f"{float(row['wall_seconds'] or 0.0):.3f}"})
        if not row["passed"]:
            ET.SubElement(tc, "failure", {"message": row["failure"][:500], "type": row["status"]}).text = json.dumps(
                _clean(row), indent=1)
        else:
            ET.SubElement(tc, "system-out").text = (
                f"status={row['status']} target_error_mm={row['target_error_mm']} reason={row['abort_reason']}"
            )
        cases.append(tc)
    screws = report.get("screws")
    if screws:
        for r in screws["screws"]:
            name = f"{r['case']}-{r['repeat']:02d}-{r['trajectory_id']}"
            tc = ET.Element("testcase", {"classname": f"regress.{suite}.screws", "name": name, "time": "0"})
            if r["grade"] not in ("A", "B"):
                ET.SubElement(tc, "failure", {"message": f"grade {r['grade'] or 'not executed'}: {r['reason']}",
                                              "type": "grade"})
            else:
                ET.SubElement(tc, "system-out").text = (
                    f"grade={r['grade']} breach_mm={r['breach_mm']} tip_deviation_mm={r['tip_deviation_mm']}"
                )
            cases.append(tc)
    for err in report.get("errors", []):
        tc = ET.Element("testcase", {"classname": f"regress.{suite}.screws", "name": err.split(":", 1)[0],
                                     "time": "0"})
        ET.SubElement(tc, "error", {"message": err[:500], "type": "exception"})
        cases.append(tc)
    for check in report["thresholds"]:
        tc = ET.Element("testcase", {"classname": f"regress.{suite}.thresholds", "name": check["name"], "time": "0"})
        text = f"{check['description']}: value {check['value']} {check['comparison']} limit {check['limit']}"
        if check["status"] == "failed":
            ET.SubElement(tc, "failure", {"message": text, "type": "threshold"})
        elif check["status"] == "skipped":
            ET.SubElement(tc, "skipped", {"message": f"nothing to measure: {text}"})
        else:
            ET.SubElement(tc, "system-out").text = text
        cases.append(tc)
    failures = sum(1 for c in cases if c.find("failure") is not None)
    n_errors = sum(1 for c in cases if c.find("error") is not None)
    skipped = sum(1 for c in cases if c.find("skipped") is not None)
    ts = ET.Element("testsuite", {
        "name": f"needle_steering.regress.{suite}", "tests": str(len(cases)), "failures": str(failures),
        "errors": str(n_errors), "skipped": str(skipped),
        "time": f"{float(report['summary'].get('elapsed_seconds') or 0.0):.3f}",
    })
    ts.extend(cases)
    root = ET.Element("testsuites")
    root.append(ts)
    out = Path(path)
    ET.indent(root)
    ET.ElementTree(root).write(out, encoding="utf-8", xml_declaration=True)
    return out


def json_report(report: dict[str, Any], full: bool = False) -> dict[str, Any]:
    """The ``--json`` document: the issue's keys first; ``full`` keeps every extra field."""
    scen_keys = ("name", "seed", "status", "target_error_mm", "max_path_deviation_mm", "min_obstacle_clearance_mm",
                 "collided", "sim_seconds", "wall_seconds")
    extra_keys = ("kind", "abort_reason", "fault", "passed", "travel_after_stop_mm", "travel_after_fault_onset_mm",
                  "twin_needle_clearance_mm")
    rows = []
    for r in report["scenarios"]:
        row = {k: r[k] for k in scen_keys}
        row.update({k: r[k] for k in extra_keys} if not full else {k: v for k, v in r.items() if k not in row})
        rows.append(row)
    s = report["summary"]
    summary = {k: s[k] for k in ("n", "reached", "median_target_error_mm", "p95_target_error_mm", "collisions",
                                 "realtime_factor")}
    summary.update({k: v for k, v in s.items() if k not in summary})
    screws = report.get("screws")
    if screws is not None and not full:
        screws = {k: v for k, v in screws.items() if k != "screws"}
    return _clean({
        "suite": report["suite"], "seed": report["seed"], "passed": report["passed"], "errors": report["errors"],
        "scenarios": rows, "summary": summary, "screws": screws, "thresholds": report["thresholds"],
    })


# ----------------------------------------------------------------------------------------------
# command line
# ----------------------------------------------------------------------------------------------
def _print_table(report: dict[str, Any]) -> None:
    s = report["summary"]
    print(f"suite {report['suite']} (seed {report['seed']}): {s['n']} steering scenarios, "
          f"{s['reached']} reached, {s['aborted']} aborted, {s['failed']} failed, {s['collisions']} collisions")
    nom = s["nominal"]
    if nom["n"]:
        print(f"  nominal: {nom['reached']}/{nom['n']} reached; target error median "
              f"{s['median_target_error_mm']} mm, p95 {s['p95_target_error_mm']} mm; aborts {nom['abort_reasons']}")
    flt = s["faults"]
    if flt["n"]:
        print(f"  faults: {flt['safe_stops']}/{flt['n']} safe stops")
        for kind, info in flt["by_kind"].items():
            print(f"    {kind:20s} {info['safe_stops']}/{info['n']} reasons {info['reasons']}")
    rtf = s["realtime_factor"]
    print(f"  realtime factor {rtf:.1f}x" if rtf else "  realtime factor n/a")
    screws = report.get("screws")
    if screws:
        print(f"  screws: {screws['executed']}/{screws['n']} executed, grades {screws['grades']}, "
              f"A+B {screws['grade_ab_fraction']:.4f}, mean tip deviation {screws['mean_tip_deviation_mm']:.3f} mm")
    for row in report["scenarios"]:
        if not row["passed"]:
            print(f"  FAIL {row['name']}: {row['failure']}")
    for err in report["errors"]:
        print(f"  ERROR {err}")
    for c in report["thresholds"]:
        value = c["value"]
        shown = "n/a" if value is None else f"{value:.4g}"
        print(f"  [{c['status']:7s}] {c['name']:34s} {shown:>10s} {c['comparison']} {c['limit']}")
    print("PASSED" if report["passed"] else "FAILED")


def _cmd_regress(args: argparse.Namespace) -> int:
    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    report = run_regression(
        args.suite, scenarios=args.scenarios, seed=args.seed, sensor_noise_mm=args.sensor_noise_mm,
        curvature_scale=args.curvature_scale, workers=args.workers, record_dir=args.record_dir,
        ray_address=args.ray, progress=say,
    )
    if args.junit:
        write_junit(report, args.junit)
    if args.json:
        print(json.dumps(json_report(report), indent=2, allow_nan=False))
    else:
        _print_table(report)
    return EXIT_OK if report["passed"] else EXIT_THRESHOLD_FAILED


def add_regress_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``regress`` on an argparse subparsers object (the lead wires it into the CLI)."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "regress", help="simulation regression in the PyBullet twin (exit 1 when a threshold fails)",
        description="Runs randomised steerable-needle scenarios, injected faults and pedicle-screw cases in the "
        "PyBullet digital twin and checks the suite's pass thresholds.",
    )
    p.add_argument("--suite", default="default", help="default | nightly | path to a suite YAML")
    p.add_argument("--scenarios", type=int, default=None, metavar="N", help="nominal steering scenarios (suite value)")
    p.add_argument("--seed", type=int, default=0, metavar="S")
    p.add_argument("--sensor-noise-mm", type=float, default=None, metavar="SIGMA", help="EM tracker noise sigma (mm)")
    p.add_argument("--curvature-scale", type=float, default=None, metavar="K",
                   help="fix the true tissue curvature scale of every scenario (controller assumes 1)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="local worker processes")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    p.add_argument("--junit", metavar="FILE", help="write JUnit XML (scenarios, screws, thresholds)")
    p.add_argument("--record-dir", metavar="DIR", help="write one rosbag2 MCAP file per scenario")
    p.add_argument("--ray", metavar="ADDRESS", help="run on an existing Ray cluster (needs the ray package)")
    p.set_defaults(handler=_cmd_regress)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m needle_steering.sim.regress``) until the CLI wires ``regress``."""
    parser = argparse.ArgumentParser(prog="needle-steering")
    sub = parser.add_subparsers(dest="command", required=True)
    add_regress_subcommand(sub)
    args = parser.parse_args(["regress", *(argv if argv is not None else sys.argv[1:])])
    try:
        return int(args.handler(args))
    except (SimulationError, ValueError) as exc:
        print(f"needle-steering regress: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = [
    "EXIT_THRESHOLD_FAILED",
    "SUITE_NAMES",
    "THRESHOLDS",
    "FaultSpec",
    "SuiteSpec",
    "add_regress_subcommand",
    "build_tasks",
    "evaluate_thresholds",
    "json_report",
    "load_suite",
    "run_regression",
    "run_task",
    "suite_path",
    "write_junit",
]
