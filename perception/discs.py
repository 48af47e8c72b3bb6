"""Intervertebral discs on CT/CBCT: the body centreline, its intensity profile, disc planes (working-grid voxels).

Used by :mod:`needle_steering.perception.classical` to cut the vertebral-body column into bodies. The working
grid is the isotropic LPS-aligned grid of :func:`~needle_steering.perception.classical.to_lps_grid`: voxel axes
``i`` (left), ``j`` (posterior), ``k`` (superior); distances in mm are voxel counts times the spacing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage


def body_centreline(column: NDArray[np.bool_], spacing: float, sigma_mm: float = 6.0) -> NDArray[np.float64]:
    """Centre ``(i, j)`` of the vertebral-body column per axial slice, smoothed; shape ``(K, 2)``, NaN where none.

    Per slice, the centroid of the largest filled component of ``column`` (at least 150 mm^2) is
    taken; gaps (discs, where the column may be thin) are interpolated and the curve is smoothed
    with a ``sigma_mm`` Gaussian along the slices.
    """
    n_k = column.shape[2]
    centre = np.full((n_k, 2), np.nan)
    for k in range(n_k):
        sl = column[:, :, k]
        if not sl.any():
            continue
        sl = ndimage.binary_fill_holes(ndimage.binary_closing(sl))
        lab, n = ndimage.label(sl)
        sizes = ndimage.sum_labels(sl, lab, np.arange(1, n + 1))
        best = int(np.argmax(sizes))
        if sizes[best] * spacing * spacing < 150.0:
            continue
        centre[k] = ndimage.center_of_mass(lab == best + 1)
    valid = np.isfinite(centre[:, 0])
    if valid.sum() < 3:
        return centre
    ks = np.arange(n_k)
    seen = ks[valid]
    inside = (ks >= seen[0]) & (ks <= seen[-1])
    out = np.full((n_k, 2), np.nan)
    for axis in range(2):
        filled = np.interp(ks[inside], seen, centre[valid, axis])
        out[inside, axis] = ndimage.gaussian_filter1d(filled, sigma=max(1.0, sigma_mm / spacing), mode="nearest")
    # No centreline across long gaps (no body there: above/below the spine, a lost track).
    near = ndimage.binary_dilation(valid, iterations=max(1, round(10.0 / spacing)))
    out[~near] = np.nan
    return out


def centreline_profile(hu: NDArray[Any], centre: NDArray[np.float64], spacing: float, radius_mm: float = 9.0,
                        ) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Mean HU on discs of ``radius_mm`` perpendicular to the body centreline (oblique sampling).

    Args:
        hu: Working-grid intensities ``(I, J, K)``.
        centre: ``(K, 2)`` body centre per slice (voxel units, NaN where none).
        spacing: Isotropic voxel size, mm.

    Returns:
        ``(profile (K,), normal (K, 3))``: mean HU per slice (NaN where no centre) and the unit
        tangent of the centreline (voxel axes i, j, k) that the sampling discs are perpendicular to.
    """
    n_k = hu.shape[2]
    profile = np.full(n_k, np.nan)
    normal = np.tile(np.array([0.0, 0.0, 1.0]), (n_k, 1))
    valid = np.isfinite(centre[:, 0])
    if valid.sum() < 3:
        return profile, normal
    ks = np.nonzero(valid)[0]
    # The tangent from a more strongly smoothed curve: the body centroids wobble slice to slice.
    smooth = ndimage.gaussian_filter1d(centre[ks], sigma=max(1.0, 8.0 / spacing), axis=0, mode="nearest")
    grad = np.gradient(smooth, axis=0)
    tangent = np.column_stack([grad, np.ones(len(ks))])
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True)
    normal[ks] = tangent
    radii = np.arange(0.0, radius_mm + 1e-6, max(1.0, spacing * 0.75)) / spacing
    angles = np.linspace(0.0, 2 * np.pi, 12, endpoint=False)
    rr, aa = np.meshgrid(radii, angles, indexing="ij")
    rr, aa = rr.ravel(), aa.ravel()
    for row, k in enumerate(ks):
        t = tangent[row]
        u = np.cross(t, [0.0, 1.0, 0.0])
        u /= max(float(np.linalg.norm(u)), 1e-9)
        v = np.cross(t, u)
        p = np.array([centre[k, 0], centre[k, 1], float(k)])
        pts = p[:, None] + u[:, None] * (rr * np.cos(aa)) + v[:, None] * (rr * np.sin(aa))
        vals = ndimage.map_coordinates(hu, pts, order=1, mode="nearest")
        profile[k] = float(np.mean(vals))
    return profile, normal


#: A disc on the centreline profile is at least this much darker (HU) than the endplates within +-8 mm.
DISC_PROMINENCE_HU = 20.0


#: Minimum distance between two discs along the centreline, mm (the shortest lumbar/thoracic body + disc).
MIN_DISC_DISTANCE_MM = 15.0


#: Calibrated CT: a clear disc's profile minimum lies at most this fraction of the way from the clear discs'
#: median minimum (disc tissue, HU) up to the profile's median (cancellous bone of the bodies).
DISC_DARK_FRACTION = 0.5


#: The disc-dark check needs at least this many clear discs (a median of fewer is not a disc level).
MIN_DARK_CHECK_DISCS = 3


@dataclass(frozen=True)
class DiscPlane:
    """An intervertebral disc found on the centreline profile (working-grid voxel units).

    Attributes:
        k: Slice of the profile minimum.
        centre_ijk: ``(3,)`` point of the body centreline in the disc.
        normal_ijk: ``(3,)`` unit tangent of the centreline there (points cranially).
        prominence_hu: Depth of the minimum below the endplates on either side, HU.
    """

    k: int
    centre_ijk: NDArray[np.float64]
    normal_ijk: NDArray[np.float64]
    prominence_hu: float


def profile_discs(profile: NDArray[np.float64], centre: NDArray[np.float64], tangent: NDArray[np.float64],
                   spacing: float, *, clear_fraction: float = 0.0,
                   dark_fraction: float | None = None) -> list[DiscPlane]:
    """Discs = minima of the centreline profile, flanked by brighter endplates within +-8 mm.

    A minimum is a clear disc at twice :data:`DISC_PROMINENCE_HU` and at least ``clear_fraction`` of the median
    prominence of the candidates (CBCT: :data:`CBCT_CLEAR_DISC_FRACTION`); shallower ones must not cut a body short.
    With ``dark_fraction`` (calibrated CT: :data:`DISC_DARK_FRACTION`) a clear disc must also be disc-dark: its
    minimum (HU) at most this fraction of the way from the median minimum of the clear discs up to the median of
    the profile (the bodies' cancellous level); a brighter dip is a shallow minimum.

    Returns:
        Disc planes ordered caudal -> cranial (increasing k).
    """
    from scipy.signal import find_peaks

    valid = np.isfinite(profile)
    if valid.sum() < max(5, round(30.0 / spacing)):
        return []
    wlen = 2 * max(2, round(8.0 / spacing)) + 1
    candidates: list[DiscPlane] = []
    ks_all = np.arange(len(profile))
    # Each contiguous run of the profile separately (no minimum across a gap of the centreline).
    run_lab, n_runs = ndimage.label(valid)
    for run in range(1, n_runs + 1):
        ks = ks_all[run_lab == run]
        if len(ks) < 3:
            continue
        peaks, props = find_peaks(-profile[ks], distance=max(2, round(MIN_DISC_DISTANCE_MM / spacing)),
                                  prominence=DISC_PROMINENCE_HU, wlen=wlen)
        for p, prom in zip(peaks, props["prominences"], strict=True):
            k = int(ks[p])
            candidates.append(DiscPlane(k, np.array([centre[k, 0], centre[k, 1], float(k)]), tangent[k].copy(),
                                        float(prom)))
    candidates = with_endplates(candidates, profile, spacing)
    # Clear minima (twice the threshold) are discs. A shallow one (a cancellous minimum inside a
    # body, a vessel) counts only where it does not cut a body shorter than 3/4 of the typical
    # spacing of the clear discs.
    clear_hu = 2 * DISC_PROMINENCE_HU
    if candidates and clear_fraction > 0.0:
        clear_hu = max(clear_hu, clear_fraction * float(np.median([c.prominence_hu for c in candidates])))
    strong = sorted((c for c in candidates if c.prominence_hu >= clear_hu), key=lambda c: c.k)
    if dark_fraction is not None and len(strong) >= MIN_DARK_CHECK_DISCS:
        # A dip inside a body (a vascular channel, sparse cancellous bone) can be 40-60 HU deep, but its minimum
        # stays at the bone's level; disc tissue is darker than the bodies by far more than the dip.
        disc_hu = float(np.median([profile[c.k] for c in strong]))
        body_hu = float(np.median(profile[np.isfinite(profile)]))
        if body_hu > disc_hu:
            dark_hu = disc_hu + dark_fraction * (body_hu - disc_hu)
            dark = [c for c in strong if profile[c.k] <= dark_hu]
            strong = dark if len(dark) >= 2 else strong
    if len(strong) < 2:
        return sorted(candidates, key=lambda c: c.k) if len(candidates) <= 2 else strong
    strong = without_close_discs(strong, spacing)
    typical = typical_disc_spacing(disc_gaps(strong), spacing)
    accepted = list(strong)
    weak = [c for c in candidates if all(c is not a for a in strong)]
    # Thick discs are accepted like the shallow minima: only where they do not cut a short body.
    weak += thick_discs(profile, centre, tangent, spacing, candidates=candidates, strong=strong)
    for cand in sorted(weak, key=lambda c: -c.prominence_hu):
        if all(abs(cand.k - a.k) >= 0.75 * typical for a in accepted):
            accepted.append(cand)
    return sorted(accepted, key=lambda c: c.k)


#: Two clear discs closer than this fraction of the typical clear-disc spacing cut a body no vertebra has (adjacent
#: levels differ by 10-25 % in height; T12 + its disc is about 0.8 of L1 + its disc): one of them is
#: a dip inside a body (a vascular channel, sparse cancellous bone, or noise on a low-dose CT).
CLOSE_DISC_FRACTION = 0.6
#: Percentile of the clear-disc gaps taken as the level height by :func:`without_close_discs`.
CLOSE_DISC_LEVEL_PERCENTILE = 75.0


def without_close_discs(strong: list[DiscPlane], spacing: float) -> list[DiscPlane]:
    """Drop clear discs that cut a body shorter than :data:`CLOSE_DISC_FRACTION` of the typical spacing.

    Of two discs that close, the one whose removal leaves the gap closest to the typical spacing goes (the other
    one continues the rhythm of the levels); at the end of the column, the shallower one. Needs three discs.
    """
    out = sorted(strong, key=lambda c: c.k)
    while len(out) >= 3:
        ks = np.array([c.k for c in out], float)
        gaps = np.diff(ks)
        # The level height from the upper quartile of the single-level gaps: false discs shorten the median.
        typical = typical_disc_spacing(gaps, spacing, CLOSE_DISC_LEVEL_PERCENTILE)
        n = int(np.argmin(gaps))
        if gaps[n] >= CLOSE_DISC_FRACTION * typical:
            break
        # Removing out[n] joins the gap ks[n-1]..ks[n+1]; removing out[n+1] joins ks[n]..ks[n+2].
        cost = []
        for drop, lo, hi in ((n, n - 1, n + 1), (n + 1, n, n + 2)):
            if lo < 0 or hi >= len(out):
                cost.append((np.inf, out[drop].prominence_hu, drop))
            else:
                cost.append((abs(ks[hi] - ks[lo] - typical), out[drop].prominence_hu, drop))
        if np.isinf(cost[0][0]) and np.isinf(cost[1][0]):
            break
        if np.isinf(cost[0][0]) or np.isinf(cost[1][0]):
            # At the end of the column only one removal can be judged by the rhythm: compare by prominence.
            drop = min(cost, key=lambda c: c[1])[2]
        else:
            drop = min(cost)[2]
        del out[drop]
    return out


#: The tallest vertebral level (body + disc, mm along k): a gap between clear discs longer than this spans more than
#: one body (a disc missed among the clear ones). Lumbar levels measure 35-45 mm; tilt only shortens the k extent.
MAX_LEVEL_HEIGHT_MM = 55.0


def typical_disc_spacing(gaps: NDArray[np.float64], spacing: float, percentile: float = 50.0) -> float:
    """Median (or ``percentile``) spacing (slices) of consecutive clear discs, over the gaps one level can span.

    With only a few discs in view, one missed disc makes the plain median a double level, and the shallow or thick
    disc in that gap would then be rejected for cutting a body "short". Gaps longer than
    :data:`MAX_LEVEL_HEIGHT_MM` are left out (all gaps when every one is that long).
    """
    single = gaps[gaps * spacing <= MAX_LEVEL_HEIGHT_MM]
    return float(np.percentile(single if single.size else gaps, percentile))


def disc_gaps(planes: list[DiscPlane]) -> NDArray[np.float64]:
    """Slices between consecutive discs (``planes`` sorted by ``k``), for :func:`typical_disc_spacing`."""
    return np.diff([p.k for p in planes]).astype(float)


#: Thickest intervertebral disc (mm along the centreline) that :func:`thick_discs` looks for.
MAX_DISC_THICKNESS_MM = 18.0


def thick_discs(profile: NDArray[np.float64], centre: NDArray[np.float64], tangent: NDArray[np.float64],
                 spacing: float, *, candidates: list[DiscPlane], strong: list[DiscPlane]) -> list[DiscPlane]:
    """Discs thicker than the +-8 mm prominence window: a dark run flanked by endplates beyond the window.

    A disc of 9-15 mm (lower lumbar) has a flat minimum whose darkest sample may lie more than 8 mm from one of the
    endplates, so :func:`scipy.signal.find_peaks` sees no prominence on that side. Here a disc is a run of samples
    at most as dark as the clear discs (``strong``: their brightest minimum plus :data:`DISC_PROMINENCE_HU`), at
    most :data:`MAX_DISC_THICKNESS_MM` long, holding no other candidate, with samples brighter than the run by at
    least :data:`DISC_PROMINENCE_HU` within 8 mm beyond both of its ends. The plane goes through the run's middle.

    Args:
        profile: ``(K,)`` mean HU per slice along the body centreline (NaN where none).
        centre: ``(K, 2)`` body centre per slice (voxel units).
        tangent: ``(K, 3)`` unit centreline tangent per slice.
        spacing: Isotropic voxel size, mm.
        candidates: Minima already found (any prominence).
        strong: The clear discs.

    Returns:
        The thick-disc planes (``prominence_hu`` = the darker endplate minus the run's minimum).
    """
    if not strong:
        return []
    dark_hu = float(max(profile[c.k] for c in strong)) + DISC_PROMINENCE_HU
    reach = max(2, round(8.0 / spacing))
    longest = max(1, round(MAX_DISC_THICKNESS_MM / spacing))
    taken = {c.k for c in candidates}
    with np.errstate(invalid="ignore"):
        dark = np.isfinite(profile) & (profile <= dark_hu)
    runs, n_runs = ndimage.label(dark)
    out: list[DiscPlane] = []
    for run in range(1, n_runs + 1):
        ks = np.nonzero(runs == run)[0]
        lo, hi = int(ks[0]), int(ks[-1])
        if len(ks) > longest or any(lo <= k <= hi for k in taken):
            continue
        below = profile[max(0, lo - reach): lo]
        above = profile[hi + 1: hi + 1 + reach]
        if not (np.isfinite(below).any() and np.isfinite(above).any()):
            continue
        floor = float(np.min(profile[lo: hi + 1]))
        prominence = min(float(np.nanmax(below)), float(np.nanmax(above))) - floor
        if prominence < DISC_PROMINENCE_HU:
            continue
        k = (lo + hi) // 2
        out.append(DiscPlane(k, np.array([centre[k, 0], centre[k, 1], float(k)]), tangent[k].copy(), prominence))
    return out


#: A disc candidate much shallower than the typical one (this fraction of the median prominence) must be
#: flanked by endplates: on both sides within :data:`ENDPLATE_SEARCH_MM`, a profile maximum above the
#: run's median by :data:`ENDPLATE_EXCESS` of the spread between the median and the 95th percentile.
WEAK_DISC_FRACTION = 0.5


ENDPLATE_SEARCH_MM = 10.0


ENDPLATE_EXCESS = 0.15


def with_endplates(candidates: list[DiscPlane], profile: NDArray[np.float64], spacing: float) -> list[DiscPlane]:
    """Drop weak disc candidates that have no bright endplate on either side.

    A dip of the centreline profile inside a body (cancellous bone darker in the middle, a vascular
    channel) or inside the sacrum (no endplates, bone darker than the mobile bodies) has the shape of a
    shallow minimum but not the bright cortical endplates of a disc; degenerate or wide discs that score a
    low prominence in the +-8 mm window keep their endplates. The caudal-most candidate (the lumbosacral disc,
    whose sacral endplate is tilted) needs the endplate above it only, when it is as dark as the clear discs.

    Args:
        candidates: Profile minima.
        profile: ``(K,)`` mean HU per slice (NaN where no centre).
        spacing: Isotropic voxel size, mm.
    """
    if len(candidates) < 3:
        return candidates
    median_prom = float(np.median([c.prominence_hu for c in candidates]))
    values = profile[np.isfinite(profile)]
    level = float(np.median(values))
    need = level + ENDPLATE_EXCESS * (float(np.percentile(values, 95)) - level)
    reach = max(2, round(ENDPLATE_SEARCH_MM / spacing))
    clear = [c for c in candidates if c.prominence_hu >= WEAK_DISC_FRACTION * median_prom]
    # As dark as the clear discs (disc tissue, not dark cancellous bone): at most their brightest minimum plus
    # the minimum disc prominence.
    disc_dark_hu = float(np.max([profile[c.k] for c in clear])) + DISC_PROMINENCE_HU if clear else -np.inf
    caudal_k = min(c.k for c in candidates)
    kept = []
    for cand in candidates:
        if cand.prominence_hu >= WEAK_DISC_FRACTION * median_prom:
            kept.append(cand)
            continue
        below = profile[max(0, cand.k - reach): cand.k]
        above = profile[cand.k + 1: cand.k + reach + 1]
        sides = [float(np.nanmax(side)) if np.isfinite(side).any() else -np.inf for side in (below, above)]
        if min(sides) >= need:
            kept.append(cand)
        elif cand.k == caudal_k and sides[1] >= need and profile[cand.k] <= disc_dark_hu:
            # The lumbosacral disc: the sacral endplate under it is tilted by the sacral slope (30-50 degrees), so
            # the near-axial profile averages it with the disc and only L5's endplate above stands out.
            kept.append(cand)
    return kept


def height_along_planes(mask: NDArray[np.bool_], planes: list[DiscPlane]) -> float:
    """Extent (voxels) of ``mask`` along the normal of the disc plane nearest to its centroid.

    A body cut by tilted disc planes spans more axial slices than its height; measured along the
    discs' normal it compares with its neighbours.
    """
    pts = np.argwhere(mask).astype(np.float64)
    if pts.size == 0:
        return 0.0
    centroid = pts.mean(axis=0)
    nearest = min(planes, key=lambda p: abs(float((centroid - p.centre_ijk) @ p.normal_ijk)))
    proj = pts @ nearest.normal_ijk
    return float(proj.max() - proj.min() + 1.0)


def plane_distance_mm(shape: tuple[int, ...], plane: DiscPlane, spacing: float) -> NDArray[np.float32]:
    """Signed distance (mm) of every voxel of a grid of ``shape`` from ``plane`` along its normal: positive above
    (cranial of) the disc; behind :data:`DISC_PLANE_POSTERIOR_REACH_MM` the plane continues axially."""
    ii = np.arange(shape[0], dtype=np.float32)[:, None, None]
    jj = np.arange(shape[1], dtype=np.float32)[None, :, None]
    kk = np.arange(shape[2], dtype=np.float32)[None, None, :]
    c, n = plane.centre_ijk.astype(np.float32), plane.normal_ijk.astype(np.float32)
    along = (ii - c[0]) * n[0] + posterior_clamped(jj - c[1], spacing) * n[1] + (kk - c[2]) * n[2]
    return np.asarray(along * np.float32(spacing), np.float32)


def plane_index(shape: tuple[int, ...], planes: list[DiscPlane], spacing: float) -> NDArray[np.int16]:
    """Per voxel, the number of disc planes it lies above (0 = below the caudal-most disc)."""
    index = np.zeros(shape, np.int16)
    for plane in planes:
        index += (plane_distance_mm(shape, plane, spacing) > 0).astype(np.int16)
    return index


#: How far behind the disc centre (mm) a disc plane keeps its tilt; further back (behind the canal's
#: front, among the posterior elements) it continues axially. A tilted L5/S1 plane (sacral slope 30-50
#: degrees) extended 40-60 mm back passes above L5's laminae and hands L5's arch to the sacrum.
DISC_PLANE_POSTERIOR_REACH_MM = 30.0


def posterior_clamped(dj: NDArray[np.float32], spacing_mm: float) -> NDArray[np.float32]:
    """Antero-posterior voxel offsets from a disc centre (LPS: + is posterior), clamped at the plane's reach."""
    return np.minimum(dj, np.float32(DISC_PLANE_POSTERIOR_REACH_MM / spacing_mm))


def cut_at_planes(mask: NDArray[np.bool_], planes: list[DiscPlane], spacing: float,
                   half_gap_mm: float = 2.5) -> NDArray[np.bool_]:
    """``mask`` without a slab of +-``half_gap_mm`` (at least half a voxel) around each disc plane."""
    out = mask.copy()
    pts = np.argwhere(mask).astype(np.float32)
    if pts.size == 0:
        return out
    half = max(0.5, half_gap_mm / spacing)
    drop = np.zeros(len(pts), bool)
    for plane in planes:
        d = (pts - plane.centre_ijk.astype(np.float32)) @ plane.normal_ijk.astype(np.float32)
        drop |= np.abs(d) < half
    out[tuple(pts[drop].astype(int).T)] = False
    return out


#: Tilt range (degrees from axial, normal leaning anteriorly) searched for the caudal-most disc (L5/S1: sacral slope).
CAUDAL_DISC_TILT_DEG = (-10.0, 65.0)


def refine_disc(hu: NDArray[Any], plane: DiscPlane, spacing: float, *, k_half_mm: float,
                 j_range_mm: tuple[float, float], tilt_deg: tuple[float, float],
                 tilt_tolerance: float = 0.0, same_sampler: bool = False) -> DiscPlane:
    """Re-fit a disc's position and sagittal tilt to the darkest disc-shaped slab between bright endplates.

    Disc-shaped samples (radius 9 mm) are tried on a grid of centres in the sagittal plane through
    ``plane.centre_ijk`` (k within +-``k_half_mm``, j offsets within ``j_range_mm``, 2 mm steps) and tilts
    of the normal ``n = (0, -sin t, cos t)`` (voxel axes i, j, k: leaning anteriorly for positive t,
    5 degree steps). Score = the darker of the two endplate samples (5-7 mm along +-n) minus the disc
    sample (HU). The profile's axial-ish disc is kept when no candidate scores higher than it: higher than its
    profile prominence, or (``same_sampler``, CBCT) than its own score with these samples along its own normal.
    Among the tilts scoring within ``tilt_tolerance`` (a fraction) of the best, the least tilted is taken.

    Args:
        hu: Working-grid intensities ``(I, J, K)``.
        plane: The profile disc (voxel units).
        spacing: Isotropic voxel size, mm.
        tilt_tolerance: Score fraction within which tilts count as equal (0: the best one).
        same_sampler: Compare with the plane's own disc-sample score instead of its profile prominence.

    Returns:
        The re-fitted plane (``prominence_hu`` = its score) or ``plane``.
    """
    step = max(1.0, 2.0 / spacing)
    c0 = plane.centre_ijk
    ks = np.arange(c0[2] - k_half_mm / spacing, c0[2] + k_half_mm / spacing + 1e-6, step)
    js = np.arange(c0[1] + j_range_mm[0] / spacing, c0[1] + j_range_mm[1] / spacing + 1e-6, step)
    ks = ks[(ks >= 0) & (ks <= hu.shape[2] - 1)]
    js = js[(js >= 0) & (js <= hu.shape[1] - 1)]
    if ks.size == 0 or js.size == 0:
        return plane
    kk, jj = np.meshgrid(ks, js, indexing="ij")
    centres = np.column_stack([np.full(kk.size, c0[0]), jj.ravel(), kk.ravel()])  # (N, 3)
    radii = np.arange(0.0, 9.0 + 1e-6, 3.0) / spacing
    angles = np.linspace(0.0, 2 * np.pi, 10, endpoint=False)
    rr, aa = np.meshgrid(radii, angles, indexing="ij")
    rr, aa = rr.ravel(), aa.ravel()

    def scores(points: NDArray[np.float64], n: NDArray[np.float64]) -> NDArray[np.float64]:
        # In-plane axes: left-right as far as the normal allows (exactly i for a sagittal tilt), and n x u.
        u = np.array([1.0, 0.0, 0.0]) - n[0] * n
        u /= max(float(np.linalg.norm(u)), 1e-9)
        v = np.cross(n, u)
        offsets = u[None, :] * (rr * np.cos(aa))[:, None] + v[None, :] * (rr * np.sin(aa))[:, None]  # (M, 3)
        means = []
        for shift_mm in (0.0, 5.0, 7.0, -5.0, -7.0):
            pts = points[:, None, :] + offsets[None, :, :] + n * (shift_mm / spacing)
            vals = ndimage.map_coordinates(hu, pts.reshape(-1, 3).T, order=1, mode="nearest")
            means.append(vals.reshape(len(points), -1).mean(axis=1))
        return np.minimum(0.5 * (means[1] + means[2]), 0.5 * (means[3] + means[4])) - means[0]

    per_tilt: list[tuple[float, float, NDArray[np.float64], NDArray[np.float64]]] = []
    for tilt in np.deg2rad(np.arange(tilt_deg[0], tilt_deg[1] + 1e-6, 5.0)):
        n = np.array([0.0, -np.sin(tilt), np.cos(tilt)])
        score = scores(centres, n)
        idx = int(np.argmax(score))
        per_tilt.append((float(score[idx]), float(tilt), centres[idx].copy(), n))
    top = max(p[0] for p in per_tilt)
    own = plane.prominence_hu
    if same_sampler:
        normal = np.asarray(plane.normal_ijk, float)
        own = float(scores(np.asarray(c0, float)[None, :], normal / np.linalg.norm(normal))[0])
    if top <= own:
        return plane
    near = [p for p in per_tilt if p[0] >= top - tilt_tolerance * abs(top)]
    chosen = near[0] if tilt_tolerance == 0.0 else min(near, key=lambda p: abs(p[1]))
    return DiscPlane(round(float(chosen[2][2])), chosen[2], chosen[3], chosen[0])


#: The caudal-most disc is looked for below the profile's end when the next disc down (one typical spacing below the
#: caudal-most profile disc) lies within this distance (mm) of the profile's first slice: there the profile cannot
#: show it (the endplate window is +-8 mm), e.g. the L5/S1 disc when the sacrum's fatty marrow or image noise ends
#: the body column at L5's endplate.
CAUDAL_SEARCH_EDGE_MM = 9.0


def disc_below_profile(hu: NDArray[Any], planes: list[DiscPlane], profile: NDArray[np.float64],
                       centre: NDArray[np.float64], tangent: NDArray[np.float64], *, spacing: float,
                       min_score_hu: float) -> DiscPlane | None:
    """A tilted disc one typical level below the caudal-most profile disc, where the profile ends (or None).

    The search (:func:`refine_disc`: k within +-9 mm of the expected slice, j -10..+25 mm, the lumbosacral tilts)
    starts from the centreline's first point, which must lie more than :data:`CAUDAL_SEARCH_EDGE_MM` above the first
    slice of the image (the column ended in the image, not at the field of view). The disc found must score more
    than ``min_score_hu`` (darker endplate minus disc, HU; the probe's own score) and lie at least
    :data:`CLOSE_DISC_FRACTION` of the typical spacing below the caudal-most disc (its centre: a tilted disc's centre
    sits higher and further back than the axial profile's).
    """
    if len(planes) < 2:
        return None
    valid = np.nonzero(np.isfinite(profile))[0]
    if valid.size == 0:
        return None
    typical = typical_disc_spacing(disc_gaps(planes), spacing)
    start = int(valid[0])
    expected = planes[0].k - typical
    # The column must end inside the image with room for the disc's far endplate: a column cut by the field of view
    # says nothing of a disc below it (samples beyond the edge repeat the edge slice).
    if start * spacing <= CAUDAL_SEARCH_EDGE_MM or abs(expected - start) * spacing > CAUDAL_SEARCH_EDGE_MM:
        return None
    k0 = float(max(0.0, expected))
    probe = DiscPlane(round(k0), np.array([centre[start, 0], centre[start, 1], k0]), tangent[start].copy(),
                      min_score_hu)
    found = refine_disc(hu, probe, spacing, k_half_mm=9.0, j_range_mm=(-10.0, 25.0), tilt_deg=CAUDAL_DISC_TILT_DEG)
    if found is probe or planes[0].k - found.k < CLOSE_DISC_FRACTION * typical:
        return None
    return found
