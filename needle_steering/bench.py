"""One registry of benchmarks that every layer adds to.

A benchmark is a function with no arguments returning the measured value; it is registered with
:func:`benchmark` in a module under ``benchmarks/`` (installed as ``needle_steering.benchmarks``)
and listed in :data:`BENCHMARK_MODULES`. ``needle-steering bench`` runs them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from needle_steering.errors import NeedleSteeringError

BENCHMARK_MODULES: tuple[str, ...] = (
    "needle_steering.benchmarks.bench_sim",
    "needle_steering.benchmarks.bench_perception",
    "needle_steering.benchmarks.bench_planning",
    "needle_steering.benchmarks.bench_control",
    "needle_steering.benchmarks.bench_sim_twin",
)


@dataclass(frozen=True)
class Benchmark:
    """A registered benchmark: ``run()`` returns the value in ``unit``; ``target`` is informative."""

    name: str
    unit: str
    run: Callable[[], float]
    description: str
    target: str


_REGISTRY: dict[str, Benchmark] = {}


def benchmark(
    name: str, unit: str, description: str, target: str = ""
) -> Callable[[Callable[[], float]], Callable[[], float]]:
    """Decorator registering ``func`` as benchmark ``name`` measured in ``unit``."""

    def register(func: Callable[[], float]) -> Callable[[], float]:
        if name in _REGISTRY and _REGISTRY[name].run is not func:
            raise ValueError(f"benchmark {name!r} registered twice")
        _REGISTRY[name] = Benchmark(name, unit, func, description, target)
        return func

    return register


def registry() -> dict[str, Benchmark]:
    """All benchmarks, loading every module of :data:`BENCHMARK_MODULES` that exists."""
    for module in BENCHMARK_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    return dict(sorted(_REGISTRY.items()))


def run_benchmarks(only: list[str] | None = None) -> dict[str, dict[str, float | str]]:
    """Run the selected benchmarks (all when ``only`` is empty) and return ``{name: {value, unit}}``."""
    known = registry()
    names = only if only else list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise NeedleSteeringError(f"unknown benchmark(s) {unknown}; known: {sorted(known)}")
    results: dict[str, dict[str, float | str]] = {}
    for name in names:
        bench = known[name]
        results[name] = {"value": float(bench.run()), "unit": bench.unit}
    return results
