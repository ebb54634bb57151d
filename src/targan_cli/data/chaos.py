"""Import the CHAOS 2019 training archive (DICOM series and PNG ground truth) into the DATA layout.

The archive as distributed:
```
Train_Sets/CT/<id>/DICOM_anon/*.dcm                       Ground/*.png   liver only (255)
Train_Sets/MR/<id>/T1DUAL/DICOM_anon/InPhase/*.dcm        T1DUAL/Ground/*.png   (OutPhase ignored)
Train_Sets/MR/<id>/T2SPIR/DICOM_anon/*.dcm                T2SPIR/Ground/*.png
```
MR ground truth codes four organs (liver 63, kidneys 126 and 189, spleen 252); only the liver
(55 < v <= 70) is kept. Slices are ordered by position (``read_dicom_series``); each PNG goes with
its DICOM file by name, so the mask lands on the slice its DICOM went to whatever the file order.
CT and MR come from different patients; both MR sequences of a patient stay in one split.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from targan_cli.config import DatasetSpec, default_modalities
from targan_cli.data.dataset import DATASET_JSON, IMAGES, LABELS
from targan_cli.errors import TarganError, UsageError
from targan_cli.io.atomic import atomic_output, check_writable
from targan_cli.io.dicom import read_dicom_series
from targan_cli.io.volume import write_volume

CHAOS_NAME = "chaos2019"
CHAOS_DESCRIPTION = (
    "CHAOS 2019 challenge training set (Kavur et al., https://chaos.grand-challenge.org), "
    "CT and MR T1-DUAL in-phase and T2-SPIR with liver masks, split by patient. "
    "Licence: CC-BY-NC-SA 4.0 (non-commercial, share alike, attribution)."
)
# MR ground truth value of the liver (63), with the tolerance the official TarGAN code uses.
MR_LIVER_RANGE = (55, 70)  # low exclusive, high inclusive
_PATIENT_NAME = re.compile(r"^[A-Za-z0-9_-]+$")
# CHAOS CT DICOM names: i<slice index>,<series>b.dcm (e.g. "i0042,0000b").
_CT_DICOM_NAME = re.compile(r"^i(\d+),\d+b?$", re.IGNORECASE)
_DIGITS = re.compile(r"\d+")

Group = Literal["ct", "mr"]
Progress = Callable[[int], None]


@dataclass(frozen=True)
class ChaosSeries:
    """One image series of the archive with its ground-truth folder."""

    group: Group  # CT and MR patients are different people; the split is per group
    patient: str  # the archive's patient folder name
    modality: str  # "ct", "t1w" or "t2w"
    dicom_dir: Path
    ground_dir: Path

    @property
    def case_id(self) -> str:
        """The case name in the DATA layout, e.g. ``ct01`` or ``mr05`` (the same for t1w and t2w)."""
        return f"{self.group}{self.patient.zfill(2)}"


@dataclass(frozen=True)
class ImportSummary:
    """What ``import_chaos`` wrote."""

    out: Path
    cases: dict[str, dict[str, tuple[str, ...]]]  # split -> modality -> case ids
    patients: dict[str, dict[str, tuple[str, ...]]]  # split -> "ct" / "mr" -> archive patient ids
    slices: int  # 2D slices over all image volumes

    @property
    def volumes(self) -> int:
        return sum(len(ids) for by_modality in self.cases.values() for ids in by_modality.values())


def find_train_sets(chaos_dir: str | Path) -> Path:
    """The ``Train_Sets`` folder: ``chaos_dir`` itself or its child."""
    chaos_dir = Path(chaos_dir)
    if not chaos_dir.is_dir():
        raise TarganError("not a folder" if chaos_dir.exists() else "folder not found", chaos_dir)
    if (chaos_dir / "Train_Sets").is_dir():
        return chaos_dir / "Train_Sets"
    if chaos_dir.name == "Train_Sets":
        return chaos_dir
    raise TarganError("no Train_Sets folder here: pass the folder of the unpacked CHAOS training archive "
                      "(the one holding Train_Sets) or Train_Sets itself", chaos_dir)


def find_chaos_series(chaos_dir: str | Path) -> list[ChaosSeries]:
    """Every series to import (CT, T1 in-phase, T2-SPIR), by group, then patient number."""
    train_sets = find_train_sets(chaos_dir)
    series: list[ChaosSeries] = []
    for group in ("ct", "mr"):
        group_dir = train_sets / group.upper()
        if not group_dir.is_dir():
            raise TarganError(f"no {group.upper()} folder: a CHAOS training set holds CT/ and MR/",
                              train_sets)
        patients = sorted((p for p in group_dir.iterdir() if p.is_dir() and not p.name.startswith(".")),
                          key=_patient_order)
        if not patients:
            raise TarganError("no patient folders", group_dir)
        for patient in patients:
            if not _PATIENT_NAME.match(patient.name):
                raise TarganError("patient folder names may hold only letters, digits, _ and -", patient)
            name = patient.name
            if group == "ct":
                series.append(ChaosSeries("ct", name, "ct", patient / "DICOM_anon", patient / "Ground"))
            else:
                t1, t2 = patient / "T1DUAL", patient / "T2SPIR"
                series.append(ChaosSeries("mr", name, "t1w", t1 / "DICOM_anon" / "InPhase", t1 / "Ground"))
                series.append(ChaosSeries("mr", name, "t2w", t2 / "DICOM_anon", t2 / "Ground"))
    seen: dict[tuple[str, str], ChaosSeries] = {}
    for item in series:
        other = seen.setdefault((item.modality, item.case_id), item)
        if other.patient != item.patient:
            raise TarganError(f"patient folders {other.patient} and {item.patient} both become case "
                              f"{item.case_id}; rename one", train_sets / item.group.upper())
    return series


def _patient_order(folder: Path) -> tuple[bool, int, str]:
    """Numbered patients first, by number (2 before 10), then any others by name."""
    name = folder.name
    return (not name.isdigit(), int(name) if name.isdigit() else 0, name)


def split_patients(patients: Sequence[str], test_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """A deterministic (train, test) split of patient ids: round(test_fraction * n) go to test.

    At least one patient stays in train. The result depends only on the sorted ids and the seed.
    """
    ordered = sorted(patients)
    count = min(math.floor(test_fraction * len(ordered) + 0.5), len(ordered) - 1)
    shuffled = [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]
    test = set(shuffled[:max(count, 0)])
    return [p for p in ordered if p not in test], [p for p in ordered if p in test]


def import_chaos(chaos_dir: str | Path, out: str | Path, test_fraction: float = 0.5, seed: int = 0,
                 overwrite: bool = False, progress: Progress | None = None) -> ImportSummary:
    """Convert the CHAOS training archive into a DATA folder (NIfTI volumes, liver masks, dataset.json).

    ``test_fraction`` of the CT patients and of the MR patients go to test/ (chosen with ``seed``).
    The output is built beside ``out`` and moved into place when complete; an existing non-empty
    ``out`` is replaced only with ``overwrite``. ``progress`` advances by one per series.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise UsageError(f"test fraction must be in [0, 1), got {test_fraction}")
    out = Path(out)
    series = find_chaos_series(chaos_dir)
    check_writable(out, overwrite, inputs=[chaos_dir], is_dir=True, kind="dataset")

    split_of: dict[tuple[str, str], str] = {}
    patients: dict[str, dict[str, tuple[str, ...]]] = {"train": {}, "test": {}}
    for group in ("ct", "mr"):
        group_patients = sorted({s.patient for s in series if s.group == group})
        train, test = split_patients(group_patients, test_fraction, seed)
        patients["train"][group], patients["test"][group] = tuple(train), tuple(test)
        split_of.update({(group, p): "train" for p in train} | {(group, p): "test" for p in test})

    spec = DatasetSpec(modalities=default_modalities(), target="liver", name=CHAOS_NAME,
                       description=CHAOS_DESCRIPTION)
    cases: dict[str, dict[str, list[str]]] = {"train": {}, "test": {}}
    slices = 0
    with atomic_output(out, overwrite=True, is_dir=True, kind="dataset", command="data import-chaos") as temporary:
        (temporary / DATASET_JSON).write_text(json.dumps(spec.to_dict(), indent=2) + "\n", encoding="utf-8")
        for item in series:
            split = split_of[(item.group, item.patient)]
            slices += _import_series(item, temporary / split / item.modality)
            cases[split].setdefault(item.modality, []).append(item.case_id)
            if progress is not None:
                progress(1)
    return ImportSummary(
        out=out,
        cases={split: {m: tuple(ids) for m, ids in by_modality.items()}
               for split, by_modality in cases.items()},
        patients=patients,
        slices=slices,
    )


def _import_series(series: ChaosSeries, modality_dir: Path) -> int:
    """Write one series as images/<case>.nii.gz and labels/<case>.nii.gz; return its slice count."""
    dicom_files = _files(series.dicom_dir, ".dcm", "DICOM")
    png_files = _files(series.ground_dir, ".png", "ground-truth PNG")
    png_of = pair_ground_truth(dicom_files, png_files, series.ground_dir)
    volume, ordered = read_dicom_series(dicom_files)
    columns, rows, _ = volume.shape  # read_dicom_series stores (Columns, Rows, Z)
    label = np.zeros(volume.shape, dtype=np.uint8)
    for index, dicom_file in enumerate(ordered):
        ground = _read_png(png_of[dicom_file])
        if ground.shape != (rows, columns):
            raise TarganError(f"ground truth of {ground.shape[0]} x {ground.shape[1]} pixels does not match "
                              f"its DICOM slice {dicom_file.name} ({rows} x {columns})", png_of[dicom_file])
        label[:, :, index] = _liver_mask(ground, series.group).T  # PNG (row, column) -> volume (column, row)
    name = f"{series.case_id}.nii.gz"
    write_volume(modality_dir / IMAGES / name, volume)
    write_volume(modality_dir / LABELS / name, volume.with_array(label), label=True)
    return len(ordered)


def _files(folder: Path, suffix: str, kind: str) -> list[Path]:
    if not folder.is_dir():
        raise TarganError(f"missing: every series needs this folder of {kind} files", folder)
    files = sorted(p for p in folder.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() == suffix)
    if not files:
        raise TarganError(f"no {kind} ({suffix}) files in this folder", folder)
    return files


def pair_ground_truth(dicom_files: Sequence[Path], png_files: Sequence[Path], folder: Path,
                      ) -> dict[Path, Path]:
    """Each DICOM file's ground-truth PNG, by name.

    MR PNGs share their DICOM's stem (``IMG-0004-00002.dcm`` <-> ``IMG-0004-00002.png``). CT PNGs
    are ``liver_GT_<n>.png`` for ``i<n>,0000b.dcm``: when stems differ, both sides are ordered by
    the slice number in their names (the ``i`` number of CHAOS CT names, else the last number)
    and paired in that order. The directory listing order is never used.
    """
    if len(png_files) != len(dicom_files):
        raise TarganError(f"{len(png_files)} ground-truth PNG files for {len(dicom_files)} DICOM files; "
                          "each slice needs one", folder)
    png_by_stem = {p.stem: p for p in png_files}
    if set(png_by_stem) == {d.stem for d in dicom_files}:
        return {d: png_by_stem[d.stem] for d in dicom_files}
    dicom_order = _by_name_number(dicom_files, folder)
    png_order = _by_name_number(png_files, folder)
    return dict(zip(dicom_order, png_order))


def _name_number(path: Path) -> int | None:
    chaos_ct = _CT_DICOM_NAME.match(path.stem)
    if chaos_ct:
        return int(chaos_ct.group(1))
    numbers = _DIGITS.findall(path.stem)
    return int(numbers[-1]) if numbers else None


def _by_name_number(files: Sequence[Path], folder: Path) -> list[Path]:
    numbers = {f: _name_number(f) for f in files}
    unnumbered = [f.name for f, n in numbers.items() if n is None]
    if unnumbered:
        raise TarganError(f"cannot pair ground truth with DICOM files: {unnumbered[0]} has no slice number "
                          "in its name and the names do not match", folder)
    seen: dict[int, Path] = {}
    for file, number in numbers.items():
        if number in seen:
            raise TarganError(f"cannot pair ground truth with DICOM files: {seen[number].name} and "
                              f"{file.name} carry the same slice number {number}", folder)
        seen[number] = file  # type: ignore[index]
    return [seen[n] for n in sorted(seen)]


def _read_png(path: Path) -> np.ndarray:
    """A grey-level PNG as a (rows, columns) integer array."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode == "P":
                image = image.convert("L")
            array = np.asarray(image)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise TarganError(f"not a readable PNG image ({type(error).__name__})", path) from None
    if array.ndim == 3:  # RGB(A) ground truth is accepted when it is grey
        if not all(np.array_equal(array[..., 0], array[..., c]) for c in range(1, min(array.shape[2], 3))):
            raise TarganError("is a colour image; CHAOS ground truth is grey-level", path)
        array = array[..., 0]
    return array.astype(np.int32)


def _liver_mask(ground: np.ndarray, group: Group) -> np.ndarray:
    """CT: any non-zero pixel is liver. MR: the liver code 63 (55 < v <= 70), not kidneys or spleen."""
    if group == "ct":
        return (ground != 0).astype(np.uint8)
    low, high = MR_LIVER_RANGE
    return ((ground > low) & (ground <= high)).astype(np.uint8)
