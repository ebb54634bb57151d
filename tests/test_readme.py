"""README.md's commands, run as written in a folder holding the files they name.

Each command runs in a fresh working folder with small stand-ins for its inputs (phantom data for
chaos/, tiny weights for runs/*/export and $TARGAN_WEIGHTS). The few that cannot run here are
skipped, each with its reason.
"""

import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from targan_cli.cli import app
from targan_cli.data.phantom import write_phantom_dataset
from targan_cli.io.volume import read_volume, write_volume
from test_official import official_state_dict
from volume_factories import write_dicom_series
from weights_factories import make_tiny_weights

README = Path(__file__).resolve().parents[1] / "README.md"

SKIPPED = {
    "targan train --data chaos/ --epochs 50": "trains the paper preset at 256 x 256 for hours",
    "torchrun": "launches several training processes of the paper preset (GPUs)",
    "import-chaos": "needs the CHAOS 2019 archive, which may not be redistributed",
    "--metric fid": "downloads the Inception-v3 weights (no network here)",
    "train-segmenter": "trains three segmenters for minutes each",
}


# Commands that create a folder the other commands read: it must not exist yet when they run.
WRITES = {"targan data phantom phantoms/": "phantoms"}


def readme_commands() -> list[str]:
    """Every `targan ...` (or `for`/`torchrun`) line of README's bash blocks, set-up blocks aside."""
    commands, inside, setup, after_marker = [], False, False, False
    for line in README.read_text().splitlines():
        if line.startswith("<!-- setup:"):
            after_marker = True
        elif line.startswith("```"):
            inside, setup, after_marker = not inside, after_marker and not inside, False
        elif inside and not setup and re.match(r"(targan|torchrun|for) ", line):
            commands.append(line)
    return commands


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """One folder with every file the README's commands name."""
    root = tmp_path_factory.mktemp("readme-inputs")
    write_phantom_dataset(root / "chaos", cases=2, size=32, slices=4, test_cases=1)
    shutil.copytree(root / "chaos", root / "phantoms")
    for run in ("chaos", "phantoms"):
        make_tiny_weights(root / "runs" / run / "export", image_size=32)
    make_tiny_weights(root / "default-weights", image_size=32)
    ct = sorted((root / "chaos" / "test" / "ct" / "images").glob("*.nii.gz"))[0]
    shutil.copy(ct, root / "scan.nii.gz")
    (root / "scans").mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(ct, root / "scans" / f"{name}.nii.gz")
    stored = np.round(read_volume(ct).array).astype(np.int16) + 1024
    write_dicom_series(root / "ct_series", stored, intercept=-1024.0, modality="CT")
    label = read_volume(ct.parent.parent / "labels" / ct.name)
    for folder in ("predictions", "labels"):
        write_volume(root / folder / "case1.nii.gz", label, label=True)
    torch.save(official_state_dict(), root / "netG_use_50.pkl")
    return root


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_runs_as_written(command, inputs, tmp_path, monkeypatch):
    reasons = [reason for key, reason in SKIPPED.items() if key in command]
    if reasons:
        pytest.skip(reasons[0])
    written = {folder for key, folder in WRITES.items() if command.startswith(key)}
    for item in inputs.iterdir():
        if item.name not in written:
            (tmp_path / item.name).symlink_to(item, target_is_directory=item.is_dir())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TARGAN_WEIGHTS", str(inputs / "default-weights"))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "nnUNet_raw"))
    arguments = shlex.split(command, comments=True)
    assert arguments[0] == "targan"
    result = CliRunner().invoke(app, arguments[1:])
    assert result.exit_code == 0, f"{command}\n{result.output}"
    assert "Traceback" not in result.output


def test_readme_lists_the_two_setup_commands_and_skips_only_what_it_must():
    text = README.read_text()
    assert text.count("<!-- setup:install -->") == 1 and text.count("<!-- setup:test -->") == 1
    commands = readme_commands()
    assert len(commands) >= 15
    skipped = [c for c in commands if any(key in c for key in SKIPPED)]
    assert len(skipped) <= len(commands) // 2


def test_every_relative_link_of_the_readmes_and_docs_points_to_a_file():
    root = README.parent
    pages = [README, root / "weights" / "README.md", root / "bench" / "README.md", *sorted((root / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a web address or an anchor in the page
            checked += 1
            assert (page.parent / target.split("#")[0]).exists(), f"{page.relative_to(root)} links to missing {target}"
    assert checked >= 20  # the pages do link to each other and to their images
