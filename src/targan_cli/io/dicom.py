"""DICOM series: found by content in a folder or a DICOMDIR, read into a ``Volume``.

A file is DICOM by its content, never by its name: the ``DICM`` preamble, or (files without a
preamble) a header that pydicom parses into a dataset with a SOP Class UID. Other files, and DICOM
objects that are not images (a DICOMDIR, reports), are skipped and counted. Files are grouped into
series by SeriesInstanceUID; several series are refused with a list to pick one from.

A series becomes a ``Volume`` whose array is (column, row, slice) of the DICOM pixel data in
stored units after RescaleSlope / RescaleIntercept (HU for CT), with the affine from
ImagePositionPatient, ImageOrientationPatient and PixelSpacing converted from LPS to RAS+.
Compressed transfer syntaxes are decoded by pydicom's pixel handlers: natively (RLE, deflate)
or through python-gdcm (JPEG, JPEG-LS, JPEG 2000), a declared dependency.
"""

from __future__ import annotations

import contextlib
import datetime
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.uid import (UID, CTImageStorage, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                         MRImageStorage, generate_uid)
from pydicom.valuerep import format_number_as_ds

from targan_cli.errors import TarganError, UsageError, counted
from targan_cli.io.atomic import atomic_output, check_writable
from targan_cli.io.volume import (INT16_RANGE, Volume, case_id, error_reason, is_integral, is_nifti_file, is_nifti_name,
                                  list_volumes, read_volume)

DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"  # Media Storage Directory Storage
# No CT or MR slice is this large (a 65535 x 65535 declaration is a damaged or hostile header).
MAX_SLICE_SIDE = 16384
# Elements larger than this (the pixel data) are read from the file only when used, so that
# scanning a folder of several series reads headers only.
_DEFER_BYTES = 4096
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """pydicom warns (to stderr) about values that break the standard, when it reads and converts
    them and when it writes them; the checks here name what matters in one error instead. Every
    public function that touches pydicom runs under it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _has_dicom_magic(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _header(path: Path) -> pydicom.Dataset | None:
    """The dataset of a DICOM file (large elements read when used); None for a file that is not DICOM.

    A file with the ``DICM`` preamble that pydicom cannot parse is a damaged DICOM file: an error.
    """
    magic = _has_dicom_magic(path)
    try:
        dataset = pydicom.dcmread(path, force=not magic, defer_size=_DEFER_BYTES)
    except Exception as error:  # pydicom raises many types for a damaged file
        if magic:
            raise TarganError(f"cannot read this DICOM file ({error_reason(error)})", path) from None
        return None
    if magic:
        return dataset
    if "SOPClassUID" not in dataset:  # what force=True makes of a text file or a thumbnail
        return None
    if "TransferSyntaxUID" not in dataset.file_meta:  # no file meta: the encoding pydicom found
        implicit, little = dataset.original_encoding
        dataset.file_meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return dataset


def _is_image(dataset: pydicom.Dataset) -> bool:
    """A DICOM image (possibly damaged), as opposed to a DICOMDIR, a report or a presentation state."""
    sop_class = UID(str(dataset.get("SOPClassUID", "")))
    return "PixelData" in dataset or "Rows" in dataset or sop_class.name.endswith("Image Storage")


def _candidates(folder: Path) -> list[Path]:
    """The files directly in a folder that may be DICOM: any name except hidden and NIfTI files."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and not is_nifti_name(p))


@_quiet()
def is_dicom_folder(folder: Path) -> bool:
    """Whether a folder directly holds at least one DICOM image file."""
    return any((header := _header(p)) is not None and _is_image(header) for p in _candidates(folder))


def _is_dicomdir(dataset: pydicom.Dataset) -> bool:
    """Whether a dataset is a DICOMDIR (a DICOM media directory), whatever its file's name."""
    return (str(dataset.file_meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS
            or "DirectoryRecordSequence" in dataset)


def dicom_series_folders(folder: Path) -> list[Path]:
    """The subfolders of a folder that directly hold DICOM images, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".") and is_dicom_folder(p))


def folder_cases(folder: Path, output: Path) -> list[Path]:
    """The cases of a folder input whose outputs go into the folder ``output``: its NIfTI files and
    DICOM series subfolders, sorted by name. An error when there is none, when two share a case id
    (``a.nii.gz`` beside a DICOM folder ``a``), or when ``output`` is a file."""
    files = sorted([*list_volumes(folder), *dicom_series_folders(folder)], key=lambda path: path.name)
    if not files:
        raise TarganError("no NIfTI (.nii / .nii.gz) files or DICOM series subfolders in this folder, and no "
                          "DICOM files directly in it", folder)
    seen: dict[str, Path] = {}
    for file in files:
        if case_id(file) in seen:
            raise TarganError(f"case {case_id(file)!r} is both {seen[case_id(file)].name} and {file.name}; "
                              "keep one", folder)
        seen[case_id(file)] = file
    if output.exists() and not output.is_dir():
        raise TarganError("the input is a folder, so the output must be a folder, but this is a file", output)
    return files


@dataclass(frozen=True)
class DicomSeries:
    """One series read from a folder or a DICOMDIR: the volume, and per slice (in the volume's
    slice order) its file and header (the dataset without its pixel data), for writing a derived series."""

    volume: Volume
    files: tuple[Path, ...]
    datasets: tuple[pydicom.Dataset, ...]
    skipped: tuple[Path, ...] = ()  # files beside the series that are not DICOM images

    @property
    def skipped_note(self) -> str | None:
        """One line saying which files were skipped, or None."""
        if not self.skipped:
            return None
        names = ", ".join(p.name for p in self.skipped[:3]) + (", ..." if len(self.skipped) > 3 else "")
        return f"skipped {counted(len(self.skipped), 'file')} that {'is' if len(self.skipped) == 1 else 'are'} not DICOM images ({names})"


def check_series_option(series: str | None, input: Path, single: bool) -> None:
    """``--series`` picks a series of one DICOM input: refused with a NIfTI file or a folder of cases."""
    if series is None:
        return
    if not single:
        raise UsageError("--series picks a series of one DICOM input; this folder holds several cases", input)
    if is_nifti_file(input):
        raise UsageError("--series picks a series of a DICOM input; this is a NIfTI file", input)


def read_input(path: Path, series: str | None = None) -> tuple[Volume, DicomSeries | None]:
    """A NIfTI file's volume, or a DICOM input's volume with its series (``series`` picks one of
    several, as ``read_dicom``)."""
    if is_nifti_file(path):
        return read_volume(path), None
    dicom = read_dicom(path, series)
    return dicom.volume, dicom


@_quiet()
def read_dicom(path: Path, series: str | None = None) -> DicomSeries:
    """Read one DICOM series from a folder (files directly in it) or a DICOMDIR file.

    ``series`` is a SeriesInstanceUID or a unique prefix of one; it is needed when the input
    holds several series, which are refused with a list (UID, description, modality, slices).
    """
    if path.is_dir():
        images, skipped = _scan(_candidates(path))
        if not images:
            subfolders = [p.name for p in dicom_series_folders(path)]
            if subfolders:
                raise TarganError(
                    f"no DICOM images directly in this folder; its subfolders {', '.join(subfolders)} "
                    "hold DICOM series: pass one of them", path)
            raise TarganError("no DICOM image files in this folder" +
                              (f" ({counted(len(skipped), 'other file')})" if skipped else ""), path)
    else:
        header = _header(path)
        if header is None:
            raise TarganError("not a volume: expected a .nii / .nii.gz file, a folder of DICOM files "
                              "or a DICOMDIR", path)
        if not _is_dicomdir(header):
            raise TarganError("is a single DICOM file; pass the folder that holds the whole series "
                              "(or its DICOMDIR)", path)
        images, skipped = _scan(_dicomdir_files(path, header))
        if not images:
            raise TarganError("this DICOMDIR lists no DICOM images", path)
    chosen = _pick_series(images, series, path)
    volume, order = _assemble(chosen, path)
    return DicomSeries(volume, tuple(chosen[i][0] for i in order), tuple(chosen[i][1] for i in order),
                       tuple(skipped))


@_quiet()
def read_dicom_series(files: Sequence[Path]) -> tuple[Volume, list[Path]]:
    """Read the given files of one DICOM series into a volume; also return the files in slice order.

    Slices are ordered by their position along the scan normal (never by file name) and
    ``RescaleSlope`` / ``RescaleIntercept`` are applied (HU for CT). The array's voxel order is
    (column, row, slice) of the DICOM pixel data, and the affine converts DICOM LPS to RAS+.
    """
    files = [Path(f) for f in files]
    if not files:
        raise TarganError("no DICOM files given")
    folder = files[0].parent
    images = []
    for file in files:
        header = _header(file)
        if header is None:
            raise TarganError("not a DICOM file", file)
        images.append((file, header))
    _pick_series(images, None, folder)  # refuses several series
    volume, order = _assemble(images, folder)
    return volume, [files[i] for i in order]


def _scan(files: Sequence[Path]) -> tuple[list[tuple[Path, pydicom.Dataset]], list[Path]]:
    """(DICOM images with their datasets, the other files)."""
    images, skipped = [], []
    for file in files:
        header = _header(file)
        if header is not None and _is_image(header):
            images.append((file, header))
        else:
            skipped.append(file)
    return images, skipped


def _dicomdir_files(path: Path, header: pydicom.Dataset) -> list[Path]:
    """The files a DICOMDIR's records reference (ReferencedFileID, relative to its folder), which
    must all exist and lie below that folder."""
    files = []
    for record in header.get("DirectoryRecordSequence", []):
        if "ReferencedFileID" not in record:  # patient, study and series records
            continue
        value = record.ReferencedFileID
        parts = [value] if isinstance(value, str) else list(value)
        if any(part in ("", ".", "..") or "/" in part or "\\" in part for part in parts):
            raise TarganError(f"references a file outside its folder ({'/'.join(parts)})", path)
        files.append(path.parent.joinpath(*parts))
    missing = [file for file in files if not file.is_file()]
    if missing:
        raise TarganError(f"lists {counted(len(missing), 'file')} that {'does' if len(missing) == 1 else 'do'} not exist, e.g. {missing[0]}", path)
    return files


def _series_key(dataset: pydicom.Dataset) -> str:
    return str(dataset.get("SeriesInstanceUID", "")).strip()


def _series_line(uid: str, images: list[tuple[Path, pydicom.Dataset]]) -> str:
    dataset = images[0][1]
    description = str(dataset.get("SeriesDescription", "")).strip() or "no description"
    modality = str(dataset.get("Modality", "")).strip() or "no modality"
    return f"{uid or '(no SeriesInstanceUID)'} ({description}, {modality}, {counted(len(images), 'slice')})"


def _pick_series(images: list[tuple[Path, pydicom.Dataset]], series: str | None,
                 where: Path) -> list[tuple[Path, pydicom.Dataset]]:
    """The images of one series. Some anonymisers (CHAOS's among them) give every file a series
    UID of its own, which says nothing: without ``series``, only UIDs shared by several files count."""
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for image in images:
        groups.setdefault(_series_key(image[1]), []).append(image)
    if series is None and (len(groups) == 1 or max(len(group) for group in groups.values()) == 1):
        return images
    listing = "; ".join(_series_line(uid, group) for uid, group in
                        sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])))
    if series is None:
        raise UsageError(f"holds {len(groups)} series: {listing}. Pick one with --series UID (or a unique "
                         "prefix of it), or put each series in its own folder", where)
    matches = [uid for uid in groups if uid == series] or [uid for uid in groups if uid.startswith(series)]
    if len(matches) != 1:
        found = "no series" if not matches else f"{len(matches)} series"
        raise UsageError(f"--series {series} matches {found} here; the series are: {listing}", where)
    return groups[matches[0]]


def _assemble(images: list[tuple[Path, pydicom.Dataset]], where: Path) -> tuple[Volume, list[int]]:
    """The volume of one series' images, and the images' indices in slice order."""
    slices = [_read_dicom_slice(file, dataset) for file, dataset in images]
    first = slices[0]
    for other in slices[1:]:
        _check_same_series(first, other, where)
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    positions = np.array([s.position @ normal for s in slices])
    order = [int(i) for i in np.argsort(positions, kind="stable")]
    slices = [slices[i] for i in order]
    positions = positions[order]
    step_vector = _slice_step(slices, positions, normal, where)

    first = slices[0]  # now the first slice along the normal: the volume's origin
    row_spacing, column_spacing = first.pixel_spacing
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = first.orientation[:3] * column_spacing  # along a row: the column index
    affine_lps[:3, 1] = first.orientation[3:] * row_spacing  # down a column: the row index
    affine_lps[:3, 2] = step_vector
    affine_lps[:3, 3] = first.position
    array = _stack_pixels(slices)
    volume = Volume(array, _LPS_TO_RAS @ affine_lps, None, first.modality or None, where)
    return volume, order


@dataclass(frozen=True)
class _DicomSlice:
    file: Path
    dataset: pydicom.Dataset
    orientation: np.ndarray  # (6,) row direction cosines, then column direction cosines (LPS)
    position: np.ndarray  # (3,) ImagePositionPatient (LPS mm)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    size: tuple[int, int]  # (Rows, Columns)
    modality: str  # the Modality tag as written, "" when absent
    slope: float
    intercept: float


def _read_dicom_slice(file: Path, dataset: pydicom.Dataset) -> _DicomSlice:
    """A slice's geometry and rescale, every value checked (finite, sizes sane) before any pixel is read."""
    missing = [tag for tag in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing",
                               "Rows", "Columns", "PixelData") if tag not in dataset]
    if missing:
        raise TarganError(f"lacks {', '.join(missing)}, needed to place the slice in space", file)
    try:
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
        samples = int(dataset.get("SamplesPerPixel", 1) or 1)
        size = (int(dataset.Rows), int(dataset.Columns))
        orientation = np.array([float(v) for v in dataset.ImageOrientationPatient])
        position = np.array([float(v) for v in dataset.ImagePositionPatient])
        pixel_spacing = tuple(float(v) for v in dataset.PixelSpacing)
        slope = float(dataset.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(dataset.get("RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError) as error:
        raise TarganError(f"has a malformed geometry, size or rescale tag ({error_reason(error)})", file) from None
    if frames > 1:
        raise TarganError("is a multi-frame DICOM file; only one-slice-per-file series are supported", file)
    if samples != 1:
        raise TarganError("is a colour image; a grey-scale CT or MR series is needed", file)
    if orientation.shape != (6,) or position.shape != (3,) or len(pixel_spacing) != 2:
        raise TarganError("has malformed ImageOrientationPatient / ImagePositionPatient / PixelSpacing", file)
    for name, values in (("ImageOrientationPatient", orientation), ("ImagePositionPatient", position),
                         ("PixelSpacing", pixel_spacing), ("RescaleSlope", [slope]),
                         ("RescaleIntercept", [intercept])):
        if not np.all(np.isfinite(values)):
            shown = ", ".join(f"{v:g}" for v in values)
            raise TarganError(f"has a {name} that is not a finite number ({shown})", file)
    if not min(pixel_spacing) > 0:
        raise TarganError(f"has an invalid PixelSpacing {list(pixel_spacing)}", file)
    if not min(size) >= 1 or max(size) > MAX_SLICE_SIDE:
        raise TarganError(f"declares {size[0]} x {size[1]} pixels (Rows x Columns); a slice needs 1 to "
                          f"{MAX_SLICE_SIDE} of each", file)
    _check_pixel_data_length(file, dataset, size)
    row_direction, column_direction = orientation[:3], orientation[3:]
    if not (np.allclose(np.linalg.norm(row_direction), 1, atol=1e-3)
            and np.allclose(np.linalg.norm(column_direction), 1, atol=1e-3)
            and abs(row_direction @ column_direction) < 1e-3):
        raise TarganError(f"has an invalid ImageOrientationPatient {orientation.tolist()}: "
                          "two orthogonal unit vectors are needed", file)
    modality = str(dataset.get("Modality", "")).strip().upper()
    return _DicomSlice(
        file=file, dataset=dataset, orientation=orientation, position=position,
        pixel_spacing=pixel_spacing,  # type: ignore[arg-type]
        size=size, modality=modality, slope=slope, intercept=intercept,
    )


def _check_pixel_data_length(file: Path, dataset: pydicom.Dataset, size: tuple[int, int]) -> None:
    """Uncompressed pixel data must hold Rows x Columns pixels: checked before anything is allocated."""
    syntax = dataset.file_meta.get("TransferSyntaxUID")
    if syntax is None or UID(syntax).is_compressed:
        return
    bits = int(dataset.get("BitsAllocated", 16) or 16)
    needed = size[0] * size[1] * bits // 8
    element = dataset.get_item("PixelData")  # raw as read; a converted element once its value was decoded
    length = element.length if hasattr(element, "length") else len(element.value or b"")
    if length != 0xFFFFFFFF and length < needed:
        raise TarganError(f"declares {size[0]} x {size[1]} pixels of {bits} bits ({needed} bytes) but its pixel "
                          f"data holds {length} bytes", file)


def _check_same_series(first: _DicomSlice, other: _DicomSlice, folder: Path) -> None:
    def differ(what: str, a: object, b: object) -> TarganError:
        return TarganError(
            f"holds several series: {first.file.name} and {other.file.name} differ in {what} "
            f"({a} vs {b}); put each series in its own folder", folder)

    if not np.allclose(first.orientation, other.orientation, atol=1e-4):
        raise differ("orientation", first.orientation.round(4).tolist(), other.orientation.round(4).tolist())
    if first.size != other.size:
        raise differ("image size", first.size, other.size)
    if not np.allclose(first.pixel_spacing, other.pixel_spacing, rtol=1e-4):
        raise differ("pixel spacing", first.pixel_spacing, other.pixel_spacing)
    if first.modality != other.modality:
        raise differ("Modality", first.modality or "none", other.modality or "none")


def _slice_step(slices: list[_DicomSlice], positions: np.ndarray, normal: np.ndarray,
                folder: Path) -> np.ndarray:
    """The (3,) LPS vector from one slice to the next; duplicate or missing slices are errors."""
    if len(slices) == 1:
        thickness = float(getattr(slices[0].dataset, "SpacingBetweenSlices", 0) or
                          getattr(slices[0].dataset, "SliceThickness", 0) or 1.0)
        return normal * thickness
    gaps = np.diff(positions)
    scale = max(abs(positions[-1] - positions[0]), 1.0)
    for index, gap in enumerate(gaps):
        if gap < 1e-4 * scale:
            raise TarganError(
                f"holds several series or duplicate slices: {slices[index].file.name} and "
                f"{slices[index + 1].file.name} share the slice position {positions[index]:.3f} mm; "
                "put each series in its own folder", folder)
    step = float(np.median(gaps))
    # 10 % tolerance: positions are stored as decimal strings of limited precision.
    for index, gap in enumerate(gaps):
        if abs(gap - step) > 0.1 * step:
            raise TarganError(
                f"uneven slice spacing (missing slices, or a second series): a gap of {gap:.3f} mm between "
                f"{slices[index].file.name} and {slices[index + 1].file.name} (positions "
                f"{positions[index]:.3f} and {positions[index + 1]:.3f} mm; the usual step is {step:.3f} mm)",
                folder)
    _check_no_tilt(slices, normal, folder)
    return (slices[-1].position - slices[0].position) / (len(slices) - 1)


def _check_no_tilt(slices: list[_DicomSlice], normal: np.ndarray, folder: Path) -> None:
    """Refuse a gantry tilt: slice positions that move across the slice plane, not along its normal.
    (Such a grid is sheared; SimpleITK and most tools would misplace it.) 0.01 mm plus 0.1 % of the
    distance along the normal allow for positions written as rounded decimal strings."""
    offsets = np.array([s.position - slices[0].position for s in slices])
    along = offsets @ normal
    across = np.linalg.norm(offsets - along[:, None] * normal, axis=1)
    worst = int(np.argmax(across - 1e-3 * np.abs(along)))
    if across[worst] > 0.01 + 1e-3 * abs(along[worst]):
        degrees = np.degrees(np.arctan2(across[worst], abs(along[worst])))
        raise TarganError(
            f"gantry tilt of {degrees:.2f} degrees: {slices[worst].file.name} lies {across[worst]:.2f} mm off the "
            f"slice normal through {slices[0].file.name}; tilted series are not supported, resample it to an "
            "untilted grid first (e.g. dcm2niix's tilt correction, then translate the NIfTI)", folder)


def _stack_pixels(slices: list[_DicomSlice]) -> np.ndarray:
    """Pixel data in stored units, (Columns, Rows, Z): int16 when exact, float32 otherwise."""
    rows, columns = slices[0].size
    array = np.empty((columns, rows, len(slices)), dtype=np.float32)
    for index, item in enumerate(slices):
        try:
            pixels = item.dataset.pixel_array
        except Exception as error:  # a missing decoder for a compressed transfer syntax, damaged data
            raise TarganError(_decode_problem(item.dataset, error), item.file) from None
        if pixels.shape != (rows, columns):
            raise TarganError(f"pixel data of shape {pixels.shape} does not match Rows x Columns", item.file)
        array[:, :, index] = (pixels.astype(np.float64) * item.slope + item.intercept).T
        del item.dataset.PixelData  # and pydicom's decoded copy: only the header is kept
    integral = all(float(s.slope).is_integer() and float(s.intercept).is_integer() for s in slices)
    if integral and INT16_RANGE[0] <= array.min() and array.max() <= INT16_RANGE[1]:
        return array.astype(np.int16)
    return array



def _decode_problem(dataset: pydicom.Dataset, error: BaseException) -> str:
    """Why pixel data cannot be decoded: a transfer syntax without an installed decoder (named,
    with the packages that add one, as pydicom lists them) or damaged data."""
    syntax = UID(str(dataset.file_meta.get("TransferSyntaxUID", "")))
    if syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            return (f"its pixel data is in {syntax.name} ({syntax}), which pydicom cannot decode: convert the "
                    "series to an uncompressed transfer syntax first (e.g. gdcmconv --raw)")
        if not decoder.is_available:
            packages = "; ".join(line.replace("gdcm - requires gdcm", "gdcm - requires python-gdcm")
                                 for line in decoder.missing_dependencies)
            return f"its pixel data is in {syntax.name} ({syntax}) and no installed decoder reads it; install one of: {packages}"
    return f"cannot decode the pixel data ({error_reason(error)})"


# ----------------------------------------------------------------------------- writing


# Patient, Patient Study and General Study module attributes copied from the source series.
_PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "OtherPatientIDsSequence",
    "PatientAge", "PatientSize", "PatientWeight", "PatientComments",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "StudyDescription",
)
_TYPE_2_STUDY_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                          "ReferringPhysicianName", "StudyID", "AccessionNumber")
_SOP_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage}
# The third value of ImageType that each IOD requires (CT: AXIAL or LOCALIZER; MR: a defined term).
_IMAGE_TYPE_VALUE_3 = {"CT": "AXIAL", "MR": "OTHER"}
_UINT16_MAX = int(np.iinfo(np.uint16).max)
_LONG_STRING_MAX = 64  # LO: SeriesDescription
_SLICE_NAME = re.compile(r"IM\d{5}\.dcm")  # the files write_dicom makes
SERIES_KIND = "DICOM series"  # the kind of folder write_dicom makes
_MANUFACTURER = "targan-cli"  # in every file write_dicom makes: how check_series_folder knows them
# "Source image for image processing operation" (DICOM CID 7202).
_SOURCE_PURPOSE = ("121322", "DCM", "Source image for image processing operation")


def _decimal(value: float) -> str:
    """A number as a DICOM decimal string (DS: at most 16 characters)."""
    return format_number_as_ds(float(value))


def _ds(values: Sequence[float]) -> list[str]:
    return [_decimal(v) for v in values]


@dataclass(frozen=True)
class Quantisation:
    """How real values become 16-bit stored values: real = stored * slope + intercept."""

    stored: np.ndarray  # int16 or uint16, the volume's shape
    slope: float
    intercept: float

    @property
    def signed(self) -> bool:
        return self.stored.dtype == np.int16


def quantise(array: np.ndarray) -> Quantisation:
    """16-bit stored values for real values: exact for integers that fit int16 (HU); otherwise
    uint16 over [min, max], so that the error is at most slope / 2 = range / 131070 (far below 0.5 %
    of the range). Slope and intercept are rounded to what a DICOM decimal string (DS) holds first,
    so that a reader computes the same real values."""
    if not np.all(np.isfinite(array)):
        raise ValueError("cannot store NaN or infinite values")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if INT16_RANGE[0] <= low and high <= INT16_RANGE[1] and is_integral(array):
        return Quantisation(array.astype(np.int16), 1.0, 0.0)
    intercept = float(_decimal(low))
    slope = float(_decimal((high - intercept) / _UINT16_MAX)) if high > intercept else 1.0
    while (high - intercept) / slope > _UINT16_MAX:  # rounding the slope down would overflow
        slope = float(_decimal(slope * (1 + 1e-7)))
    stored = np.clip(np.rint((array.astype(np.float64) - intercept) / slope), 0, _UINT16_MAX)
    return Quantisation(stored.astype(np.uint16), slope, intercept)


@dataclass(frozen=True)
class _SliceGeometry:
    position: list[str]  # ImagePositionPatient as DS strings
    orientation: list[str]  # ImageOrientationPatient
    pixel_spacing: list[str]
    slice_thickness: str


def _copied_geometry(source: DicomSeries, shape: tuple[int, int, int]) -> list[_SliceGeometry]:
    """The source slices' own geometry tags, as written (no rounding through floats)."""
    first = source.datasets[0]
    expected = (int(first.Columns), int(first.Rows), len(source.datasets))
    if shape != expected:
        raise ValueError(f"volume of shape {shape} does not fit its source series {expected} (Columns, Rows, slices)")
    return [_SliceGeometry([str(v) for v in d.ImagePositionPatient], [str(v) for v in d.ImageOrientationPatient],
                           [str(v) for v in d.PixelSpacing], str(d.get("SliceThickness", "") or ""))
            for d in source.datasets]


def _lps_grid(volume: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The volume in LPS voxel order, (columns: patient right -> left, rows: anterior -> posterior,
    slices: inferior -> superior), the axial display of DICOM; and its LPS affine."""
    transform = ornt_transform(io_orientation(volume.affine), axcodes2ornt(("L", "P", "S")))
    array = apply_orientation(volume.array, transform)
    return array, _LPS_TO_RAS @ volume.affine @ inv_ornt_aff(transform, volume.shape)


def _affine_geometry(affine_lps: np.ndarray, depth: int, where: Path | None) -> list[_SliceGeometry]:
    """Slice geometry from an LPS affine whose third axis is the slice axis."""
    column_step, row_step, slice_step = (affine_lps[:3, axis] for axis in range(3))
    directions = affine_lps[:3, :3] / np.linalg.norm(affine_lps[:3, :3], axis=0)
    if np.abs(directions.T @ directions - np.eye(3)).max() > 1e-4:
        raise TarganError("the affine's axes are not perpendicular (a sheared grid), which DICOM slices cannot "
                          "describe; resample the volume to a grid with perpendicular axes first", where)
    row_direction, column_direction = directions[:, 0], directions[:, 1]
    normal = np.cross(row_direction, column_direction)
    orientation = _ds([*row_direction, *column_direction])
    spacing = _ds([np.linalg.norm(row_step), np.linalg.norm(column_step)])
    thickness = _decimal(abs(float(slice_step @ normal)))
    return [_SliceGeometry(_ds((affine_lps @ [0, 0, k, 1])[:3]), orientation, spacing, thickness)
            for k in range(depth)]


def _slice_name(index: int) -> str:
    return f"IM{index + 1:05d}.dcm"


def is_targan_series(folder: Path) -> bool:
    """Whether ``folder`` holds only a series ``write_dicom`` wrote: slice files by its names, each
    one made by targan (its Manufacturer). A DICOM folder carries no marker file, which PACS tools
    would take for a broken instance, so this is how --overwrite knows it."""
    entries = list(folder.iterdir())
    if not all(_SLICE_NAME.fullmatch(entry.name) and entry.is_file() for entry in entries):
        return False
    try:
        return all(pydicom.dcmread(entry, stop_before_pixels=True).get("Manufacturer") == _MANUFACTURER
                   for entry in entries)
    except (OSError, pydicom.errors.InvalidDicomError, ValueError):
        return False


def check_series_folder(folder: str | Path, overwrite: bool, inputs: Sequence[str | Path] = ()) -> Path:
    """Refuse, before any work, a DICOM output folder that may not be written: what ``check_writable``
    refuses, which (even with ``overwrite``) includes a folder holding anything but a series this
    writer made, so that --overwrite never deletes someone else's files."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TarganError("exists and is not a folder; a DICOM series is written as a folder", folder)
    folder = check_writable(folder, overwrite, inputs, is_dir=True, kind=SERIES_KIND, ours=is_targan_series)
    return folder


@_quiet()
def write_dicom(folder: str | Path, volume: Volume, *, source: DicomSeries | None, modality: str,
                description: str, window: tuple[float, float] | None = None, software: str = "",
                overwrite: bool = False) -> Path:
    """Write ``volume`` (real values: HU for CT) as a derived DICOM series, one file per slice, into
    ``folder`` atomically (a temporary folder renamed into place).

    With a ``source`` series (whose grid the volume must be on) every slice keeps its source's
    geometry tags as written and the FrameOfReferenceUID, the Patient and Study modules are copied,
    and each slice points at its source instance (Source Image Sequence). Without one (a NIfTI
    input), the geometry comes from the affine (slices in LPS order) and the study and patient are
    new and anonymous. Series and instance UIDs are always new. ``modality`` is "CT" (CT Image
    Storage) or "MR" (MR Image Storage); ``description`` goes into SeriesDescription (cut to 64
    characters) and DerivationDescription; ``window`` (low, high) becomes the default display window.
    """
    folder = check_series_folder(folder, overwrite)
    if modality not in _SOP_CLASSES:
        raise ValueError(f"a derived series is CT or MR, not {modality!r}")
    with atomic_output(folder, overwrite=overwrite, is_dir=True, kind=SERIES_KIND, ours=is_targan_series) as temporary:
        save_dicom(temporary, volume, source=source, modality=modality, description=description, window=window,
                   software=software)
    return folder


@_quiet()
def save_dicom(temporary: Path, volume: Volume, *, source: DicomSeries | None, modality: str,
               description: str, window: tuple[float, float] | None = None, software: str = "") -> None:
    """``write_dicom``'s slice files, saved straight into the existing, empty folder ``temporary``:
    the name an atomic writer of several outputs (io.provenance.write_with_sidecar) gave it."""
    if modality not in _SOP_CLASSES:
        raise ValueError(f"a derived series is CT or MR, not {modality!r}")
    if source is not None:
        array = volume.array
        geometry = _copied_geometry(source, volume.shape)
        template = source.datasets[0]
    else:
        array, affine_lps = _lps_grid(volume)
        geometry = _affine_geometry(affine_lps, array.shape[2], volume.source)
        template = None
    quantised = quantise(array)
    low, high = window if window is not None else (float(array.min()), float(array.max()))
    series = _series_attributes(template, modality, description, software, quantised, (low, high))
    for index, slice_geometry in enumerate(geometry):
        dataset = _slice_dataset(series, slice_geometry, quantised.stored[:, :, index].T, index,
                                 source.datasets[index] if source is not None else None)
        dataset.save_as(temporary / _slice_name(index), enforce_file_format=True)


def _series_attributes(template: pydicom.Dataset | None, modality: str, description: str, software: str,
                       quantised: Quantisation, window: tuple[float, float]) -> pydicom.Dataset:
    """The attributes every slice of the derived series shares."""
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    series = pydicom.Dataset()
    if template is not None and "SpecificCharacterSet" in template:
        series.SpecificCharacterSet = template.SpecificCharacterSet
    else:
        series.SpecificCharacterSet = "ISO_IR 192"  # UTF-8: a weights folder's name may need it
    series.ImageType = ["DERIVED", "SECONDARY", _IMAGE_TYPE_VALUE_3[modality]]
    series.InstanceCreationDate, series.InstanceCreationTime = date, time
    series.SOPClassUID = _SOP_CLASSES[modality]
    if template is not None:
        for keyword in _PATIENT_STUDY_KEYWORDS:
            if keyword in template:
                setattr(series, keyword, template[keyword].value)
        series.FrameOfReferenceUID = template.get("FrameOfReferenceUID") or generate_uid()
        series.PositionReferenceIndicator = template.get("PositionReferenceIndicator", "")
        number = int(template.get("SeriesNumber", 0) or 0)
    else:  # a NIfTI input: a new, anonymous study
        series.PatientName, series.PatientID = "anonymous", "anonymous"
        series.StudyInstanceUID = generate_uid()
        series.StudyDate, series.StudyTime = date, time
        series.FrameOfReferenceUID = generate_uid()
        series.PositionReferenceIndicator = ""
        number = 0
    for keyword in _TYPE_2_STUDY_KEYWORDS:  # type 2: present, empty when unknown
        if keyword not in series:
            setattr(series, keyword, "")
    series.SeriesInstanceUID = generate_uid()
    series.SeriesNumber = number + 1000
    series.SeriesDate, series.SeriesTime = date, time
    series.ContentDate, series.ContentTime = date, time
    series.Modality = modality
    for keyword in ("Laterality", "PatientPosition"):  # type 2C in CT and MR images: copied, or empty
        setattr(series, keyword, template.get(keyword, "") if template is not None else "")
    series.SeriesDescription = description[:_LONG_STRING_MAX]
    series.DerivationDescription = description
    series.Manufacturer = _MANUFACTURER
    series.SoftwareVersions = software
    series.BurnedInAnnotation = "NO"
    if template is not None and str(template.get("LossyImageCompression", "")) == "01":
        series.LossyImageCompression = "01"  # a derived image keeps its source's lossy history
    series.SamplesPerPixel = 1
    series.PhotometricInterpretation = "MONOCHROME2"
    series.BitsAllocated, series.BitsStored, series.HighBit = 16, 16, 15
    series.PixelRepresentation = int(quantised.signed)
    series.RescaleIntercept = _decimal(quantised.intercept)
    series.RescaleSlope = _decimal(quantised.slope)
    series.WindowCenter = _decimal((window[0] + window[1]) / 2)
    series.WindowWidth = _decimal(max(window[1] - window[0], 1.0))
    if modality == "CT":
        series.KVP = ""
        series.AcquisitionNumber = ""
    else:  # a synthetic MR image has no acquisition: research mode, no sequence variant
        series.ScanningSequence = "RM"
        series.SequenceVariant = "NONE"
        series.ScanOptions = ""
        series.MRAcquisitionType = "2D"
        series.RepetitionTime = ""
        series.EchoTime = ""
        series.EchoTrainLength = ""
    return series


def _slice_dataset(series: pydicom.Dataset, geometry: _SliceGeometry, pixels: np.ndarray, index: int,
                   source: pydicom.Dataset | None) -> pydicom.Dataset:
    dataset = pydicom.Dataset()
    dataset.update(series)
    dataset.SOPInstanceUID = generate_uid()
    dataset.InstanceNumber = index + 1
    dataset.ImagePositionPatient = geometry.position
    dataset.ImageOrientationPatient = geometry.orientation
    dataset.PixelSpacing = geometry.pixel_spacing
    dataset.SliceThickness = geometry.slice_thickness
    dataset.Rows, dataset.Columns = pixels.shape
    if source is not None:
        reference = pydicom.Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        purpose = pydicom.Dataset()
        purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning = _SOURCE_PURPOSE
        reference.PurposeOfReferenceCodeSequence = [purpose]
        dataset.SourceImageSequence = [reference]
    dataset.PixelData = np.ascontiguousarray(pixels).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta = meta
    return dataset
