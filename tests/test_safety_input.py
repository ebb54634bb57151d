"""Rule 8: unreadable files and folders, control characters in names, too many --workers and
broken links in an input folder: each is one line naming the path or value (never a usage box
or a traceback), and no worker process outlives a failed or interrupted command."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_safety import ENVIRONMENT, data, refusal, targan, tree_digest, weights, write_case  # noqa: F401 (fixtures)

NOBODY = 65534
TINY_TRAIN = ["--preset", "tiny", "--image-size", "32", "--batch-size", "2", "--device", "cpu", "--sample-every", "0"]


def _as_nobody(*arguments: object, cwd: Path) -> subprocess.CompletedProcess:
    """``targan ARGUMENTS`` run as the user nobody, for whom file permissions apply (not to root)."""
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", sys.executable,
                           "-m", "targan_cli", *map(str, arguments)], capture_output=True, text=True, timeout=300,
                          env=ENVIRONMENT, cwd=cwd)


@pytest.fixture
def shared(weights: Path) -> Iterator[Path]:
    """A folder another user can enter (pytest's own are private to root), with a weights copy."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv(1), to run the command as another user for whom permissions apply")
    folder = Path(tempfile.mkdtemp(prefix="targan-permissions-"))
    folder.chmod(0o777)
    subprocess.run(["cp", "-r", str(weights), str(folder / "weights")], check=True)
    subprocess.run(["chmod", "-R", "a+rX", str(folder / "weights")], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["chmod", "-R", "u+rwX", str(folder)], check=False)
        subprocess.run(["rm", "-rf", str(folder)], check=False)


def test_unreadable_files_and_folders_are_one_line_naming_them(shared: Path) -> None:
    unreadable = write_case(shared / "unreadable.nii.gz")
    unreadable.chmod(0o000)
    closed = shared / "closed"  # neither readable nor searchable
    write_case(closed / "case.nii.gz")
    closed.chmod(0o000)
    weights = shared / "weights"
    translate = ["--from", "ct", "--to", "t1w", "-w", weights, "--device", "cpu"]
    cases = [
        (["translate", unreadable, "-o", shared / "out.nii.gz", *translate], unreadable),
        (["translate", closed, "-o", shared / "out", *translate], closed),
        (["translate", closed / "case.nii.gz", "-o", shared / "out.nii.gz", *translate], closed / "case.nii.gz"),
        (["evaluate", "-m", "dice", "--pred", closed, "--truth", closed], closed),
        (["train", "--data", closed, "--out", shared / "run"], closed),
        (["enrich", closed, "--from", "ct", "--single-channel", "-o", shared / "raw"], closed),
    ]
    for arguments, named in cases:
        result = _as_nobody(*arguments, cwd=shared)
        line = refusal(result, str(named), "Permission denied")
        assert "Usage" not in result.stderr and "Invalid value" not in line, arguments
    assert sorted(p.name for p in shared.iterdir()) == ["closed", "unreadable.nii.gz", "weights"]


def test_control_characters_in_names_are_escaped_into_one_line(tmp_path: Path, weights: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    broken = folder / "bad\nname\x1b[2J.nii.gz"
    broken.write_bytes(b"not a volume")
    line = refusal(targan("translate", broken, "-o", tmp_path / "out.nii.gz", "--from", "ct", "--to", "t1w",
                          "-w", weights, "--device", "cpu"), "bad\\nname\\x1b[2J.nii.gz")
    assert "\x1b" not in line
    line = refusal(targan("translate", folder / "x.nii.gz", "-o", tmp_path / "out.nii.gz", "--from", "ct",
                          "--to", "t1\nw", "-w", weights, "--device", "cpu"))
    assert "\n" not in line.strip()


def test_more_workers_than_cores_are_refused(data: Path, tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    refusal(targan("train", "--data", data, "--out", tmp_path / "run", "--workers", cores + 1, *TINY_TRAIN),
            f"--workers {cores + 1} is more than the {cores} CPU cores", exit_code=2)
    assert not (tmp_path / "run").exists()


def _processes_running(marker: str) -> list[int]:
    """Processes (of any parent) whose command line holds ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def _no_orphans(marker: str) -> None:
    deadline = time.monotonic() + 20
    while _processes_running(marker):
        assert time.monotonic() < deadline, f"worker processes outlived the command: {_processes_running(marker)}"
        time.sleep(0.1)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="lists processes through /proc (Linux)")
def test_no_worker_process_outlives_a_failed_or_interrupted_run(data: Path, tmp_path: Path) -> None:
    workers = str(min(2, len(os.sched_getaffinity(0))))
    failed = tmp_path / "failed-run"
    refusal(targan("train", "--data", data, "--out", failed, "--workers", workers, "--lr-d", "1e30", "--lr-g", "1e30",
                   *TINY_TRAIN), "training diverged")
    _no_orphans(str(failed))

    interrupted = tmp_path / "interrupted-run"
    process = subprocess.Popen([sys.executable, "-m", "targan_cli", "train", "--data", str(data), "--out",
                                str(interrupted), "--workers", workers, "--log-every", "1", "--epochs", "1000",
                                *TINY_TRAIN], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env=ENVIRONMENT)
    deadline = time.monotonic() + 240
    while not (interrupted / "metrics.jsonl").exists() and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)  # Ctrl-C
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    _no_orphans(str(interrupted))


def test_dangling_and_looping_links_in_an_input_folder_are_reported(tmp_path: Path, weights: Path) -> None:
    folder = tmp_path / "in"
    write_case(folder / "a.nii.gz")
    (folder / "b.nii.gz").symlink_to(tmp_path / "moved-away.nii.gz")
    before = tree_digest(folder)
    arguments = ["-o", tmp_path / "out", "--from", "ct", "--to", "t1w", "-w", weights, "--device", "cpu"]
    refusal(targan("translate", folder, *arguments), str(folder / "b.nii.gz"), "does not exist or loops")
    (folder / "b.nii.gz").unlink()
    (folder / "c.nii.gz").symlink_to("c.nii.gz")  # a link to itself
    refusal(targan("translate", folder, *arguments), str(folder / "c.nii.gz"), "does not exist or loops")
    refusal(targan("enrich", folder, "--from", "ct", "--single-channel", "-o", tmp_path / "raw"),
            str(folder / "c.nii.gz"), "does not exist or loops")
    assert not (tmp_path / "out").exists() and not (tmp_path / "raw").exists()
    assert {k: v for k, v in tree_digest(folder).items() if "c.nii.gz" not in k} == \
        {k: v for k, v in before.items() if "b.nii.gz" not in k}
