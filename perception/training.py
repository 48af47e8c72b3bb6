"""Training of the learned vertebra segmenter (:mod:`needle_steering.perception.learned`).

The library function :func:`train_segmentation` takes a *sample provider*: a callable
``provider(seed) -> (image, labels, modality)`` returning one training volume (any grid; resampled
here to 2 mm) with its label map (VerSe ids, disc 105). perception never imports ``sim``: the
``train-seg`` command (in ``needle_steering.cli``, which may import every layer) builds the provider from the
synthetic phantom generator (:func:`phantom_sample_provider`).

Deterministic: ``torch.manual_seed(seed)``, one ``numpy.random.Generator(seed)`` for the sample
configurations, crops and augmentations, single-process data loading.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from needle_steering.errors import SegmentationError
from needle_steering.perception.volume import Volume

#: ``provider(seed) -> (image, labels, modality)``.
SampleProvider = Callable[[int], tuple[Volume, Volume, str]]

CROP = 96


def phantom_sample_provider(generate: Callable[[Any], Any], config_type: Callable[..., Any]) -> SampleProvider:
    """A provider drawing varied synthetic phantoms at 2 mm.

    Args:
        generate: ``generate_phantom`` of ``needle_steering.sim.phantom`` (injected: no import here).
        config_type: ``PhantomConfig``.

    Each seed picks: modality (CT 55 %, CBCT 45 %), levels (T10-L5, T12-S, L1-S, T11-L4, T8-T12+L1),
    bone quality 0.3-1.0, a lesion half of the time, noise 0.6-1.6 x default, contrast 30 %.
    """
    level_sets = [
        ("T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5"),
        ("T12", "L1", "L2", "L3", "L4", "L5", "S"),
        ("L1", "L2", "L3", "L4", "L5", "S"),
        ("T11", "T12", "L1", "L2", "L3", "L4"),
        ("T8", "T9", "T10", "T11", "T12", "L1"),
        ("L3", "L4", "L5", "S"),
    ]

    def provider(seed: int) -> tuple[Volume, Volume, str]:
        rng = np.random.default_rng(seed)
        modality = "ct" if rng.random() < 0.55 else "cbct"
        levels = level_sets[int(rng.integers(len(level_sets)))]
        base_noise = 15.0 if modality == "ct" else 60.0
        cfg = config_type(
            seed=int(seed), levels=levels, modality=modality, spacing_mm=2.0,
            lesion=bool(rng.random() < 0.5), bone_quality=float(rng.uniform(0.3, 1.0)),
            contrast=bool(rng.random() < 0.3),
            noise_hu=float(base_noise / np.sqrt(2.0) * rng.uniform(0.6, 1.6)),
            tilt_sd_deg=float(rng.uniform(1.0, 4.0)),
        )
        ph = generate(cfg)
        return ph.ct, ph.labels, modality

    return provider


def _prepare(image: Volume, labels: Volume, modality: str, spacing: float,
             ) -> tuple[NDArray[np.float32], NDArray[np.uint8]]:
    """Normalised image and class target on the 2 mm LPS grid, cropped to the body's bounding box."""
    from needle_steering.perception.classical import to_lps_grid
    from needle_steering.perception.io import resample_like
    from needle_steering.perception.learned import normalise_intensity, target_classes

    work = to_lps_grid(image, spacing, default=-1024.0)
    if work.same_grid(labels):
        lab = labels.array
    else:
        lab = resample_like(labels, work, is_label=True).array
    x = normalise_intensity(work.array, modality)
    y = target_classes(lab)
    # Keep memory small: crop to the voxels above air, with a margin.
    inside = np.nonzero(x > -0.8)
    if inside[0].size:
        lo = [max(0, int(a.min()) - 4) for a in inside]
        hi = [int(a.max()) + 5 for a in inside]
        x, y = x[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], y[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def _random_crop(x: NDArray[np.float32], y: NDArray[np.uint8], rng: np.random.Generator,
                 ) -> tuple[NDArray[np.float32], NDArray[np.uint8]]:
    """A CROP^3 crop (padded with air), centred on spine voxels 85 % of the time."""
    pad = [(max(0, (CROP - s + 1) // 2 + 1),) * 2 for s in x.shape]
    if any(p[0] for p in pad):
        x = np.pad(x, pad, constant_values=-1.0)
        y = np.pad(y, pad, constant_values=0)
    if rng.random() < 0.85 and (y > 0).any():
        fg = np.flatnonzero(y.ravel() > 0)
        centre = np.array(np.unravel_index(int(fg[int(rng.integers(fg.size))]), y.shape))
        centre = centre + rng.integers(-24, 25, 3)
    else:
        centre = np.array([int(rng.integers(0, s)) for s in x.shape])
    start = np.clip(centre - CROP // 2, 0, np.array(x.shape) - CROP)
    sl = tuple(slice(int(a), int(a) + CROP) for a in start)
    return x[sl].copy(), y[sl].copy()


def _augment(x: NDArray[np.float32], y: NDArray[np.uint8], rng: np.random.Generator,
             ) -> tuple[NDArray[np.float32], NDArray[np.uint8]]:
    """Left-right / cranio-caudal flips, small rotations (<= 10 deg axial, 5 deg other), intensity."""
    from scipy import ndimage

    if rng.random() < 0.5:
        x, y = x[::-1], y[::-1]
    if rng.random() < 0.2:
        x, y = x[:, :, ::-1], y[:, :, ::-1]
    if rng.random() < 0.5:
        angles = np.radians([rng.uniform(-5, 5), rng.uniform(-5, 5), rng.uniform(-10, 10)])
        cx, cy, cz = np.cos(angles)
        sx, sy, sz = np.sin(angles)
        rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
        rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        rot = rz @ ry @ rx
        centre = (np.array(x.shape) - 1) / 2.0
        offset = centre - rot @ centre
        x = ndimage.affine_transform(np.ascontiguousarray(x), rot, offset=offset, order=1, mode="nearest")
        y = ndimage.affine_transform(np.ascontiguousarray(y), rot, offset=offset, order=0, mode="nearest")
    x = np.ascontiguousarray(x, dtype=np.float32)
    # Intensity: scale about air (-1), shift, noise (normalised units: 0.1 = 150 HU).
    x = (x + 1.0) * np.float32(rng.uniform(0.88, 1.12)) - 1.0 + np.float32(rng.uniform(-0.05, 0.05))
    if rng.random() < 0.3:
        x = x + rng.normal(0.0, rng.uniform(0.005, 0.03), x.shape).astype(np.float32)
    return x.astype(np.float32), np.ascontiguousarray(y)


def train_segmentation(
    out_dir: str | Path,
    *,
    seed: int = 0,
    epochs: int = 12,
    samples: int = 32,
    threads: int = 2,
    progress: bool = True,
    provider: SampleProvider,
    crops_per_sample: int = 2,
    batch_size: int = 2,
    learning_rate: float = 2e-3,
    time_budget_s: float | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train the 3-class network and write ``vertebra_seg.pt`` + ``vertebra_seg.json`` to ``out_dir``.

    Args:
        out_dir: Output folder (created).
        seed: Seeds torch and the numpy Generator; sample ``n`` uses provider seed ``1000 * seed + n``.
        epochs: Passes over the sample pool.
        samples: Number of training volumes drawn from ``provider`` (kept in memory at 2 mm).
        threads: ``torch.set_num_threads``.
        progress: Show a tqdm bar.
        provider: ``provider(seed) -> (image, labels, modality)``.
        crops_per_sample: Random 96^3 crops drawn per volume per epoch.
        batch_size: Crops per optimiser step.
        learning_rate: Adam learning rate (cosine decay to 5 %).
        time_budget_s: Stop after this wall time (the weights of the last finished step are saved).
        log: Optional line logger.

    Returns:
        The JSON description written beside the weights.

    Raises:
        SegmentationError: Invalid arguments.
    """
    import torch
    from monai.losses import DiceCELoss
    from tqdm import tqdm

    from needle_steering.perception.learned import (
        CONFIG_NAME,
        DEFAULT_ARCH,
        NET_SPACING_MM,
        WEIGHTS_NAME,
        build_network,
    )

    for name, value, lo in (("epochs", epochs, 1), ("samples", samples, 1), ("threads", threads, 1),
                            ("crops_per_sample", crops_per_sample, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise SegmentationError(f"{name} must be an int >= {lo}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise SegmentationError(f"seed must be a non-negative int, got {seed!r}")
    say = log or (lambda line: None)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    start = time.perf_counter()

    pool: list[tuple[NDArray[np.float32], NDArray[np.uint8]]] = []
    modalities: list[str] = []
    for n in tqdm(range(samples), desc="phantoms", disable=not progress):
        image, labels, modality = provider(1000 * seed + n)
        pool.append(_prepare(image, labels, modality, NET_SPACING_MM))
        modalities.append(modality)
    say(f"generated {samples} volumes in {time.perf_counter() - start:.0f} s "
        f"({modalities.count('ct')} CT, {modalities.count('cbct')} CBCT)")

    net = build_network(DEFAULT_ARCH)
    net.train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, lambda_ce=1.0, lambda_dice=1.0)
    optim = torch.optim.Adam(net.parameters(), lr=learning_rate, weight_decay=1e-5)
    steps_per_epoch = max(1, (samples * crops_per_sample) // batch_size)
    total_steps = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(optim, T_max=total_steps, eta_min=learning_rate * 0.05)
    history: list[float] = []
    step = 0
    stopped_early = False
    bar = tqdm(total=total_steps, desc="train", disable=not progress)
    for epoch in range(epochs):
        order = np.repeat(rng.permutation(samples), crops_per_sample)
        rng.shuffle(order)
        losses: list[float] = []
        for b in range(steps_per_epoch):
            xs, ys = [], []
            for idx in order[b * batch_size:(b + 1) * batch_size]:
                x, y = _random_crop(*pool[int(idx)], rng)
                x, y = _augment(x, y, rng)
                xs.append(x)
                ys.append(y)
            xb = torch.from_numpy(np.stack(xs))[:, None]
            yb = torch.from_numpy(np.stack(ys).astype(np.int64))[:, None]
            optim.zero_grad(set_to_none=True)
            loss = loss_fn(net(xb), yb)
            loss.backward()
            optim.step()
            sched.step()
            step += 1
            losses.append(float(loss.item()))
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses[-20:]):.3f}")
            if time_budget_s is not None and time.perf_counter() - start > time_budget_s:
                stopped_early = True
                break
        history.append(float(np.mean(losses)) if losses else float("nan"))
        say(f"epoch {epoch + 1}/{epochs}: mean loss {history[-1]:.4f}, step {step}, "
            f"{time.perf_counter() - start:.0f} s")
        torch.save(net.state_dict(), out / WEIGHTS_NAME)
        if stopped_early:
            say(f"time budget {time_budget_s} s reached after {step} steps")
            break
    bar.close()
    config: dict[str, Any] = {
        "format": "needle_steering.vertebra_seg/1",
        "architecture": DEFAULT_ARCH,
        "classes": {"0": "background", "1": "vertebral bone (VerSe 1-28, incl. sacrum)", "2": "intervertebral disc"},
        "spacing_mm": NET_SPACING_MM,
        "roi": CROP,
        "normalisation": {
            "ct": "clip HU to [-1000, 2000], map linearly to [-1, 1]",
            "cbct": "shift grey values so the soft-tissue histogram peak is 40 HU, then as ct",
        },
        "training": {
            "seed": seed, "epochs_requested": epochs, "epochs_run": len(history), "steps": step,
            "samples": samples, "crops_per_sample": crops_per_sample, "batch_size": batch_size,
            "learning_rate": learning_rate, "threads": threads, "stopped_early": stopped_early,
            "loss_per_epoch": [round(v, 4) for v in history],
            "seconds": round(time.perf_counter() - start, 1),
            "data": "synthetic phantoms (needle_steering.sim.phantom) at 2 mm, CT and CBCT",
            "modalities": {"ct": modalities.count("ct"), "cbct": modalities.count("cbct")},
            "provider_seeds": [1000 * seed + n for n in range(samples)],
        },
        "metrics": {},
    }
    torch.save(net.state_dict(), out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return config
