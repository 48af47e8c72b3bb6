"""Reference pedicle-screw trajectories from a phantom's ground truth (tests and regression).

The planner (``needle_steering.planning.pedicle``, :func:`planner_screw_trajectories`) is the
product's source of screw plans. To measure the robot's execution alone we also need plans whose
quality does not depend on the planner under test, so this module derives textbook trajectories
from the phantom's ground-truth meta (``meta["vertebrae"][level]["pedicles"][side]``: isthmus
centre and pedicle axis, LPS mm):

* axis: the pedicle axis, oriented from the isthmus toward the vertebral body;
* entry: where that axis leaves the vertebra behind the isthmus (posterior cortex), found by
  marching the vertebra's signed distance field;
* tip: short of the anterior cortex by ``max(5 mm, 15 % of the bone chord)``;
* diameter: 70 % of the isthmus width in 0.5 mm steps, within [4.0, 7.5] mm.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from needle_steering.errors import SimulationError
from needle_steering.perception.labels import level_id
from needle_steering.perception.volume import Volume
from needle_steering.planning.plan_document import Trajectory
from needle_steering.sim.twin.anatomy import SignedDistanceField
from needle_steering.sim.twin.frames import unit

_STEP_MM = 0.25
_MAX_MARCH_MM = 120.0


def _first_exit(sdf: SignedDistanceField, start_mm: np.ndarray, direction: np.ndarray) -> float:
    s = np.arange(0.0, _MAX_MARCH_MM, _STEP_MM)
    d = sdf(start_mm[None, :] + s[:, None] * direction[None, :])
    outside = np.flatnonzero(d < 0.0)
    if outside.size == 0:
        raise SimulationError(f"no bone surface within {_MAX_MARCH_MM} mm of {start_mm.tolist()} along "
                              f"{direction.tolist()}")
    return float(s[outside[0]])


def reference_screw_trajectories(
    labels: Volume, meta: Mapping[str, Any], levels: Sequence[str] | None = None
) -> list[Trajectory]:
    """Textbook pedicle screws (two per level) from the phantom's ground truth.

    Args:
        labels: The phantom's label map.
        meta: The phantom's meta (``Phantom.meta``).
        levels: Levels to instrument; every requested lumbar/thoracic level when None.

    Returns:
        Trajectories ``"<level>-left"`` / ``"<level>-right"`` (kind ``pedicle_screw``, LPS mm).
    """
    vertebrae = meta.get("vertebrae")
    if not isinstance(vertebrae, Mapping):
        raise SimulationError("phantom meta has no 'vertebrae' mapping")
    names = list(levels) if levels else [n for n, v in vertebrae.items() if v.get("requested") and "pedicles" in v]
    arr = np.asarray(labels.array)
    out: list[Trajectory] = []
    for name in names:
        info = vertebrae.get(name)
        if not isinstance(info, Mapping) or "pedicles" not in info:
            raise SimulationError(f"phantom meta has no pedicles for level {name!r}")
        lid = level_id(name)
        mask = arr == lid
        if not mask.any():
            raise SimulationError(f"level {name} (label {lid}) is not in the label map")
        sdf = SignedDistanceField(labels, mask, pad_mm=20.0)
        body = np.asarray(info["body_centre_lps_mm"], dtype=np.float64)
        for side in ("left", "right"):
            ped = info["pedicles"][side]
            c = np.asarray(ped["isthmus_centre_lps_mm"], dtype=np.float64)
            a = unit(ped["axis_lps"], f"{name} {side} pedicle axis")
            if float(a @ (body - c)) < 0.0:
                a = -a
            back = _first_exit(sdf, c, -a)
            fwd = _first_exit(sdf, c, a)
            chord = back + fwd
            entry = c - back * a
            tip = c + (fwd - max(5.0, 0.15 * chord)) * a
            diameter = float(np.clip(math.floor(0.7 * float(ped["width_mm"]) * 2.0) / 2.0, 4.0, 7.5))
            length = float(np.linalg.norm(tip - entry))
            out.append(Trajectory(
                id=f"{name}-{side}", kind="pedicle_screw", level=name, side=side,
                entry_lps_mm=tuple(entry), tip_lps_mm=tuple(tip), path_lps_mm=(tuple(entry), tuple(tip)),
                diameter_mm=diameter, length_mm=length,
                metrics={"source": "phantom_ground_truth", "isthmus_inscribed_radius_mm": float(sdf(c[None])[0])},
            ))
    return out


def planner_screw_trajectories(
    ct: Volume, labels: Volume, levels: Sequence[str]
) -> tuple[list[Trajectory], dict[str, str]]:
    """Screws planned by ``needle_steering.planning.pedicle`` (default options) on the CT.

    Returns:
        ``(trajectories, skipped)`` where ``skipped`` maps ``"L5-left"`` to the planner's reason.
    """
    from needle_steering.planning.pedicle import plan_pedicle_screws

    result = plan_pedicle_screws(ct, labels, list(levels))
    return [s.to_trajectory() for s in result.screws], dict(result.skipped)


def phantom_screw_case(
    phantom_seed: int, levels: Sequence[str] = ("L1", "L2", "L3", "L4", "L5"), spacing_mm: float = 1.0,
    planner: str = "reference", **phantom_options: Any,
) -> tuple[Volume, list[Trajectory], dict[str, str]]:
    """Generate a phantom and plan its screws: ``(labels, trajectories, skipped)``.

    Args:
        phantom_seed, levels, spacing_mm: Phantom identity.
        planner: ``"reference"`` (ground-truth textbook screws, :func:`reference_screw_trajectories`)
            or ``"pedicle"`` (the product planner, :func:`planner_screw_trajectories`).
        phantom_options: Further :class:`~needle_steering.sim.phantom.PhantomConfig` fields (e.g. a
            smaller ``fov_mm`` or ``context_levels=False`` for quick tests).
    """
    from needle_steering.sim.phantom import PhantomConfig, generate_phantom

    if planner not in ("reference", "pedicle"):
        raise SimulationError(f"planner must be 'reference' or 'pedicle', got {planner!r}")
    phantom = generate_phantom(PhantomConfig(seed=int(phantom_seed), levels=tuple(levels), spacing_mm=spacing_mm,
                                             **phantom_options))
    if planner == "pedicle":
        trajectories, skipped = planner_screw_trajectories(phantom.ct, phantom.labels, levels)
        return phantom.labels, trajectories, skipped
    return phantom.labels, reference_screw_trajectories(phantom.labels, phantom.meta, levels), {}


__all__ = ["phantom_screw_case", "planner_screw_trajectories", "reference_screw_trajectories"]
