"""The DATA folder layout, and the cached training slices built from it.

```
DATA/
  dataset.json                                   modalities (ordered) with intensity settings; optional
  <split>/<modality>/images/<case>.nii.gz        split is "train" or "test"
  <split>/<modality>/labels/<case>.nii.gz        target mask (non-zero = target), same grid as the image
  <split>/<modality>/paired/<other>/<case>.nii.gz  the same case rendered in another modality (optional)
```

``load_slices`` turns every volume of a split into model-sized canonical slices once and keeps
them as memory-mapped ``.npy`` files under ``DATA/.cache`` (or a cache folder of the caller's),
keyed by a hash of the input files and every setting that shapes the slices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # not on Windows: the cache is then built without a lock
    fcntl = None

from targan_cli.config import DatasetSpec, IntensitySettings, ModalitySpec, default_modalities, read_json
from targan_cli.core.intensity import (BODY_MIN_FRACTION, BODY_THRESHOLD, body_mask, fit_reference_high,
                                       normalize, robust_high)
from targan_cli.core.slicing import plane_fit, to_model
from targan_cli.errors import TarganError, UsageError
from targan_cli.io.atomic import atomic_output
from targan_cli.io.volume import NIFTI_SUFFIXES, case_id, read_label, read_volume, to_slices

SPLITS = ("train", "test")
DATASET_JSON = "dataset.json"
CACHE_FOLDER = ".cache"
CACHE_FORMAT_VERSION = 1  # bump when the cached arrays or their preprocessing change
IMAGES, LABELS, PAIRED = "images", "labels", "paired"
# Case ids become output file names: a letter or digit first, then no spaces or path characters.
_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
# Label grids may differ by float rounding of the affine (float32 NIfTI headers), not more.
_SLICE_ARRAYS = {"images": np.float32, "labels": np.uint8, "bodies": np.uint8}  # each (M, S, S)
_CACHE_ARRAYS = (*_SLICE_ARRAYS, "modality", "case_index")

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Case:
    """One image volume of the dataset with its optional target mask and paired renderings."""

    case_id: str
    modality: str
    split: str
    image: Path
    label: Path | None
    paired: dict[str, Path]  # other modality -> the same case rendered in it, on this image's grid


@dataclass(frozen=True)
class DataDir:
    """An opened DATA folder: its root and its dataset.json (read or inferred)."""

    root: Path
    spec: DatasetSpec

    def cases(self, split: str, modality: str | None = None) -> list[Case]:
        """The cases of a split (all modalities in spec order, or one), each modality's sorted by id."""
        if split not in SPLITS:
            raise UsageError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
        names = self.spec.modality_names
        if modality is not None and modality not in names:
            raise UsageError(f"unknown modality {modality!r}; this dataset has {', '.join(names)}")
        selected = names if modality is None else (modality,)
        return [case for name in selected for case in _modality_cases(self, split, name)]


def open_data_dir(root: str | Path) -> DataDir:
    """Open a DATA folder and check its whole layout; every problem is a TarganError naming the path.

    Without dataset.json the modalities are the folder names under train/ and test/, sorted, with
    default intensity settings (a name containing "ct" is a CT).
    """
    root = Path(root)
    if not root.is_dir():
        raise TarganError("not a folder" if root.exists() else "dataset folder not found", root)
    folders = {split: _modality_folders(root, split) for split in SPLITS}
    found = sorted(set(folders["train"]) | set(folders["test"]))
    spec_file = root / DATASET_JSON
    if spec_file.exists():
        _check_inside(root, spec_file)
        try:
            spec = DatasetSpec.from_dict(read_json(spec_file))
        except TarganError as error:
            raise TarganError(error.message, error.path or spec_file) from None
        for split, names in folders.items():
            unknown = [name for name in names if name not in spec.modality_names]
            if unknown:
                raise TarganError(f"modality folder(s) {', '.join(unknown)} are not listed in dataset.json "
                                  f"(which lists {', '.join(spec.modality_names)})", root / split)
    else:
        if not found:
            raise TarganError("no modalities: expected train/<modality>/images/ or test/<modality>/images/ "
                              "folders (or a dataset.json)", root)
        try:
            spec = DatasetSpec(modalities=default_modalities(tuple(found)))
        except TarganError as error:
            raise TarganError(f"{error.message}; add folders or a dataset.json", root) from None
    data = DataDir(root, spec)
    for split in SPLITS:
        data.cases(split)  # reads the whole listing once, so layout errors surface here
    return data


def _modality_folders(root: Path, split: str) -> list[str]:
    folder = root / split
    if not folder.exists():
        return []
    _check_folder(root, folder)
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_inside(root: Path, path: Path) -> None:
    """Refuse paths that leave the dataset (symlinks pointing elsewhere, ``..`` in names)."""
    if ".." in path.relative_to(root).parts or not path.resolve().is_relative_to(root.resolve()):
        raise TarganError(f"points outside the dataset folder (to {path.resolve()})", path)


def _check_folder(root: Path, folder: Path) -> None:
    _check_inside(root, folder)
    if not folder.is_dir():
        raise TarganError("is not a folder", folder)


def _nifti_files(root: Path, folder: Path) -> dict[str, Path]:
    """A folder's NIfTI files by case id (none when it is absent); any other non-hidden entry is an error."""
    if not folder.exists():
        return {}
    _check_folder(root, folder)
    files: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        _check_inside(root, entry)
        if not entry.is_file() or not entry.name.lower().endswith(NIFTI_SUFFIXES):
            raise TarganError("is not a .nii / .nii.gz file; this folder may hold only NIfTI volumes", entry)
        case = case_id(entry)
        if not _CASE_ID.match(case):
            raise TarganError(f"case name {case!r} is not usable: it must start with a letter or digit and "
                              "hold only letters, digits and . _ + -", entry)
        if case in files:
            raise TarganError(f"case {case!r} has two files, {files[case].name} and {entry.name}; keep one",
                              folder)
        files[case] = entry
    return files


def _modality_cases(data: DataDir, split: str, modality: str) -> list[Case]:
    root = data.root
    folder = root / split / modality
    if not folder.exists():
        return []
    _check_folder(root, folder)
    for entry in folder.iterdir():
        if not entry.name.startswith(".") and entry.name not in (IMAGES, LABELS, PAIRED):
            raise TarganError(f"unexpected {entry.name!r}: a modality folder holds only {IMAGES}/, "
                              f"{LABELS}/ and {PAIRED}/", entry)
    images = _nifti_files(root, folder / IMAGES)
    labels = _nifti_files(root, folder / LABELS)
    for case, label in labels.items():
        if case not in images:
            raise TarganError(f"label of case {case!r} has no image in {IMAGES}/", label)
    paired: dict[str, dict[str, Path]] = {}
    if (folder / PAIRED).exists():
        _check_folder(root, folder / PAIRED)
        for other in sorted(p for p in (folder / PAIRED).iterdir() if not p.name.startswith(".")):
            others = [name for name in data.spec.modality_names if name != modality]
            if not other.is_dir() or other.name not in others:
                raise TarganError(f"{PAIRED}/ may hold only folders named after the other modalities "
                                  f"({', '.join(others)})", other)
            paired[other.name] = _nifti_files(root, other)
            for case, file in paired[other.name].items():
                if case not in images:
                    raise TarganError(f"paired rendering of case {case!r} has no image in {IMAGES}/", file)
    return [
        Case(case, modality, split, image, labels.get(case),
             {other: files[case] for other, files in paired.items() if case in files})
        for case, image in sorted(images.items())
    ]


# ----------------------------------------------------------------------------- slices


@dataclass(frozen=True, eq=False)
class SliceSet:
    """Preprocessed model-sized slices of one split, all modalities (memory-mapped from the cache)."""

    images: np.ndarray  # (M, S, S) float32 in [-1, 1]
    labels: np.ndarray  # (M, S, S) uint8 0/1 target mask
    bodies: np.ndarray  # (M, S, S) uint8 0/1 body mask
    modality: np.ndarray  # (M,) int64 index into `modalities`
    case_index: np.ndarray  # (M,) int64 index into `case_ids`
    case_ids: tuple[str, ...]  # "modality/case"
    modalities: tuple[ModalitySpec, ...]  # MR reference_high fitted on these volumes where it was None

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def digest(self, chunk: int = 256) -> str:
        """A fingerprint of the content (SHA-256 of the case ids, modality indices, images and
        labels; about 1 s per 1.4 GB): equal for the same data wherever the files lie."""
        hasher = hashlib.sha256(json.dumps(self.case_ids).encode())
        for array in (self.modality, self.case_index):
            hasher.update(np.ascontiguousarray(array).data)
        for start in range(0, len(self), chunk):
            for array in (self.images, self.labels):
                hasher.update(np.ascontiguousarray(array[start:start + chunk]).data)
        return hasher.hexdigest()[:20]


def load_slices(data: DataDir, split: str, image_size: int, cache_dir: Path | None = None,
                progress: Progress | None = None) -> SliceSet:
    """All slices of a split, preprocessed for the model; built once, then read from the cache.

    Each volume is read once: canonical slices, normalised with its modality's intensity
    settings, padded to a square and resized to ``image_size`` (bilinear, fill -1; masks nearest),
    then the body mask is taken. The cache lives in ``cache_dir`` (default ``DATA/.cache``) as
    ``slices-<split>-<hash>/``; any change of a file or setting gives a new hash. ``progress``
    advances by one per volume.
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise UsageError(f"image size must be a positive integer, got {image_size!r}")
    cases = data.cases(split)
    if not cases:
        raise TarganError(f"no {split} cases: expected {split}/<modality>/{IMAGES}/<case>.nii.gz files",
                          data.root)
    digest = _cache_digest(data, split, image_size, cases)
    cache_root = Path(cache_dir) if cache_dir is not None else data.root / CACHE_FOLDER
    folder = cache_root / f"slices-{split}-{digest}"
    cached = _open_cache(folder, digest)
    if cached is None:
        new_cache_root = not cache_root.exists()
        try:
            with _exclusive(cache_root):
                cached = _open_cache(folder, digest)  # another process may have built it meanwhile
                if cached is None:
                    with atomic_output(folder, overwrite=folder.exists(), is_dir=True, kind="slice cache",
                                       command="train") as temporary:
                        _build_cache(temporary, data, cases, image_size, digest, progress)
                    cached = _open_cache(folder, digest)
                    if cached is None:
                        raise TarganError("the slice cache just written cannot be read back", folder)
                    return cached
        except BaseException:
            if new_cache_root:  # a failed first build leaves the DATA folder as it was
                with contextlib.suppress(OSError):
                    cache_root.rmdir()
            raise
    if progress is not None:
        progress(len(cases))
    return cached


@contextlib.contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    """Create ``folder`` if missing and hold an exclusive lock on it while the block runs, so that
    two processes needing the same cache build it once: the second waits, then reads it. A POSIX
    advisory lock (flock) on the folder itself, so no lock file lies in the cache; where there is
    none, the block runs unlocked."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle = os.open(folder, os.O_RDONLY) if fcntl is not None else None
    except OSError as error:
        raise TarganError(f"cannot write the slice cache here: {error.strerror or error}", folder) from None
    if handle is None:
        yield
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
    finally:
        os.close(handle)  # releases the lock


def _file_stamp(path: Path) -> list[object]:
    try:
        status = path.stat()
    except OSError as error:
        raise TarganError(f"cannot read: {error.strerror or error}", path) from None
    return [str(path.resolve()), status.st_size, status.st_mtime_ns]


def _cache_digest(data: DataDir, split: str, image_size: int, cases: list[Case]) -> str:
    key = {
        "format": CACHE_FORMAT_VERSION,
        "split": split,
        "image_size": image_size,
        "modalities": [m.to_dict() for m in data.spec.modalities],
        "body_mask": [BODY_THRESHOLD, BODY_MIN_FRACTION],
        "cases": [[c.modality, c.case_id, _file_stamp(c.image), c.label and _file_stamp(c.label)]
                  for c in cases],
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _open_cache(folder: Path, digest: str) -> SliceSet | None:
    """The cached slices when ``folder`` holds a complete cache for ``digest``, else None."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("digest") != digest or meta.get("format") != CACHE_FORMAT_VERSION:
            return None
        arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r") for name in _CACHE_ARRAYS}
        modalities = tuple(ModalitySpec.from_dict(m) for m in meta["modalities"])
        case_ids = tuple(str(c) for c in meta["case_ids"])
    except (OSError, ValueError, KeyError, TypeError, TarganError):
        return None  # absent, partial or from another version: rebuild
    count = arrays["images"].shape[0]
    if any(array.shape[0] != count for array in arrays.values()):
        return None
    return SliceSet(case_ids=case_ids, modalities=modalities, **arrays)


def _build_cache(folder: Path, data: DataDir, cases: list[Case], image_size: int, digest: str,
                 progress: Progress | None) -> None:
    """Preprocess every case into per-volume parts, then join them into the cache's arrays."""
    names = data.spec.modality_names
    highs: dict[str, list[float]] = {name: [] for name in names}
    parts = folder / "parts"  # one volume's arrays per file, so that memory holds one volume at a time
    parts.mkdir()
    counts: list[int] = []
    for index, case in enumerate(cases):
        settings = data.spec.modalities[names.index(case.modality)].intensity
        image, label, high = _preprocess_case(case, settings, image_size)
        if high is not None:
            highs[case.modality].append(high)
        np.save(parts / f"{index}-images.npy", image)
        np.save(parts / f"{index}-labels.npy", label)
        np.save(parts / f"{index}-bodies.npy", body_mask(image).astype(np.uint8))
        counts.append(image.shape[0])
        if progress is not None:
            progress(1)

    shape = (sum(counts), image_size, image_size)
    for name, dtype in _SLICE_ARRAYS.items():
        output = np.lib.format.open_memmap(folder / f"{name}.npy", mode="w+", dtype=dtype, shape=shape)
        start = 0
        for index, count in enumerate(counts):
            output[start:start + count] = np.load(parts / f"{index}-{name}.npy")
            start += count
        output.flush()
        del output
    shutil.rmtree(parts)
    modality = np.repeat([names.index(c.modality) for c in cases], counts)
    np.save(folder / "modality.npy", modality.astype(np.int64))
    np.save(folder / "case_index.npy", np.repeat(np.arange(len(cases)), counts).astype(np.int64))

    modalities = tuple(_with_reference_high(m, highs[m.name]) for m in data.spec.modalities)
    meta = {
        "format": CACHE_FORMAT_VERSION,
        "digest": digest,
        "image_size": image_size,
        "case_ids": [f"{c.modality}/{c.case_id}" for c in cases],
        "modalities": [m.to_dict() for m in modalities],
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")


def _with_reference_high(modality: ModalitySpec, highs: list[float]) -> ModalitySpec:
    """The modality with ``reference_high`` fitted on the volumes' robust maxima (none: unchanged)."""
    if not highs:
        return modality
    intensity = dataclasses.replace(modality.intensity, reference_high=fit_reference_high(highs))
    return dataclasses.replace(modality, intensity=intensity)


def _preprocess_case(case: Case, settings: IntensitySettings, image_size: int,
                     ) -> tuple[np.ndarray, np.ndarray, float | None]:
    """One case -> (images (Z, S, S) float32 in [-1, 1], labels (Z, S, S) uint8, robust high or None).

    The robust high is returned only for MR volumes whose modality has no ``reference_high`` yet.
    """
    volume = read_volume(case.image)
    slices, _ = to_slices(volume)  # (Z, H, W) stored units
    try:
        normalized = normalize(slices, settings)
        needs_high = settings.kind == "mr" and settings.reference_high is None
        high = robust_high(slices, settings) if needs_high else None
    except TarganError as error:
        raise TarganError(error.message, case.image) from None
    if case.label is not None:
        label_slices = to_slices(read_label(case.label, volume))[0].astype(np.uint8)
    else:
        label_slices = np.zeros(slices.shape, dtype=np.uint8)
    fit = plane_fit(slices.shape[1], slices.shape[2], image_size)
    image = to_model(torch.from_numpy(normalized)[:, None], fit, fill=-1.0, mode="bilinear")
    label = to_model(torch.from_numpy(label_slices)[:, None], fit, fill=0, mode="nearest")
    image = image[:, 0].clamp_(-1.0, 1.0).numpy().astype(np.float32, copy=False)  # (Z, S, S)
    return image, label[:, 0].numpy().astype(np.uint8, copy=False), high


class SliceDataset(torch.utils.data.Dataset):
    """Training items over a SliceSet: (image, label, body) each (1, S, S) float32, and the modality.

    No augmentation here: the trainer flips whole batches with its own checkpointed generator.
    """

    def __init__(self, slices: SliceSet):
        self.slices = slices

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        slices = self.slices
        image = torch.from_numpy(np.array(slices.images[index], dtype=np.float32))[None]
        label = torch.from_numpy(np.array(slices.labels[index], dtype=np.float32))[None]
        body = torch.from_numpy(np.array(slices.bodies[index], dtype=np.float32))[None]
        return image, label, body, torch.tensor(int(slices.modality[index]), dtype=torch.int64)
