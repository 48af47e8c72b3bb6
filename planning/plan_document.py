"""The plan document: a versioned, canonical, hashed JSON record of a surgical plan.

Schema ``needle_steering.plan/1``. Every coordinate is in LPS millimetres (DICOM/ITK patient frame of
the planning CT). Approvals (``plan_review_node``) bind to the plan's ``sha256`` *and* to the
``sha256`` of each approved trajectory, so a trajectory cannot be edited after approval without the
change being detected.

Canonical form
--------------
The canonical text of a document (or of one trajectory) is ``json.dumps`` of its dictionary with

* keys sorted, separators ``(",", ":")``, ASCII only, no NaN/Infinity (``allow_nan=False``);
* every float rounded to :data:`FLOAT_DECIMALS` decimals (1e-4 mm for coordinates) and ``-0.0``
  written as ``0.0``; integers and booleans are kept as they are;
* tuples written as lists.

``sha256`` is the SHA-256 of the UTF-8 canonical text of the dictionary *without* its own
``sha256`` key. The plan hash covers the trajectories including their own hashes. Files are written
in the canonical form plus a trailing newline, so the file text is itself reproducible.

The input image hash (:func:`volume_sha256`) covers the voxel bytes (little-endian, C order), the
dtype, the shape and the rounded geometry (spacing, origin, direction), so the same voxels on a
different grid give a different hash.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from needle_steering.atomic import write_text_atomic
from needle_steering.errors import PlanDocumentError

if TYPE_CHECKING:
    from needle_steering.perception.volume import Volume

SCHEMA: Final = "needle_steering.plan/1"
#: Decimals kept for every float in the canonical form (1e-4 mm for coordinates).
FLOAT_DECIMALS: Final = 4
TRAJECTORY_KINDS: Final = ("pedicle_screw", "biopsy", "steerable_needle")
SIDES: Final = ("left", "right", "none")
GRADES: Final = ("A", "B", "C", "D", "E")
_MAX_PATH_POINTS: Final = 100_000

JSONValue = Any


# --------------------------------------------------------------------------------------------------
# canonical serialisation
# --------------------------------------------------------------------------------------------------
def canonicalize(value: Any, where: str = "document") -> JSONValue:
    """Return ``value`` as plain JSON types with floats rounded; raise on non-finite numbers.

    Args:
        value: Nested dicts, lists, tuples, numpy arrays/scalars, str, int, float, bool or None.
        where: Path of the value inside the document, used in error messages.

    Raises:
        PlanDocumentError: A NaN/Inf number, a non-string key or an unsupported type.
    """
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        number = float(value)
        if not math.isfinite(number):
            raise PlanDocumentError(f"{where}: number must be finite, got {number!r}")
        rounded = round(number, FLOAT_DECIMALS)
        return 0.0 if rounded == 0.0 else rounded
    if isinstance(value, str):
        return value
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        return canonicalize(value.tolist(), where)
    if isinstance(value, Mapping):
        out: dict[str, JSONValue] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise PlanDocumentError(f"{where}: keys must be strings, got {key!r}")
            out[key] = canonicalize(item, f"{where}.{key}")
        return out
    if isinstance(value, Sequence):
        return [canonicalize(item, f"{where}[{n}]") for n, item in enumerate(value)]
    raise PlanDocumentError(f"{where}: unsupported type {type(value).__name__} ({value!r})")


def canonical_json(value: Any) -> str:
    """Canonical JSON text of ``value`` (sorted keys, compact, rounded floats, no NaN)."""
    return json.dumps(canonicalize(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def deep_freeze(value: JSONValue) -> Any:
    """Read-only view of canonical JSON: objects become mapping proxies, lists become tuples.

    Plans and trajectories hash themselves once at construction, so nothing reachable from them may
    change afterwards; mutating a frozen plan raises ``TypeError`` instead of silently invalidating
    an approval.
    """
    if isinstance(value, dict):
        return MappingProxyType({k: deep_freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(deep_freeze(v) for v in value)
    return value


def sha256_of(value: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``value`` without its ``"sha256"`` key."""
    body = {k: v for k, v in value.items() if k != "sha256"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def volume_sha256(volume: Volume) -> str:
    """SHA-256 (hex) of a volume's voxels and grid.

    Hashes ``dtype``, ``shape``, spacing/origin/direction (rounded like the plan's floats) and the
    voxel bytes in C order, little-endian.
    """
    arr = np.asarray(volume.array)
    le = arr.dtype.newbyteorder("<") if arr.dtype.byteorder not in ("|", "=", "<") else arr.dtype
    arr = np.ascontiguousarray(arr.astype(le, copy=False))
    header = canonical_json(
        {
            "dtype": arr.dtype.str,
            "shape": list(arr.shape),
            "spacing_mm": volume.spacing_mm,
            "origin_lps_mm": volume.origin_lps_mm,
            "direction": volume.direction.reshape(-1),
        }
    )
    digest = hashlib.sha256(header.encode("utf-8"))
    digest.update(arr.reshape(-1).view(np.uint8).data)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------
def _require(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise PlanDocumentError(f"{where}: missing required field {key!r}")
    return data[key]


def _point(value: Any, where: str) -> tuple[float, float, float]:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise PlanDocumentError(f"{where}: expected 3 numbers, got {value!r}") from None
    if arr.shape != (3,):
        raise PlanDocumentError(f"{where}: expected 3 numbers, got {value!r}")
    if not np.all(np.isfinite(arr)):
        raise PlanDocumentError(f"{where}: coordinates must be finite, got {arr.tolist()!r}")
    return float(arr[0]), float(arr[1]), float(arr[2])


def _positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise PlanDocumentError(f"{where}: expected a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise PlanDocumentError(f"{where}: must be a finite positive number, got {number!r}")
    return number


def _string(value: Any, where: str, allowed: Sequence[str] | None = None) -> str:
    if not isinstance(value, str):
        raise PlanDocumentError(f"{where}: expected a string, got {value!r}")
    if allowed is not None and value not in allowed:
        raise PlanDocumentError(f"{where}: {value!r} is not one of {list(allowed)}")
    return value


def _metrics(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise PlanDocumentError(f"{where}: expected an object, got {value!r}")
    out: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(item, str | int | float | bool) and item is not None:
            raise PlanDocumentError(f"{where}.{key}: metrics hold numbers, strings, booleans or null, got {item!r}")
        if isinstance(item, float) and not math.isfinite(item):
            raise PlanDocumentError(f"{where}.{key}: number must be finite, got {item!r}")
        out[str(key)] = item
    return out


def _level(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise PlanDocumentError(f"{where}: expected an object, got {value!r}")
    return dict(value)


# --------------------------------------------------------------------------------------------------
# dataclasses
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Trajectory:
    """One planned trajectory (screw, biopsy needle or steerable-needle path).

    Attributes:
        id: Unique id inside the plan, e.g. ``"L3-left"``.
        kind: ``"pedicle_screw"``, ``"biopsy"`` or ``"steerable_needle"``.
        level: Vertebra name (``"L3"``) or ``""`` when not tied to a level.
        side: ``"left"``, ``"right"`` or ``"none"``.
        entry_lps_mm: Entry point ``(3,)``, LPS mm (bone surface for screws, skin for needles).
        tip_lps_mm: Tip ``(3,)``, LPS mm.
        path_lps_mm: Points ``(N, 3)`` from entry to tip, LPS mm (2 points for straight tools).
        diameter_mm: Tool (thread major) diameter, mm.
        length_mm: Tool length along the path, mm.
        metrics: Scalar metrics (mean HU, density score, clearance, grade, pull-out estimate, ...).
        warnings: Human-readable warnings for this trajectory.
    """

    id: str
    kind: str
    level: str
    side: str
    entry_lps_mm: tuple[float, float, float]
    tip_lps_mm: tuple[float, float, float]
    path_lps_mm: tuple[tuple[float, float, float], ...]
    diameter_mm: float
    length_mm: float
    metrics: Mapping[str, Any] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    _sha256: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        where = f"trajectory {self.id!r}"
        _string(self.id, f"{where}.id")
        if not self.id:
            raise PlanDocumentError(f"{where}: id must not be empty")
        _string(self.kind, f"{where}.kind", TRAJECTORY_KINDS)
        _string(self.level, f"{where}.level")
        _string(self.side, f"{where}.side", SIDES)
        object.__setattr__(self, "entry_lps_mm", _point(self.entry_lps_mm, f"{where}.entry_lps_mm"))
        object.__setattr__(self, "tip_lps_mm", _point(self.tip_lps_mm, f"{where}.tip_lps_mm"))
        path = self.path_lps_mm
        if not isinstance(path, Sequence | np.ndarray) or len(path) < 2:
            raise PlanDocumentError(f"{where}.path_lps_mm: needs at least 2 points, got {path!r}")
        if len(path) > _MAX_PATH_POINTS:
            raise PlanDocumentError(f"{where}.path_lps_mm: {len(path)} points exceed {_MAX_PATH_POINTS}")
        pts = tuple(_point(p, f"{where}.path_lps_mm[{n}]") for n, p in enumerate(path))
        object.__setattr__(self, "path_lps_mm", pts)
        object.__setattr__(self, "diameter_mm", _positive(self.diameter_mm, f"{where}.diameter_mm"))
        object.__setattr__(self, "length_mm", _positive(self.length_mm, f"{where}.length_mm"))
        metrics = _metrics(canonicalize(self.metrics, f"{where}.metrics"), f"{where}.metrics")
        object.__setattr__(self, "metrics", MappingProxyType(metrics))
        warnings = self.warnings
        if isinstance(warnings, str) or not isinstance(warnings, Sequence):
            raise PlanDocumentError(f"{where}.warnings: expected a list of strings, got {warnings!r}")
        object.__setattr__(self, "warnings", tuple(_string(w, f"{where}.warnings") for w in warnings))
        object.__setattr__(self, "_sha256", sha256_of(self._body()))

    @property
    def sha256(self) -> str:
        """SHA-256 of the canonical trajectory (approvals bind to it); computed once, the fields are frozen."""
        return self._sha256

    def _body(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "level": self.level,
            "side": self.side,
            "entry_lps_mm": list(self.entry_lps_mm),
            "tip_lps_mm": list(self.tip_lps_mm),
            "path_lps_mm": [list(p) for p in self.path_lps_mm],
            "diameter_mm": self.diameter_mm,
            "length_mm": self.length_mm,
            "metrics": dict(self.metrics),
            "warnings": list(self.warnings),
        }

    def to_dict(self) -> dict[str, Any]:
        """Canonical dictionary including ``sha256``."""
        body: dict[str, Any] = canonicalize(self._body(), f"trajectory {self.id!r}")
        body["sha256"] = self._sha256
        return body

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, verify_hash: bool = True) -> Trajectory:
        """Build from a dictionary, validating fields and (optionally) its ``sha256``."""
        where = f"trajectory {data.get('id', '?')!r}" if isinstance(data, Mapping) else "trajectory"
        if not isinstance(data, Mapping):
            raise PlanDocumentError(f"{where}: expected an object, got {data!r}")
        required = (
            "id",
            "kind",
            "level",
            "side",
            "entry_lps_mm",
            "tip_lps_mm",
            "path_lps_mm",
            "diameter_mm",
            "length_mm",
            "metrics",
        )
        for key in required:
            _require(data, key, where)
        traj = cls(
            id=data["id"],
            kind=data["kind"],
            level=data["level"],
            side=data["side"],
            entry_lps_mm=data["entry_lps_mm"],
            tip_lps_mm=data["tip_lps_mm"],
            path_lps_mm=data["path_lps_mm"],
            diameter_mm=data["diameter_mm"],
            length_mm=data["length_mm"],
            metrics=dict(data["metrics"]) if isinstance(data["metrics"], Mapping) else data["metrics"],
            warnings=tuple(data.get("warnings", ()))
            if isinstance(data.get("warnings", ()), list | tuple)
            else data.get("warnings", ()),
        )
        if verify_hash:
            stored = _require(data, "sha256", where)
            if stored != traj.sha256:
                raise PlanDocumentError(
                    f"{where}: sha256 mismatch (stored {stored!r}, computed {traj.sha256!r}): "
                    "the trajectory was modified"
                )
        return traj


@dataclass(frozen=True)
class ImageInfo:
    """Identity of an input image: hash, grid and provenance."""

    sha256: str
    shape: tuple[int, int, int]
    spacing_mm: tuple[float, float, float]
    origin_lps_mm: tuple[float, float, float]
    direction: tuple[float, ...]
    source: str = ""

    @classmethod
    def from_volume(cls, volume: Volume) -> ImageInfo:
        """Describe ``volume`` (hashing its voxels, see :func:`volume_sha256`)."""
        return cls(
            sha256=volume_sha256(volume),
            shape=volume.shape,
            spacing_mm=_point(volume.spacing_mm, "spacing"),
            origin_lps_mm=_point(volume.origin_lps_mm, "origin"),
            direction=tuple(float(v) for v in volume.direction.reshape(-1)),
            source=str(volume.metadata.get("source", "")),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain dictionary."""
        return {
            "sha256": self.sha256,
            "shape": list(self.shape),
            "spacing_mm": list(self.spacing_mm),
            "origin_lps_mm": list(self.origin_lps_mm),
            "direction": list(self.direction),
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "image") -> ImageInfo:
        """Validate and build from a dictionary."""
        if not isinstance(data, Mapping):
            raise PlanDocumentError(f"{where}: expected an object, got {data!r}")
        sha = _string(_require(data, "sha256", where), f"{where}.sha256")
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise PlanDocumentError(f"{where}.sha256: expected 64 lowercase hex digits, got {sha!r}")
        shape = _require(data, "shape", where)
        if (
            not isinstance(shape, list | tuple)
            or len(shape) != 3
            or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
        ):
            raise PlanDocumentError(f"{where}.shape: expected 3 positive integers, got {shape!r}")
        direction = _require(data, "direction", where)
        if not isinstance(direction, list | tuple) or len(direction) != 9:
            raise PlanDocumentError(f"{where}.direction: expected 9 numbers, got {direction!r}")
        dir_arr = np.asarray([_point(direction[i : i + 3], f"{where}.direction") for i in (0, 3, 6)])
        return cls(
            sha256=sha,
            shape=(int(shape[0]), int(shape[1]), int(shape[2])),
            spacing_mm=_point(_require(data, "spacing_mm", where), f"{where}.spacing_mm"),
            origin_lps_mm=_point(_require(data, "origin_lps_mm", where), f"{where}.origin_lps_mm"),
            direction=tuple(float(v) for v in dir_arr.reshape(-1)),
            source=_string(data.get("source", ""), f"{where}.source"),
        )


@dataclass(frozen=True)
class PlanDocument:
    """A complete plan (schema ``needle_steering.plan/1``).

    Attributes:
        image: The planning CT.
        labels: The label map used (same grid as ``image``).
        trajectories: Planned trajectories (screws, biopsy needle, steerable path).
        skipped: ``{"L5-left": reason}`` for requested trajectories that could not be planned safely.
        levels: Per-level information (bone quality, pedicle measurements, derived structures).
        warnings: Plan-wide warnings, most important first.
        derived: What the planner derived because the label map lacked it (e.g. ``"spinal_canal"``).
        options: Planning options used (for reproducibility).
        created_utc: ISO-8601 creation time (UTC).
        created_by: Software name and version.
    """

    image: ImageInfo
    labels: ImageInfo
    trajectories: tuple[Trajectory, ...]
    skipped: Mapping[str, str] = field(default_factory=dict)
    levels: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    derived: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    created_utc: str = ""
    created_by: str = "needle_steering.planning"
    schema: str = SCHEMA
    _sha256: str = field(init=False, repr=False, compare=False, default="")

    def __post_init__(self) -> None:
        if self.schema != SCHEMA:
            raise PlanDocumentError(f"plan: unsupported schema {self.schema!r}; expected {SCHEMA!r}")
        ids = [t.id for t in self.trajectories]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise PlanDocumentError(f"plan: duplicate trajectory ids {dupes}")
        if not self.created_utc:
            object.__setattr__(self, "created_utc", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        object.__setattr__(self, "trajectories", tuple(self.trajectories))
        object.__setattr__(self, "warnings", tuple(self.warnings))
        for name in ("skipped", "levels", "derived", "options"):
            object.__setattr__(self, name, deep_freeze(canonicalize(getattr(self, name), f"plan.{name}")))
        object.__setattr__(self, "_sha256", sha256_of(self._body()))

    def trajectory(self, trajectory_id: str) -> Trajectory:
        """The trajectory with ``trajectory_id`` (:class:`PlanDocumentError` if absent)."""
        for traj in self.trajectories:
            if traj.id == trajectory_id:
                return traj
        raise PlanDocumentError(f"plan has no trajectory {trajectory_id!r}; ids: {[t.id for t in self.trajectories]}")

    def _body(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "created_utc": self.created_utc,
            "created_by": self.created_by,
            "image": self.image.to_dict(),
            "labels": self.labels.to_dict(),
            "trajectories": [t.to_dict() for t in self.trajectories],
            "skipped": dict(self.skipped),
            "levels": dict(self.levels),
            "warnings": list(self.warnings),
            "derived": dict(self.derived),
            "options": dict(self.options),
        }

    @property
    def sha256(self) -> str:
        """SHA-256 of the canonical plan without its own hash field; computed once, the fields are frozen."""
        return self._sha256

    def to_dict(self) -> dict[str, Any]:
        """Canonical dictionary including ``sha256``."""
        body: dict[str, Any] = canonicalize(self._body(), "plan")
        body["sha256"] = self._sha256
        return body

    def to_json(self) -> str:
        """Canonical JSON text (one line, trailing newline)."""
        return canonical_json(self.to_dict()) + "\n"

    @classmethod
    def from_dict(cls, data: Any) -> PlanDocument:
        """Validate ``data`` (schema, required fields, finite numbers, hashes) and build the plan."""
        if not isinstance(data, Mapping):
            raise PlanDocumentError(f"plan: expected a JSON object, got {type(data).__name__}")
        schema = _require(data, "schema", "plan")
        if schema != SCHEMA:
            raise PlanDocumentError(f"plan: unsupported schema {schema!r}; this software reads {SCHEMA!r}")
        canonicalize(data, "plan")  # finite numbers, string keys, plain JSON types
        for key in ("image", "labels", "trajectories", "created_utc", "created_by", "sha256"):
            _require(data, key, "plan")
        trajs_raw = data["trajectories"]
        if not isinstance(trajs_raw, list):
            raise PlanDocumentError(f"plan.trajectories: expected a list, got {trajs_raw!r}")
        trajectories = tuple(Trajectory.from_dict(t) for t in trajs_raw)
        for key in ("skipped", "levels", "derived", "options"):
            if not isinstance(data.get(key, {}), Mapping):
                raise PlanDocumentError(f"plan.{key}: expected an object, got {data.get(key)!r}")
        skipped = {str(k): _string(v, f"plan.skipped.{k}") for k, v in data.get("skipped", {}).items()}
        derived = {str(k): _string(v, f"plan.derived.{k}") for k, v in data.get("derived", {}).items()}
        warnings = data.get("warnings", [])
        if not isinstance(warnings, list):
            raise PlanDocumentError(f"plan.warnings: expected a list, got {warnings!r}")
        plan = cls(
            image=ImageInfo.from_dict(data["image"], "plan.image"),
            labels=ImageInfo.from_dict(data["labels"], "plan.labels"),
            trajectories=trajectories,
            skipped=skipped,
            levels={str(k): _level(v, f"plan.levels.{k}") for k, v in data.get("levels", {}).items()},
            warnings=tuple(_string(w, "plan.warnings") for w in warnings),
            derived=derived,
            options=dict(data.get("options", {})),
            created_utc=_string(data["created_utc"], "plan.created_utc"),
            created_by=_string(data["created_by"], "plan.created_by"),
            schema=schema,
        )
        stored = data["sha256"]
        if stored != plan.sha256:
            raise PlanDocumentError(
                f"plan: sha256 mismatch (stored {stored!r}, computed {plan.sha256!r}): the plan was modified"
            )
        return plan


# --------------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------------
def _reject_constant(token: str) -> float:
    raise PlanDocumentError(f"plan: non-finite number {token} is not allowed")


def load_plan(path_or_text: str | os.PathLike[str]) -> PlanDocument:
    """Read and validate a plan document from a file path or from JSON text.

    A string starting with ``{`` (after whitespace) is parsed as JSON text; anything else is a path.

    Raises:
        PlanDocumentError: Missing/unreadable file, invalid JSON, wrong schema version, missing
            fields, non-finite numbers, or a hash mismatch (tampering).
    """
    if isinstance(path_or_text, str) and path_or_text.lstrip().startswith("{"):
        text = path_or_text
        source = "<text>"
    else:
        p = Path(path_or_text)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PlanDocumentError(f"{p}: no such plan file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PlanDocumentError(f"{p}: cannot read plan ({exc})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise PlanDocumentError(
            f"{source}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
        ) from None
    try:
        return PlanDocument.from_dict(data)
    except PlanDocumentError as exc:
        raise PlanDocumentError(f"{source}: {exc}") from None


def save_plan(plan: PlanDocument, path: str | os.PathLike[str]) -> Path:
    """Write ``plan`` in canonical form atomically (temporary file in the same folder, renamed).

    Returns:
        The written path.

    Raises:
        PlanDocumentError: The folder does not exist or the write fails (no partial file remains).
    """
    p = Path(path)
    if not p.parent.exists():
        raise PlanDocumentError(f"{p}: folder {p.parent} does not exist")
    text = plan.to_json()
    try:
        return write_text_atomic(p, text)
    except OSError as exc:
        raise PlanDocumentError(f"{p}: write failed ({exc})") from None


__all__ = [
    "FLOAT_DECIMALS",
    "SCHEMA",
    "TRAJECTORY_KINDS",
    "ImageInfo",
    "PlanDocument",
    "Trajectory",
    "canonical_json",
    "canonicalize",
    "load_plan",
    "save_plan",
    "sha256_of",
    "volume_sha256",
]
