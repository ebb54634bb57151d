"""DICOM series reading: files found by content, series picked, compressed syntaxes decoded,
geometry equal to SimpleITK's series reader, and the refusals of bad series and bad tag values."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_factories import scanner_series
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.fileset import FileSet
from pydicom.uid import (DeflatedExplicitVRLittleEndian, JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless,
                         MPEG2MPML, RLELossless)
from volume_factories import anatomy, canonical_affine, oriented, write_dicom_series, write_nifti

from targan_cli.errors import TarganError, UsageError
from targan_cli.io.dicom import MAX_SLICE_SIDE, read_dicom, read_dicom_series, write_dicom
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
    with pytest.raises(TarganError, match=r"no DICOM image files in this folder \(1 other file\)"):
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
    with pytest.raises(TarganError, match=r"holds 2 series: 1\.2\.3\.1 \(no description, CT, 3 slices\); "
                                          r"1\.2\.3\.2 \(no description, CT, 3 slices\)\. Pick one with --series") as error:
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
    files[1].write_bytes(files[0].read_bytes()[:400])  # cut inside the header
    with pytest.raises(TarganError, match="lacks .*PixelData") as error:
        read_volume(tmp_path / "ct")
    assert error.value.path == files[1]
    files[1].write_bytes(b"not dicom at all")  # not DICOM by its content: skipped, whatever its name
    series = read_dicom(tmp_path / "ct")
    assert series.volume.shape == (3, 4, 2) and series.skipped == (files[1],)
    assert series.skipped_note == f"skipped 1 file that is not DICOM images ({files[1].name})"
    with pytest.raises(TarganError, match="not a DICOM file"):
        read_dicom_series(files)


def test_invalid_orientation_tag_is_named(tmp_path: Path) -> None:
    files = write_dicom_series(tmp_path / "ct", anatomy((2, 4, 3)))
    dataset = pydicom.dcmread(files[0])
    dataset.ImageOrientationPatient = [0, 0, 0, 0, 0, 0]
    dataset.save_as(files[0], enforce_file_format=True)
    with pytest.raises(TarganError, match="invalid ImageOrientationPatient") as error:
        read_volume(tmp_path / "ct")
    assert error.value.path == files[0]



# ----------------------------------------------------------------------------- real exports


def _stored_ct(shape: tuple[int, int, int] = (4, 40, 36), seed: int = 3) -> np.ndarray:
    """CT stored values (Z, Rows, Columns) for RescaleIntercept -1024."""
    return (anatomy(shape, seed) + 1024).astype(np.uint16)


def _clutter(folder: Path) -> list[str]:
    """The files a real export folder holds beside its images; returns their names."""
    (folder / "README.txt").write_text("exported by a PACS\n")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "thumb.jpg")
    (folder / "empty").write_bytes(b"")
    return ["README.txt", "empty", "thumb.jpg"]


@pytest.mark.parametrize(("names", "preamble"), [("uid", True), ("ima", True), ("none", True), ("dcm", True),
                                                 ("uid", False), ("none", False)])
def test_files_are_dicom_by_content_whatever_their_name(tmp_path: Path, names: str, preamble: bool) -> None:
    stored = _stored_ct()
    files = scanner_series(tmp_path / "export", stored, names=names, preamble=preamble, intercept=-1024)
    assert (files[0].read_bytes()[128:132] == b"DICM") == preamble
    clutter = _clutter(tmp_path / "export")
    assert is_volume_path(tmp_path / "export")
    series = read_dicom(tmp_path / "export")
    assert np.array_equal(series.volume.array, (stored.astype(np.int32) - 1024).transpose(2, 1, 0))
    assert series.volume.modality == "CT" and list(series.files) == files
    assert sorted(p.name for p in series.skipped) == clutter
    assert series.skipped_note == f"skipped 3 files that are not DICOM images ({', '.join(clutter)})"


@pytest.mark.parametrize("syntax", [None, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, RLELossless,
                                    DeflatedExplicitVRLittleEndian])
def test_geometry_and_voxels_equal_simpleitks_series_reader(tmp_path: Path, syntax: str | None) -> None:
    """SimpleITK (ITK's GDCM) reads the same files independently: origin, spacing and direction within
    1e-4 mm, and the same rescaled voxels, for an oblique series in every supported syntax."""
    angle = np.deg2rad(17)
    orientation = (np.cos(angle), np.sin(angle), 0.0, 0.0, 0.0, -1.0)  # an oblique coronal series
    stored = _stored_ct(seed=4)
    scanner_series(tmp_path / "s", stored, syntax=syntax, intercept=-1024, slope=1, orientation=orientation,
                   pixel_spacing=(0.77, 0.69), slice_step=3.3, origin_lps=(12.5, -40.25, 88.0))
    ours = read_dicom(tmp_path / "s").volume
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    image = reader.Execute()
    direction = np.array(image.GetDirection()).reshape(3, 3)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction * np.array(image.GetSpacing())
    affine_lps[:3, 3] = image.GetOrigin()
    np.testing.assert_allclose(LPS_TO_RAS @ ours.affine, affine_lps, rtol=0, atol=1e-4)
    assert np.array_equal(ours.array.transpose(2, 1, 0), sitk.GetArrayFromImage(image))  # (Z, Rows, Columns)


def _two_series(folder: Path) -> tuple[str, str]:
    first, second = "1.2.826.0.1.3680043.10.511.1.1", "1.2.826.0.1.3680043.10.511.2.7"
    scanner_series(folder, _stored_ct((3, 6, 5)), series_uid=first, description="AX T1", intercept=-1024)
    scanner_series(folder, np.abs(anatomy((5, 6, 5))).astype(np.uint16), series_uid=second, modality="MR",
                   description="AX T2 SPIR", names="ima")
    return first, second


def test_several_series_are_listed_and_one_is_picked_by_uid_or_prefix(tmp_path: Path) -> None:
    first, second = _two_series(tmp_path / "study")
    with pytest.raises(UsageError) as error:
        read_dicom(tmp_path / "study")
    assert error.value.message == (
        f"holds 2 series: {second} (AX T2 SPIR, MR, 5 slices); {first} (AX T1, CT, 3 slices). Pick one with "
        "--series UID (or a unique prefix of it), or put each series in its own folder")
    assert error.value.path == tmp_path / "study"
    assert read_dicom(tmp_path / "study", first).volume.shape == (5, 6, 3)
    assert read_dicom(tmp_path / "study", "1.2.826.0.1.3680043.10.511.2").volume.modality == "MR"
    with pytest.raises(UsageError, match=r"--series 1\.2\.826 matches 2 series here; the series are: "):
        read_dicom(tmp_path / "study", "1.2.826")
    with pytest.raises(UsageError, match=r"--series 9\.9 matches no series here"):
        read_dicom(tmp_path / "study", "9.9")


def test_a_dicomdir_is_an_input_and_is_skipped_in_a_folder(tmp_path: Path) -> None:
    first, second = _two_series(tmp_path / "export")
    file_set = FileSet()
    for file in sorted((tmp_path / "export").iterdir()):
        file_set.add(pydicom.dcmread(file))
    file_set.write(tmp_path / "media")  # DICOMDIR + PT000000/ST000000/SE00000n/IM00000n (no suffix)
    dicomdir = tmp_path / "media" / "DICOMDIR"
    with pytest.raises(UsageError, match=f"holds 2 series: {second} .*; {first} "):
        read_volume(dicomdir)
    series = read_dicom(dicomdir, second)
    assert series.volume.source == dicomdir and series.volume.modality == "MR"
    assert np.array_equal(series.volume.array, read_dicom(tmp_path / "export", second).volume.array)
    shutil.copy(dicomdir, tmp_path / "export" / "DICOMDIR")
    assert read_dicom(tmp_path / "export", first).skipped == (tmp_path / "export" / "DICOMDIR",)
    (tmp_path / "media" / "PT000000" / "ST000000" / "SE000000" / "IM000000").unlink()
    with pytest.raises(TarganError, match="lists 1 file that does not exist"):
        read_dicom(dicomdir)


def test_a_single_dicom_image_file_asks_for_its_folder(tmp_path: Path) -> None:
    files = scanner_series(tmp_path / "s", _stored_ct((2, 6, 5)), names="none")
    with pytest.raises(TarganError, match="is a single DICOM file; pass the folder"):
        read_volume(files[0])


# ----------------------------------------------------------------------------- decoders


def _undecodable_syntax_series(folder: Path) -> Path:
    """A series whose pixel data claims MPEG-2 video, which pydicom has no decoder for."""
    files = scanner_series(folder, _stored_ct((2, 6, 5)))
    for file in files:
        dataset = pydicom.dcmread(file)
        dataset.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
        dataset["PixelData"].VR = "OB"
        dataset.file_meta.TransferSyntaxUID = MPEG2MPML
        dataset.save_as(file, enforce_file_format=True)
    return files[0]


def test_a_syntax_without_any_decoder_is_named(tmp_path: Path) -> None:
    _undecodable_syntax_series(tmp_path / "video")
    with pytest.raises(TarganError, match=r"its pixel data is in MPEG2 .*\(1\.2\.840\.10008\.1\.2\.4\.100\), which "
                                          r"pydicom cannot decode: convert the series"):
        read_volume(tmp_path / "video")


def test_a_missing_decoder_names_the_packages_that_add_one(tmp_path: Path) -> None:
    """The JPEG Lossless series read where python-gdcm and pylibjpeg are not installed (their import
    fails, as it does without them): one line naming the syntax and the packages."""
    files = scanner_series(tmp_path / "jpeg", _stored_ct(), syntax=JPEGLosslessSV1)
    code = ("import sys\n"
            "sys.modules.update(gdcm=None, pylibjpeg=None, libjpeg=None)\n"
            "from targan_cli.io.volume import read_volume\n"
            "from targan_cli.errors import TarganError\n"
            f"try:\n    read_volume({str(tmp_path / 'jpeg')!r})\n"
            "except TarganError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stderr == ""
    assert result.stdout.strip() in {
        f"{file}: its pixel data is in JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 "
        f"[Selection Value 1]) (1.2.840.10008.1.2.4.70) and no installed decoder reads it; install one of: gdcm - "
        "requires python-gdcm>=3.0.10; pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"
        for file in files}


# ----------------------------------------------------------------------------- bad tag values


def _rewrite(file: Path, monkeypatch: pytest.MonkeyPatch, **tags: object) -> None:
    """Write values that break the standard (pydicom refuses them unless told not to)."""
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)
    dataset = pydicom.dcmread(file)
    for keyword, value in tags.items():
        setattr(dataset, keyword, value)
    dataset.save_as(file, enforce_file_format=True)


@pytest.mark.parametrize(("tags", "message"), [
    ({"ImagePositionPatient": ["nan", "0", "0"]}, "has a ImagePositionPatient that is not a finite number (nan, 0, 0)"),
    ({"PixelSpacing": ["inf", "0.7"]}, "has a PixelSpacing that is not a finite number (inf, 0.7)"),
    ({"RescaleSlope": "NaN"}, "has a RescaleSlope that is not a finite number (nan)"),
    ({"RescaleIntercept": "-inf"}, "has a RescaleIntercept that is not a finite number (-inf)"),
    ({"ImageOrientationPatient": ["1", "0", "0", "0", "nan", "0"]},
     "has a ImageOrientationPatient that is not a finite number (1, 0, 0, 0, nan, 0)"),
    ({"Rows": 65535, "Columns": 65535},
     f"declares 65535 x 65535 pixels (Rows x Columns); a slice needs 1 to {MAX_SLICE_SIDE} of each"),
    ({"Rows": 4000, "Columns": 4000}, "declares 4000 x 4000 pixels of 16 bits (32000000 bytes) but its pixel data "
                                      "holds 60 bytes"),
])
def test_bad_tag_values_are_refused_naming_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   tags: dict, message: str) -> None:
    files = scanner_series(tmp_path / "s", _stored_ct((3, 6, 5)), names="uid", intercept=-1024)
    _rewrite(files[1], monkeypatch, **tags)
    with pytest.raises(TarganError) as error:
        read_volume(tmp_path / "s")
    assert error.value.path == files[1] and error.value.message.startswith(message)


def test_gantry_tilt_is_refused_with_its_angle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = scanner_series(tmp_path / "tilt", _stored_ct((4, 6, 5)), slice_step=2.5)
    for index, file in enumerate(files):  # each slice 2.5 * tan(15 deg) mm further posterior
        dataset = pydicom.dcmread(file)
        x, y, z = (float(v) for v in dataset.ImagePositionPatient)
        _rewrite(file, monkeypatch, ImagePositionPatient=[f"{x:g}", f"{y + index * 2.5 * np.tan(np.deg2rad(15)):.6f}",
                                                          f"{z:g}"])
    with pytest.raises(TarganError, match=rf"gantry tilt of 15\.00 degrees: {files[-1].name} lies 2\.01 mm off the "
                                          rf"slice normal through {files[0].name}; tilted series are not supported"):
        read_volume(tmp_path / "tilt")


def test_values_that_break_the_standard_harmlessly_are_read_without_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real exports hold such values (a UID with letters, an over-long description); pydicom warns on
    stderr when it converts them, which would be a second line beside the command's own."""
    files = scanner_series(tmp_path / "s", _stored_ct((3, 6, 5)), series_uid="1.2.3")
    for file in files:
        _rewrite(file, monkeypatch, SeriesInstanceUID="1.2.3.x7", SeriesDescription="D" * 80,
                 SliceThickness="2.50000000000000000")
    monkeypatch.undo()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        series = read_dicom(tmp_path / "s")
        assert is_volume_path(tmp_path / "s")
        write_dicom(tmp_path / "out", series.volume, source=series, modality="CT", description="synthetic ct")
    assert [str(w.message) for w in caught] == []
    assert read_dicom(tmp_path / "out").volume.shape == (5, 6, 3)


def test_slices_larger_than_the_deferred_read_size_are_read(tmp_path: Path) -> None:
    """Pixel data past pydicom's deferred-read size (every real CT and MR slice: 512 x 512 x 2 bytes)
    is checked for its length and read like a small one; a short one is still refused."""
    stored = _stored_ct((3, 64, 64))  # 8192 bytes a slice
    files = scanner_series(tmp_path / "big", stored, intercept=-1024)
    series = read_dicom(tmp_path / "big")
    assert np.array_equal(to_slices(series.volume)[0], stored.astype(np.int32) - 1024)
    dataset = pydicom.dcmread(files[1])
    dataset.PixelData = dataset.PixelData[: 64 * 32 * 2]
    dataset.save_as(files[1], enforce_file_format=True)
    with pytest.raises(TarganError, match="but its pixel data holds 4096 bytes") as error:
        read_dicom(tmp_path / "big")
    assert error.value.path == files[1]
