"""Classical vertebra segmentation: HU thresholds, the spinal canal as the guide, discs as the cuts.

No network: a transparent fallback and a cross-check for the learned backend. Steps, all on an
LPS-aligned working grid (i -> Left, j -> Posterior, k -> Superior):

1. body = the largest connected region above -300 HU; bone = body voxels above a bone threshold
   (fixed for calibrated CT, estimated from the histogram for CBCT, whose HU drift);
2. the spinal canal, slice by slice: a low-density hole enclosed by bone near the body's midline,
   tracked cranio-caudally (interpolated where the bony ring is open, at the discs);
3. the spine = bone near the canal track that touches the canal's neighbourhood; cancellous holes
   are filled, the canal is not;
4. intervertebral discs = minima of the bone profile of the vertebral-body column along the track;
   bodies between discs seed a watershed over the bone, which carries each posterior arch to its own
   body through the pedicles;
5. naming is done by :mod:`needle_steering.perception.levels`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from needle_steering.errors import SegmentationError
from needle_steering.perception.canal import (
    CANAL_CANDIDATE_MAX_HU,
    CANAL_MARROW_CONTRAST_HU,
    canal_track,
    carry_canal,
    despike_track,
    enclosed_canal_track,
    fill_track,
    untracked_extent_mm,
)
from needle_steering.perception.discs import (
    CAUDAL_DISC_TILT_DEG,
    DISC_DARK_FRACTION,
    DISC_PROMINENCE_HU,
    DiscPlane,
    body_centreline,
    centreline_profile,
    cut_at_planes,
    disc_below_profile,
    disc_gaps,
    height_along_planes,
    plane_distance_mm,
    plane_index,
    profile_discs,
    refine_disc,
    typical_disc_spacing,
)
from needle_steering.perception.volume import Volume

#: Bone threshold for calibrated CT (HU). Cancellous bone at 3 mm partial volume sits near 100-200.
CT_BONE_HU = 120.0
#: Bone threshold for calibrated CT at <= 1.6 mm spacing (HU).
FINE_CT_BONE_HU = 200.0
#: Typical cortical bone and soft tissue (HU) of a calibrated CT, for the surface rim level.
CORTEX_HU = 700.0
SOFT_TISSUE_HU = 40.0
#: Working grids up to this spacing (mm) peel the rim (see :func:`_split_vertebrae`): planning CT (1-2 mm) resolves
#: the cortex well enough that the thresholded surface lies a voxel outside it; the coarse (3 mm) grids do not.
RIM_PEEL_MAX_SPACING_MM = 2.0
#: The same limit for CBCT (noisier, blurrier): at 2 mm the peel took a whole layer (phantom seed 104: mean Dice
#: 0.84 without, 0.72 with).
CBCT_RIM_PEEL_MAX_SPACING_MM = 1.6
#: Coarser CBCT grids up to this spacing (mm) peel one rim layer at the local half maximum only (no global floor):
#: the surface of the thresholded bone lies about one voxel outside the truth there (phantom 104 at 2 mm: of the
#: 19,200 rim voxels 9,000 lie outside the bone; 8,900 of them and 7,500 inside are below the mapped cortex level).
CBCT_COARSE_PEEL_MAX_SPACING_MM = 2.0
#: Working grids up to this spacing (mm) look for joint clefts (:func:`_joint_clefts`); on coarser ones a 1-2 mm
#: facet joint space fills less than half a voxel.
JOINT_CLEFT_MAX_SPACING_MM = 2.0
#: The same limit for CBCT (mm).
CBCT_JOINT_CLEFT_MAX_SPACING_MM = 2.0
#: Holes darker than this (HU) are not cancellous bone (fat, gas): never filled.
MAX_CANAL_HU = 30.0
#: CBCT denoising footprint: the 6-connected neighbourhood (7 voxels). A full 3x3x3 median replaces a one- or
#: two-voxel cortex by the darker cancellous/soft-tissue majority around it (~40 % of the cortex contrast lost).
_CBCT_MEDIAN_FOOTPRINT = ndimage.generate_binary_structure(3, 1)


@dataclass
class SpineSegments:
    """Result of :func:`segment_spine` on the working grid.

    Attributes:
        work: The LPS-aligned working grid (float32 HU).
        segments: int32 array, 0 background, 1..n vertebra segments ordered cranial -> caudal.
        canal: bool mask of the spinal canal.
        canal_track_ijk: ``(K, 2)`` canal centre (i, j) per axial slice k (NaN where none).
        disc_k: Slice indices of the detected discs.
        features: Per segment (index 1..n): measurements used for naming.
        warnings: Human-readable caveats.
        sacrum_candidate: ``(segment, mask)``: the segment grown below the caudal-most disc and the voxels
            (bool, working grid) that complete it as a sacrum (wide closing across fatty marrow, the rim
            that the surface peel took). Apply with :meth:`complete_sacrum` once naming calls it the sacrum.
    """

    work: Volume
    segments: NDArray[np.int32]
    canal: NDArray[np.bool_]
    canal_track_ijk: NDArray[np.float64]
    disc_k: list[int]
    features: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    sacrum_candidate: tuple[int, NDArray[np.bool_]] | None = None

    def complete_sacrum(self, names: list[str | None]) -> None:
        """Add :attr:`sacrum_candidate`'s voxels (background only) when ``names`` (per segment 1..n) call it "S"."""
        if self.sacrum_candidate is None:
            return
        label, mask = self.sacrum_candidate
        if 1 <= label <= len(names) and names[label - 1] == "S":
            self.segments[mask & (self.segments == 0)] = label


def to_lps_grid(volume: Volume, spacing_mm: float, default: float) -> Volume:
    """Resample ``volume`` onto an axis-aligned LPS grid of isotropic ``spacing_mm`` covering it."""
    from needle_steering.perception.io import resample_like

    lo, hi = volume.extent_lps_mm()
    size = np.maximum(2, np.ceil((hi - lo) / spacing_mm).astype(int) + 1)
    template = Volume(np.zeros(tuple(int(s) for s in size), np.uint8), [spacing_mm] * 3, lo, np.eye(3))
    if np.allclose(volume.direction, np.eye(3)) and np.allclose(volume.spacing_mm, spacing_mm):
        return Volume(volume.array.astype(np.float32), volume.spacing_mm, volume.origin_lps_mm, np.eye(3))
    return resample_like(volume, template, is_label=False, default=default)


def bone_threshold(hu: NDArray[Any], body: NDArray[np.bool_], modality: str, spacing_mm: float = 1.0) -> float:
    """Bone threshold: fixed for CT; for CBCT between the soft-tissue peak and dense bone.

    The CBCT value is a first pass over the whole body (enough to find the canal): :func:`segment_spine` then
    replaces it by :data:`FINE_CT_BONE_HU` / :data:`CT_BONE_HU` mapped through :func:`spine_grey_levels` and
    :func:`cbct_level` (cupping darkens the spine at the FOV centre against the whole-body histogram).

    At fine spacing the cortex is resolved and a higher threshold keeps the surface on the bone
    (partial volume spreads the cortex's HU outward); at coarse spacing the lower one keeps thin
    cortex and cancellous bone in.
    """
    if modality == "ct":
        return CT_BONE_HU if spacing_mm > 1.6 else FINE_CT_BONE_HU
    inside = hu[body]
    soft = float(np.median(inside[(inside > -200) & (inside < 300)])) if inside.size else 0.0
    dense = float(np.percentile(inside, 99.5)) if inside.size else 1000.0
    return soft + 0.3 * (dense - soft)


#: Dense-bone level (HU) of the spine neighbourhood of a calibrated CT as :func:`spine_grey_levels` measures it
#: (90th percentile of the thresholded spine bone: cortex): 870-990 HU on 1.5 mm phantom CTs, ~420 HU on a 3 mm
#: clinical CT (partial volume). With :data:`SOFT_TISSUE_HU` it is the two-point reference that maps the CT levels
#: (bone threshold, cortex mid-level, dark-hole limit) onto a CBCT's grey values, see :func:`cbct_level`.
CT_SPINE_DENSE_HU = 900.0
COARSE_CT_SPINE_DENSE_HU = 420.0
#: CBCT disc profile: a minimum is a clear disc only at this fraction of the median candidate prominence or more
#: (streaks from dense bone and 3-4x the CT noise leave 50-60 unit dips inside bodies; real discs score 150-350).
CBCT_CLEAR_DISC_FRACTION = 0.5
#: CBCT L5/S1 re-fit: tilts scoring within this fraction of the best are not told apart under CBCT noise and
#: streaks; the least tilted of them is kept (a steeper plane extended behind the body hands L5's arch to S).
CBCT_TILT_TOLERANCE = 0.05
#: CBCT surface peel: a rim voxel is peeled below the local half maximum, halfway between the soft-tissue level and
#: the brightest segment voxel within this radius (mm). Thin cortex blurred by the CBCT point spread (and
#: the denoising) peaks lower than thick cortex, so one global level cuts into thin bone or leaves a halo at thick.
LOCAL_PEAK_MM = 3.0
#: Histogram bin (HU or CBCT grey units) for the soft-tissue mode around the spine.
SOFT_MODE_BIN_HU = 10.0
#: Bone brightness level of the spine neighbourhood: this percentile of its thresholded bone (the cortex).
SPINE_DENSE_PERCENTILE = 90.0


def cbct_level(level_hu: float, soft: float, dense: float, spacing_mm: float) -> float:
    """A calibrated-CT level ``level_hu`` (HU) in the grey values of a CBCT whose spine shows ``soft`` / ``dense``.

    Two-point linear map (CBCT grey = gain * HU + offset near the spine): :data:`SOFT_TISSUE_HU` -> ``soft`` and
    the CT's spine dense level (:data:`CT_SPINE_DENSE_HU`, :data:`COARSE_CT_SPINE_DENSE_HU` above 1.6 mm) -> ``dense``.
    """
    ct_dense = CT_SPINE_DENSE_HU if spacing_mm <= 1.6 else COARSE_CT_SPINE_DENSE_HU
    return soft + (level_hu - SOFT_TISSUE_HU) * (dense - soft) / (ct_dense - SOFT_TISSUE_HU)


def spine_grey_levels(hu: NDArray[Any], bone: NDArray[np.bool_], body: NDArray[np.bool_],
                      track: NDArray[np.float64], spacing_mm: float) -> tuple[float, float]:
    """Soft-tissue and dense-bone levels (image units) in the neighbourhood of the canal track.

    The soft level is the histogram mode of the non-bone body voxels within the spine ROI (paraspinal muscles and
    psoas dominate it; fat and bowel gas form their own, smaller peaks); the dense level is the
    :data:`SPINE_DENSE_PERCENTILE` percentile of the bone there (the cortex). Measured locally, both follow the CBCT
    grey-value drift (gain and offset) and the low-frequency shading (cupping) at the spine, which the whole-body
    histogram mixes with the brighter periphery.

    Args:
        hu: Working-grid intensities ``(I, J, K)``.
        bone: Thresholded bone, same grid.
        body: Body mask, same grid.
        track: ``(K, 2)`` canal centre per slice (voxel units, NaN where none).
        spacing_mm: Isotropic voxel size, mm.

    Returns:
        ``(soft, dense)`` in the units of ``hu``; NaN when the ROI holds no soft tissue or no bone.
    """
    roi = _spine_roi(hu.shape, track, spacing_mm, lateral_mm=55.0, anterior_mm=65.0, posterior_mm=60.0) & body
    near_bone = ndimage.binary_dilation(bone & roi, iterations=max(1, round(3.0 / spacing_mm)))
    soft_vals = hu[roi & ~near_bone]
    bone_vals = hu[roi & bone]
    if soft_vals.size < 100 or bone_vals.size < 100:
        return float("nan"), float("nan")
    lo, hi = np.percentile(soft_vals, [1.0, 99.0])
    bins = np.arange(float(lo), float(hi) + SOFT_MODE_BIN_HU, SOFT_MODE_BIN_HU)
    counts, edges = np.histogram(soft_vals, bins=bins)
    counts = ndimage.gaussian_filter1d(counts.astype(float), sigma=2.0)
    peak = int(np.argmax(counts))
    soft = float(0.5 * (edges[peak] + edges[peak + 1]))
    return soft, float(np.percentile(bone_vals, SPINE_DENSE_PERCENTILE))


#: A CT whose spine cortex level (the :data:`SPINE_DENSE_PERCENTILE` percentile of the spine's bone) stays below
#: this (HU) blurs the cortex like 3 mm slices do: no surface peel, no facet clefts. Measured: phantoms at 1-3 mm
#: 755-912 HU; real CT 583 HU (1 mm series, where the peel still helps), 459 HU (3 mm), 390-450 HU (the 3 mm CT
#: interpolated to 1.5-2.5 mm, where the peel took whole cortices).
RESOLVED_CORTEX_HU = 520.0


#: Spine-like bone continuing this far (mm) beyond the tracked canal raises a warning (about one vertebra).
UNTRACKED_WARN_MM = 30.0


def _bone_and_canal(ct: Volume, hu: NDArray[Any], body: NDArray[np.bool_], spacing: float, threshold: float, *,
                    spine_bone: NDArray[np.bool_] | None, max_contrast_hu: float | None,
                    ) -> tuple[NDArray[np.bool_], NDArray[np.bool_], NDArray[np.float64], NDArray[np.bool_], int]:
    """Thresholded bone, the bone used (``spine_bone`` if given), the canal track and mask, and the number of
    slices in which the canal was seen (closed rings, else nearly enclosed dark blobs)."""
    thresholded = (hu > threshold) & body
    bone = thresholded if spine_bone is None else np.asarray(spine_bone, bool)
    if bone.sum() * spacing**3 < 20_000:
        raise SegmentationError(
            f"{ct.metadata.get('source', 'image')}: no bone found "
            f"{'by the learned mask' if spine_bone is not None else f'above {threshold:.0f} HU'} "
            f"({bone.sum() * spacing**3 / 1000:.1f} ml)"
        )
    track, canal = canal_track(hu, bone, body, spacing, max_contrast_hu=max_contrast_hu)
    seen = int(np.isfinite(track[:, 0]).sum())
    if seen < max(3, int(15.0 / spacing)):
        track, canal = enclosed_canal_track(hu, bone, body, spacing)
        seen = int(np.isfinite(track[:, 0]).sum())
    return thresholded, bone, track, canal, seen


def _largest_component(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
    lab, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum_labels(mask, lab, index=np.arange(1, n + 1))
    return lab == (int(np.argmax(sizes)) + 1)


def segment_spine(ct: Volume, modality: str = "ct", work_spacing_mm: float | None = None, *,
                  spine_bone: NDArray[np.bool_] | None = None,
                  disc: NDArray[np.bool_] | None = None) -> SpineSegments:
    """Separate the vertebrae of ``ct`` (unnamed segments, cranial to caudal).

    Args:
        ct: CT (HU) or CBCT.
        modality: ``"ct"`` or ``"cbct"``.
        work_spacing_mm: Isotropic working spacing (default: the finest input spacing, at least 1 mm).
        spine_bone: Optional precomputed vertebral-bone mask (bool, shape of the working grid
            ``to_lps_grid(ct, work_spacing_mm)``), e.g. from the learned backend. It replaces the
            thresholded bone for canal tracking and body separation; the thresholded bone is still
            used for the rib evidence of level naming.
        disc: Optional intervertebral-disc mask on the same grid: removed from
            the vertebral-body column so that it places the cuts between bodies.

    Raises:
        SegmentationError: No body, no bone, no spinal canal found, or a mask of the wrong shape.
    """
    spacing = float(work_spacing_mm or max(1.0, float(np.min(ct.spacing_mm))))
    work = to_lps_grid(ct, spacing, default=-1024.0)
    for name, mask in (("spine_bone", spine_bone), ("disc", disc)):
        if mask is not None and tuple(np.shape(mask)) != work.shape:
            raise SegmentationError(
                f"{name} mask has shape {tuple(np.shape(mask))}, the {spacing:g} mm working grid is {work.shape}"
            )
    hu = work.array.astype(np.float32)
    if modality == "cbct":
        hu = ndimage.median_filter(hu, footprint=_CBCT_MEDIAN_FOOTPRINT)
    body = _largest_component(hu > -300)
    if body.sum() * spacing**3 < 50_000:
        raise SegmentationError(f"{ct.metadata.get('source', 'image')}: no patient body found (HU > -300)")
    threshold = bone_threshold(hu, body, modality, spacing)
    # CT: a hole much brighter than the typical canal (a marrow hole in a body) places the track but is no canal.
    contrast = CANAL_MARROW_CONTRAST_HU if modality == "ct" else None
    thresholded, bone, track, canal, seen = _bone_and_canal(ct, hu, body, spacing, threshold, spine_bone=spine_bone,
                                                            max_contrast_hu=contrast)
    # A fine-grid CT whose cortex is not resolved (soft kernel, slices interpolated from thick ones, thin
    # osteoporotic cortex) leaves the canal's ring open at the fine threshold: the coarse threshold, and no surface
    # peel or facet clefts (both read a resolved cortex).
    rescued = seen < max(3, int(15.0 / spacing)) and modality == "ct" and spine_bone is None and threshold > CT_BONE_HU
    blurred = rescued
    if rescued:
        threshold = CT_BONE_HU
        thresholded, bone, track, canal, seen = _bone_and_canal(ct, hu, body, spacing, threshold,
                                                                spine_bone=spine_bone, max_contrast_hu=contrast)
    if seen < max(3, int(15.0 / spacing)):
        raise SegmentationError(
            f"{ct.metadata.get('source', 'image')}: no spinal canal found (a closed bony ring in {seen} slices)"
        )
    track = fill_track(track, max_gap_slices=int(20 / spacing))
    tracked = np.nonzero(np.isfinite(track[:, 0]))[0]
    below_mm, above_mm = untracked_extent_mm(bone, track, spacing)
    lost = [f"{mm:.0f} mm {side} slice {int(k)}" for side, k, mm in
            (("below", tracked[0], below_mm), ("above", tracked[-1], above_mm)) if mm >= UNTRACKED_WARN_MM]
    rim_soft_hu: float | None = None
    max_canal_hu = MAX_CANAL_HU
    marrow_min_hu = SACRAL_MARROW_MIN_HU
    if modality == "ct":
        rim_hu = 0.5 * (CORTEX_HU + SOFT_TISSUE_HU)
        rim_soft_hu = SOFT_TISSUE_HU
        if not blurred and spine_bone is None and spacing <= RIM_PEEL_MAX_SPACING_MM:
            # The peel and the clefts read a resolved cortex: on real CT with a soft kernel or thin cortex the
            # spine's cortex level stays far below the CORTEX_HU they assume.
            dense = spine_grey_levels(hu, thresholded, body, track, spacing)[1]
            blurred = bool(np.isfinite(dense) and dense < RESOLVED_CORTEX_HU)
    else:
        # The whole-body histogram mixes the spine (darkened by cupping at the FOV centre) with the brighter
        # periphery: calibrate on the spine's own soft tissue and cortex and use the CT's levels mapped through it.
        soft, dense = spine_grey_levels(hu, thresholded, body, track, spacing)
        if np.isfinite(soft) and np.isfinite(dense) and dense > soft:
            threshold = cbct_level(FINE_CT_BONE_HU if spacing <= 1.6 else CT_BONE_HU, soft, dense, spacing)
            rim_hu = cbct_level(0.5 * (CORTEX_HU + SOFT_TISSUE_HU), soft, dense, spacing)
            rim_soft_hu = soft
            max_canal_hu = cbct_level(MAX_CANAL_HU, soft, dense, spacing)
            marrow_min_hu = cbct_level(SACRAL_MARROW_MIN_HU, soft, dense, spacing)
            thresholded = (hu > threshold) & body
            if spine_bone is None:
                bone = thresholded
                # The calibrated threshold closes more canal rings (it was set from the whole body): track again.
                # The lower threshold also encloses dark noise/streak holes in the bodies: drop single-slice jumps.
                track2, canal2 = canal_track(hu, bone, body, spacing,
                                              max_hole_hu=cbct_level(CANAL_CANDIDATE_MAX_HU, soft, dense, spacing))
                if int(np.isfinite(track2[:, 0]).sum()) >= max(3, int(15.0 / spacing)):
                    despike_track(track2, canal2, spacing)
                    track, canal = fill_track(track2, max_gap_slices=int(20 / spacing)), canal2
        else:
            dense = float(np.percentile(hu[bone], 90))
            rim_hu = threshold + 0.5 * (dense - threshold)
    # Everything after the canal works on the in-plane box around the track (the spine, the sacral alae
    # and the iliac bone beside them): several times fewer voxels than the whole body at 1 mm.
    box = _track_box(hu.shape, track, spacing, lateral_mm=SPINE_BOX_LATERAL_MM, anterior_mm=75.0, posterior_mm=75.0)
    own_bone = spine_bone is None
    calibrated_cbct = modality == "cbct" and rim_soft_hu is not None
    # Coarse CBCT grids: blur and partial volume keep the cortex below the mapped cortex mid-level, which took a
    # whole layer. The thresholded surface lies one voxel outside the bone: one pass at the local half maximum.
    coarse_cbct_peel = calibrated_cbct and CBCT_RIM_PEEL_MAX_SPACING_MM < spacing <= CBCT_COARSE_PEEL_MAX_SPACING_MM
    # Facet clefts with the CT levels, or on the calibrated CBCT with the spine's own (mapped) cortex and soft levels.
    clefts = own_bone and ((modality == "ct" and spacing <= JOINT_CLEFT_MAX_SPACING_MM and not blurred)
                           or (calibrated_cbct and spacing <= CBCT_JOINT_CLEFT_MAX_SPACING_MM))
    offset = np.array([box[0].start, box[1].start], float)
    disc_box = None if disc is None else np.asarray(disc, bool)[box]
    seg_box, disc_k, warnings, body_k, iliac_box, sacrum_extra = _split_vertebrae(
        hu[box], bone[box], canal[box], track - offset, spacing, disc=disc_box, rim_hu=rim_hu,
        peel=own_bone and not blurred and (coarse_cbct_peel or spacing <= (
            RIM_PEEL_MAX_SPACING_MM if modality == "ct" else CBCT_RIM_PEEL_MAX_SPACING_MM)),
        rim_passes=1 if coarse_cbct_peel else 2, rim_floor_hu=threshold if coarse_cbct_peel else None,
        rim_soft_hu=rim_soft_hu, rim_peak_mm=LOCAL_PEAK_MM if modality == "cbct" else spacing,
        max_canal_hu=max_canal_hu, marrow_min_hu=marrow_min_hu,
        joint_cortex_hu=rim_hu if clefts else None,
        joint_soft_hu=SOFT_TISSUE_HU if rim_soft_hu is None else rim_soft_hu,
        clear_disc_fraction=CBCT_CLEAR_DISC_FRACTION if modality == "cbct" else 0.0,
        disc_dark_fraction=DISC_DARK_FRACTION if modality == "ct" else None,
        # The sacral rim given back only inside the local half-contrast surface: on CBCT the local level comes from
        # the spine's own soft level and the brightest bone within LOCAL_PEAK_MM (fine grids: the coarse one-pass
        # peel already stops at the local half maximum).
        sacral_local_surface=modality == "ct" or (calibrated_cbct and not coarse_cbct_peel),
        tilt_tolerance=CBCT_TILT_TOLERANCE if modality == "cbct" else 0.0,
        facet_band_mm=FACET_BAND_HALF_MM if modality == "ct" else None,
    )
    segments = np.zeros(hu.shape, np.int32)
    segments[box] = seg_box
    iliac: NDArray[np.bool_] | None = None
    if iliac_box is not None:
        iliac = np.zeros(hu.shape, bool)
        iliac[box] = iliac_box
    if rescued:
        warnings.insert(0, f"the cortex is not resolved at {spacing:g} mm (the canal's bony ring stays open above "
                           f"{FINE_CT_BONE_HU:.0f} HU): segmented with the {CT_BONE_HU:.0f} HU threshold, without "
                           f"surface peel or facet clefts; boundaries are coarser")
    if lost:
        warnings.append(f"the spinal canal was lost while spine-like bone continues ({', '.join(lost)} of the "
                        f"{spacing:g} mm working grid): vertebrae there are not segmented; verify the coverage")
    result = SpineSegments(work, segments, canal, track, disc_k, warnings=warnings)
    if sacrum_extra is not None:
        extra = np.zeros(hu.shape, bool)
        extra[box] = sacrum_extra[1]
        result.sacrum_candidate = (sacrum_extra[0], extra)
    # With a precomputed (tighter) spine mask, thresholded bone hugging the vertebrae (partial volume,
    # process tips) is not rib evidence: exclude a 4 mm shell around the spine.
    rib_owner = np.zeros(hu.shape, np.int32)
    result.features = _features(result, hu, thresholded, body_k,
                                spine_margin_vox=0 if own_bone else max(1, round(4.0 / spacing)),
                                iliac=iliac, rib_owner=rib_owner)
    # Naming features are measured first (volumes with the rib necks, as calibrated); then the rib necks that
    # the watershed carried into their vertebra are given back.
    # CBCT: also the lateral bone of a rib-bearing segment that runs on to the ROI edge; never in a segment in
    # contact with the ilium (the sacrum's alae reach the ROI edge too, and noise beside it can pass for a rib).
    sacroiliac = {f["segment"] for f in result.features if f["iliac_contact_ml"] > 0.0}
    removed = _trim_ribs(result.segments, rib_owner, track, spacing,
                         roi_edge_mm=SPINE_ROI_LATERAL_MM if modality == "cbct" else None,
                         exempt=sacroiliac if modality == "cbct" else set())
    if removed is not None:
        result.segments[removed] = 0
    return result


#: Bone of a rib-bearing vertebra more lateral than this (mm from the canal centre) and connected there to
#: its articulated rib is rib (neck and shaft inside the spine ROI), not vertebra. The T11/T12 transverse
#: processes end within ~25 mm of the midline (the 11th/12th ribs have no costotransverse joint).
RIB_TRIM_LATERAL_MM = 25.0
#: In front of the canal centre, the rib head and neck of a rib-bearing vertebra stick out of the body as a tube
#: (~8-10 mm thick) that an in-plane disc of this radius (mm) does not fit in; the body (30-50 mm wide) does.
RIB_HEAD_OPENING_MM = 6.0
#: Half-width (mm) of the spine ROI around the canal track whose bone the vertebra separation takes.
SPINE_ROI_LATERAL_MM = 55.0


def _trim_ribs(seg: NDArray[np.int32], rib_owner: NDArray[np.int32], track: NDArray[np.float64],
               spacing: float, *, roi_edge_mm: float | None = None,
               exempt: set[int] | None = None) -> NDArray[np.bool_] | None:
    """Rib bone inside the segments: the part beyond :data:`RIB_TRIM_LATERAL_MM` connected to an articulated rib.

    Args:
        seg: Segments on the working grid ``(I, J, K)`` (0 background, 1..n).
        rib_owner: Same grid: the owning segment at the voxels of the articulated ribs outside the segments.
        track: ``(K, 2)`` canal centre per slice (voxel units, NaN where none).
        spacing: Isotropic voxel size, mm.
        roi_edge_mm: When given (CBCT), a rib-bearing segment also loses, on either side, its bone beyond
            :data:`RIB_TRIM_LATERAL_MM` that reaches this distance (mm) from the canal (the spine ROI's edge).
        exempt: Segments never trimmed (CBCT: those in contact with the ilium).

    Returns:
        bool mask (same grid) of the segment voxels to remove, or None when there is no rib.
    """
    if not rib_owner.any():
        return None
    filled = fill_track(track, max_gap_slices=seg.shape[2])
    ks = np.arange(seg.shape[2])
    ok = np.isfinite(filled[:, 0])
    if not ok.any():
        return None
    ci = np.interp(ks, ks[ok], filled[ok, 0])
    cj = np.interp(ks, ks[ok], filled[ok, 1])
    remove = np.zeros(seg.shape, bool)
    step = max(1, round(RIB_CONTACT_MM / spacing))
    for owner in np.unique(rib_owner[rib_owner > 0]):
        if exempt and int(owner) in exempt:
            continue
        rib = rib_owner == owner
        owned = seg == owner
        box = ndimage.find_objects(rib.astype(np.int8))[0]
        grown_box = tuple(slice(max(0, b.start - step - 1), min(n, b.stop + step + 1))
                          for b, n in zip(box, seg.shape, strict=True))
        di = (np.arange(grown_box[0].start, grown_box[0].stop)[:, None, None]
              - ci[None, None, grown_box[2]]) * spacing
        lateral = np.abs(di) > RIB_TRIM_LATERAL_MM
        own = owned[grown_box] & lateral
        if own.any():
            near_rib = ndimage.binary_dilation(rib[grown_box], iterations=step)
            parts, _n_parts = ndimage.label(own, structure=np.ones((3, 3, 3), bool))
            hit = np.unique(parts[near_rib & (parts > 0)])
            hit = hit[hit > 0]
            if hit.size:
                remove[grown_box] |= np.isin(parts, hit)
        if roi_edge_mm is not None:
            # Either side: the lateral bone of a rib-bearing vertebra that runs on to the spine ROI's edge is a rib
            # neck whose rib outside was not accepted (CBCT: cut by the field of view or merged with its rim).
            seg_box = ndimage.find_objects(owned.astype(np.int8))[0]
            ii_seg = np.arange(seg_box[0].start, seg_box[0].stop)[:, None, None]
            di_seg = (ii_seg - ci[None, None, seg_box[2]]) * spacing
            side_parts, _n = ndimage.label(owned[seg_box] & (np.abs(di_seg) > RIB_TRIM_LATERAL_MM),
                                           structure=np.ones((3, 3, 3), bool))
            at_edge = np.unique(side_parts[(np.abs(di_seg) >= roi_edge_mm - spacing) & (side_parts > 0)])
            if at_edge.size:
                remove[seg_box] |= np.isin(side_parts, at_edge)
        # Rib head and neck beside the body (in front of the canal centre), medial of the lateral cut: a tube
        # narrower than an in-plane disc of RIB_HEAD_OPENING_MM, which the opening of the body (a wide rounded
        # block) takes away. Removed where it lies lateral of the opened body in its slice and continues the rib.
        head = _rib_head(owned, ci, cj, spacing)
        if head is None:
            continue
        hb = tuple(slice(max(0, h.start - step - 1), min(n, h.stop + step + 1))
                   for h, n in zip(ndimage.find_objects(head.astype(np.int8))[0], seg.shape, strict=True))
        anchor = ndimage.binary_dilation(remove[hb] | (rib_owner[hb] == owner), iterations=step)
        parts, _n_parts = ndimage.label(head[hb], structure=np.ones((3, 3, 3), bool))
        hit = np.unique(parts[anchor & (parts > 0)])
        hit = hit[hit > 0]
        if hit.size:
            remove[hb] |= np.isin(parts, hit)
    return remove if remove.any() else None


def _rib_head(segment: NDArray[np.bool_], ci: NDArray[np.float64], cj: NDArray[np.float64],
              spacing: float) -> NDArray[np.bool_] | None:
    """Bone of ``segment`` in front of the canal centre that sticks out laterally of its body (see
    :data:`RIB_HEAD_OPENING_MM`): outside the slice's opening and lateral of the opened body on that side.

    Args:
        segment: One segment on the working grid ``(I, J, K)``.
        ci, cj: ``(K,)`` canal centre per slice (voxel units).
        spacing: Isotropic voxel size, mm.

    Returns:
        bool mask (same grid), or None when the segment is empty.
    """
    objs = ndimage.find_objects(segment.astype(np.int8))
    if not objs or objs[0] is None:
        return None
    radius = max(1, round(RIB_HEAD_OPENING_MM / spacing))
    box = tuple(slice(max(0, o.start - radius - 1), min(n, o.stop + radius + 1))
                for o, n in zip(objs[0], segment.shape, strict=True))
    di = np.arange(box[0].start, box[0].stop)[:, None, None] - ci[None, None, box[2]]
    dj = np.arange(box[1].start, box[1].stop)[None, :, None] - cj[None, None, box[2]]
    front = segment[box] & (dj < 0)
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    disk = (yy**2 + xx**2 <= radius**2)[:, :, None]
    opened = ndimage.binary_opening(front, structure=disk)
    head = np.zeros(front.shape, bool)
    for side in (-1.0, 1.0):
        lateral = di * side
        reach = np.where(opened & (lateral > 0), lateral, -np.inf).max(axis=(0, 1))
        # A slice without an opened body on that side (an endplate's edge, the ends of the segment): no rib head.
        reach[~np.isfinite(reach)] = np.inf
        head |= front & ~opened & (lateral > reach[None, None, :])
    out = np.zeros(segment.shape, bool)
    out[box] = head
    return out if out.any() else None


#: Fatty sacral marrow (mm-scale fat islands averaged with trabeculae) is darker than soft tissue in older
#: patients: inside the closed cortical envelope of the sacrum, voxels above this (HU) are marrow.
SACRAL_MARROW_MIN_HU = -60.0
#: Closing radius (mm) that bridges the sacrum's cortices across its fatty marrow and foramina.
SACRUM_CLOSING_MM = 15.0
#: In-plane closing radius (mm) of the sacrum together with the iliac bone: bridges the narrow gaps where the ala
#: meets the ilium (the sacroiliac joint and its ligaments) so that the ala's fatty marrow, enclosed by the sacral
#: cortices in front and behind and by the ilium's medial cortex laterally, is filled up to the joint.
SACROILIAC_BRIDGE_MM = 9.0
#: The sacroiliac joint space (cartilage, 2-4 mm wide): voxels centred within this distance (mm) of the iliac bone
#: are joint, not ala, and stay out of the alar envelope.
SACROILIAC_JOINT_MM = 2.0
#: Half-width (mm) of the in-plane box around the canal track that the body separation works in.
SPINE_BOX_LATERAL_MM = 95.0
#: 2-D (in-plane) connectivity for per-slice operations done on the whole stack at once.
_SLICE_STRUCTURE = np.zeros((3, 3, 3), bool)
_SLICE_STRUCTURE[:, 1, 1] = _SLICE_STRUCTURE[1, :, 1] = True
#: 2-D connectivity in sagittal (fixed i) and coronal (fixed j) planes.
_SAGITTAL_STRUCTURE = np.zeros((3, 3, 3), bool)
_SAGITTAL_STRUCTURE[1, :, 1] = _SAGITTAL_STRUCTURE[1, 1, :] = True
_CORONAL_STRUCTURE = np.zeros((3, 3, 3), bool)
_CORONAL_STRUCTURE[:, 1, 1] = _CORONAL_STRUCTURE[1, 1, :] = True


def _fill_enclosed(segments: NDArray[np.int32], hu: NDArray[Any], canal: NDArray[np.bool_], *,
                   min_hu: float = MAX_CANAL_HU) -> None:
    """Give each segment the unlabelled voxels it encloses in a sagittal or coronal plane (in place).

    Low-density marrow and the basivertebral venous plexus leave holes in a body that open into the canal in
    every axial slice (so axial hole filling keeps them) but are closed by the endplates above and below.
    Canal voxels and voxels darker than ``min_hu`` (:data:`MAX_CANAL_HU` on CT: fat, CSF) stay unlabelled.
    """
    allowed = (segments == 0) & (hu > min_hu) & ~canal
    for value, obj in enumerate(ndimage.find_objects(segments), start=1):
        if obj is None:
            continue
        own = segments[obj] == value
        # A vertebra cut by the top or bottom of the field of view is closed there: its marrow holes open
        # onto the edge slice, not into soft tissue.
        pad = ((0, 0), (0, 0), (int(obj[2].start == 0), int(obj[2].stop == segments.shape[2])))
        padded = np.pad(own, pad, constant_values=True)
        enclosed = np.zeros_like(padded)
        for structure in (_SAGITTAL_STRUCTURE, _CORONAL_STRUCTURE):
            enclosed |= ndimage.binary_fill_holes(padded, structure=structure)
        enclosed = enclosed[:, :, pad[2][0]:enclosed.shape[2] - pad[2][1]]
        segments[obj][enclosed & allowed[obj]] = value


def _track_box(shape: tuple[int, ...], track: NDArray[np.float64], spacing: float, *, lateral_mm: float,
               anterior_mm: float, posterior_mm: float) -> tuple[slice, slice, slice]:
    """In-plane bounding box (all slices) of the track +- the given margins (mm), clipped to ``shape``."""
    valid = np.isfinite(track[:, 0])
    if not valid.any():
        return (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2]))
    ti, tj = track[valid, 0], track[valid, 1]
    i0 = max(0, int(np.floor(ti.min() - lateral_mm / spacing)))
    i1 = min(shape[0], int(np.ceil(ti.max() + lateral_mm / spacing)) + 1)
    j0 = max(0, int(np.floor(tj.min() - anterior_mm / spacing)))
    j1 = min(shape[1], int(np.ceil(tj.max() + posterior_mm / spacing)) + 1)
    return (slice(i0, i1), slice(j0, j1), slice(0, shape[2]))


def _spine_roi(shape: tuple[int, ...], track: NDArray[np.float64], spacing: float, *,
               lateral_mm: float, anterior_mm: float, posterior_mm: float) -> NDArray[np.bool_]:
    """Per slice, the box ``|di| <= lateral_mm``, ``-anterior_mm <= dj <= posterior_mm`` (mm) around the track.

    Returns:
        bool mask of ``shape`` (False in slices without a track point).
    """
    ci = track[:, 0][None, None, :]
    cj = track[:, 1][None, None, :]
    di = (np.arange(shape[0], dtype=float)[:, None, None] - ci) * spacing
    dj = (np.arange(shape[1], dtype=float)[None, :, None] - cj) * spacing
    with np.errstate(invalid="ignore"):
        return (np.abs(di) <= lateral_mm) & (dj >= -anterior_mm) & (dj <= posterior_mm)


def _closing_fov(mask: NDArray[np.bool_], iterations: int) -> NDArray[np.bool_]:
    """Binary closing (6-connected structure, ``iterations`` voxels) that does not erode the array's edges.

    :func:`scipy.ndimage.binary_closing` treats the outside as background, so its erosion takes the first and last
    slices away: the bone cut by the field of view (or the spine box) continues beyond them (edge replication).
    """
    padded = np.pad(mask, iterations, mode="edge")
    closed = ndimage.binary_closing(padded, iterations=iterations)
    inner = tuple(slice(iterations, iterations + n) for n in mask.shape)
    return np.asarray(closed[inner], bool)


#: Calibrated CT: the peeled rim of the sacrum is given back in full within this distance (mm) of the iliac bone
#: (the sacroiliac joints); elsewhere on its outer surface only where it reaches the local half-contrast level.
SACROILIAC_MARGIN_MM = 3.0
#: The typical body height (for splitting a body column whose disc was not seen) is the median over the bodies
#: not cut by the field of view when there are at least this many.
MIN_WHOLE_BODIES = 3


def _split_vertebrae(hu: NDArray[Any], bone: NDArray[np.bool_], canal: NDArray[np.bool_],
                     track: NDArray[np.float64], spacing: float, *, rim_hu: float,
                     disc: NDArray[np.bool_] | None = None, peel: bool = True,
                     joint_cortex_hu: float | None = None, clear_disc_fraction: float = 0.0,
                     disc_dark_fraction: float | None = None, sacral_local_surface: bool = False,
                     rim_soft_hu: float | None = None, rim_peak_mm: float = 1.0, tilt_tolerance: float = 0.0,
                     max_canal_hu: float = MAX_CANAL_HU, marrow_min_hu: float = SACRAL_MARROW_MIN_HU,
                     joint_soft_hu: float = SOFT_TISSUE_HU, rim_passes: int = 2, rim_floor_hu: float | None = None,
                     facet_band_mm: float | None = None,
                     ) -> tuple[NDArray[np.int32], list[int], list[str], list[tuple[int, int]],
                                NDArray[np.bool_] | None, tuple[int, NDArray[np.bool_]] | None]:
    """Body column, disc planes, seeds and the watershed that gives every spine voxel its vertebra.

    ``joint_cortex_hu`` (calibrated CT only; None = off): the cortex level for :func:`_joint_clefts`, whose
    clefts (facet joints resolved by the grid) the in-slice ring seeding and the watershed do not cross.
    ``rim_soft_hu`` (calibrated CT only; None = off): soft tissue (HU) for the local surface level of the rim peel:
    a rim voxel goes when it is darker than ``rim_hu`` or than the midpoint between the brightest bone next to it
    and soft tissue. ``rim_passes``: how many rim layers the peel examines; ``rim_floor_hu`` (None = ``rim_hu``):
    the lowest local level (with ``rim_soft_hu``). ``facet_band_mm`` (with ``joint_cortex_hu``; None = off): the
    in-slice ring seeding leaves the slab of this half-thickness (mm) around each disc plane to the watershed.
    """
    from skimage.segmentation import watershed

    warnings: list[str] = []
    roi = _spine_roi(bone.shape, track, spacing, lateral_mm=SPINE_ROI_LATERAL_MM, anterior_mm=65.0, posterior_mm=60.0)
    spine_bone = bone & roi
    # Keep the bone that belongs to the column: components touching the canal's neighbourhood.
    near_canal = ndimage.binary_dilation(canal, iterations=max(1, round(6 / spacing))) & roi
    lab, _ = ndimage.label(spine_bone)
    keep = np.unique(lab[near_canal & spine_bone])
    keep = keep[keep > 0]
    spine_bone = np.isin(lab, keep)
    # Fill cancellous holes slice by slice, but never the canal or dark (fat/CSF) holes.
    filled = _fill_cancellous(spine_bone, hu, canal, max_canal_hu=max_canal_hu)
    spine_bone = _closing_fov(filled, 1) & roi & ~canal
    # Osteoporotic bodies at fine spacing: cancellous bone below the (fine-grid) threshold leaves an open
    # cortical shell that hole filling cannot close. Axial slices through a disc also cut the endplates of
    # both neighbours: the fill is taken back near the disc planes once they are known.
    shell_fill = (_fill_open_bodies(spine_bone, hu, canal, track, spacing, max_canal_hu=max_canal_hu)
                  if spacing <= 1.6 else None)
    if shell_fill is not None:
        spine_bone |= shell_fill

    # Vertebral bodies: the bone column in front of the canal, eroded once so that the discs
    # (and their partial-volume rims) separate it into one 3-D component per body.
    body_roi = _spine_roi(bone.shape, track, spacing, lateral_mm=20.0, anterior_mm=50.0, posterior_mm=-9.0)
    column = spine_bone & body_roi
    if disc is not None:
        column &= ~disc
    eroded = ndimage.binary_erosion(column, iterations=max(1, round(2.0 / spacing)))
    # Discs from the intensity profile along the body centreline (oblique sampling): at coarse
    # spacing or in osteoporotic bone the eroded column both bridges discs (partial volume) and
    # breaks apart inside bodies (cancellous bone below the threshold). When the profile finds the
    # discs, the column between two consecutive disc planes is one body.
    centre = body_centreline(column, spacing)
    profile, tangent = centreline_profile(hu, centre, spacing)
    planes = profile_discs(profile, centre, tangent, spacing, clear_fraction=clear_disc_fraction,
                            dark_fraction=disc_dark_fraction)
    # Calibrated CT: the disc next below the profile's caudal end (L5/S1 under a column that ends at L5's endplate).
    lumbosacral = disc_below_profile(hu, planes, profile, centre, tangent, spacing=spacing,
                                     min_score_hu=2 * DISC_PROMINENCE_HU) if disc_dark_fraction is not None else None
    if lumbosacral is not None:
        # Already fitted with the lumbosacral tilts.
        planes.insert(0, lumbosacral)
    elif planes:
        # The centreline stops where the canal ring opens (the sacrum): the caudal-most disc (L5/S1 when the
        # sacrum is in view) was sampled nearly axially although the sacral slope tilts it 20-50 degrees.
        planes[0] = refine_disc(hu, planes[0], spacing, k_half_mm=9.0, j_range_mm=(-10.0, 25.0),
                                 tilt_deg=CAUDAL_DISC_TILT_DEG, tilt_tolerance=tilt_tolerance,
                                 same_sampler=tilt_tolerance > 0.0)  # both for CBCT only (noisy scores)
    # One clear disc is enough to cut a short field of view (two partial vertebrae around one disc).
    use_planes = len(planes) >= 2 or (len(planes) == 1 and planes[0].prominence_hu >= 2 * DISC_PROMINENCE_HU)
    if shell_fill is not None and planes and shell_fill.any():
        near_disc = shell_fill & ~cut_at_planes(shell_fill, planes, spacing, half_gap_mm=DISC_HALF_MM)
        spine_bone &= ~near_disc
        column &= ~near_disc
    if use_planes:
        # The whole column (not the eroded one, which falls apart in hollow coarse bodies) between the planes.
        eroded = cut_at_planes(column, planes, spacing)
        index = plane_index(bone.shape, planes, spacing)
        lab = np.zeros(bone.shape, np.int32)
        box = ndimage.find_objects(eroded.astype(np.int8))[0] if eroded.any() else None
        for value in range(len(planes) + 1) if box is not None else ():
            # One body per interval: its largest connected part (not debris that the planes reach).
            part = eroded[box] & (index[box] == value)
            if part.any():
                lab[box][_largest_component(part)] = value + 1
    else:
        lab, _ = ndimage.label(eroded)
    min_ml = 2.0
    bodies: list[tuple[int, int, NDArray[np.bool_]]] = []
    for idx, obj in enumerate(ndimage.find_objects(lab), start=1):
        if obj is None:
            continue
        part = lab[obj] == idx
        if part.sum() * spacing**3 / 1000.0 < min_ml:
            continue
        full = np.zeros(bone.shape, bool)
        full[obj] = part
        bodies.append((obj[2].start, obj[2].stop, full))
    if not bodies:
        raise SegmentationError("no vertebral body found along the spinal canal")
    # A body component much taller than its neighbours holds two bodies whose disc did not
    # separate (bridging osteophytes, a tilted disc at coarse spacing): split it at the weakest
    # cross-section near its middle.
    heights = np.array([height_along_planes(mask, planes) if use_planes else float(b - a)
                        for a, b, mask in bodies])
    # The typical height from whole bodies: one cut by the first or last slice is only a part of a body.
    whole = np.array([a > 0 and b < bone.shape[2] for a, b, _m in bodies])
    typical = float(np.median(heights[whole] if whole.sum() >= MIN_WHOLE_BODIES else heights))
    if use_planes and len(planes) >= MIN_WHOLE_BODIES:
        # Noise or sparse cancellous bone breaks a body between two disc planes into parts, whose largest part is
        # short: the spacing of the disc planes (one body plus one disc) bounds the typical height from below.
        typical = max(typical, typical_disc_spacing(disc_gaps(planes), spacing))
    typical_voxels = float(np.median([int(m.sum()) for _a, _b, m in bodies]))
    split: list[tuple[int, int, NDArray[np.bool_]]] = []
    for (a, b, mask), height in zip(bodies, heights, strict=True):
        # Below the caudal-most disc the column runs on into the sacrum (S1-S5 bodies, fused): tall by nature.
        below_discs = use_planes and int(np.median(index[mask])) == 0
        if len(bodies) >= 3 and height > 1.3 * typical and not below_discs:
            area = mask.sum(axis=(0, 1)).astype(float)
            lo, hi = a + (b - a) // 3, b - (b - a) // 3
            cut = lo + int(np.argmin(area[lo:hi])) if hi > lo else (a + b) // 2
            upper, lower = mask.copy(), mask.copy()
            upper[:, :, :cut] = False
            lower[:, :, cut:] = False
            if min(int(upper.sum()), int(lower.sum())) < 0.4 * typical_voxels:
                # A sliver, not a second body (the sacrum is tall by nature).
                split.append((a, b, mask))
                continue
            split.extend([(a, cut, lower), (cut, b, upper)])
            warnings.append(f"split a {(b - a) * spacing:.0f} mm tall body column at slice {cut}: disc not visible")
        else:
            split.append((a, b, mask))
    # Below the caudal-most disc the sacrum (canal ring open, body leaning back with the sacral slope) lies
    # mostly outside the canal-track ROI: its bone below that disc plane joins the watershed, seeded from
    # the bone right under the disc and competing with the iliac bone lateral to the sacroiliac joints.
    # The sacral canal continues the lumbar canal below its last closed ring: its lumen is no sacral bone or
    # marrow (the sacrum's hole filling and closings stay out of it).
    sacral_canal = canal
    sacral = None
    if len(planes) >= 2:
        sacral_canal = canal | (carry_canal(hu, canal, spacing, max_hu=max_canal_hu) & (index == 0))
        sacral = _sacral_region(hu, bone, sacral_canal, planes, spacing, max_canal_hu=max_canal_hu)
    iliac_basin: NDArray[np.bool_] | None = None
    if sacral is not None:
        seed, sacral_bone, iliac_basin = sacral
        # Only the ilium's bulk marks the pelvis and bounds the sacrum's completions (see ILIAC_CORE_OPENING_MM);
        # the naming's ilium contact is measured on the whole intensity basin.
        sacral = (seed, sacral_bone, np.asarray(ndimage.binary_opening(
            iliac_basin, structure=_SLICE_STRUCTURE, iterations=max(1, round(ILIAC_CORE_OPENING_MM / spacing))), bool))
        below = [n for n, (_a, _b, m) in enumerate(split) if np.median(index[m]) == 0]
        if below:
            a, b, m = split[below[0]]
            split[below[0]] = (a, b, m | seed)
        else:
            ks_seed = np.nonzero(seed.any(axis=(0, 1)))[0]
            split.append((int(ks_seed.min()), int(ks_seed.max()) + 1, seed))
        flood_bone = spine_bone | sacral_bone
    else:
        flood_bone = spine_bone
    markers = np.zeros(bone.shape, np.int32)
    discs: list[int] = []
    split.sort(key=lambda t: t[0])
    for n_seg, (a, _b, mask) in enumerate(split, start=1):
        markers[mask] = n_seg
        if n_seg > 1:
            discs.append(int(a))
    n_seg = len(split)
    interval_of: dict[int, int] | None = None
    if use_planes:
        interval_of = {n: int(np.median(index[markers == n])) for n in range(1, n_seg + 1)}
    # In an axial slice through a body, the bone connected to it in that slice (pedicles,
    # laminae, transverse processes: the ring around the canal) belongs to it: seed that first,
    # so that touching arches of neighbours cannot claim it in 3-D.
    # Joint clefts (facets) are not crossed by the in-slice ring: an inferior articular process reaching down
    # beside the superior process of the vertebra below stays with its own vertebra.
    cleft = np.zeros(bone.shape, bool)
    if joint_cortex_hu is not None:
        cleft = _joint_clefts(hu, spine_bone, joint_cortex_hu, joint_soft_hu)
    comp_all, n_comp_all = ndimage.label(spine_bone & ~cleft, structure=_SLICE_STRUCTURE)
    facet_band: NDArray[np.bool_] | None = None
    if joint_cortex_hu is not None and facet_band_mm is not None and use_planes:
        # Not at the lumbosacral disc when the sacrum is there: its steep plane (sacral slope) already follows the
        # L5/S1 facets, and the sacral flood competes with the ilia there.
        facet_band = _near_planes(bone.shape, planes[1:] if sacral is not None else planes, spacing, facet_band_mm)
    for k in range(bone.shape[2]):
        present = np.unique(markers[:, :, k])
        present = present[present > 0]
        if present.size != 1 or n_comp_all == 0:
            continue
        comp = comp_all[:, :, k]
        hit = np.unique(comp[markers[:, :, k] > 0])
        hit = hit[hit > 0]
        if hit.size == 0:
            continue
        ring = np.isin(comp, hit) & (markers[:, :, k] == 0)
        if interval_of is not None:
            # Profile discs are oblique: the ring stays on its body's side of the disc planes.
            ring &= index[:, :, k] == interval_of[int(present[0])]
        if facet_band is not None:
            # Beside a disc the arch's facets meet those of the neighbour (the joint only partly resolved):
            # there the watershed decides (necks, clefts), not the side of the extended disc plane.
            ring &= ~facet_band[:, :, k]
        markers[:, :, k][ring] = int(present[0])
    # Flood the rest from those seeds over the bone's distance map: basins meet at thin necks
    # (facet joints, touching spinous processes) rather than through thick bone.
    iliac_label = n_seg + 1
    if sacral is not None:
        markers[sacral[2] & (markers == 0)] = iliac_label
    segments = np.zeros(bone.shape, np.int32)
    sacrum_extra: NDArray[np.bool_] | None = None
    sacrum_label = 0
    objs = ndimage.find_objects(flood_bone.astype(np.int8))
    if objs and objs[0] is not None:
        # On the bone's bounding box (one voxel of background around it keeps the distances exact).
        sb = tuple(slice(max(0, o.start - 1), min(n, o.stop + 1)) for o, n in zip(objs[0], bone.shape, strict=True))
        # Joint clefts count as background for the distance: the flood crosses them last.
        distance = ndimage.distance_transform_edt(flood_bone[sb] & ~cleft[sb], sampling=[spacing] * 3)
        segments[sb] = watershed(-distance, markers=markers[sb], mask=flood_bone[sb]).astype(np.int32)
    segments[segments == iliac_label] = 0
    _fill_enclosed(segments, hu, canal, min_hu=max_canal_hu)
    if sacral is not None:
        # The sacrum's thin cortices around low-density cancellous bone (and the sacral foramina's rims)
        # leave it hollow at the threshold: close it and fill its in-plane holes (not fat, not the canal).
        values, counts = np.unique(markers[sacral[0]], return_counts=True)
        sacrum_label = int(values[np.argmax(counts)])
        sac = segments == sacrum_label
        allowed = (hu > max_canal_hu) & ~sacral_canal & ~sacral[2]
        grown = _closing_fov(sac, max(1, round(3.0 / spacing)))
        grown = ndimage.binary_fill_holes(grown, structure=_SLICE_STRUCTURE)
        segments[grown & (segments == 0) & allowed] = sacrum_label
        sac = segments == sacrum_label
        sac_obj = ndimage.find_objects(sac.astype(np.int8))
        if sac_obj and sac_obj[0] is not None:
            # Fatty sacral marrow (20-80 HU in older patients) leaves wide gaps between the cortices: a closing
            # of SACRUM_CLOSING_MM (on the sacrum's box, padded so that the closing is not cut by its edge).
            # Kept aside: added only when naming confirms the segment is the sacrum (a grown L5 would touch the
            # iliac bone and fake the sacrum anchor).
            it = max(1, round(SACRUM_CLOSING_MM / spacing))
            sb = tuple(slice(max(0, o.start - it - 1), min(n, o.stop + it + 1))
                       for o, n in zip(sac_obj[0], sac.shape, strict=True))
            wide = np.zeros(sac.shape, bool)
            wide[sb] = ndimage.binary_fill_holes(
                ndimage.binary_closing(np.pad(sac[sb], it), iterations=it)[it:-it, it:-it, it:-it],
                structure=_SLICE_STRUCTURE)
            # Not above the lumbosacral disc plane: the closing bridges the S1 endplate and the alae or superior
            # articular processes beside it over the disc, which is no marrow.
            below_disc = index == 0
            sacrum_extra = (wide & (segments == 0) & ~sacral_canal & ~sacral[2] & (hu > marrow_min_hu)
                            & below_disc)
            alar = _alar_envelope(sac | sacrum_extra, sacral[2], spacing)
            sacrum_extra |= alar & (segments == 0) & ~sacral_canal & (hu > marrow_min_hu) & below_disc
    if spacing <= RIM_PEEL_MAX_SPACING_MM and peel:
        # The threshold that keeps thin cortex connected puts the surface ~half a voxel outside the
        # bone (partial volume): peel the outer rim where it is darker than the cortex mid-level (calibrated CT:
        # the local one, see rim_soft_hu).
        # The sacrum's thin cortex over fatty marrow is darker than the cortex mid-level all along: what the peel
        # takes from it is given back once naming confirms the sacrum. With ``sacral_local_surface`` (calibrated
        # CT or CBCT) not on its outer surface facing soft tissue where the voxel is darker than the local
        # half-contrast level: there the peeled voxel is mostly soft tissue (partial volume), the one-voxel shell
        # outside it.
        level: float | NDArray[np.float32] = rim_hu
        peak_size = 2 * max(1, round(rim_peak_mm / spacing)) + 1
        sacral_soft_surface: NDArray[np.bool_] | None = None
        if sacral_local_surface and sacrum_extra is not None and sacral is not None and rim_soft_hu is not None:
            # The outer surface of the completed sacrum (holes filled) where it faces soft tissue: not at the
            # sacroiliac joints (the ala's cut face against the ilium is no soft-tissue surface).
            envelope = ndimage.binary_fill_holes((segments == sacrum_label) | sacrum_extra)
            near_ilium = ndimage.binary_dilation(sacral[2], iterations=max(1, round(SACROILIAC_MARGIN_MM / spacing)))
            sacral_soft_surface = envelope & ~ndimage.binary_erosion(envelope, border_value=1) & ~near_ilium
        floor = np.float32(rim_hu if rim_floor_hu is None else rim_floor_hu)
        for _ in range(rim_passes):
            solid = segments > 0
            # The edges of the array (the field of view, the spine box) cut the bone: not its surface.
            rim = solid & ~ndimage.binary_erosion(solid, border_value=1)
            half_hu: NDArray[np.float32] | None = None
            if rim_soft_hu is not None:
                # A partial-volume voxel is inside the bone when more than half of it is bone: darker than halfway
                # between the nearby bone peak and soft tissue, it is outside (never below the floor). Where the
                # cortex is resolved brighter than CORTEX_HU (fine grids, dense bone) that level is above rim_hu.
                peak = ndimage.maximum_filter(np.where(solid, hu, np.float32(-1024.0)).astype(np.float32),
                                              size=peak_size)
                half_hu = np.float32(rim_soft_hu) + np.float32(0.5) * (peak - np.float32(rim_soft_hu))
                level = np.maximum(floor, half_hu)
            peeled = rim & (hu < level)
            if sacrum_extra is not None:
                give_back = peeled & (segments == sacrum_label)
                if sacral_soft_surface is not None and half_hu is not None:
                    # Facing soft tissue, the local half-contrast level decides (not the fixed rim_hu floor).
                    give_back &= (hu >= half_hu) | ~sacral_soft_surface
                sacrum_extra |= give_back
            segments[peeled] = 0
    # Order cranial -> caudal (k increases superiorly): reverse the caudal-first numbering.
    order = sorted(range(1, n_seg + 1), key=lambda s: -float(np.nonzero(markers == s)[2].mean()))
    remap = np.zeros(n_seg + 1, np.int32)
    for new, old in enumerate(order, start=1):
        remap[old] = new
    body_k = [(int(split[old - 1][0]), int(split[old - 1][1])) for old in order]
    extra = None if sacrum_extra is None or not sacrum_extra.any() else (int(remap[sacrum_label]), sacrum_extra)
    return (remap[segments], [int(d) for d in discs], warnings, body_k, iliac_basin,
            extra)


#: Half-thickness (mm) of the slab around each disc plane (extended behind the body) where the articular processes
#: of two neighbours meet at the facet joints (about half a disc height): the in-slice ring seeding stays out of it
#: and the watershed (necks, joint clefts) splits the processes there, not the side of the extended disc plane
#: (which handed the superior processes of the lower vertebra to the upper one and the inferior processes of the
#: upper one to the lower: phantom CT T12 lost 3-6 % of its voxels that way). Calibrated CT with clefts only; on
#: CBCT the clefts are too noisy to carry the split (phantom seed 5: L2 -0.03).
FACET_BAND_HALF_MM = 4.0


def _near_planes(shape: tuple[int, ...], planes: list[DiscPlane], spacing: float, half_mm: float) -> NDArray[np.bool_]:
    """Voxels within ``half_mm`` (mm, along the normal) of any disc plane (extended as in :func:`plane_index`)."""
    near = np.zeros(shape, bool)
    for plane in planes:
        near |= np.abs(plane_distance_mm(shape, plane, spacing)) <= half_mm
    return near


#: 13 half-space neighbour offsets (voxels) of the 26-neighbourhood: each line through a voxel once.
_HALF_NEIGHBOURS = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) > (0, 0, 0)]


def _shifted(arr: NDArray[Any], offset: tuple[int, int, int], fill: Any) -> NDArray[Any]:
    """``out[v] = arr[v + offset]`` (voxels), ``fill`` where ``v + offset`` leaves the array."""
    out = np.full(arr.shape, fill, dtype=arr.dtype)
    src = tuple(slice(max(0, o), n + min(0, o)) for o, n in zip(offset, arr.shape, strict=True))
    dst = tuple(slice(max(0, -o), n + min(0, -o)) for o, n in zip(offset, arr.shape, strict=True))
    out[dst] = arr[src]
    return out


def _joint_clefts(hu: NDArray[Any], bone: NDArray[np.bool_], cortex_hu: float,
                  soft_hu: float = SOFT_TISSUE_HU) -> NDArray[np.bool_]:
    """Voxels of ``bone`` in a one-voxel dark cleft between the cortices of two bones (a synovial joint).

    A facet joint (~1 mm of cartilage and joint space) between two articular processes that the bone mask
    fuses: along some line through the voxel, both neighbours are cortex (at least ``cortex_hu``), the voxel is
    darker than the midpoint between the darker of them and soft tissue (more than half of it is joint space),
    and the voxels one further on both sides are bone again (the processes' cores). The dark core of one thin
    process flanked by its own cortex fails the last test (soft tissue beyond its cortices).

    Args:
        hu: Working-grid intensities ``(I, J, K)``, HU.
        bone: Bone mask, same grid (cancellous holes filled).
        cortex_hu: Lowest HU of a cortex voxel.
        soft_hu: Soft tissue (joint space) level in the units of ``hu``: :data:`SOFT_TISSUE_HU` on calibrated CT,
            the spine's own soft level (:func:`spine_grey_levels`) on CBCT.

    Returns:
        bool mask, same grid.
    """
    hu = np.asarray(hu, np.float32)
    out = np.zeros(bone.shape, bool)
    for offset in _HALF_NEIGHBOURS:
        neg = (-offset[0], -offset[1], -offset[2])
        flank = np.minimum(_shifted(hu, offset, np.float32(-1024.0)), _shifted(hu, neg, np.float32(-1024.0)))
        far = (_shifted(bone, (2 * offset[0], 2 * offset[1], 2 * offset[2]), False)
               & _shifted(bone, (2 * neg[0], 2 * neg[1], 2 * neg[2]), False))
        out |= (flank >= cortex_hu) & (hu < 0.5 * (flank + soft_hu)) & far
    return out & bone


#: A body slice is an open cortical shell when bone lies within 2 mm of at least this fraction of the
#: boundary of its convex hull (discs and scattered debris cover much less of it).
SHELL_COVERAGE = 0.6
#: Lateral half-width and anterior extent (mm) of the body region in front of the canal examined for shells.
BODY_SHELL_BOX_MM = (35.0, 55.0)
#: Half-thickness (mm) of the slab around a disc plane where the shell fill is not kept.
DISC_HALF_MM = 4.0


def _fill_open_bodies(spine_bone: NDArray[np.bool_], hu: NDArray[Any], canal: NDArray[np.bool_],
                      track: NDArray[np.float64], spacing: float, *,
                      max_canal_hu: float = MAX_CANAL_HU) -> NDArray[np.bool_]:
    """Interior of vertebral bodies whose cortical shell is open in an axial slice (cancellous bone too dark).

    Per slice, the bone of ``spine_bone`` in front of the canal (at least 6 mm anterior of the canal centre,
    within :data:`BODY_SHELL_BOX_MM`; the shell may be broken into pieces) is replaced by its convex hull when
    bone covers at least :data:`SHELL_COVERAGE` of the hull's boundary and the hull is at least 1.5x the bone's
    area. Canal and voxels darker than ``max_canal_hu`` (fat; :data:`MAX_CANAL_HU` on CT) are never added.

    Args:
        spine_bone: Spine bone on the working grid ``(I, J, K)``.
        hu: Intensities, same grid.
        canal: Canal mask, same grid.
        track: ``(K, 2)`` canal centre per slice (voxel units, NaN where none).
        spacing: Isotropic voxel size, mm.
        max_canal_hu: Dark-hole limit in the units of ``hu``.

    Returns:
        bool mask of the voxels to add (same grid).
    """
    from skimage.morphology import convex_hull_image

    add = np.zeros(spine_bone.shape, bool)
    lat, ant = (round(v / spacing) for v in BODY_SHELL_BOX_MM)
    near = max(1, round(2.0 / spacing))
    for k in np.nonzero(np.isfinite(track[:, 0]))[0]:
        ci, cj = round(track[k, 0]), round(track[k, 1])
        i0, i1 = max(0, ci - lat), min(spine_bone.shape[0], ci + lat + 1)
        j0, j1 = max(0, cj - ant), max(0, min(spine_bone.shape[1], cj - round(6.0 / spacing)))
        if i1 - i0 < 3 or j1 - j0 < 3:
            continue
        sl = spine_bone[i0:i1, j0:j1, k]
        if sl.sum() * spacing * spacing < 100.0:
            continue
        part = sl
        hull = convex_hull_image(part)
        if hull.sum() < 1.5 * part.sum():
            continue
        rim = hull & ~ndimage.binary_erosion(hull)
        covered = rim & ndimage.binary_dilation(part, iterations=near)
        if covered.sum() < SHELL_COVERAGE * rim.sum():
            continue
        add[i0:i1, j0:j1, k] = hull & ~part & (hu[i0:i1, j0:j1, k] > max_canal_hu) & ~canal[i0:i1, j0:j1, k]
    return add


def _features(result: SpineSegments, hu: NDArray[Any], bone: NDArray[np.bool_],
              body_k: list[tuple[int, int]], *, spine_margin_vox: int = 0,
              iliac: NDArray[np.bool_] | None = None,
              rib_owner: NDArray[np.int32] | None = None) -> list[dict[str, Any]]:
    """Per segment: volume, height, body width, rib evidence, sacroiliac contact, position.

    ``rib_owner`` (optional int32, working grid) receives the owning segment at the voxels of the
    articulated ribs found outside the segments (see :func:`_rib_evidence`).

    ``iliac`` (bool, working grid) is the pelvic bone that competed with the sacrum below the caudal-most
    disc; ``iliac_contact_ml`` is the segment's bone within 4 mm of it (the sacroiliac joints: large for
    the sacrum, ~0 for L5 whose transverse processes only approach the iliac crest).
    """
    spacing = float(result.work.spacing_mm[0])
    seg = result.segments
    n = int(seg.max())
    feats: list[dict[str, Any]] = []
    near_iliac = None
    if iliac is not None and iliac.any():
        near_iliac = ndimage.binary_dilation(iliac, iterations=max(1, round(4.0 / spacing)))
    ribs = _rib_evidence(seg, bone, result.canal_track_ijk, spacing, exclude=iliac, margin_vox=spine_margin_vox,
                         owner_out=rib_owner)
    for s in range(1, n + 1):
        mask = seg == s
        ks = np.nonzero(mask.any(axis=(0, 1)))[0]
        k_lo, k_hi = int(ks.min()), int(ks.max())
        # Rib and width evidence from the slices of the vertebral body only (posterior elements
        # and tilt make the whole segment overlap its neighbours).
        b_lo, b_hi = body_k[s - 1]
        k_mid = (b_lo + b_hi) // 2
        width_mm = float(np.ptp(np.nonzero(mask[:, :, k_mid])[0]) * spacing) if mask[:, :, k_mid].any() else 0.0
        feats.append({
            "segment": s,
            "volume_ml": float(mask.sum() * spacing**3 / 1000.0),
            "height_mm": float((k_hi - k_lo + 1) * spacing),
            "k_range": (k_lo, k_hi),
            "body_k_range": (b_lo, b_hi - 1),
            "body_height_mm": float((b_hi - b_lo) * spacing),
            "width_mm": width_mm,
            "rib_bone_ml": ribs[s - 1]["rib_ml"],
            "rib_sides": ribs[s - 1]["rib_sides"],
            "rib_reach_mm": ribs[s - 1]["rib_reach_mm"],
            "rib_cut_sides": ribs[s - 1]["rib_cut_sides"],
            "touches_top": bool(k_hi >= seg.shape[2] - 2),
            "touches_bottom": bool(k_lo <= 1),
            "mean_hu": float(hu[mask].mean()),
            "iliac_contact_ml": (float((mask & near_iliac).sum() * spacing**3 / 1000.0)
                                 if near_iliac is not None else 0.0),
            "sacral_checked": iliac is not None,
        })
    return feats


#: Articulated-rib test (level naming): a rib is bone outside every vertebra segment that comes within
#: :data:`RIB_CONTACT_MM` of one segment (the costovertebral / costotransverse joints, or the cut where the
#: watershed stopped taking a rib that passes through the spine ROI) and runs laterally to at least
#: :data:`RIB_MIN_REACH_MM` from the canal, :data:`RIB_MIN_RUN_MM` beyond its contact.
RIB_CONTACT_MM = 3.0
RIB_MIN_REACH_MM = 65.0
RIB_MIN_RUN_MM = 15.0
#: A stub cut by the field of view: contact at least this lateral of the canal (beside the body/transverse
#: process, not the spinous process) and running this far laterally beyond it (mm).
RIB_CUT_MIN_CONTACT_MM = 15.0
RIB_CUT_MIN_RUN_MM = 10.0
#: Bone components larger than this (ml, inside the rib search box) are pelvis/shoulder, not one rib.
RIB_MAX_COMPONENT_ML = 60.0
#: Half-width / anterior / posterior margins (mm) of the in-plane box around the canal track searched for ribs.
RIB_BOX_MM = (110.0, 80.0, 80.0)


def _rib_evidence(seg: NDArray[np.int32], bone: NDArray[np.bool_], track: NDArray[np.float64], spacing: float, *,
                  exclude: NDArray[np.bool_] | None = None, margin_vox: int = 0,
                  owner_out: NDArray[np.int32] | None = None) -> list[dict[str, Any]]:
    """Ribs articulating with each segment (1..n): volume, sides and lateral reach.

    Args:
        seg: Segments on the working grid ``(I, J, K)`` (0 background, 1..n).
        bone: Thresholded bone, same grid.
        track: ``(K, 2)`` canal centre per slice (voxel units, NaN where none).
        spacing: Isotropic voxel size, mm.
        exclude: Bone that is known not to be rib (the iliac bone beside the sacrum): components touching
            it are dropped.
        margin_vox: Shell (voxels) around the segments that is not rib either (thresholded bone hugging a
            tighter learned spine mask); the contact distance grows by it.
        owner_out: Optional int32 array of ``seg``'s shape: filled (in place) with the owning segment's
            label at the voxels of each accepted rib (0 elsewhere), for :func:`_trim_ribs`.

    Returns:
        Per segment ``{"rib_ml", "rib_sides", "rib_reach_mm", "rib_cut_sides"}``: volume (ml) of the rib
        components outside the segments that articulate with it, the number of sides (0-2) with such a rib,
        the largest lateral distance (mm) from the canal reached by them, and the number of sides with a
        rib-like stub leaving the field of view through its first/last slice (too short to tell a rib from a
        transverse process).
    """
    n = int(seg.max())
    out: list[dict[str, Any]] = [{"rib_ml": 0.0, "rib_sides": 0, "rib_reach_mm": 0.0, "rib_cut_sides": 0}
                                 for _ in range(n)]
    if n == 0:
        return out
    lat, ant, post = RIB_BOX_MM
    box = _track_box(seg.shape, fill_track(track, max_gap_slices=seg.shape[2]), spacing,
                     lateral_mm=lat, anterior_mm=ant, posterior_mm=post)
    s = seg[box]
    spine = s > 0
    if margin_vox:
        spine = ndimage.binary_dilation(spine, iterations=margin_vox)
    cand = bone[box] & ~spine
    lab, n_comp = ndimage.label(cand, structure=np.ones((3, 3, 3), bool))
    if n_comp == 0:
        return out
    voxel_ml = spacing**3 / 1000.0
    comp_ml = np.bincount(lab.ravel(), minlength=n_comp + 1) * voxel_ml
    if (comp_ml[1:] > RIB_MAX_COMPONENT_ML).any():
        # Noise (CBCT) or touching neighbours bridge ribs into one large component: open it once and
        # look at its parts again.
        big = np.isin(lab, np.nonzero(comp_ml[1:] > RIB_MAX_COMPONENT_ML)[0] + 1)
        lab[big] = 0
        parts, n_parts = ndimage.label(ndimage.binary_opening(big), structure=np.ones((3, 3, 3), bool))
        lab[parts > 0] = parts[parts > 0] + n_comp
        n_comp += n_parts
        comp_ml = np.bincount(lab.ravel(), minlength=n_comp + 1) * voxel_ml
    bad = comp_ml > RIB_MAX_COMPONENT_ML
    if exclude is not None:
        near_ex = ndimage.binary_dilation(exclude[box], iterations=1)
        bad[np.unique(lab[near_ex & (lab > 0)])] = True
    bad[0] = True
    # Lateral distance (mm) from the canal of each candidate voxel; slices without a track use the nearest one.
    filled = fill_track(track, max_gap_slices=seg.shape[2])
    ks = np.arange(seg.shape[2])
    ok = np.isfinite(filled[:, 0])
    if not ok.any():
        return out
    ci = np.interp(ks, ks[ok], filled[ok, 0])[box[2]]
    idx = np.nonzero(lab)
    comp = lab[idx]
    di = ((idx[0] + box[0].start) - ci[idx[2]]) * spacing
    keep = ~bad[comp]
    idx = tuple(a[keep] for a in idx)
    comp, di = comp[keep], di[keep]
    if comp.size == 0:
        return out
    # Contact: the segment label within RIB_CONTACT_MM (both the highest and the lowest label there).
    half = max(1, round(RIB_CONTACT_MM / spacing)) + margin_vox
    # Filter only the segments' bounding box grown by the contact distance (nothing else can touch them).
    seg_box = ndimage.find_objects((s > 0).astype(np.int8))[0]
    sub = tuple(slice(max(0, b.start - half), min(dim, b.stop + half)) for b, dim in zip(seg_box, s.shape, strict=True))
    no_label = np.iinfo(np.int32).max
    hi_sub = ndimage.maximum_filter(s[sub], size=2 * half + 1)
    lo_sub = ndimage.minimum_filter(np.where(s[sub] > 0, s[sub], no_label), size=2 * half + 1)
    hi = np.zeros(s.shape, np.int32)
    lo = np.full(s.shape, no_label, np.int32)
    hi[sub] = hi_sub
    lo[sub] = lo_sub
    side = (di > 0).astype(np.int64)  # 1 = patient left (+i)
    # Per (component, side): the segment with the most contact voxels, the contact's lateral distance.
    key = comp * 2 + side
    n_key = 2 * (n_comp + 1)
    contact_votes = np.zeros((n_key, n + 1), np.int64)
    contact_lat = np.full(n_key, np.inf)
    absdi = np.abs(di)
    for labels_near in (hi[idx], lo[idx]):
        touching = (labels_near > 0) & (labels_near <= n)
        np.add.at(contact_votes, (key[touching], labels_near[touching]), 1)
        np.minimum.at(contact_lat, key[touching], absdi[touching])
    reach = np.zeros(n_key)
    np.maximum.at(reach, key, absdi)
    vol = np.bincount(key, minlength=n_key) * voxel_ml
    # Components leaving the volume through its first or last slice (cut by the field of view).
    cut_fov = np.zeros(n_key, bool)
    edge = (idx[2] == 0) | (idx[2] == s.shape[2] - 1)
    cut_fov[key[edge]] = True
    for kk in np.nonzero(contact_votes.sum(axis=1))[0]:
        owner = int(np.argmax(contact_votes[kk]))
        if owner == 0:
            continue
        if reach[kk] < RIB_MIN_REACH_MM or reach[kk] - contact_lat[kk] < RIB_MIN_RUN_MM:
            # A rib's neck leaving the field of view before it reaches the rib cage: articulated beside the
            # body or transverse process and running laterally out of the image. Weak evidence only (a
            # transverse process cut by the same edge looks alike).
            if (cut_fov[kk] and contact_lat[kk] >= RIB_CUT_MIN_CONTACT_MM
                    and reach[kk] - contact_lat[kk] >= RIB_CUT_MIN_RUN_MM):
                out[owner - 1].setdefault("_cut", set()).add(int(kk % 2))
            continue
        entry = out[owner - 1]
        if owner_out is not None:
            sel = key == kk
            owner_out[box][tuple(a[sel] for a in idx)] = owner
        entry["rib_ml"] += float(vol[kk])
        entry["rib_reach_mm"] = max(entry["rib_reach_mm"], float(reach[kk]))
        entry.setdefault("_sides", set()).add(int(kk % 2))
    for entry in out:
        entry["rib_sides"] = len(entry.pop("_sides", ()))
        entry["rib_cut_sides"] = len(entry.pop("_cut", ()))
    return out


#: Bone this far (mm) lateral of the lumbosacral disc centre, or this far anterior of it, is pelvis
#: (iliac, pubic), not sacrum.
ILIAC_LATERAL_MM = 70.0
PELVIS_ANTERIOR_MM = 45.0
#: The sacral seed: bone under the caudal-most disc within these distances (mm) of its centre.
SACRAL_SEED_LATERAL_MM = 22.0
SACRAL_SEED_DEPTH_MM = 25.0
#: The pelvic markers keep only the iliac bone's bulk: what an in-plane opening of this radius (mm) leaves. The
#: intensity flood from the ilium runs on along the sacrum's cortex where the sacroiliac joint shows no dark cleft
#: (coarse grids: the ilium's medial cortex continues into the ala's anterior cortex), a shell one or two voxels
#: thick; the ilium's body and its thick part behind the joint (> 12 mm) keep their markers, and the thin bone
#: left unmarked is split by the distance watershed at its necks, like the vertebrae.
ILIAC_CORE_OPENING_MM = 6.0


def _fill_cancellous(mask: NDArray[np.bool_], hu: NDArray[Any], canal: NDArray[np.bool_], *,
                     max_canal_hu: float = MAX_CANAL_HU) -> NDArray[np.bool_]:
    """``mask`` with its in-plane holes filled, except the canal and holes darker than ``max_canal_hu``.

    ``max_canal_hu`` is in the units of ``hu``: :data:`MAX_CANAL_HU` on CT, mapped by :func:`cbct_level` on CBCT.
    """
    filled = mask.copy()
    holes = ndimage.binary_fill_holes(mask, structure=_SLICE_STRUCTURE) & ~mask
    hl, n = ndimage.label(holes, structure=_SLICE_STRUCTURE)
    if n:
        means = np.asarray(ndimage.mean(hu, hl, index=np.arange(1, n + 1)))
        ok = means > max_canal_hu
        ok[np.unique(hl[canal & (hl > 0)]) - 1] = False
        filled |= np.concatenate([[False], ok])[hl]
    return filled


def _alar_envelope(sacrum: NDArray[np.bool_], iliac: NDArray[np.bool_], spacing: float) -> NDArray[np.bool_]:
    """Per axial slice, what the sacrum and the iliac bone enclose together that neither encloses alone (bool).

    The ala's fatty marrow (as dark as fat or soft tissue, often below the bone threshold) lies between the
    sacrum's anterior and posterior cortices and ends laterally at the ilium's medial cortex (the sacroiliac
    joint): the sacrum alone does not enclose it, the two bones closed by :data:`SACROILIAC_BRIDGE_MM` do. The
    ilium's own marrow (what its closing alone encloses) stays out.
    """
    it = max(1, round(SACROILIAC_BRIDGE_MM / spacing))

    def closed_filled(mask: NDArray[np.bool_]) -> NDArray[np.bool_]:
        padded = np.pad(mask, it)
        closed = ndimage.binary_closing(padded, structure=_SLICE_STRUCTURE, iterations=it)[it:-it, it:-it, it:-it]
        return np.asarray(ndimage.binary_fill_holes(closed, structure=_SLICE_STRUCTURE), bool)

    to_ilium = ndimage.distance_transform_edt(~iliac, sampling=[spacing] * 3)
    # The alae lie lateral of the sacral body and canal (half-width SACRAL_SEED_LATERAL_MM about the sacrum's
    # centre of mass).
    mid_i = float(np.nonzero(sacrum)[0].mean()) if sacrum.any() else 0.5 * sacrum.shape[0]
    lateral = np.abs(np.arange(sacrum.shape[0], dtype=float) - mid_i)[:, None, None] * spacing
    envelope = closed_filled(sacrum | iliac) & ~closed_filled(iliac) & (to_ilium > SACROILIAC_JOINT_MM)
    envelope &= lateral > SACRAL_SEED_LATERAL_MM
    # Only pieces that reach the joint: the ala ends at the ilium (the sacral canal and foramina do not).
    parts, n = ndimage.label(envelope, structure=_SLICE_STRUCTURE)
    if n == 0:
        return envelope
    reach = ndimage.minimum(to_ilium, parts, index=np.arange(1, n + 1))
    return np.asarray(np.concatenate([[False], np.asarray(reach) <= SACROILIAC_JOINT_MM + spacing])[parts], bool)


def _sacral_region(hu: NDArray[Any], bone: NDArray[np.bool_], canal: NDArray[np.bool_], planes: list[DiscPlane],
                   spacing: float, *, max_canal_hu: float = MAX_CANAL_HU,
                   ) -> tuple[NDArray[np.bool_], NDArray[np.bool_], NDArray[np.bool_]] | None:
    """Bone below the caudal-most disc plane, for the sacrum's watershed (working-grid masks, shape of ``bone``).

    Returns:
        ``(seed, region, iliac)``: the seed (bone within :data:`SACRAL_SEED_LATERAL_MM` of the disc centre
        and :data:`SACRAL_SEED_DEPTH_MM` under the disc, the S1 body when a sacrum is there), the whole
        region (holes filled) the sacrum may flood, and the pelvic bone that competes with it
        (:data:`ILIAC_LATERAL_MM` lateral or :data:`PELVIS_ANTERIOR_MM` anterior of the disc centre);
        None when there is hardly any bone under the disc (the field of view ends there).
    """
    disc = planes[0]
    c = disc.centre_ijk
    ii = np.arange(bone.shape[0], dtype=np.float32)[:, None, None]
    jj = np.arange(bone.shape[1], dtype=np.float32)[None, :, None]
    along_mm = plane_distance_mm(bone.shape, disc, spacing)
    region = bone & (along_mm < -0.5 * spacing)
    if not region.any():
        return None
    region = _fill_cancellous(region, hu, canal, max_canal_hu=max_canal_hu) & ~canal
    lateral_mm = np.abs(ii - c[0]) * spacing
    seed = region & (lateral_mm <= SACRAL_SEED_LATERAL_MM) & (along_mm > -SACRAL_SEED_DEPTH_MM)
    # Only the S1 body proper: in front of the canal, within ~40 mm of the disc centre along the endplate.
    anterior_mm = (jj - c[1]) * spacing
    seed &= (anterior_mm > -25.0) & (anterior_mm < 30.0)
    if seed.sum() * spacing**3 < 3000.0:
        return None
    seed = _largest_component(seed)
    iliac = region & ((lateral_mm >= ILIAC_LATERAL_MM) | (anterior_mm <= -PELVIS_ANTERIOR_MM)) & ~seed
    # The sacroiliac joints are dark clefts between bright cortices, often bridged by the threshold at
    # coarse spacing: flood on the (slightly smoothed) intensity so that the sacrum and the ilia meet there.
    from skimage.segmentation import watershed

    objs = ndimage.find_objects(region.astype(np.int8))
    if objs and objs[0] is not None:
        rb = objs[0]
        markers = np.zeros(region[rb].shape, np.int32)
        markers[seed[rb]] = 1
        markers[iliac[rb]] = 2
        smooth = ndimage.gaussian_filter(np.asarray(hu[rb], np.float32), sigma=max(0.5, 1.0 / spacing))
        basins = watershed(-smooth, markers=markers, mask=region[rb])
        sacrum = np.zeros(region.shape, bool)
        sacrum[rb] = basins == 1
        iliac = np.zeros(region.shape, bool)
        iliac[rb] = basins == 2
        seed = sacrum
    return seed, region, iliac


