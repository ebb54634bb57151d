"""train-segmenter prints the value it optimises, under its name, and the number is that loss."""

import re

import numpy as np
import torch
from typer.testing import CliRunner

from targan_cli.cli import app
from targan_cli.data.dataset import load_slices, open_data_dir
from targan_cli.data.phantom import write_phantom_dataset
from targan_cli.workflows.segment import load_segmenter


def test_the_printed_loss_is_the_optimised_objective(tmp_path):
    data = tmp_path / "data"
    write_phantom_dataset(data, cases=2, test_cases=1, size=32, slices=4, seed=0)
    result = CliRunner().invoke(app, ["train-segmenter", "--data", str(data), "--modality", "t2w", "--out",
                                      str(tmp_path / "seg"), "--epochs", "2", "--width", "4", "--depth", "3",
                                      "--device", "cpu"])
    assert result.exit_code == 0, result.output
    match = re.search(r"BCE \+ soft Dice loss \(the optimised objective\) of the final weights on the (\d+) "
                      r"training slices: ([0-9.]+)", result.stdout)
    assert match, result.stdout
    printed_slices, printed = int(match.group(1)), float(match.group(2))

    # The same objective by hand: mean BCE with logits plus 1 - soft Dice (smoothing 1), all slices at once.
    segmenter = load_segmenter(tmp_path / "seg")
    slices = load_slices(open_data_dir(data), "train", segmenter.config.image_size)
    chosen = np.flatnonzero(slices.modality == [m.name for m in slices.modalities].index("t2w"))
    assert len(chosen) == printed_slices
    with torch.no_grad():
        logits = segmenter.network(torch.from_numpy(np.asarray(slices.images[chosen], dtype=np.float32))[:, None])
    x = logits.double().numpy()[:, 0]
    y = np.asarray(slices.labels[chosen], dtype=np.float64)
    bce = np.mean(np.maximum(x, 0) - x * y + np.log1p(np.exp(-np.abs(x))))
    p = 1 / (1 + np.exp(-x))
    loss = bce + 1 - (2 * (p * y).sum() + 1) / (p.sum() + y.sum() + 1)
    assert abs(printed - loss) <= 5e-5 + 1e-6  # printed with 4 decimals
