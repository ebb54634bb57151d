"""Output into a pipe or a file (`targan ... > log`, `| less`): plain, full lines; `--json` for scripts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from weights_factories import make_tiny_weights


def run_piped(*arguments: str) -> subprocess.CompletedProcess:
    """`targan ARGS` with stdout and stderr into pipes (not terminals), as narrow as a small terminal."""
    environment = {**os.environ, "COLUMNS": "40", "TERM": "xterm-256color"}
    environment.pop("NO_COLOR", None)
    return subprocess.run([sys.executable, "-m", "targan_cli", *arguments], capture_output=True, text=True,
                          env=environment, timeout=300)


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("a-rather-long-folder-name-for-weights") / "weights")


def test_a_table_in_a_pipe_is_full_width_plain_text(weights: Path) -> None:
    result = run_piped("info", str(weights))
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\r" not in result.stdout
    assert "…" not in result.stdout  # nothing cut to fit 40 columns
    assert any(str(weights) in line for line in result.stdout.splitlines())  # the path whole, on one line
    assert max(len(line) for line in result.stdout.splitlines()) > 40


def test_progress_in_a_pipe_is_plain_lines(tmp_path: Path) -> None:
    result = run_piped("data", "phantom", str(tmp_path / "data"), "--cases", "1", "--test-cases", "1",
                       "--size", "16", "--slices", "4")
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\r" not in result.stdout and "━" not in result.stdout
    lines = result.stdout.splitlines()
    assert lines[0] == "phantoms: 6/6 volumes"
    assert lines[1].startswith(f"Wrote {tmp_path / 'data'}: ")


def test_json_on_stdout_instead_of_the_table(weights: Path, tmp_path: Path) -> None:
    result = run_piped("info", str(weights), "--json", "-")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["folder"] == str(weights) and summary["preset"] == "tiny"
    written = tmp_path / "info.json"
    result = run_piped("info", str(weights), "--json", str(written))
    assert result.returncode == 0, result.stderr
    assert json.loads(written.read_text()) == summary and f"Wrote {written}" in result.stdout
    result = run_piped("info", str(weights), "--json", str(written))
    assert result.returncode == 1 and "already exists" in result.stderr and result.stdout == ""
