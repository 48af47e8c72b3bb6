"""Image formation: scanner blur, noise and the cone-beam CT artefacts.

All functions modify the float32 HU array in place (to keep the peak memory at a few copies of
the volume) and return the parameters they used, for ``meta.json``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from needle_steering.sim.phantom.sdf import Grid

CT_NOISE_HU_AT_1MM = 15.0
CBCT_NOISE_HU_AT_1MM = 60.0
CT_PSF_SIGMA_MM = 0.6
CBCT_PSF_SIGMA_MM = 0.8


def default_noise_hu(modality: str, spacing_mm: float) -> float:
    """Noise standard deviation at this spacing: ``sigma_1mm / sqrt(spacing)`` (thicker slices, less noise)."""
    base = CT_NOISE_HU_AT_1MM if modality == "ct" else CBCT_NOISE_HU_AT_1MM
    return base / float(np.sqrt(spacing_mm))


def apply_psf(hu: NDArray[np.float32], sigma_mm: float, spacing_mm: float) -> None:
    """Gaussian point-spread function (in place); skipped when below a tenth of a voxel."""
    sigma_vox = sigma_mm / spacing_mm
    if sigma_vox < 0.1:
        return
    ndimage.gaussian_filter(hu, sigma_vox, output=hu, mode="nearest", truncate=3.0)


def add_noise(
    hu: NDArray[np.float32], sigma_hu: float, rng: np.random.Generator, correlation_vox: float = 0.6
) -> None:
    """Add spatially correlated Gaussian noise of standard deviation ``sigma_hu`` (in place).

    White noise is smoothed with a ``correlation_vox`` Gaussian (CT noise is not white: the
    reconstruction kernel correlates neighbouring voxels) and rescaled to the requested SD.
    """
    if sigma_hu <= 0:
        return
    noise = rng.standard_normal(hu.shape, dtype=np.float32)
    if correlation_vox > 0:
        ndimage.gaussian_filter(noise, correlation_vox, output=noise, mode="wrap", truncate=3.0)
        # analytic SD of unit white noise after a separable Gaussian of this sigma
        k = np.exp(-0.5 * (np.arange(-3, 4) / correlation_vox) ** 2)
        k = k / k.sum()
        sd = float(np.sqrt(np.sum(k**2))) ** 3
        noise *= np.float32(sigma_hu / sd)
    else:
        noise *= np.float32(sigma_hu)
    hu += noise


def cbct_streaks(
    hu: NDArray[np.float32], grid: Grid, rng: np.random.Generator, n_streaks: int = 8, amplitude_hu: float = 70.0
) -> dict[str, Any]:
    """Streaks from dense bone: thin radial lines through each slice's bone centroid (in place).

    Each of ``n_streaks`` directions (random, drifting slowly with z) contributes a dark line with
    bright flanks, scaled by the square root of the dense-bone area of the slice.
    """
    nx, ny, nz = hu.shape
    s = grid.spacing_mm
    x = grid.axis_mm(0)[:, None]
    y = grid.axis_mm(1)[None, :]
    angles = rng.uniform(0, np.pi, n_streaks)
    drift = rng.normal(0, 0.002, n_streaks)
    signs = rng.choice([-1.0, 1.0], n_streaks)
    width_mm = 1.2 + 0.6 * rng.random(n_streaks)
    ref_area = 1200.0  # mm^2 of dense bone giving the nominal amplitude
    for k in range(nz):
        dense = hu[:, :, k] > 600
        count = int(dense.sum())
        if count == 0:
            continue
        ii, jj = np.nonzero(dense)
        cx = float(grid.origin_lps_mm[0] + s * ii.mean())
        cy = float(grid.origin_lps_mm[1] + s * jj.mean())
        amp = amplitude_hu * float(np.sqrt(count * s * s / ref_area))
        pattern = np.zeros((nx, ny), dtype=np.float32)
        zk = float(grid.origin_lps_mm[2] + s * k)
        for j in range(n_streaks):
            th = angles[j] + drift[j] * zk
            d = ((x - cx) * np.float32(np.sin(th)) - (y - cy) * np.float32(np.cos(th))) / np.float32(width_mm[j])
            r = np.abs((x - cx) * np.float32(np.cos(th)) + (y - cy) * np.float32(np.sin(th)))
            pattern += np.float32(signs[j]) * (1 - 2 * d * d) * np.exp(-d * d) * np.exp(-r / np.float32(180.0))
        hu[:, :, k] -= np.float32(amp) * pattern
    return {
        "n_streaks": int(n_streaks),
        "amplitude_hu": float(amplitude_hu),
        "angles_deg": np.rad2deg(angles).round(3).tolist(),
    }


def cbct_shading(
    hu: NDArray[np.float32],
    grid: Grid,
    *,
    centre_xy_mm: tuple[float, float],
    radius_mm: float,
    cupping: float,
    truncation_hu: float,
) -> None:
    """Cupping (grey values sag toward the FOV centre) and the bright truncation rim (in place)."""
    x = grid.axis_mm(0)[:, None] - np.float32(centre_xy_mm[0])
    y = grid.axis_mm(1)[None, :] - np.float32(centre_xy_mm[1])
    r = np.sqrt(x * x + y * y) / np.float32(radius_mm)
    factor = (1.0 - np.float32(cupping) * np.clip(1.0 - r * r, 0, 1)).astype(np.float32)
    rim = (np.float32(truncation_hu) * np.exp(-np.clip(1.0 - r, 0, None) * np.float32(radius_mm) / 12.0)).astype(
        np.float32
    )
    rim = np.where(r <= 1.0, rim, np.float32(0.0))
    hu += np.float32(1000.0)
    hu *= factor[:, :, None]
    hu += rim[:, :, None] - np.float32(1000.0)


def cbct_fov_mask(grid: Grid, centre_xy_mm: tuple[float, float], radius_mm: float) -> NDArray[np.bool_]:
    """In-plane mask ``(I, J)`` of the reconstructed cylinder."""
    x = grid.axis_mm(0)[:, None] - np.float32(centre_xy_mm[0])
    y = grid.axis_mm(1)[None, :] - np.float32(centre_xy_mm[1])
    return np.asarray(x * x + y * y <= np.float32(radius_mm) ** 2)


__all__ = [
    "CBCT_NOISE_HU_AT_1MM",
    "CBCT_PSF_SIGMA_MM",
    "CT_NOISE_HU_AT_1MM",
    "CT_PSF_SIGMA_MM",
    "add_noise",
    "apply_psf",
    "cbct_fov_mask",
    "cbct_shading",
    "cbct_streaks",
    "default_noise_hu",
]
