"""Small real NIfTI files and DICOM series for tests (written with nibabel and pydicom).

``anatomy()`` is a canonical (Z, H, W) phantom: slices inferior -> superior, rows anterior ->
posterior, columns patient right -> left. ``oriented()`` lays it out in any voxel order with the
matching affine; ``write_dicom_series()`` writes it as an axial series as displayed, one
``write_dicom_slice()`` per file.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.orientations import axcodes2ornt, inv_ornt_aff, ornt_transform
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

CANONICAL_AXCODES = ("S", "P", "L")


def anatomy(shape: tuple[int, int, int] = (5, 12, 10), seed: int = 0) -> np.ndarray:
    """An asymmetric integer phantom (Z, H, W) in HU-like units: no flip or transpose maps it to itself."""
    rng = np.random.default_rng(seed)
    z, h, w = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    body = (((h - shape[1] / 2) / (shape[1] / 2.5)) ** 2 + ((w - shape[2] / 2) / (shape[2] / 2.5)) ** 2) < 1
    values = np.where(body, 40 + 7 * z + 3 * h - 2 * w, -1000)
    values = values + rng.integers(-5, 6, size=shape)
    return values.astype(np.int16)


def canonical_affine(shape: tuple[int, int, int], spacing: tuple[float, float, float] = (2.5, 0.8, 0.7),
                     origin: tuple[float, float, float] = (30.0, 40.0, -50.0)) -> np.ndarray:
    """The RAS+ affine of a canonical (Z, H, W) array; ``spacing`` is (slice, row, column) mm.

    Voxel (0, 0, 0) is the inferior, anterior, patient-right corner at RAS ``origin``.
    """
    affine = np.eye(4)
    affine[:3, 0] = (0.0, 0.0, spacing[0])  # Z: towards superior (+S)
    affine[:3, 1] = (0.0, -spacing[1], 0.0)  # H: towards posterior (-A)
    affine[:3, 2] = (-spacing[2], 0.0, 0.0)  # W: towards patient left (-R)
    affine[:3, 3] = origin
    return affine


def oriented(canonical: np.ndarray, axcodes: Sequence[str], affine: np.ndarray | None = None,
             ) -> tuple[np.ndarray, np.ndarray]:
    """The canonical array in the voxel order ``axcodes`` (e.g. "RAS", "LPS", "ASL"), with its affine."""
    affine = canonical_affine(canonical.shape) if affine is None else affine
    transform = ornt_transform(axcodes2ornt(CANONICAL_AXCODES), axcodes2ornt(tuple(axcodes)))
    array = nib.orientations.apply_orientation(canonical, transform)
    return np.ascontiguousarray(array), affine @ inv_ornt_aff(transform, canonical.shape)


def rotation(degrees: float, axis: int) -> np.ndarray:
    """A (4, 4) rotation about a world axis through the origin."""
    angle = np.deg2rad(degrees)
    cosine, sine = np.cos(angle), np.sin(angle)
    first, second = [a for a in range(3) if a != axis]
    matrix = np.eye(4)
    matrix[first, first] = matrix[second, second] = cosine
    matrix[first, second], matrix[second, first] = -sine, sine
    return matrix


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray, *, qform_code: int = 0,
                sform_code: int = 2, dtype: np.dtype | type | None = None) -> Path:
    """A NIfTI file with the given affine and qform/sform codes."""
    image = nib.Nifti1Image(array, affine, dtype=dtype or array.dtype)
    image.header.set_qform(affine, code=qform_code)
    image.header.set_sform(affine, code=sform_code)
    nib.save(image, path)
    return path


def write_dicom_series(
    folder: Path,
    stored: np.ndarray,
    *,
    slope: float = 1.0,
    intercept: float = 0.0,
    modality: str = "CT",
    pixel_spacing: tuple[float, float] = (0.8, 0.7),
    slice_step: float = 2.5,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    origin_lps: Sequence[float] = (-30.0, -40.0, -50.0),
    shuffle_seed: int | None = 0,
    skip: Sequence[int] = (),
    series_uid: str | None = None,
) -> list[Path]:
    """Write stored pixel values (Z, Rows, Columns), one slice per file, as a DICOM series.

    Slice k sits at ``origin_lps + k * slice_step * normal``. File names are shuffled (when
    ``shuffle_seed`` is set) so that name order is not slice order; each file carries its own
    series UID, as anonymised CHAOS data does, unless ``series_uid`` is given to all of them.
    ``skip`` leaves slices out (missing slices).
    Returns the files in slice order (skipped ones excluded).
    """
    folder.mkdir(parents=True, exist_ok=True)
    orientation = np.asarray(orientation, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    names = [f"IMG{index:04d}.dcm" for index in range(len(stored))]
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(names)
    signed = bool(stored.min() < 0)
    files = []
    for index, (name, pixels) in enumerate(zip(names, stored)):
        if index in skip:
            continue
        position = np.asarray(origin_lps, dtype=float) + index * slice_step * normal
        files.append(write_dicom_slice(folder / name, pixels, position, modality=modality, rescale=(slope, intercept),
                                       pixel_spacing=pixel_spacing, orientation=orientation, signed=signed,
                                       instance_number=index + 1, series_uid=series_uid))
    return files


def write_dicom_slice(
    path: Path,
    pixels: np.ndarray,
    position_lps: Sequence[float],
    *,
    modality: str = "CT",
    rescale: tuple[float, float] | None = (1.0, 0.0),
    pixel_spacing: tuple[float, float] = (0.8, 0.7),
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    slice_thickness: float = 2.5,
    signed: bool | None = None,
    instance_number: int | None = None,
    series_uid: str | None = None,
) -> Path:
    """Write one slice of stored pixel values (Rows, Columns) as a DICOM file; returns ``path``.

    The SOP class is CT Image Storage for ``modality`` "CT", MR Image Storage otherwise. The file
    carries its own series and study UIDs, as anonymised CHAOS data does (or ``series_uid``). ``rescale`` is
    (RescaleSlope, RescaleIntercept), or None to leave both tags out (as MR files do). ``signed``
    (default: whether any pixel is negative) picks int16 or uint16 pixel data.
    """
    sop_class = CTImageStorage if modality == "CT" else MRImageStorage
    signed = bool(pixels.min() < 0) if signed is None else signed
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = sop_class
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.SeriesInstanceUID = series_uid or generate_uid()
    dataset.StudyInstanceUID = generate_uid()
    dataset.Modality = modality
    if instance_number is not None:
        dataset.InstanceNumber = instance_number
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.PixelSpacing = [f"{v:g}" for v in pixel_spacing]
    dataset.ImageOrientationPatient = [f"{v:.6g}" for v in orientation]
    dataset.ImagePositionPatient = [f"{v:.6f}" for v in position_lps]
    dataset.SliceThickness = f"{slice_thickness:g}"
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = int(signed)
    if rescale is not None:
        dataset.RescaleSlope, dataset.RescaleIntercept = (f"{v:g}" for v in rescale)
    dataset.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path
