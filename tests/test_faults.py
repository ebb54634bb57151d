"""Faults: processes killed with SIGKILL at awkward moments, and a full disk.

`translate` and `enrich` killed while writing leave every output either complete (new or
previous) or absent; `train` killed while writing a checkpoint resumes from the last complete one
and finishes. A full disk (a writer that fails with ENOSPC after writing part of the file) gives
one line naming the file, and the last good output or checkpoint stays as it was. The killed runs
are real ``python -m targan_cli`` processes; the rest runs in-process.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import typer
from click.testing import CliRunner

from targan_cli.cli import app
from targan_cli.data.phantom import write_phantom_dataset
from targan_cli.io import volume as volume_module
from targan_cli.io.weights import load_weights
from targan_cli.workflows.enrich import verify_nnunet_dataset
from targan_cli.workflows import translate as translate_module
from targan_cli.workflows.train import load_checkpoint
from volume_factories import anatomy, oriented, write_nifti
from weights_factories import make_tiny_weights

runner = CliRunner()
COMMAND = typer.main.get_command(app)
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
SHAPE = (24, 128, 128)  # canonical (Z, H, W): big enough that writing a file takes a moment
FILE_SHAPE = (128, 128, 24)  # the same in the files' RAS voxel order
TINY_TRAIN = ["--preset", "tiny", "--image-size", "32", "--batch-size", "2", "--epochs", "1",
              "--sample-every", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny", image_size=32)


def _volume(path: Path, canonical: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_nifti(path, *oriented(canonical, "RAS"))


def _ct(path: Path, shape: tuple[int, int, int], seed: int) -> Path:
    """A CT-like volume (HU, canonical ``shape``)."""
    return _volume(path, anatomy(shape, seed))


def _temporaries(folder: Path) -> list[Path]:
    """atomic_output's temporaries (``.<name>.tmp-*``) in a folder."""
    return sorted(p for p in folder.glob(".*.tmp-*")) if folder.is_dir() else []


def _partly_written(folder: Path, prefix: str = ".") -> bool:
    """Whether a temporary whose name starts with ``prefix`` already holds data: a write under way."""
    for path in _temporaries(folder):
        with contextlib.suppress(FileNotFoundError):  # renamed into place meanwhile
            if path.name.startswith(prefix) and path.stat().st_size > 0:
                return True
    return False


def _complete_nifti(path: Path) -> np.ndarray:
    """The voxels of a NIfTI file, read to the end (a partial file fails here)."""
    return np.asanyarray(nib.load(path).dataobj)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def kill_when(arguments: list[str], condition: Callable[[], bool], log: Path, timeout: float = 120.0) -> bool:
    """Run ``python -m targan_cli ARGUMENTS``; SIGKILL it as soon as ``condition()`` holds.

    Returns True when it was killed, False when it ended first (``log`` holds its stderr).
    """
    with log.open("wb") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "targan_cli", *arguments], stdout=subprocess.DEVNULL,
                                   stderr=stderr, env=ENVIRONMENT)
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None:
            if condition():
                process.send_signal(signal.SIGKILL)
                process.wait()
                return True
            assert time.monotonic() < deadline, "the process neither met the condition nor ended"
            time.sleep(0.001)
        return False
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def no_space(after_calls: int, write: Callable[..., None]) -> Callable[..., None]:
    """A writer that works ``after_calls`` times, then writes half a file and fails like a full disk."""
    calls = 0

    def failing(obj, path, *args, **kwargs):
        nonlocal calls
        calls += 1
        if calls <= after_calls:
            return write(obj, path, *args, **kwargs)
        Path(path).write_bytes(b"\0" * 4096)  # what fitted before the disk filled up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return failing


def _one_error_line(result) -> str:
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ----------------------------------------------------------------------------- SIGKILL


def test_translate_killed_while_writing_leaves_complete_or_previous_outputs(tmp_path: Path, weights: Path) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    for name, seed in (("a", 1), ("b", 2)):
        _ct(inputs / f"{name}.nii.gz", SHAPE, seed)
    previous = _ct(out / "a.nii.gz", (4, 8, 8), seed=3)  # an earlier result that --overwrite replaces
    previous_sha256 = _sha256(previous)
    arguments = ["translate", str(inputs), "--from", "ct", "--to", "t1w", "-o", str(out), "-w", str(weights),
                 "--device", "cpu", "--overwrite"]

    # Killed halfway through writing an output (or, should the poll miss that, once one was written).
    def writing() -> bool:
        return _partly_written(out) or (out / "b.nii.gz").exists() or _sha256(previous) != previous_sha256

    assert kill_when(arguments, writing, tmp_path / "stderr.txt")

    if any(p.name.startswith(".a.tmp-") for p in _temporaries(out)):  # killed while writing a: not renamed
        assert _sha256(out / "a.nii.gz") == previous_sha256
    elif _sha256(out / "a.nii.gz") != previous_sha256:  # replaced: by a complete output
        assert _complete_nifti(out / "a.nii.gz").shape == FILE_SHAPE
    assert not (out / "b.nii.gz").exists() or _complete_nifti(out / "b.nii.gz").shape == FILE_SHAPE
    assert all(p.name.startswith(".") and ".tmp-" in p.name for p in out.iterdir()
               if p.name not in ("a.nii.gz", "b.nii.gz"))

    result = runner.invoke(COMMAND, arguments)  # a rerun completes and removes the killed run's temporaries
    assert result.exit_code == 0, result.output
    for name in ("a", "b"):
        assert _complete_nifti(out / f"{name}.nii.gz").shape == FILE_SHAPE
    assert _temporaries(out) == []


def test_enrich_killed_while_writing_resumes_into_a_valid_dataset(tmp_path: Path, weights: Path) -> None:
    inputs, labels, raw = tmp_path / "in", tmp_path / "labels", tmp_path / "raw"
    for index in range(3):
        mr = np.clip(anatomy(SHAPE, seed=index) + 400, 0, None).astype(np.int16)  # bright body, dark air
        _volume(inputs / f"case{index}.nii.gz", mr)
        _volume(labels / f"case{index}.nii.gz", (mr > 480).astype(np.uint8))
    folder = raw / "Dataset501_LiverT1WEnriched"
    images = folder / "imagesTr"
    arguments = ["enrich", str(inputs), "--from", "t1w", "--labels", str(labels), "-o", str(raw),
                 "-w", str(weights), "--device", "cpu"]

    # Killed halfway through a file of the second case (or, should the poll miss that, once one is
    # there). The writer threads work on several files at once, so the first case may or may not be
    # complete by then: whatever is in place is complete, and the rerun writes only what is missing.
    def writing_the_second_case() -> bool:
        return _partly_written(images, ".case1") or any(images.glob("case1_*"))

    assert kill_when(arguments, writing_the_second_case, tmp_path / "stderr.txt")

    assert not (folder / "dataset.json").exists()  # written last, so absent: nnU-Net cannot take the dataset
    for path in [*images.glob("*.nii.gz"), *(folder / "labelsTr").glob("*.nii.gz")]:
        if not path.name.startswith("."):
            assert _complete_nifti(path).shape == FILE_SHAPE, path
    complete = [index for index in range(3)
                if all((images / f"case{index}_{c:04d}.nii.gz").exists() for c in range(3))
                and (folder / "labelsTr" / f"case{index}.nii.gz").exists()]
    assert len(complete) < 3  # killed while case1 was under way
    before = {p.name: p.stat().st_mtime_ns for p in images.glob("*.nii.gz")}

    result = runner.invoke(COMMAND, arguments)
    assert result.exit_code == 0, result.output
    written = 3 - len(complete)
    assert f"{written} case{'s' if written != 1 else ''} written, {len(complete)} already complete" in result.output
    for index in complete:  # a complete case is left as it was
        for c in range(3):
            name = f"case{index}_{c:04d}.nii.gz"
            assert (images / name).stat().st_mtime_ns == before[name], name
    assert verify_nnunet_dataset(folder) == []
    assert _temporaries(images) == [] and _temporaries(folder / "labelsTr") == []
    assert json.loads((folder / "dataset.json").read_text())["numTraining"] == 3


def test_train_killed_while_checkpointing_resumes_and_finishes(tmp_path: Path) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    write_phantom_dataset(data, cases=1, size=32, slices=4, test_cases=1)
    checkpoints = run / "checkpoints"
    arguments = ["train", "--data", str(data), "--out", str(run), "--max-steps", "3", "--checkpoint-every", "1",
                 "--keep", "3", *TINY_TRAIN]

    # Killed while the checkpoint of step 2 is being written over the complete one of step 1 (or,
    # should the poll miss that, right after).
    def writing_over_a_checkpoint() -> bool:
        overwriting = (checkpoints / "last.pt").exists() and _partly_written(checkpoints, ".last.tmp-")
        return overwriting or (checkpoints / "step_0000002.pt").exists()

    assert kill_when(arguments, writing_over_a_checkpoint, tmp_path / "stderr.txt")

    killed_at = load_checkpoint(checkpoints / "last.pt")["step"]  # complete and loadable
    assert killed_at in (1, 2)
    assert load_weights(run / "export").config.provenance["steps"] >= 1

    result = runner.invoke(COMMAND, [*arguments, "--resume"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(checkpoints / "last.pt")["step"] == 3
    assert load_weights(run / "export").config.provenance["steps"] == 3
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()][-1] == 3


# ----------------------------------------------------------------------------- full disk


def test_a_full_disk_while_checkpointing_keeps_the_last_good_checkpoint(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    data, run = tmp_path / "data", tmp_path / "run"
    write_phantom_dataset(data, cases=1, size=32, slices=4, test_cases=1)
    monkeypatch.setattr(torch, "save", no_space(after_calls=1, write=torch.save))  # step 1 saves, step 2 fails

    result = runner.invoke(COMMAND, ["train", "--data", str(data), "--out", str(run), "--max-steps", "3",
                                     "--checkpoint-every", "1", *TINY_TRAIN])

    line = _one_error_line(result)
    assert str(run / "checkpoints" / "last.pt") in line and "No space left on device" in line
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 1
    assert load_weights(run / "export").config.provenance["steps"] == 1
    assert _temporaries(run / "checkpoints") == [] and _temporaries(run) == []


def test_a_full_disk_while_translating_keeps_the_previous_output(tmp_path: Path, weights: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    source = _ct(tmp_path / "ct.nii.gz", (4, 16, 16), seed=1)
    output = _ct(tmp_path / "out" / "t1w.nii.gz", (2, 8, 8), seed=2)
    previous = _sha256(output)
    monkeypatch.setattr(volume_module, "save_nifti", no_space(after_calls=0, write=volume_module.save_nifti))

    result = runner.invoke(COMMAND, ["translate", str(source), "--from", "ct", "--to", "t1w", "-o", str(output),
                                     "-w", str(weights), "--device", "cpu", "--overwrite"])

    line = _one_error_line(result)
    assert str(output) in line and "No space left on device" in line
    assert _sha256(output) == previous
    assert sorted(p.name for p in output.parent.iterdir()) == ["t1w.nii.gz"]


def test_a_full_disk_stops_a_translate_folder_run(tmp_path: Path, weights: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    inputs, out = tmp_path / "in", tmp_path / "out"
    for name, seed in (("a", 1), ("b", 2), ("c", 3)):
        _ct(inputs / f"{name}.nii.gz", SHAPE, seed)
    translated = []
    add = translate_module.ModelStage.add
    monkeypatch.setattr(translate_module.ModelStage, "add", lambda stage, key, read: (
        translated.append(read[1].volume.source.name), add(stage, key, read))[1])
    monkeypatch.setattr(volume_module, "save_nifti", no_space(after_calls=1, write=volume_module.save_nifti))

    line = _one_error_line(runner.invoke(COMMAND, ["translate", str(inputs), "--from", "ct", "--to", "t1w", "-o",
                                                   str(out), "-w", str(weights), "--device", "cpu",
                                                   "--io-workers", "0"]))

    assert str(out / "b.nii.gz") in line and "No space left on device" in line and "failed" not in line
    assert translated == ["a.nii.gz", "b.nii.gz"]  # c was not translated for nothing
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["a.json", "a.nii.gz"]
    assert _temporaries(out) == []


def test_a_full_disk_while_enriching_stops_keeps_complete_cases_and_a_rerun_finishes(
        tmp_path: Path, weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    inputs, raw = tmp_path / "in", tmp_path / "raw"
    for index in range(3):
        _ct(inputs / f"case{index}.nii.gz", (4, 16, 16), seed=index)
    arguments = ["enrich", str(inputs), "--from", "ct", "-o", str(raw), "-w", str(weights), "--device", "cpu",
                 "--io-workers", "0"]  # one case after the other: the writes come in a known order
    # case0: 3 files; case1: 1, then the disk is full
    monkeypatch.setattr(volume_module, "save_nifti", no_space(after_calls=4, write=volume_module.save_nifti))

    line = _one_error_line(runner.invoke(COMMAND, arguments))

    folder = raw / "Dataset501_LiverCTEnriched"
    assert "No space left on device" in line and str(folder / "imagesTs" / "case1_0001.nii.gz") in line
    assert "failed" not in line  # the disk's error itself, not a count of failed cases: the run stopped
    written = sorted(p.name for p in (folder / "imagesTs").iterdir())
    assert written == ["case0_0000.nii.gz", "case0_0001.json", "case0_0001.nii.gz", "case0_0002.json",
                       "case0_0002.nii.gz"]  # case1 whole or not at all; the run stopped before case2
    assert all(_complete_nifti(folder / "imagesTs" / name).shape == (16, 16, 4) for name in written
               if name.endswith(".nii.gz"))
    assert not (folder / "dataset.json").exists()  # stopped: not a dataset yet

    monkeypatch.undo()  # space again
    result = runner.invoke(COMMAND, arguments)
    assert result.exit_code == 0, result.output
    assert "2 cases written, 1 already complete" in result.output
    assert verify_nnunet_dataset(folder) == []


