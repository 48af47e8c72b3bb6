"""Per-level vertebral anatomy used by the phantom generator, with sources.

All lengths are millimetres, all angles degrees. The tables hold *approximate adult means*,
rounded and smoothed between levels; they were assembled from the morphometric literature
below (not copied from any single table) and are good to roughly +-10 %, which is inside the
spread between individuals and between the published series themselves:

* Panjabi MM, Takata K, Goel V, et al. *Thoracic human vertebrae. Quantitative three-dimensional
  anatomy.* Spine 1991;16(8):888-901 -- thoracic body width/depth/height, pedicle width/height and
  angles, canal, spinous and transverse processes.
* Panjabi MM, Goel V, Oxland T, et al. *Human lumbar vertebrae. Quantitative three-dimensional
  anatomy.* Spine 1992;17(3):299-306 -- lumbar body, canal, processes.
* Zindrick MR, Wiltse LL, Doornik A, et al. *Analysis of the morphometric characteristics of the
  thoracic and lumbar pedicles.* Spine 1987;12(2):160-166 -- pedicle isthmus width/height,
  transverse and sagittal pedicle angles (L1 ~11 deg to L5 ~30 deg convergence). The lumbar
  transverse pedicle widths L1-L4 are Zindrick's means (8.7, 8.9, 10.3, 12.9 mm); an earlier
  version of this table was about 10 % narrower than its own source (7.8, 8.3, 9.6, 11.3 mm).
* Olsewski JM, Simmons EH, Kallen FC, et al. *Morphometry of the lumbar spine: anatomical
  perspectives related to transpedicular fixation.* J Bone Joint Surg Am 1990;72(4):541-549 --
  lumbar isthmus widths (the L5 value here, ~13 mm, follows the CT-based series; Zindrick's
  cadaver L5 of ~18 mm measures the whole pedicle base).
* Kaur K, Singh R, Prasath V, et al. *Computed tomographic-based morphometric study of thoracic
  spine.* J Clin Orthop Trauma 2016;7(2):101-108 -- thoracic spinous process inclination and
  transverse process lengths.
* Masharawi Y, Rothschild B, Dar G, et al. *Facet orientation in the thoracolumbar spine.* Spine
  2004;29(16):1755-1763 -- coronal thoracic facets, sagittal-to-oblique lumbar facets.
* Sagittal curvature: supine lumbar lordosis ~40-50 deg (L1-S1) and thoracic kyphosis ~30 deg
  (T4-T12), flatter than the standing values of Roussouly et al. Spine 2005;30(3):346-353.
* Disc heights and rib lengths: typical radiographic/anatomical adult values (approximate).

Conventions of the local vertebra frame used across :mod:`needle_steering.sim.phantom`:
origin at the vertebral body centre, +x toward the patient's left, +y posterior, +z superior
(the superior endplate normal), i.e. LPS axes of an upright, unrotated vertebra.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np

from needle_steering.perception.labels import STANDARD_ORDER


@dataclass(frozen=True)
class LevelAnatomy:
    """Dimensions of one vertebra (mm, degrees). See the module docstring for sources.

    Attributes:
        name: Level name (``"T12"``, ``"L3"``, ...).
        body_width_mm: Transverse width of the vertebral body (endplate level).
        body_depth_mm: Antero-posterior depth of the body in the midline.
        body_height_mm: Posterior body height.
        body_height_anterior_mm: Anterior body height (wedging).
        pedicle_width_mm: Outer transverse width of the pedicle isthmus.
        pedicle_height_mm: Outer cranio-caudal height of the pedicle isthmus.
        pedicle_transverse_deg: Convergence of the pedicle axis toward the midline, anteriorly.
        pedicle_sagittal_deg: Caudal tilt of the pedicle axis going anteriorly (anatomic axis).
        canal_width_mm: Interpedicular canal width.
        canal_depth_mm: Antero-posterior canal depth.
        lamina_height_mm: Cranio-caudal lamina height.
        lamina_thickness_mm: Lamina thickness.
        spinous_length_mm: Spinous process length from the lamina junction to the tip.
        spinous_height_mm: Cranio-caudal height of the spinous process.
        spinous_angle_deg: Caudal inclination of the spinous process below the axial plane.
        transverse_width_mm: Tip-to-tip width of the transverse processes.
        transverse_angle_deg: Posterior inclination of the transverse processes from the coronal plane.
        facet_angle_deg: Superior facet joint angle from the sagittal plane (0 sagittal, 90 coronal).
        disc_below_mm: Mid-sagittal height of the disc below this level.
        rib_length_mm: Arc length of the rib (0: no rib).
        sagittal_tilt_deg: Supine tilt of the superior axis toward posterior (+) or anterior (-).
    """

    name: str
    body_width_mm: float
    body_depth_mm: float
    body_height_mm: float
    body_height_anterior_mm: float
    pedicle_width_mm: float
    pedicle_height_mm: float
    pedicle_transverse_deg: float
    pedicle_sagittal_deg: float
    canal_width_mm: float
    canal_depth_mm: float
    lamina_height_mm: float
    lamina_thickness_mm: float
    spinous_length_mm: float
    spinous_height_mm: float
    spinous_angle_deg: float
    transverse_width_mm: float
    transverse_angle_deg: float
    facet_angle_deg: float
    disc_below_mm: float
    rib_length_mm: float
    sagittal_tilt_deg: float

    @property
    def is_thoracic(self) -> bool:
        """Whether the level is T1-T12."""
        return self.name.startswith("T")

    @property
    def has_rib(self) -> bool:
        """Whether the level carries a pair of ribs (T1-T12)."""
        return self.rib_length_mm > 0


# name: W, D, H, Ha, ped W, ped H, ped transverse, ped sagittal, canal W, canal D
_BODY_PEDICLE_CANAL: dict[str, tuple[float, ...]] = {
    "T1": (27.0, 16.5, 15.0, 14.5, 8.0, 9.5, 30.0, 12.0, 22.0, 15.0),
    "T2": (27.0, 17.5, 16.5, 15.5, 6.8, 11.5, 24.0, 14.0, 18.0, 15.0),
    "T3": (27.0, 19.0, 17.0, 16.0, 5.6, 12.0, 17.0, 15.0, 16.5, 15.0),
    "T4": (27.5, 21.0, 17.5, 16.5, 5.0, 12.0, 13.0, 15.0, 16.0, 15.0),
    "T5": (28.5, 23.0, 18.0, 17.0, 5.0, 11.5, 11.0, 15.0, 16.0, 15.0),
    "T6": (29.5, 25.0, 18.5, 17.5, 5.2, 12.0, 10.0, 15.0, 16.0, 15.5),
    "T7": (30.5, 26.5, 19.0, 18.0, 5.5, 12.5, 9.0, 15.0, 16.0, 15.5),
    "T8": (32.0, 27.5, 19.5, 18.5, 6.0, 13.0, 8.0, 14.0, 16.5, 15.5),
    "T9": (34.0, 28.5, 20.5, 19.5, 6.5, 13.5, 7.0, 13.0, 17.0, 15.5),
    "T10": (36.0, 29.5, 21.5, 20.5, 7.0, 15.0, 6.0, 11.0, 17.5, 16.0),
    "T11": (38.5, 31.0, 23.0, 22.0, 7.8, 16.5, 5.0, 8.0, 19.0, 16.5),
    "T12": (40.5, 32.5, 24.0, 23.0, 8.0, 16.0, 4.0, 6.0, 21.0, 17.0),
    "L1": (42.0, 33.5, 26.0, 24.5, 8.7, 15.4, 11.0, 4.0, 22.0, 17.5),
    "L2": (44.0, 34.5, 26.5, 25.5, 8.9, 15.0, 12.0, 3.0, 22.5, 17.0),
    "L3": (46.0, 35.5, 26.5, 26.5, 10.3, 14.9, 14.5, 2.0, 23.0, 16.5),
    "L4": (48.0, 36.0, 26.0, 27.0, 12.9, 14.8, 18.0, 1.0, 24.0, 16.5),
    "L5": (50.0, 36.0, 25.0, 28.5, 13.2, 14.0, 27.0, 0.0, 26.5, 17.0),
}

# name: lamina H, lamina t, spinous L, spinous H, spinous angle, TP width, TP angle, facet angle,
#       disc below, rib length, supine sagittal tilt
_POSTERIOR: dict[str, tuple[float, ...]] = {
    "T1": (18.0, 6.0, 38.0, 10.0, 35.0, 78.0, 20.0, 75.0, 4.5, 140.0, -22.0),
    "T2": (19.0, 6.0, 40.0, 10.0, 45.0, 75.0, 25.0, 75.0, 4.5, 190.0, -18.0),
    "T3": (19.0, 6.0, 41.0, 9.5, 50.0, 73.0, 30.0, 75.0, 4.5, 220.0, -14.0),
    "T4": (19.5, 6.0, 42.0, 9.0, 55.0, 72.0, 30.0, 75.0, 4.5, 250.0, -10.0),
    "T5": (20.0, 6.0, 42.0, 9.0, 58.0, 72.0, 30.0, 75.0, 4.8, 270.0, -6.0),
    "T6": (20.0, 6.0, 42.0, 9.0, 60.0, 72.0, 30.0, 75.0, 5.0, 285.0, -3.0),
    "T7": (20.5, 6.5, 41.0, 9.5, 58.0, 72.0, 30.0, 75.0, 5.0, 290.0, 0.0),
    "T8": (21.0, 6.5, 40.0, 10.0, 52.0, 70.0, 28.0, 75.0, 5.2, 285.0, 3.0),
    "T9": (21.0, 6.5, 38.0, 11.0, 45.0, 66.0, 26.0, 75.0, 5.5, 270.0, 6.0),
    "T10": (21.5, 6.5, 35.0, 13.0, 38.0, 62.0, 24.0, 72.0, 5.8, 245.0, 9.0),
    "T11": (22.0, 6.5, 32.0, 16.0, 28.0, 55.0, 20.0, 65.0, 6.5, 200.0, 11.0),
    "T12": (23.0, 6.5, 30.0, 20.0, 18.0, 48.0, 15.0, 65.0, 7.5, 130.0, 12.0),
    "L1": (24.0, 6.5, 30.0, 22.0, 12.0, 70.0, 5.0, 30.0, 9.0, 0.0, 11.0),
    "L2": (25.0, 6.5, 31.0, 24.0, 8.0, 80.0, 8.0, 30.0, 10.0, 0.0, 7.0),
    "L3": (25.0, 7.0, 31.0, 25.0, 5.0, 90.0, 10.0, 35.0, 10.5, 0.0, 1.0),
    "L4": (24.0, 7.5, 29.0, 23.0, 5.0, 86.0, 12.0, 42.0, 11.0, 0.0, -7.0),
    "L5": (22.0, 8.0, 24.0, 18.0, 8.0, 90.0, 15.0, 48.0, 10.5, 0.0, -17.0),
}


def _build_table() -> dict[str, LevelAnatomy]:
    table: dict[str, LevelAnatomy] = {}
    for name, body in _BODY_PEDICLE_CANAL.items():
        post = _POSTERIOR[name]
        table[name] = LevelAnatomy(name, *body, *post)
    return table


#: Mean anatomy of every supported vertebra (T1-L5).
LEVEL_ANATOMY: dict[str, LevelAnatomy] = _build_table()


@dataclass(frozen=True)
class SacrumAnatomy:
    """Approximate adult sacrum (mm, degrees); same sources as the lumbar tables.

    Attributes:
        s1_width_mm: Width of the S1 body (upper endplate).
        s1_depth_mm: Antero-posterior depth of the S1 endplate.
        s1_height_mm: Height of the S1 segment.
        ala_width_mm: Total width across the alae.
        length_mm: Length from the S1 endplate to the apex (S5), along the curve.
        curvature_deg: Total anterior concavity of the sacrum (S1 to S5 tilt change).
        canal_width_mm: Width of the sacral canal at S1.
        canal_depth_mm: Depth of the sacral canal at S1.
        facet_angle_deg: S1 superior facet angle from the sagittal plane.
        sacral_slope_deg: Supine tilt of the S1 endplate normal toward anterior.
    """

    s1_width_mm: float = 50.0
    s1_depth_mm: float = 33.0
    s1_height_mm: float = 24.0
    ala_width_mm: float = 108.0
    length_mm: float = 105.0
    curvature_deg: float = 35.0
    canal_width_mm: float = 29.0
    canal_depth_mm: float = 13.0
    facet_angle_deg: float = 50.0
    sacral_slope_deg: float = 38.0


SACRUM_ANATOMY = SacrumAnatomy()

#: Levels the generator can build, cranio-caudal.
SUPPORTED_LEVELS: tuple[str, ...] = (*LEVEL_ANATOMY.keys(), "S")

# Fields varied as lengths (relative noise) and as angles (absolute noise, degrees).
_ANGLE_FIELDS = (
    "pedicle_transverse_deg",
    "pedicle_sagittal_deg",
    "spinous_angle_deg",
    "transverse_angle_deg",
    "facet_angle_deg",
)
_FIXED_FIELDS = ("name", "sagittal_tilt_deg")


def vary_level(
    anatomy: LevelAnatomy,
    rng: np.random.Generator,
    *,
    global_scale: float = 1.0,
    size_sd: float = 0.02,
    angle_sd_deg: float = 1.5,
) -> LevelAnatomy:
    """One individual's version of a level: sizes scaled, angles perturbed.

    Args:
        anatomy: Mean anatomy.
        rng: Random generator (consumed in a fixed order, so results are reproducible).
        global_scale: Patient size factor applied to every length (e.g. 0.95 small, 1.05 large).
        size_sd: Relative standard deviation of each length around ``global_scale``.
        angle_sd_deg: Standard deviation of each angle, degrees.

    Returns:
        The varied anatomy (a new frozen object).
    """
    changes: dict[str, float] = {}
    for f in fields(anatomy):
        if f.name in _FIXED_FIELDS:
            continue
        value = float(getattr(anatomy, f.name))
        if f.name in _ANGLE_FIELDS:
            changes[f.name] = value + float(np.clip(rng.normal(0.0, angle_sd_deg), -3 * angle_sd_deg, 3 * angle_sd_deg))
        else:
            factor = global_scale * (1.0 + float(np.clip(rng.normal(0.0, size_sd), -3 * size_sd, 3 * size_sd)))
            changes[f.name] = value * factor
    return replace(anatomy, **changes)  # type: ignore[arg-type]


def level_index(name: str) -> int:
    """Cranio-caudal index of a level in the standard order (``"T1"`` < ``"L5"`` < ``"S"``)."""
    return STANDARD_ORDER.index(name)


__all__ = [
    "LEVEL_ANATOMY",
    "SACRUM_ANATOMY",
    "SUPPORTED_LEVELS",
    "LevelAnatomy",
    "SacrumAnatomy",
    "level_index",
    "vary_level",
]
