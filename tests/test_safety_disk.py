"""Rule 4: a full disk ends the command with one line naming the file and the disk; no partial
output is left, the inputs are as before, and a training run keeps its last good checkpoint.

A real full disk where the test can make one: a small tmpfs, which needs root (or CAP_SYS_ADMIN)
and Linux; elsewhere those cases are skipped with the reason. The simulated full disks (each
library's own error type raised through the write path) run everywhere.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import typer
from click.testing import CliRunner
from safetensors import SafetensorError

import targan_cli.io.weights
from cli_safety import data, refusal, targan, tree_digest, write_case, weights  # noqa: F401 (fixtures)
from targan_cli.cli import app
from test_faults import _one_error_line
from test_official import official_state_dict

COMMAND = typer.main.get_command(app)
TINY_TRAIN = ["--preset", "tiny", "--image-size", "32", "--batch-size", "2", "--device", "cpu", "--sample-every", "0"]


def _mount_tmpfs(folder: Path, size: str) -> str | None:
    """Mount a tmpfs of ``size`` on ``folder``; the reason why not, or None."""
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        return "needs Linux and mount(8)"
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", f"targan-test-{uuid.uuid4().hex[:8]}",
                           str(folder)], capture_output=True, text=True)
    return None if done.returncode == 0 else f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 256 KiB file system, full long before any of these outputs is written."""
    folder = tmp_path / "disk"
    reason = _mount_tmpfs(folder, "256k")
    if reason is not None:
        pytest.skip(reason)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _full_disk_refusal(result: subprocess.CompletedProcess, disk: Path) -> str:
    """The one line of a full disk: it names the disk's mount point, and a file on it."""
    line = refusal(result, "No space left on device", f"the disk mounted at {disk}", exit_code=1)
    assert line.startswith(f"error: {disk}/"), line
    return line


def _nothing_partial(disk: Path) -> list[str]:
    """Every entry left on the disk (temporaries and locks are hidden .NAME.tmp-*)."""
    return sorted(str(path.relative_to(disk)) for path in disk.rglob("*") if ".tmp-" in path.name)


def test_translate_on_a_full_disk(small_disk: Path, weights: Path, tmp_path: Path) -> None:
    source = write_case(tmp_path / "in" / "big.nii.gz", shape=(24, 96, 96))
    before = tree_digest(source, weights)
    result = targan("translate", source, "-o", small_disk / "out.nii.gz", "--from", "ct", "--to", "t1w",
                    "-w", weights, "--device", "cpu")
    assert str(small_disk / "out.nii.gz") in _full_disk_refusal(result, small_disk)
    assert not (small_disk / "out.nii.gz").exists() and _nothing_partial(small_disk) == []
    assert tree_digest(source, weights) == before


def test_train_on_a_full_disk(small_disk: Path, data: Path) -> None:
    before = tree_digest(data)
    result = targan("train", "--data", data, "--out", small_disk / "run", "--max-steps", "2", *TINY_TRAIN)
    _full_disk_refusal(result, small_disk)
    assert _nothing_partial(small_disk) == []
    assert {k: v for k, v in tree_digest(data).items() if ".cache" not in k} == \
        {k: v for k, v in before.items() if ".cache" not in k}


def test_train_segmenter_on_a_full_disk(small_disk: Path, data: Path) -> None:
    before = tree_digest(data)
    result = targan("train-segmenter", "--data", data, "--modality", "ct", "--out", small_disk / "seg", "--epochs",
                    "1", "--width", "64", "--depth", "3", "--device", "cpu")
    assert str(small_disk / "seg") in _full_disk_refusal(result, small_disk)
    assert list(small_disk.iterdir()) == []
    assert {k: v for k, v in tree_digest(data).items() if ".cache" not in k} == \
        {k: v for k, v in before.items() if ".cache" not in k}


def test_enrich_on_a_full_disk(small_disk: Path, weights: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "in"
    for index in range(2):
        write_case(inputs / f"case{index}.nii.gz", seed=index, shape=(16, 96, 96))
    before = tree_digest(inputs)
    result = targan("enrich", inputs, "--from", "ct", "-o", small_disk, "-w", weights, "--device", "cpu")
    _full_disk_refusal(result, small_disk)
    assert _nothing_partial(small_disk) == []
    assert tree_digest(inputs) == before


def test_convert_on_a_full_disk(small_disk: Path, tmp_path: Path) -> None:
    checkpoint = tmp_path / "netG_use_50.pkl"
    torch.save(official_state_dict(), checkpoint)
    before = tree_digest(checkpoint)
    result = targan("convert", checkpoint, "-o", small_disk / "weights")
    assert str(small_disk / "weights") in _full_disk_refusal(result, small_disk)
    assert list(small_disk.iterdir()) == []
    assert tree_digest(checkpoint) == before


# ----------------------------------------------------------------------------- simulated full disks


def _segmenter_arguments(data: Path, out: Path) -> list[str]:
    return ["train-segmenter", "--data", str(data), "--modality", "ct", "--out", str(out), "--epochs", "1",
            "--width", "4", "--depth", "3", "--device", "cpu"]


def test_safetensors_full_disk_error_is_one_error_line(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(tensors, path, metadata=None):
        Path(path).write_bytes(b"\0" * 1024)  # what fitted
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(targan_cli.io.weights, "save_file", full)
    out = tmp_path / "seg"
    line = _one_error_line(CliRunner().invoke(COMMAND, _segmenter_arguments(data, out)))
    assert f"error: {out}: cannot write: No space left on device (the disk mounted at " in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("free", [0, 1 << 40])
def test_torch_save_failures_are_one_line_and_full_disks_are_named(data: Path, tmp_path: Path, free: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save does not say why it failed; a disk with (almost) no space left is named as full."""
    def failing(obj, path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 1024)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(torch, "save", failing)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=free))
    run = tmp_path / "run"
    line = _one_error_line(CliRunner().invoke(COMMAND, ["train", "--data", str(data), "--out", str(run), "--max-steps", "1",
                                                  *TINY_TRAIN]))
    assert line.startswith(f"error: {run / 'checkpoints' / 'last.pt'}: cannot write: ")
    assert ("No space left on device" in line) == (free == 0), line
    assert "unexpected pos" in line or free == 0
    assert not any(".tmp-" in path.name for path in run.rglob("*"))


def test_a_full_disk_while_logging_the_losses_is_one_error_line(data: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    opened = Path.open

    def full(path, mode="r", *args, **kwargs):
        if path.name == "metrics.jsonl" and "a" in mode:
            raise OSError(28, os.strerror(28))
        return opened(path, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", full)
    run = tmp_path / "run"
    line = _one_error_line(CliRunner().invoke(COMMAND, ["train", "--data", str(data), "--out", str(run), "--max-steps", "1",
                                                  "--log-every", "1", *TINY_TRAIN]))
    assert line.startswith(f"error: {run / 'metrics.jsonl'}: cannot write: No space left on device")
