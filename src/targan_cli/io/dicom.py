"""DICOM series reading: files found in a folder, slices ordered and placed in space.

A series becomes a ``Volume`` whose array is (column, row, slice) of the DICOM pixel data in
stored units after RescaleSlope / RescaleIntercept (HU for CT), with the affine from
ImagePositionPatient, ImageOrientationPatient and PixelSpacing converted from LPS to RAS+.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from targan_cli.errors import TarganError
from targan_cli.io.volume import _INT16_RANGE, Volume, _reason

DICOM_SUFFIX = ".dcm"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _has_dicom_magic(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def _is_dicom_file(path: Path) -> bool:
    """A .dcm file, or a file without a suffix that starts like DICOM (scanner exports)."""
    if path.name.startswith(".") or not path.is_file():
        return False
    if path.suffix.lower() == DICOM_SUFFIX:
        return True
    return path.suffix == "" and _has_dicom_magic(path)


def dicom_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_dicom_file(p))


def read_dicom(path: Path) -> Volume:
    """Read a folder holding one DICOM series; a file that is not NIfTI is refused by name."""
    if path.is_dir():
        files = dicom_files(path)
        if not files:
            series_folders = sorted(p.name for p in path.iterdir() if p.is_dir() and dicom_files(p))
            if series_folders:
                raise TarganError(
                    f"no DICOM files directly in this folder; its subfolders {', '.join(series_folders)} "
                    "hold DICOM series: pass one of them", path)
            raise TarganError("no DICOM (.dcm) files in this folder", path)
        return read_dicom_series(files)[0]
    if path.suffix.lower() == DICOM_SUFFIX or _has_dicom_magic(path):
        raise TarganError("is a single DICOM file; pass the folder that holds the whole series", path)
    raise TarganError("not a volume: expected a .nii / .nii.gz file or a folder of DICOM files", path)


def read_dicom_series(files: Sequence[Path]) -> tuple[Volume, list[Path]]:
    """Read the files of one DICOM series into a volume; also return the files in slice order.

    Slices are ordered by their position along the scan normal (never by file name) and
    ``RescaleSlope`` / ``RescaleIntercept`` are applied (HU for CT). The array's voxel order is
    (column, row, slice) of the DICOM pixel data, and the affine converts DICOM LPS to RAS+.
    """
    files = [Path(f) for f in files]
    if not files:
        raise TarganError("no DICOM files given")
    folder = files[0].parent
    slices = [_read_dicom_slice(file) for file in files]
    first = slices[0]
    for other in slices[1:]:
        _check_same_series(first, other, folder)
    _check_one_series_uid(slices, folder)
    normal = np.cross(first.orientation[:3], first.orientation[3:])
    positions = np.array([s.position @ normal for s in slices])
    order = np.argsort(positions, kind="stable")
    slices = [slices[i] for i in order]
    positions = positions[order]
    step_vector = _slice_step(slices, positions, normal, folder)

    first = slices[0]  # now the first slice along the normal: the volume's origin
    row_spacing, column_spacing = first.pixel_spacing
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = first.orientation[:3] * column_spacing  # along a row: the column index
    affine_lps[:3, 1] = first.orientation[3:] * row_spacing  # down a column: the row index
    affine_lps[:3, 2] = step_vector
    affine_lps[:3, 3] = first.position
    array = _stack_pixels(slices)
    volume = Volume(array, _LPS_TO_RAS @ affine_lps, None, first.modality or None, folder)
    return volume, [s.file for s in slices]


@dataclass(frozen=True)
class _DicomSlice:
    file: Path
    dataset: pydicom.Dataset
    orientation: np.ndarray  # (6,) row direction cosines, then column direction cosines (LPS)
    position: np.ndarray  # (3,) ImagePositionPatient (LPS mm)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    size: tuple[int, int]  # (Rows, Columns)
    modality: str  # the Modality tag as written, "" when absent
    series_uid: str  # SeriesInstanceUID, "" when absent
    slope: float
    intercept: float


def _read_dicom_slice(file: Path) -> _DicomSlice:
    try:
        dataset = pydicom.dcmread(file)
    except InvalidDicomError:
        raise TarganError("not a DICOM file", file) from None
    except Exception as error:  # pydicom raises many types for a damaged file
        raise TarganError(f"cannot read this DICOM file ({_reason(error)})", file) from None
    missing = [tag for tag in ("ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing",
                               "Rows", "Columns", "PixelData") if tag not in dataset]
    if missing:
        raise TarganError(f"lacks {', '.join(missing)}, needed to place the slice in space", file)
    if int(getattr(dataset, "NumberOfFrames", 1) or 1) > 1:
        raise TarganError("is a multi-frame DICOM file; only one-slice-per-file series are supported", file)
    if int(getattr(dataset, "SamplesPerPixel", 1)) != 1:
        raise TarganError("is a colour image; a grey-scale CT or MR series is needed", file)
    try:
        orientation = np.array([float(v) for v in dataset.ImageOrientationPatient])
        position = np.array([float(v) for v in dataset.ImagePositionPatient])
        pixel_spacing = tuple(float(v) for v in dataset.PixelSpacing)
        slope = float(getattr(dataset, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(dataset, "RescaleIntercept", 0.0) or 0.0)
    except (TypeError, ValueError) as error:
        raise TarganError(f"has a malformed geometry or rescale tag ({_reason(error)})", file) from None
    if orientation.shape != (6,) or position.shape != (3,) or len(pixel_spacing) != 2:
        raise TarganError("has malformed ImageOrientationPatient / ImagePositionPatient / PixelSpacing", file)
    if not min(pixel_spacing) > 0:
        raise TarganError(f"has an invalid PixelSpacing {list(pixel_spacing)}", file)
    row_direction, column_direction = orientation[:3], orientation[3:]
    if not (np.allclose(np.linalg.norm(row_direction), 1, atol=1e-3)
            and np.allclose(np.linalg.norm(column_direction), 1, atol=1e-3)
            and abs(row_direction @ column_direction) < 1e-3):
        raise TarganError(f"has an invalid ImageOrientationPatient {orientation.tolist()}: "
                          "two orthogonal unit vectors are needed", file)
    modality = str(getattr(dataset, "Modality", "")).strip().upper()
    return _DicomSlice(
        file=file, dataset=dataset, orientation=orientation, position=position,
        pixel_spacing=pixel_spacing,  # type: ignore[arg-type]
        size=(int(dataset.Rows), int(dataset.Columns)),
        modality=modality, series_uid=str(getattr(dataset, "SeriesInstanceUID", "")).strip(),
        slope=slope, intercept=intercept,
    )


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


def _check_one_series_uid(slices: list[_DicomSlice], folder: Path) -> None:
    """Refuse files of several series by SeriesInstanceUID. Some anonymisers (CHAOS's among them)
    give every file a UID of its own, which says nothing: only UIDs shared by several files count."""
    counts = Counter(s.series_uid for s in slices if s.series_uid)
    if len(counts) > 1 and max(counts.values()) > 1:
        groups = " and ".join(f"{count} file(s) of {uid}" for uid, count in counts.most_common(2))
        more = f" (and {len(counts) - 2} more)" if len(counts) > 2 else ""
        raise TarganError(f"holds {len(counts)} series by SeriesInstanceUID: {groups}{more}; "
                          "put each series in its own folder", folder)


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
    # The mean step vector keeps a gantry tilt (positions not along the normal) as a shear.
    return (slices[-1].position - slices[0].position) / (len(slices) - 1)


def _stack_pixels(slices: list[_DicomSlice]) -> np.ndarray:
    """Pixel data in stored units, (Columns, Rows, Z): int16 when exact, float32 otherwise."""
    rows, columns = slices[0].size
    array = np.empty((columns, rows, len(slices)), dtype=np.float32)
    for index, item in enumerate(slices):
        try:
            pixels = item.dataset.pixel_array
        except Exception as error:  # a missing decoder for a compressed transfer syntax, damaged data
            raise TarganError(f"cannot decode the pixel data ({_reason(error)})", item.file) from None
        if pixels.shape != (rows, columns):
            raise TarganError(f"pixel data of shape {pixels.shape} does not match Rows x Columns", item.file)
        array[:, :, index] = (pixels.astype(np.float64) * item.slope + item.intercept).T
    integral = all(float(s.slope).is_integer() and float(s.intercept).is_integer() for s in slices)
    if integral and _INT16_RANGE[0] <= array.min() and array.max() <= _INT16_RANGE[1]:
        return array.astype(np.int16)
    return array

