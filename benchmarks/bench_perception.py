"""Perception benchmarks: segmentation time on a 1 mm 256 x 256 x 200 CT, and the issue-3 accuracy targets
(per-level Dice and level names on held-out phantoms and on the real CT against TotalSegmentator)."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np

from needle_steering.bench import benchmark


def _phantom_crop_1mm() -> Any:
    """A 256 x 256 x 200, 1 mm phantom CT (seed 0, cropped around the spine, padded with air)."""
    from needle_steering.perception.volume import Volume
    from needle_steering.sim.phantom import PhantomConfig, generate_phantom

    phantom = generate_phantom(PhantomConfig(seed=0, spacing_mm=1.0))
    ct = phantom.ct
    centre = np.array(ct.shape) // 2
    size = np.array([256, 256, 200])
    lo = np.clip(centre - size // 2, 0, None)
    crop = np.full(tuple(size), -1024.0, np.float32)
    part = ct.array[lo[0] : lo[0] + 256, lo[1] : lo[1] + 256, lo[2] : lo[2] + 200]
    crop[: part.shape[0], : part.shape[1], : part.shape[2]] = part
    return Volume(crop, ct.spacing_mm, ct.index_to_lps(lo), ct.direction, {"source": "phantom crop"})


def _time_segmentation(backend: Literal["auto", "learned"]) -> float:
    from needle_steering.perception.segment import segment_volume

    volume = _phantom_crop_1mm()
    start = time.perf_counter()
    segment_volume(volume, backend=backend, device="cpu")
    return time.perf_counter() - start


@benchmark(
    "segment_1mm_256x256x200_s",
    unit="s",
    description="segment_volume (auto backend) on a 1 mm phantom CT cropped to 256 x 256 x 200 voxels",
    target="<= 20",
)
def segment_1mm_256x256x200_s() -> float:
    """Wall seconds to segment a 256 x 256 x 200, 1 mm CT (a phantom cropped around the spine)."""
    return _time_segmentation("auto")


@benchmark(
    "segment_1mm_256x256x200_learned_s",
    unit="s",
    description="segment_volume (learned backend, CPU: network at 2 mm + shared pipeline) on the same 1 mm crop",
    target="<= 20",
)
def segment_1mm_256x256x200_learned_s() -> float:
    """Wall seconds for the learned backend on the CPU, shipped weights, same crop as the auto benchmark."""
    return _time_segmentation("learned")


DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
#: Held-out phantom seeds (never used to tune the segmentation), 1.5 mm.
HELD_OUT_CT_SEEDS = tuple(range(200, 216))
HELD_OUT_CBCT_SEEDS = tuple(range(301, 309))


@functools.lru_cache(maxsize=2)
def _phantom_study(modality: Literal["ct", "cbct"]) -> dict[str, Any]:
    """Classical segmentation of the held-out phantoms: name accuracy and per-level Dice."""
    from needle_steering.perception.metrics import level_identification, per_level_scores
    from needle_steering.perception.segment import segment_volume
    from needle_steering.sim.phantom import PhantomConfig, generate_phantom

    seeds = HELD_OUT_CT_SEEDS if modality == "ct" else HELD_OUT_CBCT_SEEDS
    named = 0
    dice: list[float] = []
    for seed in seeds:
        phantom = generate_phantom(PhantomConfig(seed=seed, modality=modality, spacing_mm=1.5))
        result = segment_volume(phantom.ct, backend="classical", modality=modality)
        named += int(level_identification(result.labels, phantom.labels)["accuracy"] == 1.0)
        dice += [float(v["dice"]) for v in per_level_scores(result.labels, phantom.labels).values()]
    return {"named_pct": 100.0 * named / len(seeds), "median_dice": float(np.median(dice)),
            "min_dice": float(np.min(dice))}


def _register_phantom_benchmarks() -> None:
    """``segment_phantom_{ct,cbct}_named_pct`` and ``..._median_dice`` from one study per modality."""
    seeds = {"ct": "200-215", "cbct": "301-308"}
    dice_target = {"ct": ">= 0.95", "cbct": ">= 0.90"}
    for modality in ("ct", "cbct"):
        def named(modality: Literal["ct", "cbct"] = modality) -> float:
            return float(_phantom_study(modality)["named_pct"])

        def median_dice(modality: Literal["ct", "cbct"] = modality) -> float:
            return float(_phantom_study(modality)["median_dice"])

        benchmark(f"segment_phantom_{modality}_named_pct", "%",
                  f"held-out {modality.upper()} phantoms (seeds {seeds[modality]}, 1.5 mm) with every level named "
                  "right (classical)", target="100")(named)
        benchmark(f"segment_phantom_{modality}_median_dice", "",
                  f"median per-level Dice over the held-out {modality.upper()} phantoms (T11-S, 1.5 mm)",
                  target=dice_target[modality])(median_dice)


_register_phantom_benchmarks()


@benchmark("segment_real_ct_min_dice", "", "lowest per-level Dice (T12-S, levels >= 5 ml) of the auto backend on "
           "the real 3 mm CT against TotalSegmentator, names must be right (else 0)", target=">= 0.85")
def segment_real_ct_min_dice() -> float:
    """Lowest per-level Dice on the real CT; 0 when a level is misnamed."""
    from needle_steering.perception.io import read_volume
    from needle_steering.perception.labels import from_totalsegmentator
    from needle_steering.perception.metrics import level_identification, per_level_scores
    from needle_steering.perception.segment import segment_volume

    folder = DATA / "abdomen_ct_3mm"
    ct = read_volume(folder / "ct.nii.gz")
    ref = read_volume(folder / "labels_totalsegmentator_total.nii.gz")
    ref = ref.with_array(from_totalsegmentator(ref.array.astype(np.int32), vertebrae_only=True))
    result = segment_volume(ct, backend="auto")
    min_voxels = int(5.0 / ref.voxel_volume_ml())
    if level_identification(result.labels, ref, min_ref_voxels=min_voxels)["accuracy"] < 1.0:
        return 0.0
    return float(min(v["dice"] for v in per_level_scores(result.labels, ref, min_ref_ml=5.0).values()))
