"""Configuration and result types of the synthetic spine phantom."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from needle_steering.errors import LabelError, NeedleSteeringError
from needle_steering.perception.labels import STANDARD_ORDER, level_id, level_name
from needle_steering.perception.volume import Volume
from needle_steering.sim.phantom.anatomy import SUPPORTED_LEVELS

Modality = Literal["ct", "cbct"]
LesionType = Literal["random", "lytic", "blastic"]

MIN_SPACING_MM = 0.5
MAX_SPACING_MM = 3.0


class PhantomConfigError(NeedleSteeringError, ValueError):
    """A :class:`PhantomConfig` field is invalid (the message names the field and its value)."""


def _finite(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PhantomConfigError(f"{name} must be a number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise PhantomConfigError(f"{name} must be finite, got {value!r}")
    return out


def _in_range(name: str, value: Any, lo: float, hi: float, unit: str = "") -> float:
    out = _finite(name, value)
    if not lo <= out <= hi:
        raise PhantomConfigError(f"{name} must lie in [{lo}, {hi}]{unit}, got {value!r}{unit}")
    return out


def normalise_levels(levels: Any) -> tuple[str, ...]:
    """Validate level names and return them cranio-caudal (``"sacrum"``/``"S1"`` become ``"S"``).

    Raises:
        PhantomConfigError: Empty, unknown, unsupported, duplicated or non-contiguous levels.
    """
    if isinstance(levels, str) or not hasattr(levels, "__iter__"):
        raise PhantomConfigError(f"levels must be a sequence of level names, got {levels!r}")
    names: list[str] = []
    for raw in levels:
        if not isinstance(raw, str):
            raise PhantomConfigError(f"levels must hold level names (str), got {raw!r}")
        try:
            name = level_name(level_id(raw))
        except LabelError as exc:
            raise PhantomConfigError(f"levels: {exc}") from None
        if name not in SUPPORTED_LEVELS:
            raise PhantomConfigError(
                f"levels: {raw!r} is not supported by the phantom (supported: T1-T12, L1-L5, S)"
            )
        if name in names:
            raise PhantomConfigError(f"levels: {raw!r} is listed twice in {tuple(levels)!r}")
        names.append(name)
    if not names:
        raise PhantomConfigError("levels must name at least one vertebra, got an empty sequence")
    ordered = sorted(names, key=STANDARD_ORDER.index)
    idx = [STANDARD_ORDER.index(n) for n in ordered]
    if idx[-1] - idx[0] != len(idx) - 1:
        missing = [STANDARD_ORDER[i] for i in range(idx[0], idx[-1] + 1) if STANDARD_ORDER[i] not in ordered]
        raise PhantomConfigError(f"levels must be contiguous, {tuple(levels)!r} misses {missing}")
    return tuple(ordered)


@dataclass(frozen=True)
class PhantomConfig:
    """What to generate. Every field has a default; the same config always gives the same phantom.

    Attributes:
        seed: Seed of every random choice (anatomy, pose, texture, noise); non-negative int.
        levels: Contiguous vertebra names (``"T1"``-``"L5"``, ``"S"`` = sacrum), any order; stored
            cranio-caudal.
        modality: ``"ct"`` (HU) or ``"cbct"`` (grey values with CBCT artefacts and a cylindrical FOV).
        spacing_mm: Isotropic output spacing, 0.5-3 mm.
        lesion: Put one lytic or blastic lesion in a random (seeded) vertebral body.
        bone_quality: 1 normal ... 0 severely osteoporotic (cancellous ~250 HU -> ~60 HU).
        lesion_type: ``"random"`` (seeded), ``"lytic"`` or ``"blastic"``.
        lesion_level: Level of the lesion (default: random among the requested vertebrae).
        contrast: Contrast-enhanced blood (aorta ~250 HU, IVC ~150 HU) instead of ~40 HU.
        noise_hu: Image noise standard deviation (HU); default 15 HU (CT) or 60 (CBCT) at 1 mm,
            scaled by ``1/sqrt(spacing_mm)``.
        psf_sigma_mm: Gaussian point-spread sigma (mm); default 0.6 (CT), 0.8 (CBCT).
        fov_mm: In-plane field of view ``(x, y)`` centred on the scanner isocentre, mm.
        margin_mm: Extra z extent above and below the requested levels, mm.
        curvature_scale: Scale of lordosis/kyphosis (1 = average supine adult, 0 = straight);
            default: random around 1 (sd 0.15).
        tilt_sd_deg: Standard deviation of the random patient rotation about each axis, degrees.
        context_levels: Also draw (and label) the neighbouring vertebrae cut by the field of view,
            as in a real scan; they are listed in ``meta["context_levels"]``.
        table: Draw the scanner table below the patient (unlabelled).
        cbct_fov_diameter_mm: Diameter of the CBCT reconstruction cylinder, mm.
    """

    seed: int = 0
    levels: tuple[str, ...] = ("T12", "L1", "L2", "L3", "L4", "L5")
    modality: Modality = "ct"
    spacing_mm: float = 1.0
    lesion: bool = False
    bone_quality: float = 1.0
    lesion_type: LesionType = "random"
    lesion_level: str | None = None
    contrast: bool = False
    noise_hu: float | None = None
    psf_sigma_mm: float | None = None
    fov_mm: tuple[float, float] = (330.0, 250.0)
    margin_mm: float = 10.0
    curvature_scale: float | None = None
    tilt_sd_deg: float = 2.0
    context_levels: bool = True
    table: bool = True
    cbct_fov_diameter_mm: float = 200.0

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise PhantomConfigError(f"seed must be a non-negative int, got {self.seed!r}")
        object.__setattr__(self, "levels", normalise_levels(self.levels))
        if self.modality not in ("ct", "cbct"):
            raise PhantomConfigError(f"modality must be 'ct' or 'cbct', got {self.modality!r}")
        spacing = _finite("spacing_mm", self.spacing_mm)
        if not MIN_SPACING_MM <= spacing <= MAX_SPACING_MM:
            raise PhantomConfigError(
                f"spacing_mm must lie in [{MIN_SPACING_MM}, {MAX_SPACING_MM}] mm, got {self.spacing_mm!r}"
            )
        object.__setattr__(self, "spacing_mm", spacing)
        if not isinstance(self.lesion, bool):
            raise PhantomConfigError(f"lesion must be True or False, got {self.lesion!r}")
        object.__setattr__(self, "bone_quality", _in_range("bone_quality", self.bone_quality, 0.0, 1.0))
        if self.lesion_type not in ("random", "lytic", "blastic"):
            raise PhantomConfigError(
                f"lesion_type must be 'random', 'lytic' or 'blastic', got {self.lesion_type!r}"
            )
        if self.lesion_level is not None:
            try:
                name = level_name(level_id(str(self.lesion_level)))
            except LabelError as exc:
                raise PhantomConfigError(f"lesion_level: {exc}") from None
            if name not in self.levels or name == "S":
                raise PhantomConfigError(
                    f"lesion_level must be one of the requested vertebrae {self.levels} (not the sacrum), "
                    f"got {self.lesion_level!r}"
                )
            object.__setattr__(self, "lesion_level", name)
        if not isinstance(self.contrast, bool):
            raise PhantomConfigError(f"contrast must be True or False, got {self.contrast!r}")
        if self.noise_hu is not None:
            object.__setattr__(self, "noise_hu", _in_range("noise_hu", self.noise_hu, 0.0, 500.0, " HU"))
        if self.psf_sigma_mm is not None:
            object.__setattr__(
                self, "psf_sigma_mm", _in_range("psf_sigma_mm", self.psf_sigma_mm, 0.0, 3.0, " mm")
            )
        fov = tuple(self.fov_mm) if hasattr(self.fov_mm, "__iter__") else (self.fov_mm,)
        if len(fov) != 2:
            raise PhantomConfigError(f"fov_mm must be (x, y) in mm, got {self.fov_mm!r}")
        object.__setattr__(
            self, "fov_mm", tuple(_in_range("fov_mm", v, 200.0, 600.0, " mm") for v in fov)
        )
        object.__setattr__(self, "margin_mm", _in_range("margin_mm", self.margin_mm, 0.0, 60.0, " mm"))
        if self.curvature_scale is not None:
            object.__setattr__(
                self, "curvature_scale", _in_range("curvature_scale", self.curvature_scale, 0.0, 2.0)
            )
        object.__setattr__(self, "tilt_sd_deg", _in_range("tilt_sd_deg", self.tilt_sd_deg, 0.0, 8.0, " deg"))
        for flag in ("context_levels", "table"):
            if not isinstance(getattr(self, flag), bool):
                raise PhantomConfigError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        object.__setattr__(
            self,
            "cbct_fov_diameter_mm",
            _in_range("cbct_fov_diameter_mm", self.cbct_fov_diameter_mm, 100.0, 600.0, " mm"),
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy of the fields."""
        return {
            "seed": self.seed,
            "levels": list(self.levels),
            "modality": self.modality,
            "spacing_mm": self.spacing_mm,
            "lesion": self.lesion,
            "bone_quality": self.bone_quality,
            "lesion_type": self.lesion_type,
            "lesion_level": self.lesion_level,
            "contrast": self.contrast,
            "noise_hu": self.noise_hu,
            "psf_sigma_mm": self.psf_sigma_mm,
            "fov_mm": list(self.fov_mm),
            "margin_mm": self.margin_mm,
            "curvature_scale": self.curvature_scale,
            "tilt_sd_deg": self.tilt_sd_deg,
            "context_levels": self.context_levels,
            "table": self.table,
            "cbct_fov_diameter_mm": self.cbct_fov_diameter_mm,
        }


@dataclass(frozen=True, eq=False)
class Phantom:
    """A generated phantom.

    Attributes:
        ct: float32 HU (CT) or CBCT grey values on an LPS millimetre grid.
        labels: uint8 label map on the same grid (VerSe vertebra ids and the structure ids of
            :mod:`needle_steering.perception.labels`).
        meta: JSON-serialisable ground truth; every point is LPS millimetres (see ``docs/phantom.md``).
    """

    ct: Volume
    labels: Volume
    meta: dict[str, Any] = field(default_factory=dict)


__all__ = ["LesionType", "Modality", "Phantom", "PhantomConfig", "PhantomConfigError", "normalise_levels"]
