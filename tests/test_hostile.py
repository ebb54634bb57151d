"""Hostile inputs across every command: one-line errors, non-zero exit codes, nothing written, inputs untouched.

A module-scoped corpus of bad inputs is generated in a temporary folder (damaged and misleading
NIfTI files, broken DICOM series, masks that do not fit their image, weights folders that lie,
checkpoints that are not state dicts, datasets whose paths try to leave their folder, CHAOS trees
with broken series). Every command that takes such an input runs on it in-process (``CliRunner``)
and must answer with exactly one line on stderr naming the file, a non-zero exit code, no
traceback, no new entry in its output folder, and every input byte for byte as before.
Single-function error tests live beside their modules (test_volume.py, test_weights.py, ...);
this file is the cross-command matrix.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import gzip
import hashlib
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import typer
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import targan_cli
from targan_cli.cli import app
from targan_cli.config import IntensitySettings
from targan_cli.data.phantom import write_phantom_dataset
from targan_cli.workflows.segment import SegmenterConfig, build_network, save_segmenter
from test_chaos import build_chaos_tree
from volume_factories import anatomy, canonical_affine, oriented, write_dicom_series, write_dicom_slice, write_nifti
from weights_factories import cache_hub_repo, make_tiny_weights, use_offline_hub_cache

runner = CliRunner()
COMMAND = typer.main.get_command(app)  # built once: typer.testing.CliRunner rebuilds it on every call
for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):  # the developer's own nnU-Net folders
    os.environ.pop(variable, None)

CASE = "case"  # the case id of the good image and of every bad label
SHAPE = (4, 16, 16)  # canonical (Z, H, W) of the good MR image


class Unpickled:
    """Unpickling this creates a folder: proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


@dataclasses.dataclass(frozen=True)
class Corpus:
    root: Path
    marker: Path  # must never exist: only an unpickled payload creates it
    good_image: Path  # <good_folder>/case.nii.gz, MR (t1w)
    good_folder: Path
    good_truth: Path  # folder with case.nii.gz, a liver mask on the good image's grid
    weights: Path
    segmenter: Path
    volumes: dict[str, Path]  # NIfTI files
    dicom: dict[str, Path]  # DICOM series folders
    labels: dict[str, Path]  # folders holding a bad case.nii.gz mask
    bad_weights: dict[str, Path]  # weights folders
    bad_segmenters: dict[str, Path]  # segmenter folders
    checkpoints: dict[str, Path]  # files for `convert`
    datasets: dict[str, Path]  # DATA folders
    chaos: dict[str, Path]  # CHAOS trees


# ----------------------------------------------------------------------------- the corpus


def _mr_canonical(shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> np.ndarray:
    """MR-like stored values (Z, H, W): a bright body on a zero background."""
    ct = anatomy(shape, seed)
    return np.where(ct > -500, ct + 400, 0).astype(np.int16)


def _nifti(path: Path, canonical: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    array, file_affine = oriented(canonical, "RAS", affine)
    return write_nifti(path, array, file_affine)


def _bad_volumes(folder: Path) -> dict[str, Path]:
    """Each bad NIfTI file alone in its own folder (so that `enrich` can take the folder)."""
    def place(name: str) -> Path:
        (folder / name).mkdir(parents=True)
        return folder / name / f"{name}.nii.gz"

    good = _nifti(folder / "source" / "big.nii.gz", _mr_canonical((8, 32, 32), seed=5)).read_bytes()
    shutil.rmtree(folder / "source")
    files: dict[str, Path] = {}
    files["truncated"] = place("truncated")
    files["truncated"].write_bytes(good[: len(good) // 2])
    corrupt = bytearray(good)
    middle = len(corrupt) // 2
    corrupt[middle:middle + 64] = bytes(64)  # zeros inside the deflate stream
    files["corrupt"] = place("corrupt")
    files["corrupt"].write_bytes(bytes(corrupt))
    files["text"] = place("text")
    files["text"].write_bytes(b"patient notes, not an image\n" * 20)
    files["zero_bytes"] = place("zero_bytes")
    files["zero_bytes"].write_bytes(b"")
    files["two_d"] = write_nifti(place("two_d"), np.ones((16, 16), np.int16), np.eye(4))
    files["four_d"] = write_nifti(place("four_d"), np.ones((16, 16, 4, 2), np.int16), np.eye(4))
    for name, value in (("nan", np.nan), ("inf", np.inf)):
        array = _mr_canonical().astype(np.float32)
        array[1, 8, 8] = value
        files[name] = _nifti(place(name), array)
    files["constant"] = _nifti(place("constant"), np.full(SHAPE, 300, np.int16))
    singular = nib.Nifti1Header()  # sform only, and it maps every voxel onto one line
    singular["sform_code"], singular["srow_x"], singular["srow_y"] = 2, [1, 0, 0, 0], [2, 0, 0, 0]
    files["singular_affine"] = place("singular_affine")
    nib.save(nib.Nifti1Image(_mr_canonical(), None, singular), files["singular_affine"])
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((4000, 4000, 4000))  # 256 GB declared in a file of a few hundred bytes
    files["huge_dims"] = place("huge_dims")
    files["huge_dims"].write_bytes(gzip.compress(header.binaryblock + bytes(4 + 64)))
    return files


def _bad_dicom(folder: Path) -> dict[str, Path]:
    stored = _mr_canonical((5, 16, 16))
    series: dict[str, Path] = {}
    series["dicom_missing_slice"] = folder / "dicom_missing_slice"
    write_dicom_series(series["dicom_missing_slice"], stored, modality="MR", skip=(2,))
    series["dicom_mixed_series"] = folder / "dicom_mixed_series"
    write_dicom_series(series["dicom_mixed_series"], stored, modality="MR")
    other = write_dicom_series(folder / "other", stored, modality="MR", pixel_spacing=(1.5, 1.5),
                               origin_lps=(-30.0, -40.0, -48.75))  # slices between the first series'
    for file in other:
        file.rename(series["dicom_mixed_series"] / f"B{file.name}")
    shutil.rmtree(folder / "other")
    series["dicom_truncated"] = folder / "dicom_truncated"
    files = write_dicom_series(series["dicom_truncated"], stored[:3], modality="MR")
    files[1].write_bytes(files[1].read_bytes()[:400])  # cut inside the header
    for name, tags in (("dicom_nan_position", {"ImagePositionPatient": ["nan", "0", "0"]}),
                       ("dicom_inf_spacing", {"PixelSpacing": ["inf", "0.7"]}),
                       ("dicom_nan_slope", {"RescaleSlope": "nan"}),
                       ("dicom_huge_rows", {"Rows": 65535, "Columns": 65535})):
        series[name] = folder / name
        files = write_dicom_series(series[name], stored[:3], modality="MR", series_uid="1.2.3.4")
        with pydicom.config.disable_value_validation():
            dataset = pydicom.dcmread(files[1])
            for keyword, value in tags.items():
                setattr(dataset, keyword, value)
            dataset.save_as(files[1], enforce_file_format=True)
    series["dicom_two_series"] = folder / "dicom_two_series"
    write_dicom_series(series["dicom_two_series"], stored, modality="MR", series_uid="1.2.3.1")
    for file in write_dicom_series(folder / "other", stored, modality="MR", series_uid="1.2.3.2"):
        file.rename(series["dicom_two_series"] / f"B{file.name}")
    shutil.rmtree(folder / "other")
    series["dicom_tilted"] = folder / "dicom_tilted"
    for index, pixels in enumerate(stored):  # each slice 1 mm further posterior: a gantry tilt
        write_dicom_slice(series["dicom_tilted"] / f"{index}.dcm", pixels, (-30.0, -40.0 + index, -50.0 + 2.5 * index),
                          modality="MR", series_uid="1.2.3.5")
    return series


def _bad_labels(folder: Path) -> dict[str, Path]:
    """Folders holding one bad mask named like the good image."""
    liver = (_mr_canonical() > 450).astype(np.uint8)
    labels = {}
    off_grid = folder / "label_off_grid"
    _nifti(off_grid / f"{CASE}.nii.gz", np.zeros((4, 16, 12), np.uint8))
    labels["label_off_grid"] = off_grid
    shifted = folder / "label_shifted"
    _nifti(shifted / f"{CASE}.nii.gz", liver, canonical_affine(SHAPE, origin=(30.0, 40.0, -45.0)))
    labels["label_shifted"] = shifted
    values = folder / "label_several_values"
    organs = liver.copy()
    organs[:, :3, :3] = 2  # a second structure (CHAOS MR ground truth marks kidneys and spleen)
    _nifti(values / f"{CASE}.nii.gz", organs)
    labels["label_several_values"] = values
    truncated = folder / "label_truncated"
    data = _nifti(truncated / f"{CASE}.nii.gz", (anatomy((8, 32, 32)) > 0).astype(np.uint8)).read_bytes()
    (truncated / f"{CASE}.nii.gz").write_bytes(data[: len(data) // 2])
    labels["label_truncated"] = truncated
    return labels


def _lying_folders(folder: Path, good: Path, marker: Path,
                   other_network: Callable[[dict], dict]) -> dict[str, Path]:
    """Copies of a good model.safetensors + config.json folder (weights or segmenter), each lying
    in one way; ``other_network`` turns the config into one for a network of another shape."""
    tensors = {name: tensor.clone() for name, tensor in load_file(str(good / "model.safetensors")).items()}
    config = json.loads((good / "config.json").read_text())
    result: dict[str, Path] = {}

    def variant(name: str, config_text: str | None = None, weights: dict | bytes | None = None) -> None:
        target = folder / name
        shutil.copytree(good, target)
        if config_text is not None:
            (target / "config.json").write_text(config_text)
        if isinstance(weights, dict):
            save_file(weights, str(target / "model.safetensors"))
        elif isinstance(weights, bytes):
            (target / "model.safetensors").write_bytes(weights)
        result[name] = target

    variant("config_not_json", config_text='{"model": ')
    variant("config_unknown_field", config_text=json.dumps({**config, "learning_rate": 1e-4}))
    variant("config_other_network", config_text=json.dumps(other_network(config)))
    first = sorted(tensors)[0]
    variant("missing_tensor", weights={k: v for k, v in tensors.items() if k != first})
    variant("extra_tensor", weights={**tensors, "backdoor.weight": torch.zeros(3)})
    variant("int_tensor", weights={**tensors, first: tensors[first].to(torch.int32)})
    variant("pickle_as_safetensors", weights=pickle.dumps({"weights": Unpickled(marker)}))
    variant("zero_byte_safetensors", weights=b"")
    raw = (good / "model.safetensors").read_bytes()
    variant("truncated_safetensors", weights=raw[: len(raw) // 2])
    variant("no_safetensors")
    (result["no_safetensors"] / "model.safetensors").unlink()
    return result


def _bad_weights(folder: Path, good: Path, marker: Path) -> dict[str, Path]:
    folders = _lying_folders(folder, good, marker, lambda c: {**c, "model": {**c["model"], "base_width": 16}})
    config = json.loads((good / "config.json").read_text())
    escaping = [{**m, "name": "../../outside"} if i == 0 else m for i, m in enumerate(config["modalities"])]
    folders["config_modality_path"] = Path(shutil.copytree(good, folder / "config_modality_path"))
    (folders["config_modality_path"] / "config.json").write_text(json.dumps({**config, "modalities": escaping}))
    return folders


def _bad_checkpoints(folder: Path, marker: Path) -> dict[str, Path]:
    folder.mkdir(parents=True)
    files = {name: folder / f"{name}.pkl" for name in
             ("pickle_payload", "torch_payload", "text", "zero_bytes", "truncated", "safetensors", "not_a_dict")}
    files["pickle_payload"].write_bytes(pickle.dumps({"img_encoder.w": Unpickled(marker)}))
    torch.save({"out_img.weight": Unpickled(marker)}, files["torch_payload"])  # a zip checkpoint with code
    files["text"].write_bytes(b"def generator(): pass\n" * 10)
    files["zero_bytes"].write_bytes(b"")
    torch.save({"out_img.weight": torch.zeros(1, 64, 1, 1)}, files["truncated"])
    files["truncated"].write_bytes(files["truncated"].read_bytes()[:300])
    save_file({"out_img.weight": torch.zeros(1, 64, 1, 1)}, str(files["safetensors"]))
    torch.save(torch.zeros(3), files["not_a_dict"])
    return files


def _bad_datasets(folder: Path, base: Path, outside_file: Path) -> dict[str, Path]:
    result: dict[str, Path] = {}

    def variant(name: str) -> Path:
        result[name] = Path(shutil.copytree(base, folder / name, ignore=shutil.ignore_patterns(".cache")))
        return result[name]

    def first_image(root: Path) -> Path:
        return sorted((root / "train" / "ct" / "images").glob("*.nii.gz"))[0]

    for name, modality in (("dataset_parent_path", "../outside"), ("dataset_absolute_path", "/tmp/outside")):
        root = variant(name)
        spec = json.loads((root / "dataset.json").read_text())
        spec["modalities"][0]["name"] = modality
        (root / "dataset.json").write_text(json.dumps(spec))
    root = variant("dataset_symlink_out")
    image = first_image(root)
    image.unlink()
    image.symlink_to(outside_file)
    root = variant("dataset_truncated_image")
    image = first_image(root)
    image.write_bytes(image.read_bytes()[:200])
    for name, change in (("dataset_label_off_grid", "grid"), ("dataset_label_several_values", "values")):
        root = variant(name)
        label = root / "train" / "ct" / "labels" / first_image(root).name
        volume = nib.load(label)
        array = np.asanyarray(volume.dataobj).astype(np.uint8)
        if change == "grid":
            array = array[:, :-2]
        else:
            array[array > 0] = 1
            array[:3, :3, :] = 2
        write_nifti(label, array, volume.affine)
    return result


def _bad_chaos(folder: Path) -> dict[str, Path]:
    trees: dict[str, Path] = {}
    trees["chaos_missing_slice"] = build_chaos_tree(folder / "chaos_missing_slice")
    ct = trees["chaos_missing_slice"] / "Train_Sets" / "CT" / "1"
    (ct / "DICOM_anon" / "i0000,0000b.dcm").unlink()  # position 1 of 4: a gap in the series
    (ct / "Ground" / "liver_GT_000.png").unlink()
    trees["chaos_mixed_series"] = build_chaos_tree(folder / "chaos_mixed_series")
    patients = trees["chaos_mixed_series"] / "Train_Sets"
    stray = sorted((patients / "MR" / "3" / "T2SPIR" / "DICOM_anon").glob("*.dcm"))[0]
    shutil.copyfile(stray, patients / "CT" / "1" / "DICOM_anon" / "i0004,0000b.dcm")
    shutil.copyfile(patients / "CT" / "1" / "Ground" / "liver_GT_000.png",
                    patients / "CT" / "1" / "Ground" / "liver_GT_004.png")
    return trees


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("hostile")
    marker = tmp_path_factory.mktemp("marker") / "code-ran"
    good_folder = root / "good"
    good_image = _nifti(good_folder / f"{CASE}.nii.gz", _mr_canonical())
    good_truth = root / "truth"
    _nifti(good_truth / f"{CASE}.nii.gz", (_mr_canonical() > 450).astype(np.uint8))
    weights = make_tiny_weights(root / "weights", image_size=32)
    segmenter_config = SegmenterConfig(modality="t1w", intensity=IntensitySettings(kind="mr"), image_size=32,
                                       width=4, depth=3)
    torch.manual_seed(0)
    segmenter = save_segmenter(root / "segmenter", build_network(segmenter_config), segmenter_config)
    phantom = root / "phantom"
    write_phantom_dataset(phantom, cases=1, size=32, slices=4, test_cases=1)
    return Corpus(
        root=root, marker=marker, good_image=good_image, good_folder=good_folder, good_truth=good_truth,
        weights=weights, segmenter=segmenter,
        volumes=_bad_volumes(root / "volumes"),
        dicom=_bad_dicom(root / "dicom"),
        labels=_bad_labels(root / "labels"),
        bad_weights=_bad_weights(root / "bad_weights", weights, marker),
        bad_segmenters=_lying_folders(root / "bad_segmenters", segmenter, marker, lambda c: {**c, "width": 8}),
        checkpoints=_bad_checkpoints(root / "checkpoints", marker),
        datasets=_bad_datasets(root / "datasets", phantom, good_image),
        chaos=_bad_chaos(root / "chaos"),
    )


# ----------------------------------------------------------------------------- the matrix


def snapshot(root: Path) -> dict[str, str]:
    """``root`` and every entry under it: files by SHA-256, links by target, folders by name."""
    entries = {}
    for path in [root, *sorted(root.rglob("*"))] if root.is_dir() else [root]:
        relative = str(path.relative_to(root))
        if path.is_symlink():
            entries[relative] = f"link:{os.readlink(path)}"
        elif path.is_dir():
            entries[relative] = "folder"
        else:
            entries[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
    return entries


# A case: (command, kind of input, bad input name) -> argv builder and the path the error must name.
Build = Callable[[Corpus, Path, Path], list[str]]
VOLUME_NAMES = ("truncated", "corrupt", "text", "zero_bytes", "two_d", "four_d", "nan", "inf", "constant",
                "singular_affine", "huge_dims")
DICOM_NAMES = ("dicom_missing_slice", "dicom_mixed_series", "dicom_truncated", "dicom_nan_position",
               "dicom_inf_spacing", "dicom_nan_slope", "dicom_huge_rows", "dicom_two_series", "dicom_tilted")
LABEL_NAMES = ("label_off_grid", "label_shifted", "label_several_values", "label_truncated")
SEGMENTER_NAMES = ("config_not_json", "config_unknown_field", "config_other_network", "missing_tensor",
                   "extra_tensor", "int_tensor", "pickle_as_safetensors", "zero_byte_safetensors",
                   "truncated_safetensors", "no_safetensors")
WEIGHTS_NAMES = (*SEGMENTER_NAMES, "config_modality_path")
CHECKPOINT_NAMES = ("pickle_payload", "torch_payload", "text", "zero_bytes", "truncated", "safetensors",
                    "not_a_dict")
DATASET_NAMES = ("dataset_parent_path", "dataset_absolute_path", "dataset_symlink_out", "dataset_truncated_image",
                 "dataset_label_off_grid", "dataset_label_several_values")
CHAOS_NAMES = ("chaos_missing_slice", "chaos_mixed_series")

CPU = ["--device", "cpu"]


def _translate(c: Corpus, bad: Path, out: Path) -> list[str]:
    return ["translate", str(bad), "--from", "t1w", "--to", "ct", "-o", str(out / "out.nii.gz"),
            "-w", str(c.weights), "--preview", str(out / "preview.png"), *CPU]


def _segment(c: Corpus, bad: Path, out: Path) -> list[str]:
    return ["segment", str(bad), "-o", str(out / "mask.nii.gz"), "--segmenter", str(c.segmenter), *CPU]


def _enrich_volume(c: Corpus, bad: Path, out: Path) -> list[str]:
    return ["enrich", str(bad.parent), "--from", "t1w", "-o", str(out), "-w", str(c.weights), *CPU]


def _enrich_labels(c: Corpus, bad: Path, out: Path) -> list[str]:
    return ["enrich", str(c.good_folder), "--from", "t1w", "--labels", str(bad), "-o", str(out),
            "-w", str(c.weights), *CPU]


def _evaluate_masks(c: Corpus, bad: Path, out: Path) -> list[str]:
    return ["evaluate", "-m", "dice", "--pred", str(bad), "--truth", str(c.good_truth),
            "--json", str(out / "dice.json")]


def _segment_with(c: Corpus, bad: Path, out: Path) -> list[str]:
    return ["segment", str(c.good_image), "-o", str(out / "mask.nii.gz"), "--segmenter", str(bad), *CPU]


def _info(c: Corpus, bad: Path, out: Path) -> list[str]:
    return ["info", str(bad)]


def _translate_weights(c: Corpus, bad: Path, out: Path) -> list[str]:
    return ["translate", str(c.good_image), "--from", "t1w", "--to", "ct", "-o", str(out / "out.nii.gz"),
            "-w", str(bad), *CPU]


def _enrich_weights(c: Corpus, bad: Path, out: Path) -> list[str]:
    return ["enrich", str(c.good_folder), "--from", "t1w", "-o", str(out), "-w", str(bad), *CPU]


def _evaluate_weights(c: Corpus, bad: Path, out: Path) -> list[str]:
    return ["evaluate", "-m", "mae", "--data", str(c.root / "phantom"), "-w", str(bad),
            "--json", str(out / "mae.json"), *CPU]


def _convert(c: Corpus, bad: Path, out: Path) -> list[str]:
    return ["convert", str(bad), "-o", str(out / "weights")]


def _train(c: Corpus, bad: Path, out: Path) -> list[str]:
    return ["train", "--data", str(bad), "--out", str(out / "run"), "--preset", "tiny", "--image-size", "32",
            "--max-steps", "2", "--batch-size", "2", "--sample-every", "0", *CPU]


def _train_segmenter(c: Corpus, bad: Path, out: Path) -> list[str]:
    return ["train-segmenter", "--data", str(bad), "--modality", "ct", "-o", str(out / "segmenter"),
            "--image-size", "32", "--width", "4", "--depth", "3", "--epochs", "1", *CPU]


def _import_chaos(c: Corpus, bad: Path, out: Path) -> list[str]:
    return ["data", "import-chaos", str(bad), str(out / "data")]


def _cases() -> list:
    groups: list[tuple[str, Build, str, tuple[str, ...]]] = [
        ("translate", _translate, "volumes", VOLUME_NAMES),
        ("translate", _translate, "dicom", DICOM_NAMES),
        ("segment", _segment, "volumes", VOLUME_NAMES),
        ("segment", _segment, "dicom", DICOM_NAMES),
        ("enrich", _enrich_volume, "volumes", VOLUME_NAMES),
        ("enrich-labels", _enrich_labels, "labels", LABEL_NAMES),
        ("evaluate-dice", _evaluate_masks, "labels", LABEL_NAMES),
        ("info", _info, "bad_weights", WEIGHTS_NAMES),
        ("segment-segmenter", _segment_with, "bad_segmenters", SEGMENTER_NAMES),
        ("translate-weights", _translate_weights, "bad_weights", WEIGHTS_NAMES),
        ("enrich-weights", _enrich_weights, "bad_weights", WEIGHTS_NAMES),
        ("evaluate-weights", _evaluate_weights, "bad_weights", WEIGHTS_NAMES),
        ("convert", _convert, "checkpoints", CHECKPOINT_NAMES),
        ("train", _train, "datasets", DATASET_NAMES),
        ("train-segmenter", _train_segmenter, "datasets", DATASET_NAMES),
        ("import-chaos", _import_chaos, "chaos", CHAOS_NAMES),
    ]
    cases = []
    for command, build, kind, names in groups:
        for name in names:
            cases.append(pytest.param(build, kind, name, id=f"{command}-{name}"))
    return cases


def _named_path(kind: str, bad: Path) -> Path:
    """The path the error must name: the bad file or folder itself; for labels, the mask in the folder."""
    if kind == "labels":
        return bad / f"{CASE}.nii.gz"
    return bad


@pytest.mark.parametrize(("build", "kind", "name"), _cases())
def test_a_bad_input_is_refused_in_one_line_and_changes_nothing(corpus: Corpus, tmp_path: Path, build: Build,
                                                                kind: str, name: str) -> None:
    bad = getattr(corpus, kind)[name]
    out = tmp_path / "out"
    out.mkdir()
    inputs = [bad.parent if kind == "volumes" else bad, corpus.good_folder, corpus.good_truth, corpus.weights,
              corpus.segmenter, corpus.root / "phantom"]
    before = [snapshot(path) for path in inputs]

    with warnings.catch_warnings(record=True) as caught:  # outside pytest, a warning is a second stderr line
        warnings.simplefilter("always")
        result = runner.invoke(COMMAND, build(corpus, bad, out))

    assert [str(w.message) for w in caught] == []
    assert result.exit_code not in (0, None), result.output
    assert isinstance(result.exception, SystemExit), f"raised {result.exception!r}"  # not a crash
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    named = _named_path(kind, bad)
    assert str(named) in lines[0] or str(named.resolve()) in lines[0], lines[0]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == []  # no partial output
    assert [snapshot(path) for path in inputs] == before  # inputs untouched
    assert not corpus.marker.exists()  # nothing was unpickled


def test_the_good_inputs_of_the_corpus_work(corpus: Corpus, tmp_path: Path) -> None:
    """The matrix above refuses bad inputs, not everything: the same commands accept the good ones."""
    for arguments in (
        _translate(corpus, corpus.good_image, tmp_path),
        _segment(corpus, corpus.good_image, tmp_path),
        _enrich_labels(corpus, corpus.good_truth, tmp_path / "raw"),
        _evaluate_masks(corpus, corpus.good_truth, tmp_path),
        _info(corpus, corpus.weights, tmp_path),
    ):
        result = runner.invoke(COMMAND, arguments)
        assert result.exit_code == 0, (arguments[0], result.output)
    assert (tmp_path / "out.nii.gz").is_file() and (tmp_path / "mask.nii.gz").is_file()
    assert json.loads((tmp_path / "dice.json").read_text())


# ----------------------------------------------------------------------------- trust


@functools.cache
def _package_calls() -> tuple[tuple[str, str, ast.Call], ...]:
    """Every call in the package: (module path, function as written, call)."""
    package = Path(targan_cli.__file__).parent
    return tuple((file.relative_to(package).as_posix(), ast.unparse(node.func), node)
                 for file in sorted(package.rglob("*.py"))
                 for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))) if isinstance(node, ast.Call))


def _calls(function: str) -> list[tuple[str, ast.Call]]:
    """Every call of ``function`` (as written, e.g. "torch.load") in the package: (module path, call)."""
    return [(module, call) for module, name, call in _package_calls() if name == function]


def _keyword(call: ast.Call, name: str) -> object:
    return next((ast.literal_eval(k.value) for k in call.keywords if k.arg == name), None)


def test_nothing_in_the_package_unpickles_without_weights_only() -> None:
    """Weights load from safetensors only; torch.load (weights_only=True, no code runs) reads the
    official checkpoints of `convert` and the run's own resume state; nothing else deserializes code."""
    loads = _calls("torch.load")
    assert {module for module, _ in loads} == {"io/official.py", "workflows/train.py"}
    assert all(_keyword(call, "weights_only") is True for _, call in loads)
    for function in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load", "marshal.loads",
                     "torch.serialization.load", "eval", "exec"):
        assert _calls(function) == [], function
    assert all(_keyword(call, "allow_pickle") in (None, False) for _, call in _calls("np.load"))
    # TorchScript and torch.export files (--fid-features) run their own graph, and torch.export.load
    # may unpickle constants: a file the user names for evaluation, read in one place only.
    for function in ("torch.jit.load", "torch.export.load"):
        assert {module for module, _ in _calls(function)} <= {"io/features.py"}, function
    assert _calls("torch.export.load")  # the check above can fail: the call is found where it is


def test_a_hub_revision_is_pinned_and_its_commit_recorded(corpus: Corpus, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`--revision v1` loads the v1 snapshot, not main's, and the dataset records the commit it came from."""
    repo, main, v1 = "tiny-org/tiny-targan", "a" * 40, "b" * 40
    other = make_tiny_weights(tmp_path / "other", seed=1, image_size=32)
    cache = tmp_path / "hf-cache"
    cache_hub_repo(cache, repo, corpus.weights, commit=main, ref="main")
    snapshot = cache_hub_repo(cache, repo, other, commit=v1, ref="v1")
    use_offline_hub_cache(monkeypatch, cache)

    raw = tmp_path / "raw"
    result = runner.invoke(COMMAND, ["enrich", str(corpus.good_folder), "--from", "t1w", "-o", str(raw), "-w", repo,
                                     "--revision", "v1", *CPU])

    assert result.exit_code == 0, result.output
    written = json.loads((raw / "Dataset501_LiverT1WEnriched" / "dataset.json").read_text())["targan"]["weights"]
    assert written["provenance"]["hub_commit"] == v1 and written["provenance"]["hub_revision"] == "v1"
    assert written["provenance"]["hub_repo"] == repo and written["folder"] == str(snapshot)
    assert written["sha256"] == hashlib.sha256((other / "model.safetensors").read_bytes()).hexdigest()
    refused = runner.invoke(COMMAND, ["info", f"{repo}@v2"])  # a revision that is not there is not replaced
    assert refused.exit_code == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert f"{repo!r}" in refused.stderr and "Traceback" not in refused.output
