"""Label ids used across needle_steering.

Vertebrae follow the VerSe numbering, the field's public standard:

=========  ======
level      id
=========  ======
C1-C7      1-7
T1-T12     8-19
L1-L5      20-24
L6         25
sacrum     26
T13        28
=========  ======

Other structures in our label maps (ids chosen above every VerSe id, below 255 so uint8 holds them):

====================  ====  =====================================================
structure             id    note
====================  ====  =====================================================
spinal canal          100   thecal sac and cord; critical, never to be breached
aorta                 101   critical
inferior vena cava    102   critical
lesion                103   lytic or blastic lesion (also reported in phantom meta)
skin                  104   a thin shell on the body surface (needle entry)
intervertebral disc   105   a screw must not enter it
====================  ====  =====================================================

TotalSegmentator's ``total`` task uses other ids; :func:`from_totalsegmentator` converts its label
maps (sacrum 25 and S1 26 both become our sacrum 26; L5..L1 27..31; T12..T1 32..43; C7..C1 44..50;
spinal cord 79 -> canal; aorta 52; inferior vena cava 63).
"""

from __future__ import annotations

from typing import Final

import numpy as np
from numpy.typing import NDArray

from needle_steering.errors import LabelError

SPINAL_CANAL: Final = 100
AORTA: Final = 101
INFERIOR_VENA_CAVA: Final = 102
LESION: Final = 103
SKIN: Final = 104
DISC: Final = 105

#: Structures a needle or screw must keep clear of.
CRITICAL_STRUCTURES: Final[dict[int, str]] = {
    SPINAL_CANAL: "spinal_canal",
    AORTA: "aorta",
    INFERIOR_VENA_CAVA: "inferior_vena_cava",
}
OTHER_STRUCTURES: Final[dict[int, str]] = {LESION: "lesion", SKIN: "skin", DISC: "disc"}


def _build_levels() -> dict[str, int]:
    levels = {f"C{n}": n for n in range(1, 8)}
    levels.update({f"T{n}": 7 + n for n in range(1, 13)})
    levels.update({f"L{n}": 19 + n for n in range(1, 6)})
    levels.update({"L6": 25, "S": 26, "T13": 28})
    return levels


#: Vertebra name -> VerSe id (``"S"`` is the sacrum).
VERTEBRA_IDS: Final[dict[str, int]] = _build_levels()
#: VerSe id -> vertebra name.
VERTEBRA_NAMES: Final[dict[int, str]] = {v: k for k, v in VERTEBRA_IDS.items()}

#: Cranio-caudal order of the standard levels (T13 and L6 are anatomical variants).
STANDARD_ORDER: Final[tuple[str, ...]] = (
    *(f"C{n}" for n in range(1, 8)),
    *(f"T{n}" for n in range(1, 13)),
    *(f"L{n}" for n in range(1, 6)),
    "S",
)


def is_vertebra(label_id: int) -> bool:
    """Whether ``label_id`` is a VerSe vertebra id (sacrum included)."""
    return int(label_id) in VERTEBRA_NAMES


def level_name(label_id: int) -> str:
    """VerSe id -> level name (``20`` -> ``"L1"``); raises :class:`LabelError` for unknown ids."""
    try:
        return VERTEBRA_NAMES[int(label_id)]
    except KeyError:
        raise LabelError(f"{label_id} is not a VerSe vertebra id") from None


def level_id(name: str) -> int:
    """Level name -> VerSe id (``"L1"`` -> ``20``, ``"sacrum"``/``"S"`` -> 26)."""
    key = name.strip().upper()
    if key in ("SACRUM", "S1"):
        key = "S"
    try:
        return VERTEBRA_IDS[key]
    except KeyError:
        raise LabelError(f"unknown vertebra level {name!r}; expected e.g. C1-C7, T1-T12, L1-L5, S") from None


def parse_level_range(spec: str) -> list[str]:
    """Expand ``"T10-L5"`` or ``"L1,L3"`` into standard-order level names.

    Raises:
        LabelError: Unknown level or a range that runs caudal-to-cranial.
    """
    names: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if "-" in part:
            first, last = (level_name(level_id(x)) for x in part.split("-", 1))
            if first not in STANDARD_ORDER or last not in STANDARD_ORDER:
                raise LabelError(f"level range {part!r} must use standard levels")
            a, b = STANDARD_ORDER.index(first), STANDARD_ORDER.index(last)
            if a > b:
                raise LabelError(f"level range {part!r} runs caudal to cranial; write it as {last}-{first}")
            names.extend(STANDARD_ORDER[a : b + 1])
        else:
            names.append(level_name(level_id(part)))
    if not names:
        raise LabelError(f"no levels in {spec!r}")
    return list(dict.fromkeys(names))


#: TotalSegmentator ``total`` id -> our id.
TOTALSEGMENTATOR_TO_OURS: Final[dict[int, int]] = {
    25: 26,
    26: 26,
    **{27 + n: 24 - n for n in range(5)},  # L5..L1 -> 24..20
    **{32 + n: 19 - n for n in range(12)},  # T12..T1 -> 19..8
    **{44 + n: 7 - n for n in range(7)},  # C7..C1 -> 7..1
    79: SPINAL_CANAL,
    52: AORTA,
    63: INFERIOR_VENA_CAVA,
}


def from_totalsegmentator(labels: NDArray[np.integer], vertebrae_only: bool = False) -> NDArray[np.uint8]:
    """Convert a TotalSegmentator ``total`` label array to our ids (other classes become 0).

    Args:
        labels: Integer label array of any shape.
        vertebrae_only: Drop the critical structures too.
    """
    arr = np.asarray(labels)
    if arr.dtype.kind not in "iu":
        raise LabelError(f"label map must hold integers, got dtype {arr.dtype}")
    lut = np.zeros(max(256, int(arr.max(initial=0)) + 1), dtype=np.uint8)
    for theirs, ours in TOTALSEGMENTATOR_TO_OURS.items():
        if vertebrae_only and not is_vertebra(ours):
            continue
        lut[theirs] = ours
    if arr.min(initial=0) < 0:
        raise LabelError(f"label map holds negative ids (min {arr.min()})")
    return lut[arr]
