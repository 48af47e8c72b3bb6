"""The ONE place where the nodes call core-layer APIs that are still landing.

Each function imports its core API when called and raises :class:`CoreUnavailableError` (with the
missing module/function and the import error) when it is not there yet; nodes turn that into a
service response ``success=false`` with the reason. Nothing here fakes a result.

To re-point (lead): change only the import/call inside the function named in the table.

==============================  ==========================================================
adapter                          core API it calls
==============================  ==========================================================
:func:`read_image`              ``perception.io.read_volume(path)``
:func:`generate_phantom_patient` ``sim.phantom.generate_phantom(PhantomConfig(...))``
:func:`segment`                 ``perception.segment.segment_volume(volume, backend, device, modality)``
:func:`plan_case`               ``planning.plan_case(ct, labels, levels, biopsy_target_lps_mm, steerable,
                                options=PlanOptions(...))`` (``options_json`` mapped by
                                :func:`plan_options_from_json`)
:func:`recheck_trajectory`      ``planning.recheck_trajectory(plan, trajectory_id, entry_lps_mm, ...)``
:func:`make_twin_backend`       ``sim.twin.Twin`` through ``nodes.twin_pybullet.PyBulletTwinBackend``
                                (``backend: pybullet``) or the needle-model twin (``kinematic``)
:func:`twin_anatomy_labels`     the phantom's ground-truth label map, or a label-map file
==============================  ==========================================================
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from needle_steering.errors import NeedleSteeringError

if TYPE_CHECKING:
    from needle_steering.nodes.twin import TwinBackend, TwinConfig
    from needle_steering.nodes.twin_pybullet import ArmSceneConfig
    from needle_steering.perception.volume import Volume
    from needle_steering.planning.plan_document import PlanDocument


class CoreUnavailableError(NeedleSteeringError, RuntimeError):
    """A core-layer API the node needs has not landed (the message names it)."""


def _core(module: str, name: str) -> Callable[..., Any]:
    """``module.name`` or :class:`CoreUnavailableError` naming what is missing."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise CoreUnavailableError(f"{module}.{name} is not available yet ({exc})") from None
    func = getattr(mod, name, None)
    if func is None:
        raise CoreUnavailableError(f"{module}.{name} is not available yet ({module} has no {name!r})")
    return func


@dataclass(frozen=True)
class Patient:
    """A planning image with optional ground-truth labels (phantoms carry them)."""

    ct: Volume
    labels: Volume | None
    source: str
    meta: Mapping[str, Any]


@dataclass(frozen=True)
class Segmentation:
    """Label map on the image grid plus the vertebral levels found."""

    labels: Volume
    levels: tuple[str, ...]
    backend: str


_PHANTOM_CACHE: dict[tuple[int, str, float], Patient] = {}
_PHANTOM_LOCK = threading.Lock()


def read_image(path: str, modality: str) -> Patient:
    """Read a CT/CBCT file or DICOM folder (``perception.io.read_volume``)."""
    read_volume = _core("needle_steering.perception.io", "read_volume")
    volume = read_volume(path)
    return Patient(volume, None, str(path), {"modality": modality})


def generate_phantom_patient(seed: int, levels: str, spacing_mm: float) -> Patient:
    """The generated phantom patient with a lesion (``sim.phantom.generate_phantom``), cached per config."""
    key = (int(seed), levels, float(spacing_mm))
    with _PHANTOM_LOCK:
        if key in _PHANTOM_CACHE:
            return _PHANTOM_CACHE[key]
        generate = _core("needle_steering.sim.phantom", "generate_phantom")
        config_cls = _core("needle_steering.sim.phantom", "PhantomConfig")
        from needle_steering.perception.labels import parse_level_range

        phantom = generate(
            config_cls(
                seed=int(seed), levels=tuple(parse_level_range(levels)), spacing_mm=float(spacing_mm), lesion=True
            )
        )
        patient = Patient(phantom.ct, phantom.labels, f"phantom seed {seed} {levels}", dict(phantom.meta))
        _PHANTOM_CACHE[key] = patient
        return patient


def load_patient(
    image_path: str, modality: str, phantom_seed: int, phantom_levels: str, phantom_spacing_mm: float
) -> Patient:
    """The configured image, or the phantom patient when ``image_path`` is empty."""
    if image_path:
        return read_image(image_path, modality)
    return generate_phantom_patient(phantom_seed, phantom_levels, phantom_spacing_mm)


def require_segmentation() -> None:
    """Raise :class:`CoreUnavailableError` now (before loading any image) if segmentation is missing."""
    _core("needle_steering.perception.segment", "segment_volume")


def require_planner() -> None:
    """Raise :class:`CoreUnavailableError` now (before loading any image) if ``planning.plan_case`` is missing."""
    _core("needle_steering.planning", "plan_case")


def segment(volume: Volume, backend: str, device: str, modality: str) -> Segmentation:
    """Vertebra and critical-structure segmentation (``perception.segment.segment_volume``)."""
    segment_volume = _core("needle_steering.perception.segment", "segment_volume")
    result = segment_volume(volume, backend=backend, device=device, modality=modality)
    levels = tuple(str(level) for level in getattr(result, "levels", ()))
    return Segmentation(result.labels, levels, str(getattr(result, "backend", backend)))


#: ``options_json`` keys passed to ``planning.PlanOptions`` as they are (besides ``pedicle`` / ``biopsy``).
_PLAN_OPTION_SCALARS = (
    "steerable_kappa_max_per_mm",
    "steerable_clearance_mm",
    "steerable_diameter_mm",
    "steerable_seed",
    "hash_images",
)


def plan_options_from_json(options: Mapping[str, Any]) -> tuple[bool, Any]:
    """``(steerable, planning.PlanOptions)`` from the planning node's ``options_json`` object.

    Keys: ``steerable`` (bool), ``pedicle`` / ``biopsy`` (objects with ``PedicleOptions`` /
    ``BiopsyOptions`` fields; lists become tuples) and the scalar ``PlanOptions`` fields
    (:data:`_PLAN_OPTION_SCALARS`).

    Raises:
        PlanningError: unknown keys or values the planner's option classes refuse (their reason).
    """
    from needle_steering.errors import PlanningError

    opts_cls = _core("needle_steering.planning", "PlanOptions")
    pedicle_cls = _core("needle_steering.planning", "PedicleOptions")
    biopsy_cls = _core("needle_steering.planning", "BiopsyOptions")
    known = {"steerable", "pedicle", "biopsy", *_PLAN_OPTION_SCALARS}
    unknown = sorted(set(options) - known)
    if unknown:
        raise PlanningError(f"options_json: unknown keys {unknown}; known: {sorted(known)}")
    steerable = options.get("steerable", False)
    if not isinstance(steerable, bool):
        raise PlanningError(f"options_json: 'steerable' must be a bool, got {steerable!r}")
    kwargs: dict[str, Any] = {k: options[k] for k in _PLAN_OPTION_SCALARS if k in options}
    for key, cls in (("pedicle", pedicle_cls), ("biopsy", biopsy_cls)):
        if key not in options:
            continue
        sub = options[key]
        if not isinstance(sub, Mapping):
            raise PlanningError(f"options_json: {key!r} must be an object, got {sub!r}")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in sub.items()}
        try:
            kwargs[key] = cls(**fields)
        except TypeError as exc:
            raise PlanningError(f"options_json: {key}: {exc}") from None
    try:
        return steerable, opts_cls(**kwargs)
    except TypeError as exc:
        raise PlanningError(f"options_json: {exc}") from None


def plan_case(
    ct: Volume,
    labels: Volume,
    levels: Sequence[str],
    biopsy_target_lps_mm: Sequence[float] | None,
    options: Mapping[str, Any],
) -> PlanDocument:
    """Plan screws for ``levels`` and an optional biopsy (``planning.plan_case``).

    The returned plan document carries the planner's skipped trajectories with their reasons
    (``PlanDocument.skipped``).
    """
    plan = _core("needle_steering.planning", "plan_case")
    steerable, plan_options = plan_options_from_json(options)
    result = plan(ct, labels, list(levels), biopsy_target_lps_mm, steerable, plan_options)
    return _as_plan_document(result, "planning.plan_case")


def recheck_trajectory(
    plan: PlanDocument,
    trajectory_id: str,
    entry_lps_mm: Sequence[float],
    ct: Volume | None,
    labels: Volume | None,
) -> PlanDocument:
    """Re-check and re-grade a trajectory whose entry was dragged; returns the adjusted plan.

    Raises:
        CoreUnavailableError: the planner has no re-check yet, or the planning images are unknown
            (plan loaded from a file).
        PlanningError: the adjusted trajectory is unsafe (the planner's reason).
    """
    recheck = _core("needle_steering.planning", "recheck_trajectory")
    if ct is None or labels is None:
        raise CoreUnavailableError("re-checking needs the planning CT and labels; the plan was loaded from a file")
    result = recheck(plan, trajectory_id, list(entry_lps_mm), ct=ct, labels=labels)
    return _as_plan_document(result, "planning.recheck_trajectory")


def _as_plan_document(result: Any, where: str) -> PlanDocument:
    from needle_steering.planning.plan_document import PlanDocument

    plan = getattr(result, "plan_document", getattr(result, "plan", result))
    if not isinstance(plan, PlanDocument):
        raise CoreUnavailableError(f"{where} returned {type(result).__name__}, expected a PlanDocument")
    return plan


#: Values of ``sim_node.backend``.
TWIN_BACKENDS = ("pybullet", "kinematic")


def twin_anatomy_labels(source: str, phantom_seed: int, phantom_levels: str, phantom_spacing_mm: float) -> Volume:
    """The label map the twin turns into collision bodies.

    Args:
        source: ``"phantom"`` (the generated phantom patient's ground truth, the same patient the
            other nodes use with an empty ``image_path``) or a label-map file (LPS mm grid).
        phantom_seed, phantom_levels, phantom_spacing_mm: The phantom patient.
    """
    if source == "phantom":
        labels = generate_phantom_patient(phantom_seed, phantom_levels, phantom_spacing_mm).labels
        if labels is None:  # pragma: no cover - the phantom always carries its ground truth
            raise CoreUnavailableError("the phantom patient has no label map")
        return labels
    return read_image(source, "labels").ct


def make_twin_backend(
    config: TwinConfig,
    backend: str = "kinematic",
    scene: ArmSceneConfig | None = None,
    load_labels: Callable[[], Volume] | None = None,
) -> TwinBackend:
    """The simulator behind ``sim_node``.

    Args:
        config: Needle, tracker and guide settings (both backends).
        backend: ``"pybullet"``: :class:`~needle_steering.nodes.twin_pybullet.PyBulletTwinBackend` on
            ``sim.twin.Twin`` (KUKA iiwa, IK, anatomy collision bodies); ``"kinematic"``: the
            needle-model twin (ideal guide, no arm, no anatomy).
        scene: Placement and anatomy settings of the PyBullet backend (defaults when ``None``).
        load_labels: Returns the patient's label map for the PyBullet backend (``None``: no anatomy).

    Raises:
        CoreUnavailableError: PyBullet (``sim.twin``) cannot be imported.
        ValueError: unknown backend.
    """
    if backend == "kinematic":
        from needle_steering.nodes.twin import NeedleModelTwin

        return NeedleModelTwin(config)
    if backend == "pybullet":
        _core("needle_steering.sim.twin", "Twin")
        try:
            from needle_steering.sim.twin._pybullet import import_pybullet

            import_pybullet()
        except ImportError as exc:
            raise CoreUnavailableError(f"pybullet is not available for the PyBullet twin ({exc})") from None
        from needle_steering.nodes.twin_pybullet import ArmSceneConfig, PyBulletTwinBackend

        return PyBulletTwinBackend(config, scene or ArmSceneConfig(), load_labels)
    raise ValueError(f"unknown twin backend {backend!r}; choose one of {list(TWIN_BACKENDS)}")


__all__ = [
    "TWIN_BACKENDS",
    "CoreUnavailableError",
    "Patient",
    "Segmentation",
    "generate_phantom_patient",
    "load_patient",
    "make_twin_backend",
    "plan_case",
    "plan_options_from_json",
    "read_image",
    "recheck_trajectory",
    "require_planner",
    "require_segmentation",
    "segment",
    "twin_anatomy_labels",
]
