"""DICOM series reading: slice order, geometry, rescale, and the refusals of bad series."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from volume_factories import anatomy, canonical_affine, oriented, write_dicom_series, write_nifti

from targan_cli.errors import TarganError
from targan_cli.io.dicom import read_dicom_series
from targan_cli.io.volume import from_slices, is_volume_path, read_volume, to_slices, write_volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


# ----------------------------------------------------------------------------- DICOM


def test_dicom_series_reads_hu_in_slice_order_and_matches_the_display(tmp_path: Path) -> None:
    displayed = anatomy((5, 12, 10), seed=1)  # HU, as a viewer shows each slice
    stored = ((displayed + 1024) // 2).astype(np.int16)  # HU = 2 * stored - 1024
    hu = stored * 2 - 1024
    files = write_dicom_series(tmp_path / "ct", stored, slope=2, intercept=-1024)
    assert sorted(files) != files  # name order is not slice order

    volume, ordered = read_dicom_series(sorted(files))
    assert ordered == files
    assert volume.modality == "CT" and volume.array.dtype == np.int16
    assert volume.shape == (10, 12, 5)  # (Columns, Rows, slices)
    slices, frame = to_slices(volume)
    assert np.array_equal(slices, hu)
    for file, canonical_slice in zip(ordered, slices):  # the ground truth of the convention
        dataset = pydicom.dcmread(file)
        assert np.array_equal(canonical_slice, dataset.pixel_array * 2.0 - 1024)
    assert np.array_equal(from_slices(slices, frame), volume.array)
    assert np.allclose(volume.spacing, (0.7, 0.8, 2.5))

    via_folder = read_volume(tmp_path / "ct")
    assert np.array_equal(via_folder.array, volume.array) and np.array_equal(via_folder.affine, volume.affine)


def test_dicom_geometry_matches_the_equivalent_nifti(tmp_path: Path) -> None:
    stored = ((anatomy((4, 12, 10), seed=2) + 1024) // 2).astype(np.int16)
    hu = stored * 2 - 1024
    write_dicom_series(tmp_path / "ct", stored, slope=2, intercept=-1024, origin_lps=(-30.0, -40.0, -50.0))
    dicom = read_volume(tmp_path / "ct")
    # The same anatomy as a RAS NIfTI: canonical voxel (0, 0, 0) is at LPS (-30, -40, -50).
    array, affine = oriented(hu, "RAS", canonical_affine(hu.shape, origin=(30.0, 40.0, -50.0)))
    nifti = read_volume(write_nifti(tmp_path / "ct.nii.gz", array, affine))
    assert np.array_equal(to_slices(dicom)[0], to_slices(nifti)[0])
    ras_of_first_voxel = dicom.affine @ [0, 0, 0, 1]
    assert np.allclose(ras_of_first_voxel[:3], (30.0, 40.0, -50.0))
    # Every voxel centre lands at the same world point in both.
    z, h, w = 3, 7, 2
    assert np.allclose(dicom.affine @ [w, h, z, 1],
                       nifti.affine @ [array.shape[0] - 1 - w, array.shape[1] - 1 - h, z, 1], atol=1e-4)
    written = read_volume(write_volume(tmp_path / "from_dicom.nii.gz", dicom))
    assert np.array_equal(to_slices(written)[0], hu) and np.allclose(written.affine, dicom.affine, atol=1e-4)


def test_oblique_dicom_affine_follows_the_tags(tmp_path: Path) -> None:
    angle = np.deg2rad(15)
    tilt = 0.2
    iop = (np.cos(angle), np.sin(angle), 0.0,
           -np.sin(angle) * np.cos(tilt), np.cos(angle) * np.cos(tilt), -np.sin(tilt))
    files = write_dicom_series(tmp_path / "mr", anatomy((4, 6, 5)).clip(0), modality="MR",
                               orientation=iop, slice_step=3.0, pixel_spacing=(1.5, 1.25))
    volume, ordered = read_dicom_series(files)
    assert volume.modality == "MR"
    for k, file in enumerate(ordered):
        dataset = pydicom.dcmread(file)
        orientation = np.array(dataset.ImageOrientationPatient, dtype=float)
        row_dir, column_dir = orientation[:3], orientation[3:]
        lps = np.array(dataset.ImagePositionPatient, dtype=float) + 2 * 1.25 * row_dir + 3 * 1.5 * column_dir
        assert np.allclose(volume.affine @ [2, 3, k, 1], LPS_TO_RAS @ [*lps, 1], atol=1e-4)


def test_dicom_without_rescale_keeps_raw_values_and_fractional_slope_gives_float(tmp_path: Path) -> None:
    raw = np.abs(anatomy((3, 5, 4))).astype(np.int16)
    write_dicom_series(tmp_path / "plain", raw, modality="MR")
    plain = read_volume(tmp_path / "plain")
    assert np.array_equal(to_slices(plain)[0], raw)
    write_dicom_series(tmp_path / "scaled", raw, slope=0.5, intercept=0.25, modality="OT")
    scaled = read_volume(tmp_path / "scaled")
    assert scaled.array.dtype == np.float32 and scaled.modality == "OT"  # the tag as written
    assert np.allclose(to_slices(scaled)[0], raw * 0.5 + 0.25)


def test_single_slice_series_uses_the_slice_thickness(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "one", anatomy((1, 4, 3)))
    volume = read_volume(tmp_path / "one")
    assert volume.shape == (3, 4, 1) and np.isclose(volume.spacing[2], 2.5)


def test_single_dicom_file_asks_for_the_folder(tmp_path: Path) -> None:
    files = write_dicom_series(tmp_path / "ct", anatomy((2, 4, 3)))
    with pytest.raises(TarganError, match="pass the folder"):
        read_volume(files[0])


def test_folder_without_dicom_files_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(TarganError, match=r"no DICOM \(\.dcm\) files"):
        read_volume(tmp_path)
    write_dicom_series(tmp_path / "InPhase", anatomy((2, 4, 3)))
    write_dicom_series(tmp_path / "OutPhase", anatomy((2, 4, 3)))
    with pytest.raises(TarganError, match="subfolders InPhase, OutPhase"):
        read_volume(tmp_path)


def test_extensionless_dicom_files_are_found(tmp_path: Path) -> None:
    for file in write_dicom_series(tmp_path / "ct", anatomy((3, 4, 3))):
        file.rename(file.with_suffix(""))
    assert is_volume_path(tmp_path / "ct") and read_volume(tmp_path / "ct").shape == (3, 4, 3)


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ({"orientation": (0, 1, 0, 0, 0, -1)}, "differ in orientation"),
        ({"modality": "MR"}, "differ in Modality"),
        ({"stored": np.zeros((2, 5, 3), np.int16)}, "differ in image size"),
        ({"origin_lps": (-30.0, -40.0, -50.0)}, "share the slice position"),
    ],
)
def test_several_series_in_one_folder_are_refused(tmp_path: Path, second: dict, message: str) -> None:
    folder = tmp_path / "mixed"
    write_dicom_series(folder, anatomy((2, 4, 3)))
    options = {"stored": anatomy((2, 4, 3)), "origin_lps": (-30.0, -40.0, 0.0), **second}
    for file in write_dicom_series(tmp_path / "other", **options):
        file.rename(folder / f"B{file.name}")
    with pytest.raises(TarganError, match=message) as error:
        read_volume(folder)
    assert "series" in str(error.value) and error.value.path == folder


def test_two_series_told_apart_only_by_their_uid_are_refused(tmp_path: Path) -> None:
    """Series B continues series A's grid exactly (same spacing, next positions, same tags): only
    SeriesInstanceUID tells them apart. Files with a UID each (CHAOS) stay one series."""
    folder = tmp_path / "two"
    write_dicom_series(folder, anatomy((3, 4, 3)), series_uid="1.2.3.1")
    for file in write_dicom_series(tmp_path / "b", anatomy((3, 4, 3)), origin_lps=(-30.0, -40.0, -42.5),
                                   series_uid="1.2.3.2"):
        file.rename(folder / f"B{file.name}")
    with pytest.raises(TarganError, match=r"holds 2 series by SeriesInstanceUID: 3 file\(s\) of 1\.2\.3\.\d "
                                          r"and 3 file\(s\) of 1\.2\.3\.\d; put each series") as error:
        read_volume(folder)
    assert error.value.path == folder
    write_dicom_series(tmp_path / "one", anatomy((3, 4, 3)), series_uid="1.2.3.1")
    write_dicom_series(tmp_path / "chaos", anatomy((3, 4, 3)))  # every file its own UID
    assert read_volume(tmp_path / "one").shape == read_volume(tmp_path / "chaos").shape == (3, 4, 3)


def test_missing_slices_are_refused_with_the_gap(tmp_path: Path) -> None:
    write_dicom_series(tmp_path / "ct", anatomy((6, 4, 3)), skip=[3])
    with pytest.raises(TarganError, match=r"gap of 5\.000 mm.*usual step is 2\.500 mm"):
        read_volume(tmp_path / "ct")


def test_broken_dicom_files_are_named(tmp_path: Path) -> None:
    files = write_dicom_series(tmp_path / "ct", anatomy((3, 4, 3)))
    dataset = pydicom.dcmread(files[1])
    del dataset.ImagePositionPatient
    dataset.save_as(files[1], enforce_file_format=True)
    with pytest.raises(TarganError, match="lacks ImagePositionPatient") as error:
        read_volume(tmp_path / "ct")
    assert error.value.path == files[1]
    files[1].write_bytes(b"not dicom at all")
    with pytest.raises(TarganError, match="not a DICOM file"):
        read_volume(tmp_path / "ct")
    files[1].write_bytes(files[0].read_bytes()[:400])  # cut inside the header
    with pytest.raises(TarganError) as error:
        read_volume(tmp_path / "ct")
    assert error.value.path == files[1]


def test_invalid_orientation_tag_is_named(tmp_path: Path) -> None:
    files = write_dicom_series(tmp_path / "ct", anatomy((2, 4, 3)))
    dataset = pydicom.dcmread(files[0])
    dataset.ImageOrientationPatient = [0, 0, 0, 0, 0, 0]
    dataset.save_as(files[0], enforce_file_format=True)
    with pytest.raises(TarganError, match="invalid ImageOrientationPatient") as error:
        read_volume(tmp_path / "ct")
    assert error.value.path == files[0]
