"""Curvature-bounded path planning for a bevel-tip steerable needle (arc-based RRT).

Model
-----
A bevel-tip needle inserted while its bevel is rotated (duty-cycled) follows, piecewise, circular
arcs of any curvature ``0 <= kappa <= kappa_max`` (Webster et al., IJRR 2006; duty cycling:
Minhas et al., IEEE EMBS 2007). A path is a chain of such arcs, tangent-continuous (the tip
heading never jumps), starting at the tip pose with its heading (the tip frame's z axis).

The unique arc from a pose ``(p, h)`` through a point ``q`` lies in the plane of ``h`` and
``q - p``; with ``a = (q - p) . h`` and ``l`` the distance of ``q`` from the tip's axis its
curvature is ``kappa = 2 l / |q - p|^2`` and its turning angle ``2 atan2(l, a)`` (``q`` is
reachable in one arc iff ``a > 0`` and ``kappa <= kappa_max``).

Planner
-------
1. The direct arc to the target, if it is within the curvature and turning bounds and clear of
   the obstacles, is the answer (the usual case while replanning during an insertion).
2. Otherwise a rapidly-exploring random tree of arcs grows from the tip (Xu, Duindam, Alterovitz,
   Goldberg, CASE 2008), with *reachability guidance* (Shkolnik et al., ICRA 2009; Patil &
   Alterovitz, BioRob 2010): a random sample is only connected to tree nodes from which it is
   reachable by one arc within the bounds, choosing the one with the shortest such arc; the new
   node is at most ``extend_mm`` along that arc. After every extension the direct arc from the
   new node to the target is tried. Samples are the target with probability ``goal_bias``,
   otherwise uniform in the box around tip and target (deterministic generator from ``seed``).
3. Shortcut: the first node of the found branch (from the tip) with a clear direct arc to the
   target replaces the rest of the branch.

Every arc is sampled every ``step_mm`` and each sample must keep ``clearance_mm`` from the
obstacles (any object with ``clearance_mm(points (N, 3)) -> (N,)``, signed distance to the
nearest obstacle surface; :class:`SphereObstacles` and :class:`FieldObstacles` are provided,
``needle_steering.control.geometry.Obstacles`` works as is). When the tip already lies closer
than ``clearance_mm`` to an obstacle (a replan after a deviation), the requirement becomes the
tip's own clearance, so the needle may move away but never closer.

The result carries either a path or the reason why none was found (curvature, turning, clearance
or time budget, with numbers).

Replanner protocol
------------------
:meth:`SteerablePlanner.plan` has the signature of ``needle_steering.control.replanner.Replanner``
(``plan(start_T_world_from_tip, target_mm, obstacles, kappa_max_per_mm)``) and returns a
:class:`SteerablePlanResult` with the same attributes as ``control.replanner.PlanResult``
(``path``, ``reason``, ``ok``), whose ``path`` has the attributes of ``control.replanner.Path``
(``points_mm``, ``arc_length_mm``, ``min_clearance_mm``, ``max_curvature_per_mm``,
``description``, ``length_mm``, ``target_mm``). The planning layer does not import control.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray

from needle_steering.errors import PlanningError
from needle_steering.planning.fields import FieldSet

FloatArray = NDArray[np.float64]


class ObstacleSet(Protocol):
    """Anything giving the signed clearance (mm) of points to the nearest obstacle surface."""

    def clearance_mm(self, points_mm: FloatArray) -> FloatArray:
        """Signed distance ``(N,)`` of points ``(N, 3)`` to the nearest obstacle (negative inside)."""
        ...


@dataclass(frozen=True)
class SphereObstacles:
    """Spherical obstacles (mm)."""

    centers_mm: FloatArray
    radii_mm: FloatArray

    def __post_init__(self) -> None:
        c = np.asarray(self.centers_mm, dtype=np.float64).reshape(-1, 3)
        r = np.asarray(self.radii_mm, dtype=np.float64).reshape(-1)
        if len(c) != len(r) or not (np.all(np.isfinite(c)) and np.all(np.isfinite(r))) or np.any(r < 0):
            raise PlanningError(
                f"sphere obstacles need matching finite centres (K,3) and radii >= 0, got {c.shape}, {r.shape}"
            )
        object.__setattr__(self, "centers_mm", c)
        object.__setattr__(self, "radii_mm", r)

    @property
    def count(self) -> int:
        """Number of spheres."""
        return len(self.radii_mm)

    def clearance_mm(self, points_mm: FloatArray) -> FloatArray:
        """Signed distance to the nearest sphere surface, ``+inf`` without spheres."""
        pts = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        if self.count == 0:
            return np.full(len(pts), np.inf)
        d2 = (
            np.sum(pts**2, axis=1)[:, None]
            - 2.0 * pts @ self.centers_mm.T
            + np.sum(self.centers_mm**2, axis=1)[None, :]
        )
        out: FloatArray = (np.sqrt(np.maximum(d2, 0.0)) - self.radii_mm[None, :]).min(axis=1)
        return out


@dataclass(frozen=True, eq=False)
class FieldObstacles:
    """Obstacles given by a distance field on a planning grid.

    ``clearance = field value`` (trilinear), e.g. the ``"forbidden"`` field of a vertebra (distance
    to the canal, neighbours, vessels) or its ``"sdf"`` (distance to the outer cortex, when the
    needle must stay inside the bone). Points off the grid get ``outside_clearance_mm``.
    """

    fields: FieldSet
    name: str
    outside_clearance_mm: float = -1.0

    @property
    def count(self) -> int:
        """Always 1 (one field)."""
        return 1

    def clearance_mm(self, points_mm: FloatArray) -> FloatArray:
        """Field value at the points (mm)."""
        arr = self.fields.fields[self.name] if self.name != "hu" else self.fields.hu
        return self.fields.grid.sample(
            arr, np.asarray(points_mm, dtype=np.float64).reshape(-1, 3), cval=self.outside_clearance_mm
        )


@dataclass(frozen=True)
class CombinedObstacles:
    """The smallest clearance over several obstacle sets."""

    parts: tuple[Any, ...]

    @property
    def count(self) -> int:
        """Number of parts."""
        return len(self.parts)

    def clearance_mm(self, points_mm: FloatArray) -> FloatArray:
        """Smallest clearance over the parts."""
        pts = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        out = np.full(len(pts), np.inf)
        for part in self.parts:
            out = np.minimum(out, part.clearance_mm(pts))
        return out


@dataclass(frozen=True)
class SteerablePath:
    """A tip path (attribute-compatible with ``control.replanner.Path``).

    Attributes:
        points_mm: ``(M, 3)`` samples from the start tip to the target, mm.
        arc_length_mm: ``(M,)`` cumulative length, mm.
        min_clearance_mm: Smallest obstacle clearance along the path, mm.
        max_curvature_per_mm: Largest arc curvature used, 1/mm.
        description: Summary (number of arcs, curvatures).
        arcs: ``(kappa_per_mm, length_mm)`` of each arc in order.
    """

    points_mm: FloatArray
    arc_length_mm: FloatArray
    min_clearance_mm: float
    max_curvature_per_mm: float
    description: str = ""
    arcs: tuple[tuple[float, float], ...] = ()

    @classmethod
    def from_points(
        cls,
        points_mm: ArrayLike,
        min_clearance_mm: float = math.inf,
        max_curvature_per_mm: float = 0.0,
        description: str = "",
    ) -> SteerablePath:
        """Path through world points ``(M, 3)``, ``M >= 2`` (mm), with cumulative arc lengths.

        Raises:
            PlanningError: Not a finite ``(M >= 2, 3)`` array.
        """
        pts = np.asarray(points_mm, dtype=np.float64)
        if pts.ndim != 2 or pts.shape[1] != 3 or len(pts) < 2 or not np.all(np.isfinite(pts)):
            raise PlanningError(f"path points must be a finite (M >= 2, 3) array, got shape {pts.shape}")
        seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
        return cls(pts, np.concatenate([[0.0], np.cumsum(seg)]), min_clearance_mm, max_curvature_per_mm, description)

    @property
    def length_mm(self) -> float:
        """Total length, mm."""
        return float(self.arc_length_mm[-1])

    @property
    def target_mm(self) -> FloatArray:
        """Last point, ``(3,)`` mm."""
        return self.points_mm[-1]


@dataclass(frozen=True)
class SteerablePlanResult:
    """A path, or ``path=None`` with the reason (attribute-compatible with ``control.replanner.PlanResult``)."""

    path: SteerablePath | None
    reason: str = ""
    iterations: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """True when a feasible path was found."""
        return self.path is not None


def arc_to_point(p: FloatArray, h: FloatArray, q: FloatArray) -> tuple[float, FloatArray, float, float]:
    """The arc from pose ``(p, h)`` through ``q``: ``(kappa, lateral unit (3,), turn rad, length mm)``.

    ``length`` is ``inf`` when ``q`` is not ahead of the tip.
    """
    d = q - p
    along = float(d @ h)
    lat = d - along * h
    lateral = float(np.linalg.norm(lat))
    dist2 = float(d @ d)
    if along <= 0.0 or dist2 <= 0.0:
        return math.inf, np.zeros(3), math.pi, math.inf
    if lateral < 1e-9:
        return 0.0, np.zeros(3), 0.0, math.sqrt(dist2)
    kappa = 2.0 * lateral / dist2
    turn = 2.0 * math.atan2(lateral, along)
    return kappa, lat / lateral, turn, turn / kappa


def sample_arc(
    p: FloatArray, h: FloatArray, u: FloatArray, kappa: float, length: float, *, step: float
) -> tuple[FloatArray, FloatArray]:
    """Points ``(M, 3)`` and unit headings ``(M, 3)`` every ``step`` mm along an arc (both ends included)."""
    n = max(2, math.ceil(length / step) + 1)
    s = np.linspace(0.0, length, n)
    if kappa < 1e-12:
        return p + s[:, None] * h, np.broadcast_to(h, (n, 3)).copy()
    sk, ck = np.sin(kappa * s), np.cos(kappa * s)
    pts = p + (sk / kappa)[:, None] * h + ((1.0 - ck) / kappa)[:, None] * u
    heads = ck[:, None] * h + sk[:, None] * u
    return pts, heads


def _check_pose(T: ArrayLike) -> tuple[FloatArray, FloatArray]:
    M = np.asarray(T, dtype=np.float64)
    if M.shape != (4, 4) or not np.all(np.isfinite(M)):
        raise PlanningError(f"start_T_world_from_tip must be a finite 4x4 matrix, got shape {M.shape}")
    R = M[:3, :3]
    if float(np.max(np.abs(R.T @ R - np.eye(3)))) > 1e-4 or abs(float(np.linalg.det(R)) - 1.0) > 1e-4:
        raise PlanningError("start_T_world_from_tip rotation is not a proper rotation matrix")
    return M[:3, 3].copy(), R[:, 2] / np.linalg.norm(R[:, 2])


class SteerablePlanner:
    """Arc-based RRT planner for a bevel-tip steerable needle (see the module docstring).

    Args:
        clearance_mm: Required clearance from every obstacle surface, mm.
        step_mm: Spacing of the collision checks and of the returned samples, mm.
        extend_mm: Longest arc added to the tree per iteration, mm.
        goal_bias: Probability of sampling the target.
        max_iterations: Iteration limit of the tree.
        time_budget_s: Wall-time limit of the tree search, s.
        max_turn_rad: Largest heading change of one arc, rad.
        max_length_mm: Longest path accepted, mm.
        workspace_margin_mm: Margin of the sampling box around tip and target, mm.
        seed: Seed of the sampling generator (the same inputs give the same path).
    """

    def __init__(
        self,
        *,
        clearance_mm: float = 2.0,
        step_mm: float = 1.0,
        extend_mm: float = 12.0,
        goal_bias: float = 0.15,
        max_iterations: int = 3000,
        time_budget_s: float = 0.08,
        max_turn_rad: float = math.pi / 2,
        max_length_mm: float = 300.0,
        workspace_margin_mm: float = 30.0,
        seed: int = 0,
    ) -> None:
        for name, value in (
            ("clearance_mm", clearance_mm),
            ("step_mm", step_mm),
            ("extend_mm", extend_mm),
            ("time_budget_s", time_budget_s),
            ("max_length_mm", max_length_mm),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise PlanningError(f"{name} must be finite and >= 0, got {value!r}")
        if step_mm <= 0 or extend_mm <= 0:
            raise PlanningError(f"step_mm and extend_mm must be > 0, got {step_mm!r}, {extend_mm!r}")
        if not 0.0 <= goal_bias <= 1.0:
            raise PlanningError(f"goal_bias must lie in [0, 1], got {goal_bias!r}")
        self.clearance_mm = clearance_mm
        self.step_mm = step_mm
        self.extend_mm = extend_mm
        self.goal_bias = goal_bias
        self.max_iterations = int(max_iterations)
        self.time_budget_s = time_budget_s
        self.max_turn_rad = max_turn_rad
        self.max_length_mm = max_length_mm
        self.workspace_margin_mm = workspace_margin_mm
        self.seed = int(seed)

    # -- helpers --------------------------------------------------------------------------------
    def _clear(self, obstacles: Any, pts: FloatArray) -> float:
        if obstacles is None or getattr(obstacles, "count", 1) == 0:
            return math.inf
        return float(np.min(obstacles.clearance_mm(pts)))

    def _direct(
        self,
        p: FloatArray,
        h: FloatArray,
        q: FloatArray,
        *,
        kmax: float,
        obstacles: Any,
        required: float,
    ) -> tuple[FloatArray, float, float, float] | str:
        """Clear single arc from ``(p, h)`` to ``q`` or the reason it is not usable."""
        kappa, u, turn, length = arc_to_point(p, h, q)
        if not math.isfinite(length):
            return "target not ahead of the tip"
        if kappa > kmax * (1.0 + 1e-9):
            return f"needs curvature {kappa:.5f}/mm > kappa_max {kmax:.5f}/mm"
        if turn > self.max_turn_rad:
            return f"turns {turn:.2f} rad > {self.max_turn_rad:.2f} rad"
        pts, _ = sample_arc(p, h, u, kappa, length, step=self.step_mm)
        c = self._clear(obstacles, pts)
        if c < required:
            return f"clearance {c:.2f} mm < {required:.2f} mm"
        return pts, kappa, length, c

    # -- main -----------------------------------------------------------------------------------
    def plan(
        self,
        start_T_world_from_tip: FloatArray,
        target_mm: FloatArray,
        obstacles: Any,
        kappa_max_per_mm: float,
    ) -> SteerablePlanResult:
        """Plan from the tip pose (4x4, z axis = insertion direction, mm) to ``target_mm`` ``(3,)``.

        Args:
            start_T_world_from_tip: Tip pose.
            target_mm: Target point, mm (same frame as the pose and the obstacles).
            obstacles: Object with ``clearance_mm(points)`` (``None`` for free space).
            kappa_max_per_mm: Largest achievable curvature, 1/mm (radius 50-200 mm: 0.005-0.02).

        Returns:
            :class:`SteerablePlanResult` (``path=None`` and a reason when nothing is feasible).

        Raises:
            PlanningError: Invalid pose, target or curvature.
        """
        t0 = time.perf_counter()
        p0, h0 = _check_pose(start_T_world_from_tip)
        target = np.asarray(target_mm, dtype=np.float64).reshape(-1)
        if target.shape != (3,) or not np.all(np.isfinite(target)):
            raise PlanningError(f"target_mm must be 3 finite numbers, got {np.asarray(target_mm).tolist()!r}")
        kmax = float(kappa_max_per_mm)
        if not (math.isfinite(kmax) and kmax >= 0):
            raise PlanningError(f"kappa_max_per_mm must be finite and >= 0, got {kappa_max_per_mm!r}")
        start_clear = self._clear(obstacles, p0[None, :])
        if start_clear < 0:
            return SteerablePlanResult(None, f"the tip lies inside an obstacle (clearance {start_clear:.2f} mm)")
        required = min(self.clearance_mm, start_clear)
        target_clear = self._clear(obstacles, target[None, :])
        if target_clear < required:
            return SteerablePlanResult(
                None,
                f"the target is {target_clear:.2f} mm from an obstacle, closer than the required {required:.2f} mm",
            )
        dist = float(np.linalg.norm(target - p0))
        if dist > self.max_length_mm:
            return SteerablePlanResult(
                None, f"target {dist:.1f} mm away, beyond the longest path {self.max_length_mm:.0f} mm"
            )
        direct = self._direct(p0, h0, target, kmax=kmax, obstacles=obstacles, required=required)
        if not isinstance(direct, str):
            pts, kappa, length, _ = direct
            return SteerablePlanResult(
                self._assemble([pts], [(kappa, length)], obstacles, "direct arc"),
                "direct arc",
                0,
                time.perf_counter() - t0,
            )
        reasons = [f"direct arc: {direct}"]
        return self._rrt(p0, h0, target, kmax=kmax, obstacles=obstacles, required=required, reasons=reasons, t0=t0)

    def _rrt(
        self,
        p0: FloatArray,
        h0: FloatArray,
        target: FloatArray,
        *,
        kmax: float,
        obstacles: Any,
        required: float,
        reasons: list[str],
        t0: float,
    ) -> SteerablePlanResult:
        rng = np.random.default_rng(self.seed)
        cap = self.max_iterations + 1
        pos = np.zeros((cap, 3))
        head = np.zeros((cap, 3))
        parent = np.full(cap, -1, dtype=np.int64)
        cost = np.zeros(cap)
        arc_of: list[tuple[FloatArray, float, float]] = [(p0[None, :], 0.0, 0.0)]  # samples, kappa, length
        pos[0], head[0] = p0, h0
        n = 1
        lo = np.minimum(p0, target) - self.workspace_margin_mm
        hi = np.maximum(p0, target) + self.workspace_margin_mm
        best_gap = float(np.linalg.norm(target - p0))
        n_unreachable = n_blocked = 0
        it = 0
        goal_node = -1
        goal_arc: tuple[FloatArray, float, float] | None = None
        while it < self.max_iterations and time.perf_counter() - t0 < self.time_budget_s:
            it += 1
            q = target if rng.random() < self.goal_bias else rng.uniform(lo, hi)
            d = q[None, :] - pos[:n]
            along = np.einsum("ij,ij->i", d, head[:n])
            dist2 = np.einsum("ij,ij->i", d, d)
            lat_v = d - along[:, None] * head[:n]
            lateral = np.linalg.norm(lat_v, axis=1)
            with np.errstate(divide="ignore", invalid="ignore"):
                kappa = np.where(dist2 > 0, 2.0 * lateral / dist2, np.inf)
                turn = 2.0 * np.arctan2(lateral, along)
                arc_len = np.where(kappa > 1e-12, turn / np.maximum(kappa, 1e-12), np.sqrt(dist2))
            ok = (
                (along > 0) & (kappa <= kmax) & (turn <= self.max_turn_rad) & (cost[:n] + arc_len <= self.max_length_mm)
            )
            if ok.any():
                k = int(np.argmin(np.where(ok, arc_len, np.inf)))
                kap = float(kappa[k])
                length = min(self.extend_mm, float(arc_len[k]))
            else:
                # not reachable in one arc from any node: turn toward it at full curvature from the
                # node facing it best (the reachable set grows toward the sample)
                n_unreachable += 1
                facing = along / np.sqrt(np.maximum(dist2, 1e-12))
                k = int(np.argmax(np.where(cost[:n] + self.extend_mm <= self.max_length_mm, facing, -np.inf)))
                if not np.isfinite(facing[k]) or lateral[k] < 1e-9:
                    continue
                kap = kmax
                length = self.extend_mm
            u = lat_v[k] / lateral[k] if lateral[k] > 1e-9 else np.zeros(3)
            pts, heads = sample_arc(pos[k], head[k], u, kap, length, step=self.step_mm)
            if self._clear(obstacles, pts[1:]) < required:
                n_blocked += 1
                continue
            if n >= cap:
                break
            pos[n], head[n], parent[n], cost[n] = pts[-1], heads[-1], k, cost[k] + length
            arc_of.append((pts, kap, length))
            best_gap = min(best_gap, float(np.linalg.norm(target - pts[-1])))
            direct = self._direct(pos[n], head[n], target, kmax=kmax, obstacles=obstacles, required=required)
            n += 1
            if not isinstance(direct, str) and cost[n - 1] + direct[2] <= self.max_length_mm:
                goal_node = n - 1
                goal_arc = (direct[0], direct[1], direct[2])
                break
        elapsed = time.perf_counter() - t0
        if goal_node < 0 or goal_arc is None:
            why = "time budget" if it < self.max_iterations else "iteration limit"
            reasons.append(
                f"tree search stopped ({why}: {it} iterations, {elapsed * 1000:.0f} ms, {n} nodes): closest approach "
                f"{best_gap:.1f} mm; {n_unreachable} samples unreachable within kappa_max {kmax:.5f}/mm, "
                f"{n_blocked} extensions blocked by clearance {required:.2f} mm"
            )
            return SteerablePlanResult(None, "no feasible path: " + "; ".join(reasons), it, elapsed)
        # branch from the root to the goal node
        branch = [goal_node]
        while parent[branch[-1]] >= 0:
            branch.append(int(parent[branch[-1]]))
        branch.reverse()
        # shortcut: first node on the branch with a clear direct arc to the target
        for j, node in enumerate(branch):
            if node == goal_node:
                break
            direct = self._direct(pos[node], head[node], target, kmax=kmax, obstacles=obstacles, required=required)
            if not isinstance(direct, str):
                branch = branch[: j + 1]
                goal_arc = (direct[0], direct[1], direct[2])
                break
        pieces = [arc_of[node][0] for node in branch[1:]] + [goal_arc[0]]
        arcs = [(arc_of[node][1], arc_of[node][2]) for node in branch[1:]] + [(goal_arc[1], goal_arc[2])]
        path = self._assemble(pieces, arcs, obstacles, f"{len(arcs)} arcs (tree: {n} nodes, {it} iterations)")
        return SteerablePlanResult(path, "; ".join(reasons), it, time.perf_counter() - t0)

    def _assemble(
        self, pieces: list[FloatArray], arcs: list[tuple[float, float]], obstacles: Any, description: str
    ) -> SteerablePath:
        pts = np.vstack([pieces[0]] + [p[1:] for p in pieces[1:]])
        seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
        arc_length = np.concatenate([[0.0], np.cumsum(seg)])
        clear = self._clear(obstacles, pts)
        kmax_used = max((k for k, _ in arcs), default=0.0)
        return SteerablePath(pts, arc_length, clear, kmax_used, description, tuple(arcs))


def path_curvature_per_mm(points_mm: FloatArray) -> FloatArray:
    """Discrete curvature at the interior samples of a polyline (circumscribed-circle formula), 1/mm."""
    p = np.asarray(points_mm, dtype=np.float64)
    a = p[1:-1] - p[:-2]
    b = p[2:] - p[1:-1]
    c = p[2:] - p[:-2]
    cross = np.linalg.norm(np.cross(a, b), axis=1)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) * np.linalg.norm(c, axis=1)
    out: FloatArray = np.where(denom > 1e-12, 2.0 * cross / np.maximum(denom, 1e-12), 0.0)
    return out


__all__ = [
    "CombinedObstacles",
    "FieldObstacles",
    "ObstacleSet",
    "SphereObstacles",
    "SteerablePath",
    "SteerablePlanResult",
    "SteerablePlanner",
    "arc_to_point",
    "path_curvature_per_mm",
    "sample_arc",
]
