"""Rule 5: a weights or segmenter folder is untrusted input. Every field of config.json is type-
and range-checked before any network is built (widths, depths, image size, intensity settings
finite and bounded), and tensors holding NaN or infinite values are refused at load.

Each case edits one field of a real tiny folder and runs `targan info` (weights; in-process, for
the many fields) or `targan segment` (segmenters; in a subprocess): exit code 1, no traceback,
one line naming config.json (or model.safetensors) and the field, the folder untouched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import typer
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from cli_safety import refusal, targan, tree_digest, weights, write_case  # noqa: F401 (fixtures)
from targan_cli.cli import app
from targan_cli.config import IntensitySettings
from targan_cli.workflows.segment import SegmenterConfig, build_network, save_segmenter

COMMAND = typer.main.get_command(app)
BAD_FIELDS = [
    (("model", "base_width"), 10 ** 9, "base_width must be an integer from 1 to 4096"),
    (("model", "base_width"), 1024, "the generator (base_width) reaches"),
    (("model", "image_size"), 1 << 20, "image_size must be an integer from 1 to 2048"),
    (("model", "encoder_depth"), 2.5, "encoder_depth must be an integer"),
    (("model", "disc_depth"), True, "disc_depth must be an integer"),
    (("model", "num_modalities"), "3", "num_modalities must be an integer"),
    (("modalities", 2, "intensity", "window_width"), "Infinity", "window_width (CT) must be a finite number"),
    (("modalities", 2, "intensity", "window_level"), "NaN", "window_level must be a finite number"),
    (("modalities", 2, "intensity", "window_level"), "40", "window_level must be a finite number"),
    (("modalities", 0, "intensity", "reference_high"), 1e300, "reference_high (MR) must be a finite number"),
    (("modalities", 0, "intensity", "percentile"), -5, "percentile (MR) must be a finite number in [50, 100]"),
    (("modalities", 0, "name"), "t1\nw", "modality name must be a plain non-empty name"),
    (("preset",), ["tiny"], "preset and target must be text"),
]


def _edit(folder: Path, path: tuple, value: object) -> None:
    config_file = folder / "config.json"
    text = config_file.read_text()
    config = json.loads(text)
    node = config
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    text = json.dumps(config, indent=2)
    for word in ("Infinity", "NaN"):  # as Python's json writes float("inf") and float("nan")
        text = text.replace(f'"{word}"', word)
    config_file.write_text(text)


@pytest.mark.parametrize("path, value, words", BAD_FIELDS, ids=[f"{'.'.join(map(str, p))}={v!r}"[:40]
                                                               for p, v, _ in BAD_FIELDS])
def test_a_weights_config_field_out_of_range_is_refused_before_building(weights: Path, tmp_path: Path, path: tuple,
                                                                        value: object, words: str) -> None:
    folder = tmp_path / "weights"
    shutil.copytree(weights, folder)
    _edit(folder, path, value)
    before = tree_digest(folder)
    result = CliRunner().invoke(COMMAND, ["info", str(folder)])  # in-process: 13 cases, no torch start-up each
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {folder / 'config.json'}: ") and words in lines[0], lines
    assert tree_digest(folder) == before


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_with_non_finite_tensors_are_refused(weights: Path, tmp_path: Path, bad: float) -> None:
    folder = tmp_path / "weights"
    shutil.copytree(weights, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    name = sorted(tensors)[3]
    tensors[name].view(-1)[0] = bad
    save_file(tensors, str(folder / "model.safetensors"))
    before = tree_digest(folder)
    refusal(targan("info", folder), str(folder / "model.safetensors"), name, "holds NaN or infinite values")
    source = write_case(tmp_path / "ct.nii.gz")
    refusal(targan("translate", source, "-o", tmp_path / "out.nii.gz", "--from", "ct", "--to", "t1w", "-w", folder,
                   "--device", "cpu"), "holds NaN or infinite values")
    assert tree_digest(folder) == before and not (tmp_path / "out.nii.gz").exists()


def test_segmenter_configs_and_tensors_are_checked(tmp_path: Path) -> None:
    config = SegmenterConfig("ct", IntensitySettings(kind="ct"), image_size=16, width=4, depth=3)
    good = save_segmenter(tmp_path / "segmenter", build_network(config), config)
    source = write_case(tmp_path / "ct.nii.gz")
    cases = [("width", 1 << 20, "width must be an integer from 1 to 4096"),
             ("depth", 40, "depth must be an integer from 1 to 12"),
             ("width", 2048, "the U-Net (width) reaches")]
    for field, value, words in cases:
        folder = tmp_path / f"{field}-{value}"
        shutil.copytree(good, folder)
        _edit(folder, (field,), value)
        refusal(targan("segment", source, "-o", tmp_path / "mask.nii.gz", "--segmenter", folder, "--device", "cpu"),
                str(folder / "config.json"), words)
    folder = tmp_path / "nan"
    shutil.copytree(good, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[-1] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"))
    refusal(targan("segment", source, "-o", tmp_path / "mask.nii.gz", "--segmenter", folder, "--device", "cpu"),
            str(folder / "model.safetensors"), "holds NaN or infinite values")
    assert not (tmp_path / "mask.nii.gz").exists()
    assert torch.isfinite(load_file(str(good / "model.safetensors"))[name]).all()
