"""Rule 6: training that produces non-finite losses or weights stops with one clear line and a
non-zero exit code, and saves nothing non-finite; non-finite options are refused before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli_safety import data, refusal, targan, tree_digest  # noqa: F401 (fixtures)

TINY_TRAIN = ["--preset", "tiny", "--image-size", "32", "--batch-size", "2", "--device", "cpu", "--sample-every", "0"]


@pytest.mark.parametrize("option, value", [("--lr-d", "inf"), ("--lr-g", "nan"), ("--lambda-gp", "inf")])
def test_non_finite_training_options_are_refused_before_any_work(data: Path, tmp_path: Path, option: str,
                                                                 value: str) -> None:
    before = tree_digest(data)
    refusal(targan("train", "--data", data, "--out", tmp_path / "run", option, value, *TINY_TRAIN),
            "finite", exit_code=2)
    assert not (tmp_path / "run").exists() and tree_digest(data) == before


def test_a_diverging_run_stops_and_saves_nothing_non_finite(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = targan("train", "--data", data, "--out", run, "--max-steps", "4", "--lr-d", "1e30", "--lr-g", "1e30",
                    *TINY_TRAIN)
    refusal(result, str(run), "training diverged at step 1", "NaN or infinite", exit_code=1)
    assert not (run / "export").exists()
    assert list((run / "checkpoints").iterdir()) == []
