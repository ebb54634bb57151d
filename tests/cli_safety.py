"""Helpers of the safety tests (test_safety_*.py): the CLI in a subprocess, trees hashed before and
after, and the shape of a refusal (an exit code, no traceback, one line on stderr naming the cause)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from targan_cli.data.phantom import write_phantom_dataset
from volume_factories import anatomy, oriented, write_nifti
from weights_factories import make_tiny_weights

ENVIRONMENT = {**os.environ, "NO_COLOR": "1", "COLUMNS": "240", "HF_HUB_OFFLINE": "1"}


def targan(*arguments: object, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    """Run ``targan ARGUMENTS`` in its own process (as a user would), from the current folder."""
    return subprocess.run([sys.executable, "-m", "targan_cli", *map(str, arguments)], capture_output=True,
                          text=True, timeout=timeout, **{"env": ENVIRONMENT, **popen})


def tree_digest(*roots: Path) -> dict[str, str]:
    """Every file (sha256), folder and link (its target) under ``roots``, links not followed."""
    digest: dict[str, str] = {}
    for root in roots:
        if os.path.islink(root) or root.is_file():
            digest[str(root)] = _entry(root)
            continue
        for folder, folders, files in os.walk(root):
            digest[folder] = "folder"
            for name in [*folders, *files]:
                path = Path(folder, name)
                if path.is_symlink() or path.is_file():
                    digest[str(path)] = _entry(path)
    return digest


def _entry(path: Path) -> str:
    if path.is_symlink():
        return "link -> " + os.readlink(path)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def refusal(result: subprocess.CompletedProcess, *words: str, exit_code: int | None = None) -> str:
    """The one error line of a refused command; checks that it exited non-zero (``exit_code`` if
    given), printed no traceback, and that the line holds every one of ``words``."""
    assert result.returncode != 0, result.stdout + result.stderr
    if exit_code is not None:
        assert result.returncode == exit_code, result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def write_case(path: Path, seed: int = 0, shape: tuple[int, int, int] = (4, 16, 16), ct: bool = True) -> Path:
    """A small CT (HU) or MR NIfTI volume of canonical ``shape`` (Z, H, W)."""
    canonical = anatomy(shape, seed=seed)
    array = canonical if ct else np.clip(canonical + 400, 0, None)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_nifti(path, *oriented(array.astype(np.int16), "RAS"))


def write_mask(path: Path, seed: int = 0, shape: tuple[int, int, int] = (4, 16, 16)) -> Path:
    """A liver-like mask (uint8, 0 and 1) of canonical ``shape``, on the grid of ``write_case``."""
    mask = (anatomy(shape, seed=seed) > 0).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_nifti(path, *oriented(mask, "RAS"))


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random weights folder (CT, T1w, T2w)."""
    return make_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny phantom DATA folder: one training case per modality, one test case."""
    return write_phantom_dataset(tmp_path_factory.mktemp("data") / "DATA", cases=1, size=16, slices=4,
                                 test_cases=1).root
