"""Learned vertebra segmentation: a small MONAI 3-D U-Net predicting bone and disc voxels at 2 mm.

The network labels every voxel of a 2 mm isotropic LPS-aligned grid as 0 background, 1 vertebral
bone (every vertebra including the sacrum; not ribs, not pelvis) or 2 intervertebral disc. Its bone
mask replaces the thresholded spine bone of :mod:`needle_steering.perception.classical`, and its disc
mask places the cuts between bodies; canal tracking, body separation, watershed and naming stay the
classical ones (:func:`~needle_steering.perception.classical.segment_spine` with ``spine_bone=``).

Intensity normalisation (:func:`normalise_intensity`):

* CT: clip to [-1000, 2000] HU, map linearly to [-1, 1].
* CBCT: grey values drift (``grey = a * HU + b``, a ~0.85-1.12, b ~ +-90). A robust histogram
  standardisation shifts the grey values so that the soft-tissue peak (the mode of the voxels in
  [-250, 350] once a 1st-percentile floor is excluded) lands at 40 HU; the residual scale is
  absorbed by the intensity-scale augmentation of training. Then the CT mapping applies.

Weights ship as ``needle_steering/models/vertebra_seg.pt`` (a ``state_dict``) with
``vertebra_seg.json`` (architecture, spacing, normalisation, seed, metrics). torch and MONAI are
imported inside the functions that need them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from needle_steering.errors import SegmentationError
from needle_steering.perception.volume import Volume

WEIGHTS_NAME = "vertebra_seg.pt"
CONFIG_NAME = "vertebra_seg.json"
#: Working spacing of the network (mm, isotropic).
NET_SPACING_MM = 2.0
HU_MIN = -1000.0
HU_MAX = 2000.0
#: Soft-tissue HU the CBCT standardisation moves the soft-tissue histogram peak to.
SOFT_TISSUE_REF_HU = 40.0
#: Classes predicted by the network.
CLASS_BACKGROUND, CLASS_BONE, CLASS_DISC = 0, 1, 2
#: Default architecture (recorded in vertebra_seg.json; the loader builds what the JSON says).
DEFAULT_ARCH: dict[str, Any] = {
    "name": "monai.networks.nets.UNet",
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 3,
    "channels": [8, 16, 32, 64],
    "strides": [2, 2, 2],
    "num_res_units": 1,
}


def _models_dir() -> Path:
    """``needle_steering/models`` of the installed package (editable or not)."""
    import needle_steering

    return Path(needle_steering.__file__).resolve().parent / "models"


def default_weights_path() -> Path:
    """Path of the shipped ``vertebra_seg.pt``."""
    return _models_dir() / WEIGHTS_NAME


def cbct_soft_tissue_peak(grey: NDArray[Any]) -> float:
    """Soft-tissue histogram peak of a CBCT (grey units): mode of the voxels in [-250, 350].

    Args:
        grey: Any-shape CBCT grey values (HU-like, drifting offset and scale).

    Returns:
        The peak's grey value (falls back to 40 when no voxel lies in the window).
    """
    sample = np.asarray(grey, dtype=np.float32).ravel()
    if sample.size > 2_000_000:
        sample = sample[:: sample.size // 2_000_000 + 1]
    window = sample[(sample > -250.0) & (sample < 350.0)]
    if window.size < 100:
        return SOFT_TISSUE_REF_HU
    hist, edges = np.histogram(window, bins=120, range=(-250.0, 350.0))
    smooth = np.convolve(hist.astype(float), np.ones(5) / 5.0, mode="same")
    peak = int(np.argmax(smooth))
    return float(0.5 * (edges[peak] + edges[peak + 1]))


def normalise_intensity(array: NDArray[Any], modality: str) -> NDArray[np.float32]:
    """Network input from HU (CT) or grey values (CBCT).

    Args:
        array: Any-shape image, HU (``ct``) or CBCT grey values (``cbct``).
        modality: ``"ct"`` or ``"cbct"``.

    Returns:
        float32 array of the same shape in [-1, 1] (-1 = air at -1000 HU, +1 = 2000 HU).

    Raises:
        SegmentationError: Unknown modality.
    """
    if modality not in ("ct", "cbct"):
        raise SegmentationError(f"modality must be 'ct' or 'cbct', got {modality!r}")
    hu = np.asarray(array, dtype=np.float32)
    if modality == "cbct":
        hu = hu + np.float32(SOFT_TISSUE_REF_HU - cbct_soft_tissue_peak(hu))
    out = (np.clip(hu, HU_MIN, HU_MAX) - HU_MIN) / (HU_MAX - HU_MIN) * 2.0 - 1.0
    return out.astype(np.float32)


def target_classes(labels: NDArray[Any]) -> NDArray[np.uint8]:
    """Training target from a label map: 1 vertebrae (VerSe ids 1-28), 2 disc (105), else 0."""
    from needle_steering.perception.labels import DISC

    lab = np.asarray(labels)
    out = np.zeros(lab.shape, np.uint8)
    out[(lab >= 1) & (lab <= 28)] = CLASS_BONE
    out[lab == DISC] = CLASS_DISC
    return out


def build_network(arch: dict[str, Any] | None = None) -> Any:
    """The MONAI network described by ``arch`` (default :data:`DEFAULT_ARCH`)."""
    from monai.networks.nets import UNet

    spec = dict(DEFAULT_ARCH if arch is None else arch)
    if spec.get("name") != DEFAULT_ARCH["name"]:
        raise SegmentationError(f"unsupported architecture {spec.get('name')!r} (expected {DEFAULT_ARCH['name']})")
    return UNet(
        spatial_dims=int(spec["spatial_dims"]),
        in_channels=int(spec["in_channels"]),
        out_channels=int(spec["out_channels"]),
        channels=tuple(int(c) for c in spec["channels"]),
        strides=tuple(int(s) for s in spec["strides"]),
        num_res_units=int(spec["num_res_units"]),
    )


@dataclass
class LoadedModel:
    """A network with its weights and the description from ``vertebra_seg.json``."""

    network: Any
    config: dict[str, Any]
    device: str
    path: Path


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when available else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise SegmentationError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SegmentationError("device 'cuda' requested but torch sees no CUDA device; use --device cpu")
    return device


def load_model(weights: str | Path | None = None, device: str = "auto") -> LoadedModel:
    """Load the network and its JSON description.

    Args:
        weights: ``.pt`` state dict (default: the shipped ``vertebra_seg.pt``); the JSON sits beside it
            with the same stem.
        device: ``auto``, ``cpu`` or ``cuda``.

    Raises:
        SegmentationError: Missing, unreadable or mismatching weights or JSON (the message names the file).
    """
    import torch

    dev = resolve_device(device)
    path = Path(weights) if weights is not None else default_weights_path()
    cfg_path = path.with_suffix(".json")
    if not path.is_file():
        raise SegmentationError(f"learned backend: no weights at {path} (train with `needle-steering train-seg`)")
    if not cfg_path.is_file():
        raise SegmentationError(f"learned backend: no model description {cfg_path} beside the weights")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise SegmentationError(f"learned backend: unreadable model description {cfg_path}: {exc}") from None
    if not isinstance(config, dict) or "architecture" not in config:
        raise SegmentationError(f"learned backend: {cfg_path} has no 'architecture' entry")
    spacing = config.get("spacing_mm", NET_SPACING_MM)
    if not isinstance(spacing, int | float) or not 0.5 <= float(spacing) <= 4.0:
        raise SegmentationError(f"learned backend: {cfg_path}: spacing_mm {spacing!r} is not in [0.5, 4] mm")
    try:
        network = build_network(config["architecture"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SegmentationError(f"learned backend: {cfg_path}: bad architecture entry: {exc}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
    except Exception as exc:  # torch raises many types for a corrupt or mismatching file
        raise SegmentationError(f"learned backend: cannot load weights {path}: {str(exc).splitlines()[0]}") from None
    network.to(dev).eval()
    return LoadedModel(network=network, config=config, device=dev, path=path)


@dataclass
class LearnedPrediction:
    """Network output on the working grid.

    Attributes:
        work: The 2 mm LPS-aligned working grid (float32 HU or grey values).
        classes: uint8 ``(I, J, K)`` argmax class per voxel (0, 1 bone, 2 disc).
        device: Device that ran.
        seconds: Inference wall time (resampling + network).
    """

    work: Volume
    classes: NDArray[np.uint8]
    device: str
    seconds: float
    warnings: list[str] = field(default_factory=list)


def predict_classes(volume: Volume, model: LoadedModel, modality: str = "ct") -> LearnedPrediction:
    """Run the network on ``volume`` resampled to its spacing on an LPS-aligned grid.

    Sliding-window inference with 96^3 windows, overlap 0.25, batch 2 on CUDA (AMP autocast) or 1 on CPU.

    Args:
        volume: CT (HU) or CBCT, any orientation.
        model: From :func:`load_model`.
        modality: ``ct`` or ``cbct``.
    """
    import torch
    from monai.inferers import sliding_window_inference

    from needle_steering.perception.classical import to_lps_grid

    start = time.perf_counter()
    spacing = float(model.config.get("spacing_mm", NET_SPACING_MM))
    work = to_lps_grid(volume, spacing, default=-1024.0)
    x = normalise_intensity(work.array, modality)
    roi = int(model.config.get("roi", 96))
    cuda = model.device == "cuda"
    tensor = torch.from_numpy(np.ascontiguousarray(x))[None, None].to(model.device)
    with torch.no_grad(), torch.autocast(device_type="cuda", enabled=cuda):
        logits = sliding_window_inference(
            tensor, roi_size=(roi, roi, roi), sw_batch_size=2 if cuda else 1, predictor=model.network,
            overlap=0.25, mode="gaussian", padding_mode="constant", cval=-1.0,
        )
    assert isinstance(logits, torch.Tensor)
    classes = torch.argmax(logits, dim=1)[0].to(torch.uint8).cpu().numpy()
    return LearnedPrediction(work=work, classes=classes, device=model.device, seconds=time.perf_counter() - start)
