"""The ``Replanner`` protocol and a fast arc-based implementation.

A replanner answers one question during an insertion: from the current tip pose, which
curvature-bounded path reaches the target while keeping clear of critical structures? Three
implementations: :class:`ArcReplanner` (one and two arcs, a few ms), the planning layer's
:class:`~needle_steering.planning.steerable.SteerablePlanner` (arc RRT, complete for harder
scenes, up to its time budget) and :class:`FallbackReplanner` (the arc replanner first, the RRT
when it finds nothing); :func:`make_replanner` builds one by name. ``Path`` and ``PlanResult`` are
the planning layer's types (control may import planning, never the reverse).

:class:`ArcReplanner` tries, in order:

1. the unique constant-curvature arc from the tip (tangent to its axis) through the target;
2. two-arc paths: a first arc sampled over bending direction, curvature and length, followed
   by the unique arc from its end to the target.

Every candidate is sampled about every ``sample_step_mm`` and checked against the obstacles;
the cheapest feasible one (length, curvature use, clearance) wins. When none is feasible the
result carries ``path=None`` and a reason naming what failed and by how much.
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import numpy as np

from needle_steering.control.geometry import FloatArray, Obstacles, check_point, check_pose
from needle_steering.control.needle_model import arc_points_tip_mm, arc_to_point
from needle_steering.errors import ControlError
from needle_steering.planning.steerable import SteerablePath, SteerablePlanner, SteerablePlanResult

__all__ = ["ArcReplanner", "FallbackReplanner", "Path", "PlanResult", "Replanner", "make_replanner"]


#: The path and result types are the planning layer's (one definition for both layers): a
#: :class:`Path` has ``points_mm``, ``arc_length_mm``, ``min_clearance_mm``, ``max_curvature_per_mm``,
#: ``description``, ``arcs``, ``length_mm``, ``target_mm`` and ``Path.from_points(...)``; a
#: :class:`PlanResult` has ``path``, ``reason``, ``ok`` (plus ``iterations``, ``seconds``).
Path = SteerablePath
PlanResult = SteerablePlanResult


@runtime_checkable
class Replanner(Protocol):
    """Anything that can plan a curvature-bounded, collision-free tip path."""

    def plan(
        self,
        start_T_world_from_tip: FloatArray,
        target_mm: FloatArray,
        obstacles: Obstacles,
        kappa_max_per_mm: float,
    ) -> PlanResult:
        """Plan from the tip pose (shape (4, 4), mm) to ``target_mm`` (shape (3,)).

        Args:
            start_T_world_from_tip: current tip pose; its z-axis is the insertion direction.
            target_mm: target point (mm, world).
            obstacles: critical structures (spheres and capsules).
            kappa_max_per_mm: largest curvature the needle can achieve now (1/mm).

        Returns:
            A :class:`PlanResult`; ``path`` is None with a ``reason`` when nothing is feasible.
        """
        ...


def _second_arc(
    start_mm: FloatArray, heading: FloatArray, target_mm: FloatArray
) -> tuple[float, FloatArray, float, float]:
    """Arc from ``start_mm`` with unit ``heading`` through ``target_mm``.

    Returns:
        ``(kappa_per_mm, lateral_unit (3,), turn_rad, length_mm)``; length is inf if behind.
    """
    d = target_mm - start_mm
    along = float(d @ heading)
    lat = d - along * heading
    lateral = float(np.linalg.norm(lat))
    dist2 = float(d @ d)
    if along <= 0.0:
        return math.inf, np.zeros(3), math.pi, math.inf
    if lateral < 1e-9:
        return 0.0, np.zeros(3), 0.0, math.sqrt(dist2)
    kappa = 2.0 * lateral / dist2
    turn = 2.0 * math.atan2(lateral, along)
    return kappa, lat / lateral, turn, turn / kappa


def _sample_arc_world(
    start_mm: FloatArray,
    heading: FloatArray,
    lateral_unit: FloatArray,
    *,
    kappa: float,
    length_mm: float,
    step_mm: float,
) -> tuple[FloatArray, FloatArray]:
    """Points (M, 3) and unit headings (M, 3) along an arc in world coordinates."""
    n = max(2, math.ceil(length_mm / step_mm) + 1)
    s = np.linspace(0.0, length_mm, n)
    if kappa < 1e-12:
        pts = start_mm + s[:, None] * heading
        heads = np.broadcast_to(heading, pts.shape).copy()
        return pts, heads
    sin_ks = np.sin(kappa * s)
    cos_ks = np.cos(kappa * s)
    pts = start_mm + (sin_ks / kappa)[:, None] * heading + ((1.0 - cos_ks) / kappa)[:, None] * lateral_unit
    heads = cos_ks[:, None] * heading + sin_ks[:, None] * lateral_unit
    return pts, heads


class ArcReplanner:
    """One- and two-arc replanner (fast, a few ms), see the module docstring.

    Args:
        clearance_mm: required clearance from every obstacle surface (mm).
        sample_step_mm: spacing of the clearance checks and of the returned samples (mm).
        n_bend_angles: bending directions tried for the first arc of two-arc paths.
        first_arc_kappa_fractions: first-arc curvatures as fractions of ``kappa_max_per_mm``.
        first_arc_length_fractions: first-arc lengths as fractions of the tip-target distance.
        max_turn_rad: largest heading change allowed per arc (rad).
    """

    def __init__(
        self,
        *,
        clearance_mm: float = 2.0,
        sample_step_mm: float = 1.0,
        n_bend_angles: int = 12,
        first_arc_kappa_fractions: tuple[float, ...] = (0.5, 1.0),
        first_arc_length_fractions: tuple[float, ...] = (0.2, 0.35, 0.5),
        max_turn_rad: float = math.pi / 2,
    ) -> None:
        if not (math.isfinite(clearance_mm) and clearance_mm >= 0):
            raise ControlError(f"clearance_mm must be >= 0, got {clearance_mm!r}")
        if not (math.isfinite(sample_step_mm) and sample_step_mm > 0):
            raise ControlError(f"sample_step_mm must be > 0, got {sample_step_mm!r}")
        if n_bend_angles < 1:
            raise ControlError(f"n_bend_angles must be >= 1, got {n_bend_angles!r}")
        self.clearance_mm = clearance_mm
        self.sample_step_mm = sample_step_mm
        self.n_bend_angles = n_bend_angles
        self.first_arc_kappa_fractions = first_arc_kappa_fractions
        self.first_arc_length_fractions = first_arc_length_fractions
        self.max_turn_rad = max_turn_rad

    def plan(
        self,
        start_T_world_from_tip: FloatArray,
        target_mm: FloatArray,
        obstacles: Obstacles,
        kappa_max_per_mm: float,
    ) -> PlanResult:
        """See :meth:`Replanner.plan`."""
        T = check_pose(start_T_world_from_tip, "start_T_world_from_tip")
        target = check_point(target_mm, "target_mm")
        if not (math.isfinite(kappa_max_per_mm) and kappa_max_per_mm >= 0):
            raise ControlError(f"kappa_max_per_mm must be finite and >= 0, got {kappa_max_per_mm!r}")
        R = T[:3, :3]
        p0 = T[:3, 3]
        q = R.T @ (target - p0)
        if q[2] <= 0.0:
            return PlanResult(None, f"target is behind the tip (depth along the axis {q[2]:.2f} mm <= 0)")
        start_clear = float(obstacles.clearance_mm(p0[None, :])[0])
        required = min(self.clearance_mm, start_clear)
        kappa, bend, length = arc_to_point(q)
        turn = kappa * length
        reasons: list[str] = []
        if kappa <= kappa_max_per_mm and turn <= self.max_turn_rad:
            pts_tip = arc_points_tip_mm(
                kappa, bend, np.linspace(0.0, length, max(2, math.ceil(length / self.sample_step_mm) + 1))
            )
            pts = p0 + pts_tip @ R.T
            clear = float(np.min(obstacles.clearance_mm(pts))) if obstacles.count else math.inf
            if clear >= required:
                return PlanResult(
                    Path.from_points(pts, clear, kappa, f"arc k={kappa:.5f}/mm len={length:.1f}mm"), "direct arc"
                )
            reasons.append(f"direct arc clearance {clear:.2f} mm < required {required:.2f} mm")
        elif kappa > kappa_max_per_mm:
            reasons.append(f"direct arc needs curvature {kappa:.5f}/mm > kappa_max {kappa_max_per_mm:.5f}/mm")
        else:
            reasons.append(f"direct arc turns {turn:.2f} rad > max {self.max_turn_rad:.2f} rad")
        return self._two_arc(T, target, obstacles, kappa_max=kappa_max_per_mm, required=required, reasons=reasons)

    def _two_arc(
        self,
        T: FloatArray,
        target: FloatArray,
        obstacles: Obstacles,
        *,
        kappa_max: float,
        required: float,
        reasons: list[str],
    ) -> PlanResult:
        R = T[:3, :3]
        p0 = T[:3, 3]
        h0 = R[:, 2]
        dist = float(np.linalg.norm(target - p0))
        candidates: list[tuple[FloatArray, float, float, str]] = []
        n_curv = n_turn = 0
        step = self.sample_step_mm
        for i in range(self.n_bend_angles):
            bend = 2.0 * math.pi * i / self.n_bend_angles
            u0 = R @ np.array([-math.sin(bend), math.cos(bend), 0.0])
            for kf in self.first_arc_kappa_fractions:
                k1 = kf * kappa_max
                for lf in self.first_arc_length_fractions:
                    l1 = lf * dist
                    if k1 * l1 > self.max_turn_rad:
                        n_turn += 1
                        continue
                    pts1, heads1 = _sample_arc_world(p0, h0, u0, kappa=k1, length_mm=l1, step_mm=step)
                    e, h1 = pts1[-1], heads1[-1]
                    k2, u2, turn2, l2 = _second_arc(e, h1, target)
                    if not math.isfinite(l2) or k2 > kappa_max:
                        n_curv += 1
                        continue
                    if turn2 > self.max_turn_rad:
                        n_turn += 1
                        continue
                    pts2, _ = _sample_arc_world(e, h1, u2, kappa=k2, length_mm=l2, step_mm=step)
                    pts = np.vstack([pts1, pts2[1:]])
                    desc = f"two arcs k1={k1:.5f}/mm len1={l1:.1f}mm k2={k2:.5f}/mm len2={l2:.1f}mm"
                    candidates.append((pts, max(k1, k2), l1 + l2, desc))
        if not candidates:
            reasons.append(
                f"no two-arc candidate reaches the target ({n_curv} need curvature > {kappa_max:.5f}/mm, "
                f"{n_turn} turn more than {self.max_turn_rad:.2f} rad)"
            )
            return PlanResult(None, "no feasible path: " + "; ".join(reasons))
        sizes = [len(c[0]) for c in candidates]
        allpts = np.vstack([c[0] for c in candidates])
        if obstacles.count:
            clear_all = obstacles.clearance_mm(allpts)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
            clears = np.minimum.reduceat(clear_all, starts)
        else:
            clears = np.full(len(candidates), math.inf)
        best: tuple[float, int] | None = None
        for idx, (_pts, kmax, length, _d) in enumerate(candidates):
            c = float(clears[idx])
            if c < required:
                continue
            cost = length + 20.0 * kmax / max(kappa_max, 1e-12) - 0.5 * min(c, 10.0)
            if best is None or cost < best[0]:
                best = (cost, idx)
        if best is None:
            reasons.append(
                f"all {len(candidates)} two-arc candidates violate clearance "
                f"(best {float(np.max(clears)):.2f} mm < required {required:.2f} mm)"
            )
            return PlanResult(None, "no feasible path: " + "; ".join(reasons))
        pts, kmax, _length, desc = candidates[best[1]]
        return PlanResult(Path.from_points(pts, float(clears[best[1]]), kmax, desc), "; ".join(reasons))


class FallbackReplanner:
    """Tries each replanner in turn and returns the first feasible path (else every reason).

    Args:
        replanners: Replanners in order of preference (e.g. the fast arc replanner, then the RRT).
    """

    def __init__(self, *replanners: Replanner) -> None:
        if not replanners:
            raise ControlError("FallbackReplanner needs at least one replanner")
        self.replanners = replanners

    def plan(
        self,
        start_T_world_from_tip: FloatArray,
        target_mm: FloatArray,
        obstacles: Obstacles,
        kappa_max_per_mm: float,
    ) -> PlanResult:
        """See :meth:`Replanner.plan`."""
        reasons: list[str] = []
        for planner in self.replanners:
            res = planner.plan(start_T_world_from_tip, target_mm, obstacles, kappa_max_per_mm)
            if res.path is not None:
                why = "; ".join([*reasons, res.reason]) if reasons else res.reason
                return PlanResult(res.path, why)
            reasons.append(f"{type(planner).__name__}: {res.reason}")
        return PlanResult(None, "; ".join(reasons))


#: Replanner names accepted by :func:`make_replanner`.
REPLANNER_KINDS = ("arc", "steerable", "arc+steerable")


def make_replanner(kind: str, *, clearance_mm: float, seed: int = 0) -> Replanner:
    """Replanner by name: ``"arc"``, ``"steerable"`` (planning's arc RRT) or ``"arc+steerable"``.

    Raises:
        ControlError: Unknown ``kind``.
    """
    if kind == "arc":
        return ArcReplanner(clearance_mm=clearance_mm)
    if kind == "steerable":
        return SteerablePlanner(clearance_mm=clearance_mm, seed=seed)
    if kind == "arc+steerable":
        return FallbackReplanner(
            ArcReplanner(clearance_mm=clearance_mm), SteerablePlanner(clearance_mm=clearance_mm, seed=seed)
        )
    raise ControlError(f"unknown replanner {kind!r}; expected one of {REPLANNER_KINDS}")
