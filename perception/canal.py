"""The spinal canal on CT/CBCT: per axial slice, the hole of the closed bony ring, chained over slices.

Used by :mod:`needle_steering.perception.classical`. Arrays are on its isotropic LPS-aligned working grid
(voxel axes ``i`` left, ``j`` posterior, ``k`` superior); a track is ``(K, 2)`` canal centres ``(i, j)`` per
slice, NaN where no canal was seen.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

#: A canal candidate (a hole enclosed by bone) is darker than this on average (CSF, fat; HU).
CANAL_CANDIDATE_MAX_HU = 100.0
#: Calibrated CT: a hole this much brighter (HU) than the typical canal of the image (CSF, epidural fat) is
#: cancellous bone below the threshold inside a body (3 mm partial volume, fatty marrow), not the canal.
CANAL_MARROW_CONTRAST_HU = 50.0


def canal_track(hu: NDArray[Any], bone: NDArray[np.bool_], body: NDArray[np.bool_], spacing: float, *,
                 max_hole_hu: float = CANAL_CANDIDATE_MAX_HU, max_contrast_hu: float | None = None,
                 ) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Per axial slice, the centre of the canal hole (NaN where no closed ring is seen).

    Candidate holes are darker than ``max_hole_hu`` on average (units of ``hu``; :data:`CANAL_CANDIDATE_MAX_HU`
    on CT). With ``max_contrast_hu`` (HU, calibrated CT: :data:`CANAL_MARROW_CONTRAST_HU`), a slice's chosen
    hole brighter than the typical canal by more than that is a marrow hole in the body (the ring around the
    canal open in that slice): it still marks the spine's axis in the track, but its voxels are not canal
    (they are excluded from the bodies' hole filling otherwise).
    """
    n_k = hu.shape[2]
    track = np.full((n_k, 2), np.nan)
    canal = np.zeros(hu.shape, bool)
    area_mm2 = spacing * spacing
    candidates: list[list[tuple[float, float, NDArray[np.bool_], float, float]]] = []
    body_x = np.full(n_k, np.nan)
    for k in range(n_k):
        sl = bone[:, :, k]
        cands: list[tuple[float, float, NDArray[np.bool_], float, float]] = []
        if body[:, :, k].any():
            body_x[k] = float(np.mean(np.nonzero(body[:, :, k])[0]))
        if sl.sum() * area_mm2 > 200:
            closed = ndimage.binary_closing(sl, iterations=1)
            holes = ndimage.binary_fill_holes(closed) & ~closed
            lab, _ = ndimage.label(holes)
            for idx, obj in enumerate(ndimage.find_objects(lab), start=1):
                if obj is None:
                    continue
                hole = lab[obj] == idx
                area = float(hole.sum()) * area_mm2
                if not 60.0 <= area <= 700.0:
                    continue
                mean_hu = float(hu[:, :, k][obj][hole].mean())
                if mean_hu > max_hole_hu:
                    continue
                ci, cj = ndimage.center_of_mass(hole)
                if not _in_posterior_trunk(body[:, :, k], ci + obj[0].start, cj + obj[1].start):
                    continue
                full = np.zeros(sl.shape, bool)
                full[obj] = hole
                cands.append((ci + obj[0].start, cj + obj[1].start, full, area, mean_hu))
        candidates.append(cands)
    # Lateral midline of the body: the canal lies close to it.
    mid_x = float(np.nanmedian(body_x)) if np.isfinite(body_x).any() else hu.shape[0] / 2
    # Per slice, the darkest candidate near the midline is the likeliest canal (CSF/fat); holes in a
    # vertebral body whose cancellous bone falls below the threshold (osteoporosis, 3 mm partial
    # volume) are brighter and lie anterior of it.
    anchors: list[tuple[int, float, float, float]] = []
    for k, cands in enumerate(candidates):
        near = [c for c in cands if abs(c[0] - mid_x) * spacing < 40.0]
        if near:
            darkest = min(near, key=lambda c: c[4])
            anchors.append((k, darkest[0], darkest[1], darkest[4]))
    if not anchors:
        return track, canal
    # The longest chain places the reference where it has anchors nearby; the chains that continue it (a tilted
    # spine's canal seen once per vertebra) place it elsewhere.
    anchors, joined = canal_chains(anchors, spacing)
    anchor_k = np.array([a[0] for a in anchors])
    anchor_ij = np.array([[a[1], a[2]] for a in anchors])
    joined_k = np.array([a[0] for a in joined])
    joined_ij = np.array([[a[1], a[2]] for a in joined])
    canal_hu = float(np.median([a[3] for a in anchors]))
    marrow_hu = np.inf if max_contrast_hu is None else canal_hu + max_contrast_hu
    window = max(2, round(40.0 / spacing))
    for k, cands in enumerate(candidates):
        # The canal follows the curvature of the spine: reference position from the longest chain's anchors
        # within +-40 mm, else the joined chain's (all of the longest chain's when none is that close).
        local = np.abs(anchor_k - k) <= window
        joined_local = np.abs(joined_k - k) <= window
        if local.any():
            ref_i, ref_j = np.median(anchor_ij[local], axis=0)
        elif joined_local.any():
            ref_i, ref_j = np.median(joined_ij[joined_local], axis=0)
        else:
            ref_i, ref_j = np.median(anchor_ij, axis=0)
        best = None
        best_cost = np.inf
        dist: dict[int, float] = {}
        for n, c in enumerate(cands):
            d = float(np.hypot(c[0] - ref_i, (c[1] - ref_j) * 0.6))
            if d >= 25.0 / spacing:
                continue
            dist[n] = d
            # Distance in units of the search radius plus brightness above the typical canal.
            cost = d * spacing / 25.0 + max(0.0, c[4] - canal_hu) / 60.0
            if cost < best_cost:
                best, best_cost = c, cost
        if best is not None and best[4] > marrow_hu:
            # Only marrow holes (cancellous bone, all alike): their brightness says nothing of the canal; the
            # one nearest the reference marks the spine's axis.
            best = cands[min((n for n in dist if cands[n][4] > marrow_hu), key=dist.__getitem__)]
        if best is not None:
            track[k] = best[:2]
            if best[4] <= marrow_hu:
                canal[:, :, k] = best[2]
    return track, canal


#: The spinal canal lies in the posterior part of the trunk: at least this fraction of the body's
#: anterior-posterior depth (along the candidate's column) lies in front of it (lumbar ~0.7, neck ~0.6). Holes
#: further forward are in the pelvis (pubic bones) or the chest, not the canal.
CANAL_MIN_POSTERIOR_FRACTION = 0.5


def _in_posterior_trunk(body_slice: NDArray[np.bool_], ci: float, cj: float) -> bool:
    """Whether a hole centred at ``(ci, cj)`` (voxels; j grows posteriorly) lies in the posterior part of the body
    outline along its column. True when the outline is cut by the array's edge there (truncated field of view:
    the trunk's depth is unknown)."""
    inside = np.nonzero(body_slice[round(ci), :])[0]
    if inside.size == 0:
        return True
    # The outline's extent, not the run around the hole: bowel gas and the lungs break the column.
    front, back = int(inside[0]), int(inside[-1])
    if front == 0 or back == body_slice.shape[1] - 1:
        return True
    return (cj - front) >= CANAL_MIN_POSTERIOR_FRACTION * (back - front)


#: Longest cranio-caudal gap (mm) between consecutive canal anchors of one chain.
CANAL_CHAIN_GAP_MM = 20.0
#: Largest in-plane step (mm) between consecutive canal anchors of one chain.
CANAL_CHAIN_STEP_MM = 15.0


#: Longest cranio-caudal gap (mm) bridged between two chains of canal anchors that continue each other: in a
#: tilted patient the bony ring closes only near the pedicles, a run of slices once per vertebra (~30-35 mm
#: lumbar), so the runs of one canal are up to about one level apart.
CANAL_JOIN_GAP_MM = 35.0
#: A chain's direction (in-plane drift per slice) is fitted over its anchors within this distance (mm) of its end.
CANAL_JOIN_FIT_MM = 20.0
#: Steepest inclination (degrees) of the canal to the slice normal used to continue a chain: patient tilt plus
#: the lumbar lordosis stay below it; a steeper fitted drift is noise of a short chain and is clamped.
CANAL_MAX_INCLINATION_DEG = 30.0


def _chain_pieces(anchors: list[tuple[int, float, float, float]], spacing: float,
                  ) -> list[list[tuple[int, float, float, float]]]:
    """Chains of anchors ``(k, i, j, mean HU)`` (sorted by k) whose consecutive members are at most
    :data:`CANAL_CHAIN_GAP_MM` apart in k and :data:`CANAL_CHAIN_STEP_MM` in plane."""
    chains: list[list[tuple[int, float, float, float]]] = []
    for a in sorted(anchors):
        for chain in chains:
            last = chain[-1]
            if ((a[0] - last[0]) * spacing <= CANAL_CHAIN_GAP_MM
                    and np.hypot(a[1] - last[1], a[2] - last[2]) * spacing <= CANAL_CHAIN_STEP_MM):
                chain.append(a)
                break
        else:
            chains.append([a])
    return chains


def _extrapolate(chain: list[tuple[int, float, float, float]], k: int, spacing: float) -> NDArray[np.float64]:
    """In-plane position (voxels) of ``chain`` continued linearly to slice ``k`` from its anchors within
    :data:`CANAL_JOIN_FIT_MM` of the end nearest ``k`` (the end's position when they span a single slice; the
    drift at most :data:`CANAL_MAX_INCLINATION_DEG`)."""
    ks = np.array([a[0] for a in chain], float)
    ij = np.array([[a[1], a[2]] for a in chain])
    end = ks[-1] if k > ks[-1] else ks[0]
    near = np.abs(ks - end) * spacing <= CANAL_JOIN_FIT_MM
    ks, ij = ks[near], ij[near]
    if np.ptp(ks) == 0:
        return np.asarray(ij.mean(axis=0), float)
    slope = np.array([np.polyfit(ks, ij[:, axis], 1)[0] for axis in range(2)])
    max_slope = float(np.tan(np.radians(CANAL_MAX_INCLINATION_DEG)))
    norm = float(np.hypot(*slope))
    if norm > max_slope:
        slope *= max_slope / norm
    at_end = ij[ks == end].mean(axis=0)
    return np.asarray(at_end + slope * (k - end), float)


def canal_chains(anchors: list[tuple[int, float, float, float]], spacing: float,
                 ) -> tuple[list[tuple[int, float, float, float]], list[tuple[int, float, float, float]]]:
    """The longest chain of canal anchors ``(k, i, j, mean HU)``, and that chain joined with the chains that
    continue it (both sorted by k).

    A chain's consecutive members are at most :data:`CANAL_CHAIN_GAP_MM` apart in k and :data:`CANAL_CHAIN_STEP_MM`
    in plane: dark holes in the pelvis or the chest far from the spine's canal form chains of their own and are
    dropped. A chain continues the joined one when it starts (ends) at most :data:`CANAL_JOIN_GAP_MM` beyond its end
    (start) and within :data:`CANAL_CHAIN_STEP_MM` in plane of the joined chain's linear continuation there
    (same direction: the canal of a tilted spine drifts steadily across slices). Repeated in both directions.
    """
    pieces = _chain_pieces(anchors, spacing)
    longest = max(pieces, key=len)
    joined = list(longest)
    rest = [p for p in pieces if p is not longest]
    for upward in (True, False):
        while True:
            edge = joined[-1][0] if upward else joined[0][0]
            best = None
            for p in rest:
                first = p[0] if upward else p[-1]
                gap = (first[0] - edge) if upward else (edge - first[0])
                if not 0 < gap * spacing <= CANAL_JOIN_GAP_MM:
                    continue
                pred = _extrapolate(joined, first[0], spacing)
                if float(np.hypot(first[1] - pred[0], first[2] - pred[1])) * spacing > CANAL_CHAIN_STEP_MM:
                    continue
                if best is None or gap < best[0]:
                    best = (gap, p)
            if best is None:
                break
            rest = [p for p in rest if p is not best[1]]
            joined = sorted(joined + best[1])
    return longest, joined


def enclosed_canal_track(hu: NDArray[Any], bone: NDArray[np.bool_], body: NDArray[np.bool_], spacing: float,
                          ) -> tuple[NDArray[np.float64], NDArray[np.bool_]]:
    """Canal track where the bony ring is open in most slices (thin laminae, coarse slices).

    A canal voxel is dark (below the soft-tissue median: CSF, epidural fat) and nearly enclosed
    by bone: of 16 in-plane directions, at least 13 meet bone within 25 mm. Computed on a 2 mm
    in-plane grid; the largest such blob near the body's midline is the canal of that slice.
    """
    step = max(1, round(2.0 / spacing))
    hu_c = hu[::step, ::step, :]
    bone_c = bone[::step, ::step, :]
    body_c = body[::step, ::step, :]
    soft = float(np.median(hu_c[body_c & (hu_c > -200) & (hu_c < 200)])) if body_c.any() else 40.0
    dark = body_c & (hu_c < soft) & ~bone_c
    reach = max(2, round(25.0 / (spacing * step)))
    hits = np.zeros(hu_c.shape, np.int16)
    angles = np.linspace(0.0, 2 * np.pi, 16, endpoint=False)
    for angle in angles:
        di, dj = np.cos(angle), np.sin(angle)
        seen = np.zeros(hu_c.shape, bool)
        for r in range(1, reach + 1):
            si, sj = round(di * r), round(dj * r)
            shifted = np.zeros_like(bone_c)
            src_i = slice(max(0, si), bone_c.shape[0] + min(0, si))
            dst_i = slice(max(0, -si), bone_c.shape[0] + min(0, -si))
            src_j = slice(max(0, sj), bone_c.shape[1] + min(0, sj))
            dst_j = slice(max(0, -sj), bone_c.shape[1] + min(0, -sj))
            shifted[dst_i, dst_j, :] = bone_c[src_i, src_j, :]
            seen |= shifted
        hits += seen
    enclosed = dark & (hits >= 13)
    track = np.full((hu.shape[2], 2), np.nan)
    canal = np.zeros(hu.shape, bool)
    mid_i = float(np.mean(np.nonzero(body_c.any(axis=(1, 2)))[0])) if body_c.any() else hu_c.shape[0] / 2
    for k in range(hu.shape[2]):
        lab, n = ndimage.label(enclosed[:, :, k])
        best, best_area = 0, 0.0
        for idx in range(1, n + 1):
            blob = lab == idx
            area = float(blob.sum()) * (spacing * step) ** 2
            ci = float(np.mean(np.nonzero(blob)[0]))
            if 60.0 <= area <= 700.0 and abs(ci - mid_i) * spacing * step < 40.0 and area > best_area:
                best, best_area = idx, area
        if best:
            blob = lab == best
            ci, cj = ndimage.center_of_mass(blob)
            track[k] = (ci * step, cj * step)
            up = np.repeat(np.repeat(blob, step, axis=0), step, axis=1)[: hu.shape[0], : hu.shape[1]]
            canal[: up.shape[0], : up.shape[1], k] = up
    return track, canal


#: A canal centre further than this (mm, in plane) from the median of its neighbours within
#: :data:`CANAL_SPIKE_WINDOW_MM` is not the canal (the canal follows the spine's curvature, far smoother).
CANAL_SPIKE_MM = 8.0


CANAL_SPIKE_WINDOW_MM = 9.0


def despike_track(track: NDArray[np.float64], canal: NDArray[np.bool_], spacing_mm: float) -> None:
    """Remove (in place: NaN in ``track``, cleared slices of ``canal``) canal centres that jump off the track.

    Args:
        track: ``(K, 2)`` canal centre per slice (voxel units, NaN where none).
        canal: Canal mask ``(I, J, K)``.
        spacing_mm: Isotropic voxel size, mm.
    """
    valid = np.nonzero(np.isfinite(track[:, 0]))[0]
    half = max(1, round(CANAL_SPIKE_WINDOW_MM / spacing_mm))
    spikes = []
    for k in valid:
        near = valid[(np.abs(valid - k) <= half) & (valid != k)]
        if near.size < 2:
            continue
        ref = np.median(track[near], axis=0)
        if float(np.hypot(*(track[k] - ref))) * spacing_mm > CANAL_SPIKE_MM:
            spikes.append(int(k))
    for k in spikes:
        track[k] = np.nan
        canal[:, :, k] = False


def fill_track(track: NDArray[np.float64], max_gap_slices: int) -> NDArray[np.float64]:
    out = track.copy()
    valid = np.isfinite(track[:, 0])
    if valid.sum() < 2:
        return out
    ks = np.arange(track.shape[0])
    idx = ks[valid]
    for axis in range(2):
        out[:, axis] = np.interp(ks, idx, track[valid, axis])
    # Beyond the first/last seen slice, extend only a little.
    out[: max(0, idx[0] - max_gap_slices)] = np.nan
    out[idx[-1] + max_gap_slices + 1 :] = np.nan
    return out


#: In-plane half-size (mm) of the box around a track end in which bone beyond that end counts as spine.
UNTRACKED_BOX_MM = 30.0
#: Bone area (mm^2) in that box that makes a slice beyond the track end look like spine (a vertebral body's
#: cross-section is 800-2,000 mm^2; ribs or the iliac crest crossing the box leave far less).
UNTRACKED_BONE_MM2 = 400.0


def untracked_extent_mm(bone: NDArray[np.bool_], track: NDArray[np.float64], spacing_mm: float,
                        ) -> tuple[float, float]:
    """How far (mm) spine-like bone continues below and above the tracked part of the canal.

    Per slice beyond each end of ``track``, bone within :data:`UNTRACKED_BOX_MM` of the end's canal centre is
    spine-like at :data:`UNTRACKED_BONE_MM2` or more; the run of such slices next to the end is measured.
    A long run means the canal was lost there (e.g. rings never closed in a tilted patient) and the vertebrae
    beyond it are not segmented.

    Args:
        bone: Thresholded bone ``(I, J, K)``.
        track: ``(K, 2)`` canal centre per slice (voxel units, NaN where none).
        spacing_mm: Isotropic voxel size, mm.

    Returns:
        ``(below_mm, above_mm)``.
    """
    seen = np.nonzero(np.isfinite(track[:, 0]))[0]
    if seen.size == 0:
        return 0.0, 0.0
    half = max(1, round(UNTRACKED_BOX_MM / spacing_mm))
    out = []
    for end, step in ((int(seen[0]), -1), (int(seen[-1]), 1)):
        ci, cj = (round(v) for v in track[end])
        box = bone[max(0, ci - half): ci + half + 1, max(0, cj - half): cj + half + 1, :]
        run = 0
        k = end + step
        while 0 <= k < bone.shape[2] and box[:, :, k].sum() * spacing_mm**2 >= UNTRACKED_BONE_MM2:
            run += 1
            k += step
        out.append(run * spacing_mm)
    return out[0], out[1]


#: The sacral canal continues the lumbar canal below its last closed ring (a triangular canal in S1-S3 that
#: narrows and flattens caudally into the sacral groove and hiatus at S4-S5): per slice it may shift by this much
#: (mm) from the canal in the slice above.
SACRAL_CANAL_STEP_MM = 3.0
#: Where the canal above's outline, shifted at best, is less than this fraction dark, the carried lumen ends.
SACRAL_CANAL_MIN_DARK = 0.5


def carry_canal(hu: NDArray[Any], canal: NDArray[np.bool_], spacing: float, *, max_hu: float,
                ) -> NDArray[np.bool_]:
    """The canal lumen carried caudally into the slices without a canal hole (bool, shape of ``canal``).

    Below the last closed ring (and over the slices between rings: discs, open arches) the lumen goes on as the
    sacral canal. Per slice downwards, the voxels darker than ``max_hu`` (units of ``hu``: CSF, epidural fat)
    within :data:`SACRAL_CANAL_STEP_MM` of the canal of the slice above, connected to it and not in front of it,
    with their in-plane holes (nerve roots, partial volume). The canal narrows caudally and never widens: where
    that is larger than the canal above (the ring has opened onto the foramina, the fatty marrow or the soft
    tissue behind the sacrum), the canal above's outline shifted by up to the step onto the most dark voxels;
    it ends where that is less than :data:`SACRAL_CANAL_MIN_DARK` dark or nothing dark continues it. Of several
    pieces, the one that overlaps the canal above most (the foramina branch off laterally).
    """
    out = np.zeros(canal.shape, bool)
    seen = np.nonzero(canal.any(axis=(0, 1)))[0]
    if seen.size == 0:
        return out
    step = max(1, round(SACRAL_CANAL_STEP_MM / spacing))
    prev = canal[:, :, int(seen[-1])]
    for k in range(int(seen[-1]) - 1, -1, -1):
        if canal[:, :, k].any():
            prev = canal[:, :, k]
            continue
        if not prev.any():
            continue
        # The sacral kyphosis carries the canal backwards caudally: never further forward than the canal above
        # (in front of it lie the vertebral body's and the sacrum's marrow, as dark on fatty marrow).
        front = int(np.nonzero(prev.any(axis=0))[0].min())
        dark = hu[:, :, k] < max_hu
        dark[:, :front] = False
        lab, _ = ndimage.label(dark & ndimage.binary_dilation(prev, iterations=step))
        hit = np.unique(lab[prev & dark])
        cur = np.isin(lab, hit[hit > 0])
        if cur.sum() > prev.sum():
            # Opened: the canal above's outline, shifted (by up to the step; np.roll's wrap-around lands on the
            # bounding box's margin, far from the canal) onto the most dark voxels.
            best = -1
            for di in range(-step, step + 1):
                for dj in range(-step, step + 1):
                    moved = np.roll(prev, (di, dj), axis=(0, 1)) & dark
                    score = int(moved.sum()) * (2 * step + 1) ** 2 - (abs(di) + abs(dj))
                    if score > best:
                        best, cur = score, moved
            if cur.sum() < SACRAL_CANAL_MIN_DARK * prev.sum():
                # Mostly bright at its best: the lumen has ended (the canal flattens into the hiatus).
                break
        # One lumen: the foramina branch off it laterally (S1-S4) and lead to the fatty marrow and the pelvis.
        lab, n = ndimage.label(cur)
        if n > 1:
            shared = ndimage.sum_labels(prev, lab, index=np.arange(1, n + 1))
            cur = lab == int(np.argmax(shared)) + 1
        cur = np.asarray(ndimage.binary_fill_holes(cur), bool)
        out[:, :, k] = cur
        prev = cur
    return out
