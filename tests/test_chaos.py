"""The CHAOS 2019 importer, on a tiny CHAOS-shaped tree written with pydicom and PIL.

File names are shuffled relative to slice position and written in shuffled order, every file
carries its own UIDs (as the anonymised archive does), and slices are 16 rows x 12 columns so
that a swapped row/column shows.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from targan_cli.config import DatasetSpec, read_json
from targan_cli.data.chaos import find_chaos_series, import_chaos, pair_ground_truth, split_patients
from targan_cli.data.dataset import open_data_dir
from targan_cli.errors import TarganError
from volume_factories import write_dicom_slice

ROWS, COLUMNS, SLICES = 16, 12, 4
STEP_MM = 3.0
CT_INTERCEPT = -1024
# Name number of the file holding the slice at each position (position order != name order).
NAME_OF_POSITION = (2, 0, 3, 1)
OUT_PHASE_VALUE = 9999  # out-of-phase pixels: must never reach the imported T1 volume


def _write_dicom(path: Path, pixels: np.ndarray, position_z: float, modality: str) -> None:
    """One CHAOS-like slice: CT or MR SOP class, rescale tags on CT only, a series UID per file."""
    write_dicom_slice(path, pixels, (-20.0, -30.0, position_z), modality=modality,
                      rescale=(1.0, CT_INTERCEPT) if modality == "CT" else None,
                      pixel_spacing=(0.8, 0.7), slice_thickness=STEP_MM)


def _write_png(path: Path, values: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.uint8), mode="L").save(path)


def _stored(position: int, seed: int) -> np.ndarray:
    """Stored pixels (rows, columns) of one slice: noise plus a per-position offset."""
    rng = np.random.default_rng(seed * 10 + position)
    return rng.integers(0, 1500, size=(ROWS, COLUMNS)) + 1000 * position


def _ground(position: int, organs: bool) -> np.ndarray:
    """A (rows, columns) PNG of one slice: a liver box whose size depends on the position.

    With ``organs`` (MR) the liver is 63 and kidney / spleen boxes (126, 252) are added.
    """
    values = np.zeros((ROWS, COLUMNS), dtype=np.uint8)
    values[2 * position:2 * position + 5, : 2 + position] = 63 if organs else 255
    if organs:
        values[12:15, 8:11] = 126
        values[0:2, 9:12] = 252
    return values


def _liver(position: int) -> np.ndarray:
    return (_ground(position, organs=False) > 0).astype(np.uint8)


def _write_series(dicom_dir: Path, ground_dir: Path, dicom_name, png_name, modality: str, seed: int,
                  organs: bool, z0: float, direction: float, out_phase_dir: Path | None = None,
                  out_phase_name=None) -> None:
    """One series: slice ``position`` sits at z0 + direction * STEP * position; files written shuffled."""
    jobs = []
    for position in range(SLICES):
        number = NAME_OF_POSITION[position]
        z = z0 + direction * STEP_MM * position
        jobs.append(lambda p=position, n=number, z=z: _write_dicom(
            dicom_dir / dicom_name(n), _stored(p, seed), z, modality))
        jobs.append(lambda p=position, n=number: _write_png(ground_dir / png_name(n), _ground(p, organs)))
        if out_phase_dir is not None:
            jobs.append(lambda n=number, z=z: _write_dicom(
                out_phase_dir / out_phase_name(n), np.full((ROWS, COLUMNS), OUT_PHASE_VALUE), z, modality))
    random.Random(seed).shuffle(jobs)
    for job in jobs:
        job()


def build_chaos_tree(root: Path) -> Path:
    """CT patients 1 and 2, MR patients 3 and 5; returns the folder holding Train_Sets."""
    train_sets = root / "Train_Sets"
    # CT 1: CHAOS names i<n>,0000b.dcm <-> liver_GT_<n>.png, slices ascending in z.
    ct1 = train_sets / "CT" / "1"
    _write_series(ct1 / "DICOM_anon", ct1 / "Ground", lambda n: f"i{n:04d},0000b.dcm",
                  lambda n: f"liver_GT_{n:03d}.png", "CT", seed=1, organs=False, z0=-50.0, direction=1.0)
    # CT 2: IMG-style names numbered from 1, PNGs from 0; the scan runs downwards.
    ct2 = train_sets / "CT" / "2"
    _write_series(ct2 / "DICOM_anon", ct2 / "Ground", lambda n: f"IMG-0002-{n + 1:05d}.dcm",
                  lambda n: f"liver_GT_{n:03d}.png", "CT", seed=2, organs=False, z0=40.0, direction=-1.0)
    for patient, seed, t1_ground_like_out_phase in (("3", 3, False), ("5", 5, True)):
        t1 = train_sets / "MR" / patient / "T1DUAL"
        in_name = lambda n: f"IMG-0004-{2 * n + 2:05d}.dcm"  # noqa: E731
        out_name = lambda n: f"IMG-0004-{2 * n + 1:05d}.dcm"  # noqa: E731
        ground_name = (lambda n: out_name(n)[:-4] + ".png") if t1_ground_like_out_phase else (
            lambda n: in_name(n)[:-4] + ".png")
        _write_series(t1 / "DICOM_anon" / "InPhase", t1 / "Ground", in_name, ground_name, "MR", seed=seed,
                      organs=True, z0=-10.0, direction=1.0, out_phase_dir=t1 / "DICOM_anon" / "OutPhase",
                      out_phase_name=out_name)
        t2 = train_sets / "MR" / patient / "T2SPIR"
        _write_series(t2 / "DICOM_anon", t2 / "Ground", lambda n: f"IMG-0002-{n + 1:05d}.dcm",
                      lambda n: f"IMG-0002-{n + 1:05d}.png", "MR", seed=seed + 100, organs=True,
                      z0=0.0, direction=-1.0)
    return root


@pytest.fixture
def chaos_dir(tmp_path: Path) -> Path:
    return build_chaos_tree(tmp_path / "CHAOS")


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(path)
    return np.asarray(image.dataobj), image.affine


# ----------------------------------------------------------------------------- import


def test_import_orders_slices_and_places_masks(chaos_dir: Path, tmp_path: Path) -> None:
    steps: list[int] = []
    summary = import_chaos(chaos_dir, tmp_path / "DATA", progress=steps.append)
    out = tmp_path / "DATA"
    assert steps == [1] * 6 and summary.volumes == 6 and summary.slices == 6 * SLICES
    seeds = {"ct01": 1, "ct02": 2, "mr03": 3, "mr05": 5}
    directions = {("ct", "ct01"): 1, ("ct", "ct02"): -1, ("t1w", "mr03"): 1, ("t1w", "mr05"): 1,
                  ("t2w", "mr03"): -1, ("t2w", "mr05"): -1}
    for (modality, case), direction in directions.items():
        (split,) = [s for s in ("train", "test") if case in summary.cases[s].get(modality, ())]
        image, affine = _load(out / split / modality / "images" / f"{case}.nii.gz")
        label, label_affine = _load(out / split / modality / "labels" / f"{case}.nii.gz")
        assert image.shape == label.shape == (COLUMNS, ROWS, SLICES)
        assert image.dtype == np.int16 and label.dtype == np.uint8
        np.testing.assert_allclose(label_affine, affine)
        # Voxel index k runs along +z (superior in RAS too): position order, whatever the names.
        assert affine[2, 2] == pytest.approx(STEP_MM)
        seed = seeds[case] + (100 if modality == "t2w" else 0)
        for k in range(SLICES):
            position = k if direction == 1 else SLICES - 1 - k
            offset = CT_INTERCEPT if modality == "ct" else 0
            np.testing.assert_array_equal(image[:, :, k], (_stored(position, seed) + offset).T)
            np.testing.assert_array_equal(label[:, :, k], _liver(position).T)


def test_import_ignores_out_phase_and_other_organs(chaos_dir: Path, tmp_path: Path) -> None:
    summary = import_chaos(chaos_dir, tmp_path / "DATA")
    for split in ("train", "test"):
        for modality in ("t1w", "t2w"):
            for case in summary.cases[split].get(modality, ()):
                image, _ = _load(tmp_path / "DATA" / split / modality / "images" / f"{case}.nii.gz")
                label, _ = _load(tmp_path / "DATA" / split / modality / "labels" / f"{case}.nii.gz")
                assert not np.any(image == OUT_PHASE_VALUE)
                assert set(np.unique(label)) == {0, 1}
                assert label[9:12, 12:15, :].sum() == 0 and label[9:12, 0:2, :].sum() == 0  # kidney, spleen


def test_split_is_by_patient_and_dataset_json_is_valid(chaos_dir: Path, tmp_path: Path) -> None:
    summary = import_chaos(chaos_dir / "Train_Sets", tmp_path / "DATA", test_fraction=0.5, seed=3)
    assert sorted(summary.patients["train"]["ct"] + summary.patients["test"]["ct"]) == ["1", "2"]
    assert sorted(summary.patients["train"]["mr"] + summary.patients["test"]["mr"]) == ["3", "5"]
    for split in ("train", "test"):
        assert len(summary.patients[split]["ct"]) == len(summary.patients[split]["mr"]) == 1
        (mr_patient,) = summary.patients[split]["mr"]
        assert summary.cases[split]["t1w"] == summary.cases[split]["t2w"] == (f"mr{mr_patient.zfill(2)}",)
        assert summary.cases[split]["ct"] == (f"ct{summary.patients[split]['ct'][0].zfill(2)}",)

    spec = DatasetSpec.from_dict(read_json(tmp_path / "DATA" / "dataset.json"))
    assert spec.modality_names == ("t1w", "t2w", "ct") and spec.name == "chaos2019"
    assert "CC-BY-NC-SA 4.0" in spec.description and spec.target == "liver"
    data = open_data_dir(tmp_path / "DATA")
    train = data.cases("train")
    assert [c.modality for c in train] == ["t1w", "t2w", "ct"]
    assert all(c.label is not None for c in train + data.cases("test"))

    again = import_chaos(chaos_dir, tmp_path / "AGAIN", test_fraction=0.5, seed=3)
    assert again.patients == summary.patients  # deterministic for a seed


def test_split_patients() -> None:
    patients = [str(i) for i in (1, 2, 5, 6, 8, 10, 14, 16, 18, 19, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30)]
    train, test = split_patients(patients, 0.5, seed=0)
    assert len(train) == len(test) == 10 and sorted(train + test) == sorted(patients)
    assert split_patients(list(reversed(patients)), 0.5, seed=0) == (train, test)
    assert any(split_patients(patients, 0.5, seed=s)[1] != test for s in range(1, 4))
    assert split_patients(patients, 0.0, seed=0) == (sorted(patients), [])
    assert len(split_patients(patients, 0.99, seed=0)[0]) == 1  # at least one training patient
    assert split_patients(["7"], 0.5, seed=0) == (["7"], [])


def test_series_listing(chaos_dir: Path) -> None:
    series = find_chaos_series(chaos_dir)
    assert [(s.modality, s.case_id) for s in series] == [
        ("ct", "ct01"), ("ct", "ct02"), ("t1w", "mr03"), ("t2w", "mr03"), ("t1w", "mr05"), ("t2w", "mr05")]
    assert series[2].dicom_dir.parts[-2:] == ("DICOM_anon", "InPhase")


# ----------------------------------------------------------------------------- pairing


def test_pairing_by_stem_and_by_number(tmp_path: Path) -> None:
    dicoms = [tmp_path / f"IMG-0004-{n:05d}.dcm" for n in (4, 2, 6)]
    same_stems = [tmp_path / f"IMG-0004-{n:05d}.png" for n in (6, 4, 2)]
    assert {d.name: p.name for d, p in pair_ground_truth(dicoms, same_stems, tmp_path).items()} == {
        "IMG-0004-00004.dcm": "IMG-0004-00004.png", "IMG-0004-00002.dcm": "IMG-0004-00002.png",
        "IMG-0004-00006.dcm": "IMG-0004-00006.png"}
    ct = [tmp_path / f"i{n:04d},0000b.dcm" for n in (10, 9, 11)]
    gt = [tmp_path / f"liver_GT_{n:03d}.png" for n in (11, 10, 9)]
    assert {d.name: p.name for d, p in pair_ground_truth(ct, gt, tmp_path).items()} == {
        "i0009,0000b.dcm": "liver_GT_009.png", "i0010,0000b.dcm": "liver_GT_010.png",
        "i0011,0000b.dcm": "liver_GT_011.png"}


@pytest.mark.parametrize(("pngs", "message"), [
    (["liver_GT_000.png"], "1 ground-truth PNG files for 2 DICOM files"),
    (["liver_GT_a.png", "liver_GT_001.png"], "liver_GT_a.png has no slice number"),
    (["liver_GT_001.png", "liver_GT_01.png"], "carry the same slice number 1"),
])
def test_pairing_errors(tmp_path: Path, pngs: list[str], message: str) -> None:
    dicoms = [tmp_path / "i0000,0000b.dcm", tmp_path / "i0001,0000b.dcm"]
    with pytest.raises(TarganError, match=message) as error:
        pair_ground_truth(dicoms, [tmp_path / p for p in pngs], tmp_path)
    assert error.value.path == tmp_path


# ----------------------------------------------------------------------------- errors


def test_missing_train_sets(tmp_path: Path) -> None:
    with pytest.raises(TarganError, match="no Train_Sets folder"):
        import_chaos(tmp_path, tmp_path / "DATA")
    with pytest.raises(TarganError, match="folder not found"):
        import_chaos(tmp_path / "nope", tmp_path / "DATA")


def test_patient_without_dicom_names_the_folder(chaos_dir: Path, tmp_path: Path) -> None:
    dicom_dir = chaos_dir / "Train_Sets" / "CT" / "2" / "DICOM_anon"
    shutil.rmtree(dicom_dir)
    dicom_dir.mkdir()
    with pytest.raises(TarganError, match="no DICOM") as error:
        import_chaos(chaos_dir, tmp_path / "DATA")
    assert error.value.path == dicom_dir
    assert not (tmp_path / "DATA").exists()  # nothing half-written
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".DATA")]


def test_ground_truth_count_mismatch_names_the_folder(chaos_dir: Path, tmp_path: Path) -> None:
    ground = chaos_dir / "Train_Sets" / "MR" / "5" / "T2SPIR" / "Ground"
    next(ground.iterdir()).unlink()
    with pytest.raises(TarganError, match="3 ground-truth PNG files for 4 DICOM files") as error:
        import_chaos(chaos_dir, tmp_path / "DATA")
    assert error.value.path == ground


def test_ground_truth_of_another_size(chaos_dir: Path, tmp_path: Path) -> None:
    png = chaos_dir / "Train_Sets" / "CT" / "1" / "Ground" / "liver_GT_002.png"
    _write_png(png, np.zeros((COLUMNS, ROWS)))
    with pytest.raises(TarganError, match="does not match its DICOM slice") as error:
        import_chaos(chaos_dir, tmp_path / "DATA")
    assert error.value.path == png


def test_output_folder_rules(chaos_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "DATA"
    out.mkdir()
    import_chaos(chaos_dir, out)  # an empty folder is fine
    (out / "mine.txt").write_text("keep")
    with pytest.raises(TarganError, match="--overwrite"):
        import_chaos(chaos_dir, tmp_path / "DATA")
    import_chaos(chaos_dir, out, overwrite=True)
    assert not (out / "mine.txt").exists() and (out / "dataset.json").is_file()
    with pytest.raises(TarganError, match="outside every input|is also an input"):
        import_chaos(chaos_dir, chaos_dir / "Train_Sets" / "out", overwrite=True)
    with pytest.raises(TarganError, match="outside every input|is also an input"):
        import_chaos(chaos_dir, chaos_dir, overwrite=True)
    with pytest.raises(TarganError, match="outside every input|is also an input"):  # beside Train_Sets: still inside
        import_chaos(chaos_dir, chaos_dir / "out")
    assert sorted(p.name for p in chaos_dir.iterdir()) == ["Train_Sets"]
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(TarganError, match=r"holds no \.targan\.json \(targan did not make it\); refusing to replace it") as caught:
        import_chaos(chaos_dir, foreign, overwrite=True)  # not a dataset: never replaced
    assert caught.value.path == foreign and (foreign / "notes.txt").read_text() == "precious"
    with pytest.raises(TarganError, match="test fraction"):
        import_chaos(chaos_dir, tmp_path / "other", test_fraction=1.0)
    assert json.loads((out / "dataset.json").read_text())["name"] == "chaos2019"


def test_patient_folders_that_collide(chaos_dir: Path, tmp_path: Path) -> None:
    shutil.copytree(chaos_dir / "Train_Sets" / "CT" / "1", chaos_dir / "Train_Sets" / "CT" / "01")
    with pytest.raises(TarganError, match="both become case ct01"):
        import_chaos(chaos_dir, tmp_path / "DATA")
