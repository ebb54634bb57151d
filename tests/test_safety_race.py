"""Rule 3: the final move cannot replace an output that appeared meanwhile (without --overwrite),
and two writers of one output do not both win: one writes, the other says that the output
appeared or is being written."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import pytest

from cli_safety import ENVIRONMENT, refusal, write_case
from targan_cli.errors import TarganError
from targan_cli.io.atomic import MARKER, atomic_output, lock_name
from weights_factories import make_tiny_weights


def test_two_translations_to_one_output_started_together_one_wins(tmp_path: Path) -> None:
    weights = make_tiny_weights(tmp_path / "weights")
    output = tmp_path / "out" / "same.nii.gz"
    sources = [write_case(tmp_path / f"in{index}.nii.gz", seed=index, shape=(8, 32, 32)) for index in range(2)]
    processes = [subprocess.Popen([sys.executable, "-m", "targan_cli", "translate", source, "-o", output,
                                   "--from", "ct", "--to", "t1w", "-w", weights, "--device", "cpu"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENVIRONMENT)
                 for source in sources]
    results = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    winners = [result for result in results if result.returncode == 0]
    losers = [result for result in results if result.returncode != 0]
    assert len(winners) == 1 and len(losers) == 1, [result.stderr for result in results]
    line = refusal(losers[0], str(output))
    assert any(words in line for words in ("appeared while this command ran", "is being written",
                                           "already exists")), line
    assert "Wrote" in winners[0].stdout
    assert nib.load(output).shape == nib.load(sources[0]).shape  # complete
    assert sorted(p.name for p in output.parent.iterdir()) == ["same.json", "same.nii.gz"]  # its sidecar; no temporary, no lock


def test_a_file_that_appears_meanwhile_is_kept_without_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "report.json"
    with pytest.raises(TarganError, match="appeared while this command ran"):
        with atomic_output(target) as temporary:
            temporary.write_text('{"mine": 1}')
            target.write_text("someone else's")  # written by another program while this one worked
    assert target.read_text() == "someone else's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_folder_that_appears_meanwhile_is_kept_without_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "weights"
    with pytest.raises(TarganError, match="targan did not make it"):
        with atomic_output(target, is_dir=True, command="test") as temporary:
            (temporary / "model.safetensors").write_text("mine")
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in target.iterdir()) == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]


def test_an_output_locked_by_a_running_writer_is_refused_and_free_once_it_is_gone(tmp_path: Path) -> None:
    target = tmp_path / "out.nii.gz"
    lock = lock_name(target)
    holder = subprocess.Popen([sys.executable, "-c", f"""
import fcntl, os, sys, time
handle = os.open({str(lock)!r}, os.O_CREAT | os.O_RDWR)
fcntl.flock(handle, fcntl.LOCK_EX)
print("locked", flush=True)
time.sleep(120)
"""], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TarganError, match="is being written by another process"):
            with atomic_output(target) as temporary:
                temporary.write_bytes(b"never")
        assert not target.exists()
    finally:
        holder.kill()
        holder.wait()
    deadline = time.monotonic() + 30
    while True:  # the system releases a killed process's lock; its empty file stays behind
        try:
            with atomic_output(target) as temporary:
                temporary.write_bytes(b"written")
            break
        except TarganError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert target.read_bytes() == b"written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]


def test_the_marker_is_written_into_a_folder_before_it_is_moved_into_place(tmp_path: Path) -> None:
    with atomic_output(tmp_path / "folder", is_dir=True, command="test") as temporary:
        assert not (temporary / MARKER).exists()
    assert (tmp_path / "folder" / MARKER).is_file()
