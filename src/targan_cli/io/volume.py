"""Volumes with their geometry: NIfTI and DICOM-series reading, NIfTI writing, canonical slicing.

A ``Volume`` keeps the file's own voxel order and stored units together with the affine that
maps voxel indices to RAS+ world millimetres (the nibabel convention). ``to_slices`` turns any
voxel order into the one orientation the model sees, ``from_slices`` turns model output back.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from isal import igzip
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from targan_cli.errors import TarganError, UsageError, counted
from targan_cli.io.atomic import atomic_output
from targan_cli.process import quiet_logger

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Canonical slices (Z, H, W): slices inferior -> superior, rows anterior -> posterior, columns
# patient right -> left: the DICOM display convention for axial images.
CANONICAL_AXCODES = ("S", "P", "L")
# Deflate cannot compress better than about 1032:1, so a .nii.gz smaller than this fraction of
# its declared data cannot hold it.
_MAX_DEFLATE_RATIO = 1032
INT16_RANGE = (np.iinfo(np.int16).min, np.iinfo(np.int16).max)
# A slice is padded to a square for the networks: at most this many bytes (float32) per slice,
# 16384 x 16384. An absurd shape (1 x 200000 x 1) is refused before the square is allocated.
_MAX_SLICE_BYTES = 1 << 30
_FLOAT32_MAX = float(np.finfo(np.float32).max)
# nibabel logs the header fixes it makes on load ("pixdim[1,2,3] should be non-zero; setting 0
# dims to 1") to stderr. (Its own LoggingOutputSuppressor removes the handler, and Python's
# last-resort handler prints anyway: the logger is disabled instead.)
_NIBABEL_LOGGER = nib.imageglobals.logger.name
GZIP_LEVEL = 1
"""ISA-L's deflate level of written .nii.gz files (0-3; chosen with bench/folder.py --levels: on a
512 x 512 x 80 float32 output, 0.15 s against 0.87 s for zlib's level 1, and no larger)."""


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image in the file's own voxel order and stored units, with its geometry.

    ``array`` holds HU for CT and raw values for MR; ``affine`` (4, 4) maps voxel indices to RAS+
    world mm; ``header`` is the source NIfTI header (qform/sform codes, units), kept for writing.
    """

    array: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header | nib.Nifti2Header | None = None
    modality: str | None = None  # the DICOM Modality tag ("CT", "MR", "PT"...); None when unknown
    source: Path | None = None

    def __post_init__(self) -> None:
        if self.array.ndim != 3:
            raise ValueError(f"a volume array must be 3D, got shape {self.array.shape}")
        affine = np.array(self.affine, dtype=np.float64)
        if affine.shape != (4, 4):
            raise ValueError(f"an affine must be (4, 4), got {affine.shape}")
        object.__setattr__(self, "affine", affine)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along each array axis."""
        sizes = np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))
        return tuple(float(s) for s in sizes)  # type: ignore[return-value]

    def with_array(self, array: np.ndarray) -> Volume:
        """The same geometry, header and modality around a new array of the same shape."""
        if array.shape != self.array.shape:
            raise ValueError(f"new array shape {array.shape} differs from the volume's {self.array.shape}")
        return Volume(array, self.affine.copy(), self.header, self.modality, self.source)


# ----------------------------------------------------------------------------- paths


def _nifti_suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((suffix for suffix in NIFTI_SUFFIXES if name.endswith(suffix)), None)


def is_nifti_name(path: str | Path) -> bool:
    """Whether ``path``'s name ends in .nii or .nii.gz (any case)."""
    return _nifti_suffix(Path(path)) is not None


def is_nifti_file(path: str | Path) -> bool:
    """Whether ``path`` is an existing file named .nii or .nii.gz: a NIfTI input, not a DICOM one."""
    return Path(path).is_file() and is_nifti_name(path)


def check_nifti_output(path: str | Path, what: str = "the output") -> Path:
    """Refuse, before any work, an output name that is not ``<name>.nii.gz`` or ``<name>.nii``."""
    path = Path(path)
    suffix = _nifti_suffix(path)
    if suffix is None or len(path.name) == len(suffix):
        raise UsageError(f"{what} is a NIfTI file: name it NAME.nii.gz or NAME.nii", path)
    return path


def is_volume_path(path: str | Path) -> bool:
    """True for a .nii / .nii.gz file or a folder that directly holds DICOM files."""
    from targan_cli.io.dicom import is_dicom_folder  # io.dicom builds Volumes: imported when used

    path = Path(path)
    if path.is_dir():
        return is_dicom_folder(path)
    return is_nifti_file(path)


def case_id(path: str | Path) -> str:
    """A case's name: the file name without .nii / .nii.gz, or a DICOM folder's name."""
    path = Path(path)
    suffix = _nifti_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem if path.is_file() else path.name


def list_volumes(folder: str | Path) -> list[Path]:
    """The NIfTI files directly in a folder, sorted by name (hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TarganError("not a folder" if folder.exists() else "folder not found", folder)
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith(".") and _nifti_suffix(p) is not None)
    for entry in entries:
        if entry.is_symlink() and not entry.exists():
            raise TarganError(f"is a symbolic link to {os.readlink(entry)}, which does not exist or loops: fix or "
                              "remove the link", entry)
    files = [p for p in entries if p.is_file()]
    seen: dict[str, Path] = {}
    for file in files:
        case = case_id(file)
        if case in seen:
            raise TarganError(
                f"case {case!r} has two files, {seen[case].name} and {file.name}; keep one", folder)
        seen[case] = file
    return files


# ----------------------------------------------------------------------------- reading


def read_volume(path: str | Path) -> Volume:
    """Read a .nii / .nii.gz file, or a folder holding one DICOM series."""
    path = Path(path)
    if not path.exists():
        raise TarganError("not found", path)
    if path.is_file() and _nifti_suffix(path) is not None:
        return _read_nifti(path)
    from targan_cli.io.dicom import read_dicom  # io.dicom builds Volumes: imported when used

    return read_dicom(path).volume


def _read_nifti(path: Path) -> Volume:
    try:
        size = path.stat().st_size
        with path.open("rb"):  # readable (permissions), before nibabel hides why it is not
            pass
    except OSError as error:
        raise TarganError(f"cannot read: {error.strerror or error}", path) from None
    if size == 0:
        raise TarganError("empty file (0 bytes)", path)
    try:  # nibabel, gzip and zlib raise many exception types for a damaged header
        with quiet_logger(_NIBABEL_LOGGER):
            image = nib.load(path)
    except Exception as error:
        raise TarganError(f"not a readable NIfTI file ({error_reason(error)})", path) from None
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise TarganError(f"not a NIfTI image (nibabel reads it as {type(image).__name__})", path)
    header = image.header
    shape = tuple(int(n) for n in header.get_data_shape())
    _check_declared_size(path, header, shape, size)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise TarganError(
            f"holds {int(np.prod(shape[3:]))} volumes (shape {shape}); pass a single 3D volume", path)
    if len(shape) < 3:
        raise TarganError(f"is {len(shape)}D (shape {shape}); a 3D volume is needed", path)
    try:  # a truncated or corrupt gzip stream fails only here
        array = _voxels(image, path)
    except Exception as error:
        raise TarganError(
            f"cannot read the voxel data, the file is damaged or truncated ({error_reason(error)})", path
        ) from None
    array = np.asarray(array).reshape(shape)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise TarganError(
            f"voxel type {array.dtype} is not supported; a scalar integer or float image is needed", path)
    if np.issubdtype(array.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise TarganError(f"{counted(bad, 'voxel')} {'is' if bad == 1 else 'are'} NaN or infinite", path)
        largest = max(-float(array.min()), float(array.max()))
        if largest > _FLOAT32_MAX:  # float64 data, or a huge scl_slope
            raise TarganError(f"holds values up to {largest:.3g} in magnitude, beyond float32's range "
                              f"({_FLOAT32_MAX:.3g}): check its scaling (scl_slope) or its values", path)
    affine = image.affine
    if affine is None or not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise TarganError(f"has no usable orientation (affine {np.round(affine, 3).tolist()})", path)
    return Volume(array, affine, header.copy(), None, path)


def _voxels(image: nib.Nifti1Image, path: Path) -> np.ndarray:
    """The image's stored voxels (scaled by scl_slope/scl_inter as nibabel does); a .nii.gz is
    inflated by ISA-L (igzip), about 3x faster than zlib, which nibabel would use."""
    if _nifti_suffix(path) != ".nii.gz":
        return np.asanyarray(image.dataobj)
    with igzip.open(path, "rb") as stream:
        return np.asanyarray(type(image).from_file_map({"image": nib.FileHolder(fileobj=stream)}).dataobj)


def save_nifti(image: nib.Nifti1Image, path: Path, level: int | None = None) -> None:
    """``nib.save``, with a .nii.gz deflated by ISA-L at ``level`` (None: ``GZIP_LEVEL``): a standard
    gzip stream without a name or time in its header, so that equal images give equal files (as
    nibabel's)."""
    if _nifti_suffix(path) != ".nii.gz":
        nib.save(image, path)
        return
    level = GZIP_LEVEL if level is None else level
    with path.open("wb") as raw, igzip.GzipFile(filename="", mode="wb", compresslevel=level, fileobj=raw,
                                                  mtime=0) as stream:
        image.to_file_map({"image": nib.FileHolder(fileobj=stream)})


def _check_declared_size(path: Path, header: nib.Nifti1Header, shape: tuple[int, ...], size: int) -> None:
    """Compare the dims the header declares with what the file can hold, before loading data."""
    if not shape or any(n < 1 for n in shape):
        raise TarganError(f"declares an empty image (dims {shape})", path)
    declared = int(np.prod(shape, dtype=object)) * header.get_data_dtype().itemsize
    offset = int(header.get_data_offset())
    if _nifti_suffix(path) == ".nii":
        if offset + declared > size:
            raise TarganError(
                f"declares {shape} voxels ({offset + declared} bytes) but the file has only {size} bytes: "
                "it is truncated or its header is wrong", path)
    elif offset + declared > size * _MAX_DEFLATE_RATIO:
        raise TarganError(
            f"declares {shape} voxels ({offset + declared} bytes), more than a {size}-byte "
            "compressed file can hold: its header is wrong", path)
    working = int(np.prod(shape, dtype=object)) * 4  # as float32 slices, the smallest working copy
    memory = _physical_memory()
    if memory is not None and working > memory:
        raise TarganError(f"declares {shape} voxels, {_gib(working)} as float32, more than this machine's "
                          f"memory ({_gib(memory)}); refused before allocating it", path)


def error_reason(error: BaseException) -> str:
    """A library exception in one line for a user error: its type and the first line of its text."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


# ----------------------------------------------------------------------------- writing


def write_volume(path: str | Path, volume: Volume, *, label: bool = False, overwrite: bool = False,
                 descrip: str | None = None, intent_name: str | None = None) -> Path:
    """Write a volume as NIfTI in its source's geometry: the source header's qform, sform, codes,
    units and NIfTI version when the volume's affine is still the header's; else the affine as
    scanner coordinates (qform and sform code 1).

    The on-disk type is uint8 for labels, int16 when every value is an integer that fits
    (e.g. rounded HU), float32 otherwise. Nothing is rounded here. ``descrip`` and ``intent_name``
    replace the header's (a synthetic volume says so there).
    """
    path = check_nifti_output(path)
    image = _nifti_image(volume, label, descrip, intent_name)
    with atomic_output(path, overwrite=overwrite, kind="volume") as temporary:
        save_nifti(image, temporary)
    return path


def save_volume(temporary: Path, volume: Volume, *, descrip: str | None = None,
                intent_name: str | None = None) -> None:
    """``write_volume``'s file, saved straight into ``temporary``: the name an atomic writer of
    several files (io.provenance.write_with_sidecar) gave it, which moves it into place."""
    save_nifti(_nifti_image(volume, False, descrip, intent_name), temporary)


def _nifti_image(volume: Volume, label: bool, descrip: str | None, intent_name: str | None) -> nib.Nifti1Image:
    array = _output_array(volume.array, label)
    source = volume.header
    if source is not None and np.allclose(source.get_best_affine(), volume.affine, rtol=0, atol=1e-9):
        # The source's geometry as it is: qform and sform each with its own matrix and code (they
        # may differ, or both be unset), pixdim, units, NIfTI-1 or NIfTI-2, trailing unit dims.
        declared = tuple(int(n) for n in source.get_data_shape())
        if declared[:3] == array.shape and all(n == 1 for n in declared[3:]):
            array = array.reshape(declared)
        image_class = nib.Nifti2Image if isinstance(source, nib.Nifti2Header) else nib.Nifti1Image
        image = image_class(array, None, source.copy())
    else:  # a DICOM series (scanner coordinates), or a header that no longer fits the affine
        with quiet_logger(_NIBABEL_LOGGER):  # a NIfTI-2 header's size is "fixed" for NIfTI-1, and logged
            header = nib.Nifti1Header.from_header(source) if source is not None else nib.Nifti1Header()
        if source is None:
            header.set_xyzt_units("mm", "sec")
        image = nib.Nifti1Image(array, volume.affine, header)
        image.header.set_qform(volume.affine, code=1)
        image.header.set_sform(volume.affine, code=1)
    image.header.set_data_dtype(array.dtype)
    image.header.set_slope_inter(np.nan, np.nan)
    image.header["cal_min"] = image.header["cal_max"] = 0
    if descrip is not None:
        image.header["descrip"] = descrip.encode("ascii", "replace")[:80]
    if intent_name is not None:
        image.header["intent_name"] = intent_name.encode("ascii", "replace")[:16]
    return image


def _output_array(array: np.ndarray, label: bool) -> np.ndarray:
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"cannot write voxel type {array.dtype}")
    low, high = (array.min(), array.max()) if array.size else (0, 0)
    if not (np.isfinite(low) and np.isfinite(high)):  # a NaN makes both NaN
        raise ValueError("cannot write a volume with NaN or infinite values")
    if label:
        if low < 0 or high > 255 or not is_integral(array):
            raise ValueError(f"a label volume needs integers in [0, 255], got values in [{low}, {high}]")
        return array.astype(np.uint8, copy=False)
    if INT16_RANGE[0] <= low and high <= INT16_RANGE[1] and is_integral(array):
        return array.astype(np.int16, copy=False)
    return array.astype(np.float32, copy=False)


def is_integral(array: np.ndarray, chunk: int = 1 << 20) -> bool:
    """Whether every value is a whole number; a float volume is looked at a million voxels at a
    time, and a synthetic one stops at its first fraction."""
    if np.issubdtype(array.dtype, np.integer):
        return True
    flat = array.reshape(-1, order="A")
    return all(np.all(np.mod(flat[start:start + chunk], 1) == 0) for start in range(0, flat.size, chunk))


# ----------------------------------------------------------------------------- orientation


GRID_TOLERANCE_MM = 1e-3  # two files on one voxel grid may differ by header rounding only


def _grid(volume: Volume) -> str:
    return f"shape {volume.shape}, voxel size {[round(v, 3) for v in volume.spacing]} mm"


def read_on_grid(path: str | Path, image: Volume, what: str = "label") -> Volume:
    """Read a volume that must lie on ``image``'s voxel grid (a label, a paired rendering, a
    prediction); another grid is a TarganError naming both files."""
    volume = read_volume(path)
    if volume.shape != image.shape or not np.allclose(volume.affine, image.affine, rtol=0,
                                                      atol=GRID_TOLERANCE_MM):
        raise TarganError(f"{what} grid ({_grid(volume)}) differs from its image {image.source} ({_grid(image)}); "
                          f"a {what} must be on its image's voxel grid", path)
    return volume


def read_label(path: str | Path, image: Volume | None = None, what: str = "label") -> Volume:
    """A target mask as uint8 0/1 (any non-zero voxel is target), on ``image``'s grid if given.

    Several different non-zero values mean several structures (CHAOS MR ground truth also marks
    the kidneys and the spleen), which one binary target would silently merge: refused.
    """
    label = read_on_grid(path, image, what) if image is not None else read_volume(path)
    mask = label.array != 0
    foreground = label.array[mask]
    if foreground.size and foreground.min() != foreground.max():
        values = np.unique(foreground)
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (" ..." if values.size > 6 else "")
        raise TarganError(f"holds {values.size} different non-zero values ({shown}); a target label has one "
                          "(0 background, anything else target). `targan data import-chaos` writes such labels",
                          path)
    return label.with_array(mask.astype(np.uint8))


@dataclass(frozen=True)
class SliceFrame:
    """How a volume's voxel order maps to canonical slices, to invert ``to_slices`` exactly."""

    shape: tuple[int, int, int]  # the volume's array shape (file voxel order)
    orientation: tuple[tuple[float, float], ...]  # nibabel ornt of the array axes: (world axis, flip)

    @property
    def _to_canonical(self) -> np.ndarray:
        return ornt_transform(np.array(self.orientation), axcodes2ornt(CANONICAL_AXCODES))

    @property
    def canonical_shape(self) -> tuple[int, int, int]:
        """The (Z, H, W) shape of the canonical slices."""
        transform = self._to_canonical
        shape = [0, 0, 0]
        for axis, (target, _) in enumerate(transform):
            shape[int(target)] = self.shape[axis]
        return tuple(shape)  # type: ignore[return-value]


def slice_frame(shape: tuple[int, ...], affine: np.ndarray, source: Path | None = None) -> SliceFrame:
    """The frame of a volume with this array shape and affine (oblique: the nearest axes)."""
    orientation = io_orientation(affine)
    if np.isnan(orientation).any():
        raise TarganError(f"the affine has no usable orientation ({np.round(affine, 3).tolist()})", source)
    frame = SliceFrame(tuple(int(n) for n in shape[:3]), tuple((float(a), float(f)) for a, f in orientation))
    _, height, width = frame.canonical_shape
    square = max(height, width)
    if square * square * 4 > _MAX_SLICE_BYTES:
        raise TarganError(f"its slices are {height} x {width} voxels: padded to a square for the model, one slice "
                          f"would take {_gib(square * square * 4)} of memory (at most {_gib(_MAX_SLICE_BYTES)}); "
                          "refused before allocating it", source)
    return frame


def _gib(size: int) -> str:
    return f"{size / 2 ** 30:.1f} GiB"


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):  # not POSIX
        return None


def canonical_depth(path: str | Path) -> int:
    """How many canonical slices a volume file holds, from a NIfTI header alone when possible."""
    path = Path(path)
    if _nifti_suffix(path) is not None:
        try:
            with quiet_logger(_NIBABEL_LOGGER):
                image = nib.load(path)
            if len(image.shape) == 3 or (len(image.shape) == 4 and image.shape[3] == 1):
                return slice_frame(image.shape, image.affine, path).canonical_shape[0]
        except Exception:  # a damaged or odd file: read_volume names the problem below
            pass
    volume = read_volume(path)
    return slice_frame(volume.shape, volume.affine, path).canonical_shape[0]


def to_slices(volume: Volume) -> tuple[np.ndarray, SliceFrame]:
    """The volume as canonical axial slices (Z, H, W) float32, and the frame to invert it.

    Z runs inferior -> superior, H anterior -> posterior, W patient right -> left (DICOM display).
    Oblique volumes use their nearest axes; nothing is resampled, so the mapping is exact.
    """
    frame = slice_frame(volume.shape, volume.affine, volume.source)
    slices = apply_orientation(volume.array, frame._to_canonical)
    return np.ascontiguousarray(slices, dtype=np.float32), frame


def from_slices(slices: np.ndarray, frame: SliceFrame) -> np.ndarray:
    """Canonical slices (Z, H, W) back in the volume's voxel order and shape (dtype kept), in
    Fortran order: NIfTI's order on disk, and the transposed slices' own (a cheaper copy)."""
    if slices.shape != frame.canonical_shape:
        raise ValueError(f"slices of shape {slices.shape} do not fit the frame's {frame.canonical_shape}")
    back = ornt_transform(axcodes2ornt(CANONICAL_AXCODES), np.array(frame.orientation))
    return np.asfortranarray(apply_orientation(slices, back))
