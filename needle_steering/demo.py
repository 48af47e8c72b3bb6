"""``make demo`` / ``needle-steering demo``: the end-to-end path on a generated patient.

Each stage reports progress on stderr and writes its artefacts into the output folder; the
terminal ends with a short summary table. Stages are added as the layers land.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def _progress(step: int, total: int, text: str) -> None:
    print(f"[{step}/{total}] {text}", file=sys.stderr, flush=True)


def run_demo(out_dir: Path, seed: int = 7) -> int:
    """Run the demonstration into ``out_dir``; returns the process exit status."""
    from needle_steering.perception.labels import LESION, VERTEBRA_NAMES
    from needle_steering.sim.phantom import PhantomConfig, generate_phantom, write_phantom

    out_dir.mkdir(parents=True, exist_ok=True)
    total = 2
    started = time.perf_counter()
    _progress(1, total, f"generating phantom patient (seed {seed}, T12-L5, 1 mm, with lesion)")
    config = PhantomConfig(seed=seed, levels=("T12", "L1", "L2", "L3", "L4", "L5"), spacing_mm=1.0, lesion=True)
    phantom = generate_phantom(config)
    paths = write_phantom(phantom, out_dir)

    _progress(2, total, "summarising ground truth")
    labels = phantom.labels.array
    voxel_ml = phantom.labels.voxel_volume_ml()
    ids, counts = np.unique(labels, return_counts=True)
    rows: list[dict[str, Any]] = []
    for label_id, count in zip(ids.tolist(), counts.tolist(), strict=True):
        if label_id in VERTEBRA_NAMES:
            rows.append({"level": VERTEBRA_NAMES[label_id], "id": label_id, "volume_ml": round(count * voxel_ml, 1)})
    lesion_ml = float((labels == LESION).sum() * voxel_ml)
    summary = {
        "seed": seed,
        "size": list(phantom.ct.shape),
        "spacing_mm": [float(v) for v in phantom.ct.spacing_mm],
        "levels": rows,
        "lesion_ml": round(lesion_ml, 2),
        "lesion": phantom.meta.get("lesion"),
        "files": {k: str(v) for k, v in paths.items()},
        "seconds": round(time.perf_counter() - started, 2),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    print(f"\nphantom patient {' x '.join(map(str, phantom.ct.shape))} voxels, "
          f"{phantom.ct.spacing_mm[0]:.1f} mm, HU {phantom.ct.array.min():.0f}..{phantom.ct.array.max():.0f}")
    print(f"{'level':6s} {'id':>4s} {'volume ml':>10s}")
    for row in rows:
        print(f"{row['level']:6s} {row['id']:>4d} {row['volume_ml']:>10.1f}")
    print(f"lesion {lesion_ml:.1f} ml; outputs in {out_dir} ({summary['seconds']} s)")
    return 0
