"""Naming vertebral segments (cranial -> caudal) with anatomical anchors and a confidence.

Anchors, strongest first:

- the sacrum: the caudal segment in contact with the iliac bones (the sacroiliac joints; the
  segmenter reports ``iliac_contact_ml`` when it followed the bone below the caudal-most disc);
  without that measurement, the caudal segment that is much larger (fused sacral vertebrae, alae)
  than the mobile vertebrae above it. The segment above it is L5;
- ribs: thoracic vertebrae carry ribs; the last rib-bearing vertebra is T12. The segmenter reports
  ``rib_sides``: ribs that articulate with the segment (bone outside the spine within 3 mm of it,
  running laterally to >= 65 mm from the canal; a short floating 12th rib counts, a lumbar transverse
  process and the iliac crest do not). Segments cut by the top of the field of view neither start
  nor break the rib run (their rib heads may lie above it); the anchor needs the vertebra below the
  last rib-bearing one in view (not a sliver). Bone beside the lumbar spine low down is the iliac
  crest, not a rib, so rib evidence counts only for segments well above the sacrum;
- without either anchor the names come from a weak prior (the caudal-most complete segment is
  taken as L5) and the confidence says so: labels are never shifted silently.

Transitional anatomy (a sixth lumbar vertebra, L6 = 25; thirteen rib-bearing vertebrae, T13 = 28)
shows up as a disagreement between the two anchors; the result then keeps the sacrum's naming,
lowers the confidence and states the disagreement.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from needle_steering.perception.labels import STANDARD_ORDER, level_id

#: Minimum bone beside a vertebra (ml) that counts as a rib pair.
RIB_EVIDENCE_ML = 1.5
#: A segment cut by the bottom of the field of view needs this much body height (mm) in view to count as
#: rib-free (the segment below the last rib-bearing one).
MIN_RIBLESS_BODY_MM = 10.0
#: A caudal segment this much larger than the typical vertebra is taken as the sacrum.
SACRUM_VOLUME_RATIO = 1.6
#: Above this ratio the caudal segment is more likely L5 and the sacrum merged (unresolved disc).
MERGED_VOLUME_RATIO = 2.0
#: Bone of the caudal segment within 4 mm of the iliac bone (ml) that makes it the sacrum (sacroiliac joints).
#: Measured: whole sacrum 7.7-24 ml (phantoms at 1-2 mm, real 3 mm CT 12.4 ml); L5 0-0.7 ml in phantoms but 1.7 ml
#: on the real CT, whose L5 transverse processes reach the iliac crests. A false sacrum shifts every name
#: (at confidence 0.6 when it is the only anchor); a missed one only costs the anchor.
SACRUM_ILIAC_CONTACT_ML = 3.0


@dataclass
class LevelAssignment:
    """Names of the segments, cranial -> caudal, with confidence (0-1) and reasons."""

    names: list[str]
    confidence: float
    anchors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def ids(self) -> list[int]:
        """VerSe ids in segment order."""
        return [level_id(n) for n in self.names]


def _sacrum_ratio(features: list[dict[str, Any]]) -> float:
    """Volume of the caudal segment over the typical (median) complete vertebra above it."""
    if len(features) < 3:
        return 0.0
    others = [f["volume_ml"] for f in features[:-1] if not f["touches_top"]] or [features[-2]["volume_ml"]]
    return float(features[-1]["volume_ml"] / max(float(np.median(others)), 1e-6))


def _bears_ribs(feature: dict[str, Any]) -> bool:
    """Rib evidence of one segment: an articulated rib on either side (``rib_sides`` from the segmenter's
    articulation test), else at least :data:`RIB_EVIDENCE_ML` of bone beside it (``rib_bone_ml``)."""
    if "rib_sides" in feature:
        return int(feature["rib_sides"]) >= 1
    return float(feature["rib_bone_ml"]) >= RIB_EVIDENCE_ML


def _names_from_anchor(n: int, anchor_index: int, anchor_name: str) -> list[str]:
    pos = STANDARD_ORDER.index(anchor_name)
    names = []
    for i in range(n):
        j = pos + (i - anchor_index)
        if j < 0 or j >= len(STANDARD_ORDER):
            names.append("")
        else:
            names.append(STANDARD_ORDER[j])
    return names


def assign_levels(features: list[dict[str, Any]]) -> LevelAssignment:
    """Name segments described by ``features`` (as produced by the classical segmenter).

    Each feature dict holds ``volume_ml``, ``width_mm``, ``rib_bone_ml``, ``touches_top``,
    ``touches_bottom``; optionally ``rib_sides`` / ``rib_cut_sides`` (articulation test; without them
    ``rib_bone_ml >= RIB_EVIDENCE_ML`` is the rib flag), ``body_height_mm``, ``iliac_contact_ml`` and
    ``sacral_checked``. The list runs cranial -> caudal.
    """
    n = len(features)
    if n == 0:
        return LevelAssignment([], 0.0, warnings=["no vertebra found"])
    anchors: list[str] = []
    warnings: list[str] = []
    ratio = _sacrum_ratio(features)
    by_shape = "iliac_contact_ml" in features[-1] and bool(features[-1].get("sacral_checked", False))
    if by_shape:
        # Shape anchor: the sacrum articulates with both ilia; L5 (however large its transverse processes
        # or a merged neighbour make it) does not.
        sacrum = n >= 2 and features[-1]["iliac_contact_ml"] >= SACRUM_ILIAC_CONTACT_ML
    else:
        sacrum = ratio > SACRUM_VOLUME_RATIO
    rib_flags = [_bears_ribs(f) for f in features]
    articulated = all("rib_sides" in f for f in features)
    # Ribs only count above the lowest four mobile segments when a sacrum is present (iliac crest).
    usable_rib = list(rib_flags)
    if sacrum:
        for i in range(max(0, n - 1 - 4), n):
            usable_rib[i] = False
    # Ribs form a run from the cranial end; a run that starts lower down is the iliac crest (or
    # a rib-like artefact) and does not anchor anything. A run covering every segment is ambiguous.
    # Segments cut by the top of the field of view may show no rib because their rib heads lie above it:
    # they neither start nor break the run.
    last_rib: int | None = None
    evidence = [f["rib_bone_ml"] for f in features]
    first = 0
    while first < n - 1 and not usable_rib[first] and features[first].get("touches_top", False):
        first += 1
    if usable_rib and usable_rib[first]:
        run_end = first
        # Without the articulation test (bone beside the body only), the lowest ribs slope caudally into the
        # slices of the next vertebra: a much weaker signal right below a rib-bearing level is that
        # spill-over, not a rib pair of its own. Articulated ribs need no such guard (a floating 12th rib
        # may be much shorter than the 11th).
        while run_end + 1 < n and usable_rib[run_end + 1] and (
                articulated or evidence[run_end + 1] >= 0.6 * evidence[run_end]):
            run_end += 1
        below = features[run_end + 1] if run_end + 1 < n else None
        # The vertebra below must be seen well enough to say it has no ribs (its rib heads would lie at its
        # upper body, next to the pedicles).
        if below is not None and (not below.get("touches_bottom", False)
                                  or float(below.get("body_height_mm", np.inf)) >= MIN_RIBLESS_BODY_MM):
            last_rib = run_end
    rib_names = _names_from_anchor(n, last_rib, "T12") if last_rib is not None else None
    if sacrum:
        names = _names_from_anchor(n, n - 1, "S")
        anchors.append("sacrum")
        # One anchor alone cannot rule out a merged L5 + sacrum or an unresolved disc.
        confidence = 0.6
        if rib_names is not None and last_rib is not None:
            anchors.append("ribs")
            if rib_names == names:
                confidence = 0.95
            elif ratio > MERGED_VOLUME_RATIO and not by_shape:
                confidence = 0.4
                warnings.append(
                    f"anchors disagree and the caudal segment is {ratio:.1f}x a typical vertebra (L5 and sacrum "
                    f"merged?): named from the last rib-bearing vertebra (T12); verify every level"
                )
                names = rib_names
            else:
                confidence = 0.4
                warnings.append(
                    f"anchors disagree: the sacrum makes segment {last_rib + 1} {names[last_rib]}, the last rib "
                    f"makes it T12 (transitional anatomy such as L6 or T13?); kept the sacrum's naming; verify"
                )
        else:
            warnings.append("levels counted from the sacrum alone (no rib-bearing vertebra seen): verify L5/S1")
    elif rib_names is not None:
        names = rib_names
        anchors.append("ribs")
        confidence = 0.6
        warnings.append("no sacrum in the field of view: levels counted from the last rib-bearing vertebra (T12)")
    else:
        if rib_flags[-1] or int(features[-1].get("rib_cut_sides", 0)) >= 1:
            # Every segment carries ribs (or the caudal one a rib-like stub cut by the field of view): all
            # thoracic, the lowest taken as T12 (the commonest FOV).
            names = _names_from_anchor(n, n - 1, "T12")
            prior = "rib-bearing vertebrae only, the caudal-most taken as T12"
        else:
            complete = [i for i, f in enumerate(features) if not f["touches_bottom"]]
            anchor = complete[-1] if complete else n - 1
            names = _names_from_anchor(n, anchor, "L5")
            prior = "caudal-most complete vertebra = L5"
        confidence = 0.3
        warnings.append(
            f"no sacrum and no rib/lumbar transition in the field of view: levels assigned from a weak prior "
            f"({prior}); verify the level names before planning"
        )
    if any(name == "" for name in names):
        warnings.append("some segments fall outside C1-sacrum with these anchors and are left unnamed")
    return LevelAssignment(names, confidence, anchors, warnings)
