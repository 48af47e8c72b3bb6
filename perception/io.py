"""Reading and writing medical images as :class:`~needle_steering.perception.volume.Volume`.

Formats: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``)
and DICOM series folders (any transfer syntax GDCM decodes, JPEG 2000 included). Everything is
returned in LPS millimetres, whatever the file's own convention: ITK converts NIfTI's RAS on read.

Every failure raises :class:`~needle_steering.errors.ImageError` (or ``GeometryError``) naming the
file and the problem; writes go to a temporary file that is renamed into place, so a failed write
never leaves a half-written image behind.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from needle_steering.atomic import atomic_path
from needle_steering.errors import GeometryError, ImageError
from needle_steering.perception.volume import Volume, validate_direction, validate_spacing

if TYPE_CHECKING:
    import SimpleITK as sitk

READ_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm")
WRITE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha")


@dataclass(frozen=True)
class DicomSeries:
    """One DICOM series found in a folder."""

    uid: str
    files: tuple[str, ...]
    description: str


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _sitk() -> Any:
    import SimpleITK

    SimpleITK.ProcessObject.SetGlobalWarningDisplay(False)
    return SimpleITK


def list_dicom_series(folder: str | os.PathLike[str]) -> list[DicomSeries]:
    """All DICOM series in ``folder`` (not recursive), largest first."""
    sitk_mod = _sitk()
    folder_path = Path(folder)
    reader = sitk_mod.ImageSeriesReader()
    series: list[DicomSeries] = []
    for uid in reader.GetGDCMSeriesIDs(str(folder_path)) or ():
        files = tuple(reader.GetGDCMSeriesFileNames(str(folder_path), uid))
        description = ""
        try:
            file_reader = sitk_mod.ImageFileReader()
            file_reader.SetFileName(files[0])
            file_reader.ReadImageInformation()
            if file_reader.HasMetaDataKey("0008|103e"):
                description = file_reader.GetMetaData("0008|103e").strip()
        except RuntimeError:
            description = ""
        series.append(DicomSeries(uid=uid, files=files, description=description))
    return sorted(series, key=lambda s: -len(s.files))


def _read_dicom_folder(folder: Path, series_uid: str | None) -> tuple[Any, dict[str, Any]]:
    sitk_mod = _sitk()
    found = list_dicom_series(folder)
    if not found:
        raise ImageError(f"{folder}: folder holds no readable DICOM series")
    if series_uid is None:
        if len(found) > 1:
            listing = "; ".join(f"{s.uid} ({len(s.files)} files, {s.description or 'no description'})" for s in found)
            raise ImageError(
                f"{folder}: folder holds {len(found)} DICOM series, choose one with series_uid "
                f"(--series-uid): {listing}"
            )
        chosen = found[0]
    else:
        matches = [s for s in found if s.uid == series_uid]
        if not matches:
            raise ImageError(f"{folder}: no series {series_uid!r}; found {[s.uid for s in found]}")
        chosen = matches[0]
    if len(chosen.files) < 2:
        raise ImageError(f"{folder}: series {chosen.uid} has a single slice; a 3-D volume needs at least 2")
    reader = sitk_mod.ImageSeriesReader()
    reader.SetFileNames(list(chosen.files))
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOff()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise ImageError(f"{folder}: cannot decode DICOM series {chosen.uid}: {_first_line(exc)}") from None
    meta: dict[str, Any] = {"series_uid": chosen.uid, "n_files": len(chosen.files)}
    for key, tag in (("modality", "0008|0060"), ("description", "0008|103e")):
        if reader.HasMetaDataKey(0, tag):
            meta[key] = reader.GetMetaData(0, tag).strip()
    _check_dicom_slice_spacing(folder, reader, len(chosen.files))
    return image, meta


def _check_dicom_slice_spacing(folder: Path, reader: Any, n_files: int) -> None:
    """Refuse series with missing or unevenly spaced slices (the volume would be geometrically wrong)."""
    positions = []
    for index in range(n_files):
        if not reader.HasMetaDataKey(index, "0020|0032"):
            return
        positions.append([float(v) for v in reader.GetMetaData(index, "0020|0032").split("\\")])
    if len(positions) < 3:
        return
    steps = np.linalg.norm(np.diff(np.asarray(positions), axis=0), axis=1)
    median = float(np.median(steps))
    if median <= 0 or np.max(np.abs(steps - median)) > max(0.1, 0.05 * median):
        raise ImageError(
            f"{folder}: slice positions are unevenly spaced (steps {np.round(steps.min(), 3)}"
            f"-{np.round(steps.max(), 3)} mm, median {median:.3f} mm): missing or duplicate slices"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    useful = [line.strip() for line in text if line.strip() and not line.strip().startswith("sitk::ERROR")]
    return (useful[-1] if useful else (text[0] if text else type(exc).__name__))[:300]


def read_volume(
    path: str | os.PathLike[str],
    *,
    series_uid: str | None = None,
    allow_nonfinite: bool = False,
) -> Volume:
    """Read an image file or DICOM series folder as a :class:`Volume` in LPS millimetres.

    Args:
        path: Image file (NIfTI, NRRD, MHA/MHD, single DICOM file) or folder holding one DICOM series.
        series_uid: Series to read when the folder holds several.
        allow_nonfinite: Accept NaN/Inf voxels (otherwise refused: they poison every later step).

    Returns:
        The volume; ``metadata`` holds ``source``, ``format`` and, for DICOM, ``series_uid`` and ``modality``.

    Raises:
        ImageError: Missing, empty, truncated, non-image, 2-D, or non-finite input; ambiguous DICOM folder.
        GeometryError: Zero, negative or absurd spacing; non-orthonormal direction.
    """
    sitk_mod = _sitk()
    p = Path(path)
    if not p.exists():
        raise ImageError(f"{p}: no such file or folder")
    meta: dict[str, Any] = {"source": str(p)}
    if p.is_dir():
        image, dicom_meta = _read_dicom_folder(p, series_uid)
        meta.update(dicom_meta, format="dicom")
    else:
        if p.stat().st_size == 0:
            raise ImageError(f"{p}: file is empty")
        image_io = ""
        try:
            reader = sitk_mod.ImageFileReader()
            reader.SetFileName(str(p))
            reader.ReadImageInformation()
            image_io = reader.GetImageIO()
            # ITK turns a negative spacing into an axis flip without a word; a header that says
            # so is more likely an error than an intent, so refuse it here.
            header_spacing = list(reader.GetSpacing())
            if any(v <= 0 for v in header_spacing):
                raise GeometryError(f"{p}: spacing must be positive, got {header_spacing} mm")
            _check_payload_complete(p, reader)
            image = reader.Execute()
        except RuntimeError as exc:
            detail = _first_line(exc)
            if not image_io:
                raise ImageError(f"{p}: not a readable image ({detail})") from None
            raise ImageError(f"{p}: image data is truncated or corrupt ({detail})") from None
        meta["format"] = image_io.replace("ImageIO", "").lower() or _suffix(p).lstrip(".")
    return _volume_from_image(image, meta, allow_nonfinite=allow_nonfinite)


def _expected_payload_bytes(reader: Any) -> int:
    n_voxels = int(np.prod(reader.GetSize()))
    components = int(reader.GetNumberOfComponents())
    sitk_mod = _sitk()
    pixel_id = reader.GetPixelID()
    probe = sitk_mod.Image([1] * reader.GetDimension(), pixel_id, components) if components > 1 else (
        sitk_mod.Image([1] * reader.GetDimension(), pixel_id)
    )
    per_voxel = probe.GetSizeOfPixelComponent() * components
    return n_voxels * int(per_voxel)


def _stream_length(data_source: Any, decompressor: Any, path: Path) -> int:
    total = 0
    try:
        while chunk := data_source.read(1 << 20):
            total += len(decompressor.decompress(chunk))
        total += len(decompressor.flush())
    except (EOFError, OSError, zlib.error) as exc:
        raise ImageError(f"{path}: compressed image data is truncated or corrupt ({exc})") from None
    if not getattr(decompressor, "eof", True):
        raise ImageError(f"{path}: compressed image data is truncated (stream ended early)")
    return total


def _check_payload_complete(path: Path, reader: Any) -> None:
    """Refuse files whose voxel data is shorter than the header promises.

    ITK reads a truncated NIfTI (plain or gzipped) without complaint, filling the missing voxels
    with zeros: a half-missing spine would look like a valid image. So count the bytes ourselves.
    """
    expected = _expected_payload_bytes(reader)
    with path.open("rb") as fh:
        head = fh.read(2)
    suffix = _suffix(path)
    if head == b"\x1f\x8b":
        with path.open("rb") as fh:
            got = _stream_length(fh, zlib.decompressobj(wbits=47), path)
        header = 348 if suffix in (".nii", ".nii.gz") else 0
    elif suffix in (".nrrd", ".mha"):
        raw = path.read_bytes()
        marker = b"\n\n" if suffix == ".nrrd" else b"ElementDataFile = LOCAL"
        at = raw.find(marker)
        if at < 0:
            return  # detached data file: ITK checks its existence; sizes are not ours to guess
        start = at + len(marker) + (1 if suffix == ".mha" else 0)
        header_text = raw[:at].decode("latin-1").lower()
        payload = raw[start:]
        if suffix == ".nrrd" and ("encoding: gzip" in header_text or "encoding: gz" in header_text):
            got = _stream_length(_BytesSource(payload), zlib.decompressobj(wbits=47), path)
        elif suffix == ".mha" and "compresseddata = true" in header_text:
            got = _stream_length(_BytesSource(payload), zlib.decompressobj(), path)
        else:
            got = len(payload)
        header = 0
    else:
        got = path.stat().st_size
        header = 348 if suffix == ".nii" else 0
    if got - header < expected:
        raise ImageError(
            f"{path}: image data is truncated: header promises {expected} bytes of voxels, "
            f"file holds {max(0, got - header)}"
        )


class _BytesSource:
    """Minimal file-like reader over bytes, for streaming decompression."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def read(self, n: int) -> bytes:
        chunk = self._data[self._pos : self._pos + n]
        self._pos += len(chunk)
        return chunk


def _volume_from_image(image: Any, meta: dict[str, Any], *, allow_nonfinite: bool) -> Volume:
    sitk_mod = _sitk()
    source = meta["source"]
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageError(
            f"{source}: image has {image.GetNumberOfComponentsPerPixel()} components per voxel; "
            "a scalar CT/CBCT or label map is needed"
        )
    dim = image.GetDimension()
    size = list(image.GetSize())
    if dim == 4 and size[3] == 1:
        image = image[:, :, :, 0]
        dim, size = 3, size[:3]
    if dim != 3:
        raise ImageError(f"{source}: a 3-D volume is needed, got a {dim}-D image of size {size}")
    if min(size) < 2 and size[2] < 2:
        raise ImageError(f"{source}: image is a single slice (size {size}); a 3-D volume is needed")
    spacing = validate_spacing(image.GetSpacing(), source)
    direction = validate_direction(image.GetDirection(), source)
    array = np.ascontiguousarray(sitk_mod.GetArrayFromImage(image).transpose(2, 1, 0))
    if array.dtype.kind == "f" and not allow_nonfinite:
        bad = ~np.isfinite(array)
        if bad.any():
            first = np.argwhere(bad)[0].tolist()
            raise ImageError(f"{source}: {int(bad.sum())} NaN/Inf voxels (first at index {first})")
    return Volume(array, spacing, np.asarray(image.GetOrigin()), direction, meta)


def volume_to_sitk(volume: Volume) -> sitk.Image:
    """Convert to a SimpleITK image (copying the array into ITK's ``[k, j, i]`` order)."""
    sitk_mod = _sitk()
    array = volume.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    image = sitk_mod.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing([float(v) for v in volume.spacing_mm])
    image.SetOrigin([float(v) for v in volume.origin_lps_mm])
    image.SetDirection([float(v) for v in volume.direction.reshape(-1)])
    return image


def volume_from_sitk(image: sitk.Image, source: str = "SimpleITK image") -> Volume:
    """Convert a SimpleITK image (LPS) to a :class:`Volume`."""
    return _volume_from_image(image, {"source": source}, allow_nonfinite=True)


def write_volume(volume: Volume, path: str | os.PathLike[str], *, compress: bool = True) -> Path:
    """Write ``volume`` as NIfTI/NRRD/MHA atomically (temporary file renamed into place).

    Returns:
        The written path.

    Raises:
        ImageError: Unsupported suffix, missing folder or write failure (no partial file is left).
    """
    sitk_mod = _sitk()
    p = Path(path)
    suffix = _suffix(p)
    if suffix not in WRITE_SUFFIXES:
        raise ImageError(f"{p}: cannot write {suffix or 'files without suffix'}; use one of {WRITE_SUFFIXES}")
    if not p.parent.exists():
        raise ImageError(f"{p}: folder {p.parent} does not exist")
    if volume.array.dtype.kind == "f" and not np.all(np.isfinite(volume.array)):
        raise ImageError(f"{p}: refusing to write NaN/Inf voxels")
    try:
        with atomic_path(p, suffix=suffix) as tmp:
            sitk_mod.WriteImage(volume_to_sitk(volume), str(tmp), compress)
    except RuntimeError as exc:
        raise ImageError(f"{p}: write failed ({_first_line(exc)})") from None
    return p


def resample_to_spacing(volume: Volume, spacing_mm: Any, *, is_label: bool = False) -> Volume:
    """Resample onto a grid of the given spacing covering the same physical extent.

    Linear interpolation for intensities (CT: air outside, -1024 HU), nearest neighbour for labels.

    Args:
        volume: Input volume.
        spacing_mm: Target spacing ``(3,)`` or a scalar for isotropic, millimetres.
        is_label: Use nearest-neighbour interpolation and keep the integer dtype.
    """
    sitk_mod = _sitk()
    target = np.broadcast_to(np.asarray(spacing_mm, dtype=np.float64), (3,))
    target = validate_spacing(target, "target spacing")
    extent = (np.asarray(volume.shape) - 1) * volume.spacing_mm
    new_size = np.maximum(1, np.floor(extent / target + 1e-6).astype(int) + 1)
    image = volume_to_sitk(volume)
    resampler = sitk_mod.ResampleImageFilter()
    resampler.SetOutputSpacing([float(v) for v in target])
    resampler.SetSize([int(v) for v in new_size])
    resampler.SetOutputOrigin([float(v) for v in volume.origin_lps_mm])
    resampler.SetOutputDirection([float(v) for v in volume.direction.reshape(-1)])
    if is_label:
        resampler.SetInterpolator(sitk_mod.sitkNearestNeighbor)
        resampler.SetDefaultPixelValue(0)
    else:
        resampler.SetInterpolator(sitk_mod.sitkLinear)
        resampler.SetDefaultPixelValue(float(np.min(volume.array)))
        resampler.SetOutputPixelType(sitk_mod.sitkFloat32)
    out = resampler.Execute(image)
    result = volume_from_sitk(out, str(volume.metadata.get("source", "resampled")))
    return Volume(result.array, result.spacing_mm, result.origin_lps_mm, result.direction, dict(volume.metadata))


def resample_like(volume: Volume, reference: Volume, *, is_label: bool = False, default: float = 0.0) -> Volume:
    """Resample ``volume`` onto ``reference``'s grid (physical coordinates preserved)."""
    sitk_mod = _sitk()
    resampler = sitk_mod.ResampleImageFilter()
    resampler.SetReferenceImage(volume_to_sitk(reference.with_array(np.zeros(reference.shape, np.uint8))))
    resampler.SetInterpolator(sitk_mod.sitkNearestNeighbor if is_label else sitk_mod.sitkLinear)
    resampler.SetDefaultPixelValue(float(default))
    if not is_label:
        resampler.SetOutputPixelType(sitk_mod.sitkFloat32)
    else:
        resampler.SetOutputPixelType(volume_to_sitk(volume).GetPixelID())
    out = resampler.Execute(volume_to_sitk(volume))
    arr: NDArray[Any] = sitk_mod.GetArrayFromImage(out).transpose(2, 1, 0)
    return reference.with_array(np.ascontiguousarray(arr), **{"source": volume.metadata.get("source", "")})


def describe(volume: Volume) -> dict[str, Any]:
    """Geometry and intensity summary used by ``needle-steering info``."""
    arr = volume.array
    lo = float(np.min(arr))
    hi = float(np.max(arr))
    return {
        "source": volume.metadata.get("source", ""),
        "format": volume.metadata.get("format", ""),
        "size": list(volume.shape),
        "spacing": [float(v) for v in volume.spacing_mm],
        "origin": [float(v) for v in volume.origin_lps_mm],
        "direction": [float(v) for v in volume.direction.reshape(-1)],
        "orientation": volume.orientation_code(),
        "dtype": str(arr.dtype),
        "min": lo,
        "max": hi,
        "modality": guess_modality(volume),
    }


def guess_modality(volume: Volume) -> str:
    """A best guess at the image content from DICOM tags and intensities.

    Returns one of ``"CT"``, ``"label map"``, ``"MR or non-HU image"``, or the DICOM modality tag.
    """
    tag = str(volume.metadata.get("modality", "")).upper()
    if tag:
        return tag
    arr = volume.array
    if arr.dtype.kind in "iub":
        sample = arr[:: max(1, arr.shape[0] // 64), :: max(1, arr.shape[1] // 64), :: max(1, arr.shape[2] // 64)]
        uniq = np.unique(sample)
        if uniq.size <= 128 and float(uniq.min()) >= 0 and float(uniq.max()) <= 255:
            return "label map"
    lo, hi = float(np.percentile(arr, 1)), float(np.percentile(arr, 99.9))
    if lo <= -500 and hi >= 300:
        return "CT"
    return "MR or non-HU image"


__all__ = [
    "READ_SUFFIXES",
    "WRITE_SUFFIXES",
    "DicomSeries",
    "GeometryError",
    "ImageError",
    "describe",
    "guess_modality",
    "list_dicom_series",
    "read_volume",
    "resample_like",
    "resample_to_spacing",
    "volume_from_sitk",
    "volume_to_sitk",
    "write_volume",
]
