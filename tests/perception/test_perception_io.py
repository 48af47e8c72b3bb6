"""Medical image I/O: real files, real broken files, exact geometry."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from needle_steering.errors import GeometryError, ImageError
from needle_steering.perception.io import (
    describe,
    list_dicom_series,
    read_volume,
    resample_like,
    resample_to_spacing,
    volume_to_sitk,
    write_volume,
)
from needle_steering.perception.labels import from_totalsegmentator, level_id
from needle_steering.perception.volume import Volume


def _rotation(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    K = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * K + (1 - np.cos(angle_rad)) * K @ K


def _oblique_volume(dtype: type = np.float32) -> Volume:
    rng = np.random.default_rng(3)
    array: np.ndarray = rng.normal(0, 100, size=(7, 9, 5)).astype(dtype)
    direction = _rotation(np.array([0.3, -0.5, 0.8]), 0.7)
    return Volume(array, np.array([0.7, 1.1, 2.5]), np.array([-120.5, 33.25, 870.0]), direction)


# --- real data ------------------------------------------------------------------------------------
def test_reads_real_nifti_with_known_geometry(shared_data: Path) -> None:
    ct = read_volume(shared_data / "abdomen_ct_3mm" / "ct.nii.gz")
    assert ct.shape == (122, 101, 112)
    np.testing.assert_allclose(ct.spacing_mm, [3.0, 3.0, 3.0])
    # NIfTI stores RAS; ITK reports LPS: a diag(-1, -1, 1) direction, i.e. an RAS-ordered array.
    np.testing.assert_allclose(ct.direction, np.diag([-1.0, -1.0, 1.0]), atol=1e-6)
    assert ct.orientation_code() == "RAS"
    assert describe(ct)["modality"] == "CT"


def test_reads_real_jpeg2000_dicom_series(shared_data: Path) -> None:
    folder = shared_data / "dicom_ct_1mm" / "series"
    series = list_dicom_series(folder)
    assert len(series) == 1 and len(series[0].files) == 20
    ct = read_volume(folder)
    assert ct.shape == (512, 512, 20)
    np.testing.assert_allclose(ct.spacing_mm, [0.9765625, 0.9765625, 2.0], atol=1e-6)
    assert ct.orientation_code() == "LPS"
    assert ct.metadata["format"] == "dicom"
    # Decoded JPEG 2000 pixels are in HU: air around -1000, bone above +700.
    assert ct.array.min() <= -1000 and ct.array.max() > 700


def test_dicom_reference_labels_share_the_physical_grid(shared_data: Path) -> None:
    ct = read_volume(shared_data / "dicom_ct_1mm" / "series")
    labels = read_volume(shared_data / "dicom_ct_1mm" / "labels_totalsegmentator_total.nii.gz")
    # Stored with a flipped j axis: same voxels in space, different array order.
    assert labels.orientation_code() == "LAS" and not ct.same_grid(labels)
    on_ct = resample_like(labels, ct, is_label=True)
    assert on_ct.same_grid(ct)
    t12 = from_totalsegmentator(on_ct.array) == level_id("T12")
    assert t12.sum() > 10_000
    # The T12 voxels must be bone in the CT (mean HU of a vertebra is well above soft tissue).
    assert float(ct.array[t12].mean()) > 150


def test_totalsegmentator_counts_match_the_data_readme(shared_data: Path) -> None:
    labels = read_volume(shared_data / "abdomen_ct_3mm" / "labels_totalsegmentator_total.nii.gz")
    ours = from_totalsegmentator(labels.array)
    counts = {name: int((ours == level_id(name)).sum()) for name in ("L1", "L2", "L3", "L4", "L5", "T12")}
    assert counts == {"L1": 2220, "L2": 2236, "L3": 2446, "L4": 2442, "L5": 2508, "T12": 1831}
    assert int((ours == level_id("S")).sum()) == 5884 + 1796  # sacrum and S1 merge


# --- geometry -------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_oblique_round_trip_through_physical_coordinates(tmp_path: Path, suffix: str) -> None:
    volume = _oblique_volume()
    path = write_volume(volume, tmp_path / f"oblique{suffix}")
    back = read_volume(path)
    assert back.same_grid(volume, tol_mm=1e-3)
    np.testing.assert_allclose(back.array, volume.array, atol=1e-4)
    ijk = np.array([[0, 0, 0], [6, 8, 4], [3.5, 2.25, 1.0]])
    image = volume_to_sitk(back)
    expected = np.array([image.TransformContinuousIndexToPhysicalPoint(p.tolist()) for p in ijk])
    np.testing.assert_allclose(back.index_to_lps(ijk), expected, atol=1e-4)
    np.testing.assert_allclose(back.lps_to_index(expected), ijk, atol=1e-6)
    np.testing.assert_allclose(back.T_index_from_lps @ back.T_lps_from_index, np.eye(4), atol=1e-12)


def test_resampling_keeps_the_physical_extent_and_label_set() -> None:
    volume = _oblique_volume()
    labels = volume.with_array((volume.array > 0).astype(np.uint8) * 20)
    fine = resample_to_spacing(labels, 0.5, is_label=True)
    assert fine.array.dtype == np.uint8
    assert set(np.unique(fine.array)) <= {0, 20}
    np.testing.assert_allclose(fine.origin_lps_mm, volume.origin_lps_mm)
    np.testing.assert_allclose(fine.direction, volume.direction)
    ct = resample_to_spacing(volume, [1.4, 2.2, 5.0])
    assert ct.shape == (4, 5, 3)
    np.testing.assert_allclose(ct.array[0, 0, 0], volume.array[0, 0, 0], atol=1e-4)


# --- bad input ------------------------------------------------------------------------------------
def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no such file"):
        read_volume(tmp_path / "nope.nii.gz")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        read_volume(path)


def test_truncated_file(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).normal(size=(40, 40, 40)).astype(np.float32)
    path = write_volume(Volume(noise, [1, 1, 1], [0, 0, 0], np.eye(3)), tmp_path / "full.nii", compress=False)
    data = path.read_bytes()
    cut = tmp_path / "cut.nii"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match=r"cut\.nii"):
        read_volume(cut)
    gz = tmp_path / "cut.nii.gz"
    packed = gzip.compress(data)
    gz.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(ImageError, match=r"cut\.nii\.gz.*truncated"):
        read_volume(gz)
    for suffix in (".nrrd", ".mha"):
        whole = write_volume(Volume(noise, [1, 1, 1], [0, 0, 0], np.eye(3)), tmp_path / f"w{suffix}")
        raw = whole.read_bytes()
        broken = tmp_path / f"broken{suffix}"
        broken.write_bytes(raw[: len(raw) - 5000])
        with pytest.raises(ImageError, match="truncated"):
            read_volume(broken)


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.nii.gz"
    path.write_text("this is a surgeon's note, not an image\n")
    with pytest.raises(ImageError, match="not a readable image"):
        read_volume(path)


def test_two_dimensional_image(tmp_path: Path) -> None:
    path = tmp_path / "slice.mha"
    sitk.WriteImage(sitk.Image(32, 32, sitk.sitkInt16), str(path))
    with pytest.raises(ImageError, match="3-D"):
        read_volume(path)


def test_single_slice_volume(tmp_path: Path) -> None:
    path = tmp_path / "one.nii.gz"
    sitk.WriteImage(sitk.Image(32, 32, 1, sitk.sitkInt16), str(path))
    with pytest.raises(ImageError, match="single slice"):
        read_volume(path)


def _write_mha(path: Path, spacing: str, matrix: str = "1 0 0 0 1 0 0 0 1") -> Path:
    header = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"TransformMatrix = {matrix}\nOffset = 0 0 0\nElementSpacing = {spacing}\n"
        "DimSize = 4 4 4\nElementType = MET_SHORT\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + np.zeros(64, np.int16).tobytes())
    return path


@pytest.mark.parametrize(("spacing", "message"), [("0 1 1", "spacing"), ("-1 1 1", "spacing"),
                                                  ("1 1 1000", "plausible range")])
def test_bad_spacing(tmp_path: Path, spacing: str, message: str) -> None:
    path = _write_mha(tmp_path / "bad_spacing.mha", spacing)
    with pytest.raises((GeometryError, ImageError), match=message):
        read_volume(path)


def test_non_orthonormal_direction(tmp_path: Path) -> None:
    path = _write_mha(tmp_path / "skewed.mha", "1 1 1", matrix="1 0 0 0.5 1 0 0 0 1")
    with pytest.raises((GeometryError, ImageError), match=r"orthonormal|direction"):
        read_volume(path)


def test_nan_voxels_refused_and_never_written(tmp_path: Path) -> None:
    array = np.zeros((5, 5, 5), np.float32)
    array[2, 3, 4] = np.nan
    image = sitk.GetImageFromArray(array)
    path = tmp_path / "nan.nrrd"
    sitk.WriteImage(image, str(path))
    with pytest.raises(ImageError, match="NaN/Inf"):
        read_volume(path)
    assert np.isnan(read_volume(path, allow_nonfinite=True).array).sum() == 1
    volume = Volume(array.transpose(2, 1, 0), [1, 1, 1], [0, 0, 0], np.eye(3))
    with pytest.raises(ImageError, match="NaN"):
        write_volume(volume, tmp_path / "out.nii.gz")
    assert list(tmp_path.glob("out*")) == [] and list(tmp_path.glob(".out*")) == []


def test_unsupported_write_suffix_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="cannot write"):
        write_volume(_oblique_volume(), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


def _write_dicom_series(folder: Path, series_uid: str, n_slices: int, z0: float) -> None:
    folder.mkdir(exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(n_slices):
        image = sitk.Image(16, 16, sitk.sitkInt16) + k
        image.SetSpacing((1.0, 1.0))
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
            "0020|000e": series_uid,
            "0020|0032": f"0\\0\\{z0 + 2.0 * k}",
            "0020|0037": "1\\0\\0\\0\\1\\0",
            "0020|0013": str(k + 1),
            "0008|0018": f"{series_uid}.{k + 1}",
            "0028|0030": "1\\1",
            "0018|0050": "2",
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{series_uid[-3:]}_{k:03d}.dcm"))
        writer.Execute(image)


def test_several_series_in_one_folder_must_be_chosen(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    _write_dicom_series(folder, "1.2.826.0.1.3680043.2.1125.101", 4, 0.0)
    _write_dicom_series(folder, "1.2.826.0.1.3680043.2.1125.202", 6, 100.0)
    with pytest.raises(ImageError, match=r"2 DICOM series.*\.202.*\.101"):
        read_volume(folder)
    chosen = read_volume(folder, series_uid="1.2.826.0.1.3680043.2.1125.101")
    assert chosen.shape == (16, 16, 4)
    np.testing.assert_allclose(chosen.spacing_mm, [1, 1, 2])
    with pytest.raises(ImageError, match="no series"):
        read_volume(folder, series_uid="9.9")


def test_dicom_series_with_a_missing_slice_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "gap"
    _write_dicom_series(folder, "1.2.826.0.1.3680043.2.1125.303", 6, 0.0)
    sorted(folder.iterdir())[2].unlink()
    with pytest.raises(ImageError, match="unevenly spaced"):
        read_volume(folder)


def test_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no readable DICOM"):
        read_volume(tmp_path)


def test_label_map_on_another_grid_is_named(shared_data: Path) -> None:
    ct = read_volume(shared_data / "abdomen_ct_3mm" / "ct.nii.gz")
    other = resample_to_spacing(ct, 4.0)
    with pytest.raises(GeometryError, match="not on the image grid"):
        ct.require_same_grid(other)
