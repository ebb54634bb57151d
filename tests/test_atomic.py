"""Atomic outputs: complete or absent, never over an existing file without overwrite."""

import os
import socket
import stat
import subprocess
import sys

import pytest

from targan_cli.errors import TarganError
from targan_cli.io.atomic import MARKER, atomic_output, mark_folder


def test_success_renames_into_place_with_ordinary_permissions(tmp_path):
    target = tmp_path / "sub" / "out.nii.gz"
    with atomic_output(target) as temporary:
        assert temporary.parent == target.parent and temporary.name.endswith(".nii.gz")
        temporary.write_bytes(b"data")
        assert not target.exists()
    assert target.read_bytes() == b"data"
    assert list(target.parent.iterdir()) == [target]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_failure_leaves_nothing_and_keeps_the_previous_output(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("previous")
    with pytest.raises(RuntimeError):
        with atomic_output(target, overwrite=True) as temporary:
            temporary.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "previous"
    assert list(tmp_path.iterdir()) == [target]


def test_existing_output_is_refused_without_overwrite(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("mine")
    with pytest.raises(TarganError, match="already exists; pass --overwrite"):
        with atomic_output(target):
            pass
    assert target.read_text() == "mine"


def test_an_os_error_while_writing_becomes_a_one_line_error(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(TarganError, match="out.txt: cannot write: No space left"):
        with atomic_output(target):
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_folders_are_replaced_whole(tmp_path):
    target = tmp_path / "weights"
    target.mkdir()
    (target / "old.txt").write_text("old")
    mark_folder(target, "test", "folder")  # made by targan: --overwrite may replace it
    with atomic_output(target, overwrite=True, is_dir=True, command="test") as temporary:
        (temporary / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["weights"]


def test_temporaries_left_by_a_killed_process_of_this_host_are_removed_on_the_next_write(tmp_path):
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead = int(finished.stdout)  # a process id that no longer runs
    host = "".join(c for c in socket.gethostname() if c.isalnum())[:40] or "host"
    stale = tmp_path / f".out.tmp-{host}_{dead}-abc123.nii.gz"
    stale_folder = tmp_path / f".out.tmp-{host}_{dead}-def456"
    live = tmp_path / f".out.tmp-{host}_{os.getpid()}-ghi789.nii.gz"  # a running writer's
    elsewhere = tmp_path / f".out.tmp-otherhost_{dead}-jkl012.nii.gz"  # another host's, on a shared disk
    other_name = tmp_path / f".other.tmp-{host}_{dead}-mno345.nii.gz"  # another output's
    for path in (stale, live, elsewhere, other_name):
        path.write_bytes(b"partial")
    stale_folder.mkdir()
    (stale_folder / "model.safetensors").write_bytes(b"partial")

    with atomic_output(tmp_path / "out.nii.gz") as temporary:
        assert temporary.name.startswith(f".out.tmp-{host}_{os.getpid()}-")
        temporary.write_bytes(b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out.nii.gz", live.name, elsewhere.name, other_name.name])
