"""A refusal is one line on stderr and nothing on stdout: every check that can run before the work
runs before the first progress bar (or, in a pipe, the first progress line), in every command."""

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from targan_cli.cli import app
from targan_cli.data.phantom import write_phantom_dataset
from weights_factories import make_tiny_weights

TINY = ["--preset", "tiny", "--image-size", "32", "--batch-size", "2", "--sample-every", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("refusals")
    data = root / "data"
    write_phantom_dataset(data, cases=1, test_cases=1, size=32, slices=4, seed=0)
    weights = make_tiny_weights(root / "weights")
    run = root / "run"
    assert CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(run), "--max-steps", "1",
                                    *TINY]).exit_code == 0
    masks = root / "masks"
    for name in ("pred", "truth"):
        (masks / name).mkdir(parents=True)
    for case in ("a", "b"):
        image = nib.Nifti1Image(np.ones((4, 4, 2), dtype=np.uint8), np.eye(4))
        nib.save(image, masks / "truth" / f"{case}.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((4, 4, 2), dtype=np.uint8), np.eye(4)), masks / "pred" / "a.nii.gz")
    return {"root": root, "data": data, "weights": weights, "run": run, "masks": masks}


def _commands(setup: dict[str, Path], tmp: Path) -> dict[str, tuple[list[str], str]]:
    data, weights, root = setup["data"], setup["weights"], setup["root"]
    run = tmp / "run"
    shutil.copytree(setup["run"], run)
    images = data / "test" / "t1w" / "images"
    return {
        "translate": (["translate", str(images), "-o", str(tmp / "out"), "--to", "flair", "--weights", str(weights),
                       "--device", "cpu"], "unknown modality 'flair'"),
        "enrich": (["enrich", str(data / "train" / "ct"), "-o", str(tmp / "raw"), "--to", "flair",
                    "--weights", str(weights), "--device", "cpu"], "flair"),
        "train": (["train", "--data", str(data), "--out", str(run), "--max-steps", "2", "--resume",
                   *TINY[:4], "--batch-size", "3", *TINY[6:]], "batch_size"),
        "evaluate": (["evaluate", "-m", "dice", "--pred", str(setup["masks"] / "pred"), "--truth",
                      str(setup["masks"] / "truth")], "no prediction for case 'b'"),
        "train-segmenter": (["train-segmenter", "--data", str(data), "--modality", "t2w", "--out", str(tmp / "seg"),
                             "--image-size", "30", "--device", "cpu"], "not divisible"),
        "demo": (["demo", "--out", str(weights / "config.json"), "--quick"], "not a folder"),
        "data phantom": (["data", "phantom", str(tmp / "p"), "--slices", "3"], "--slices"),
        "data import-chaos": (["data", "import-chaos", str(root), str(tmp / "chaos")], str(root)),
    }


COMMANDS = ["translate", "enrich", "train", "evaluate", "train-segmenter", "demo", "data phantom",
            "data import-chaos"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_refusal_comes_before_any_progress(setup, tmp_path, command):
    arguments, message = _commands(setup, tmp_path)[command]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code in (1, 2), result.output
    assert result.stdout == ""  # no bar, no stage line
    assert message in result.stderr and result.stderr.count("\n") == 1, result.stderr
