"""Rule 2: --overwrite replaces only what targan made. A folder it made holds .targan.json (the
command and version); a non-empty folder without one is never deleted or emptied, --overwrite or
not. A file is replaced only by a file of its kind (a report over a report, a volume over a volume).

The CLI runs in a subprocess; a refusal is one line, exit code 1, and the folder or file as before.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import targan_cli
from cli_safety import data, refusal, targan, tree_digest, write_case, write_mask, weights  # noqa: F401 (fixtures)
from targan_cli.io.atomic import MARKER


@pytest.fixture
def thesis(tmp_path: Path) -> Path:
    """Someone's folder that targan did not make."""
    folder = tmp_path / "thesis"
    (folder / "export").mkdir(parents=True)  # even with names a run writes
    (folder / "export" / "chapter1.tex").write_text("precious")
    (folder / "dataset.json").write_text("{}")  # even with the file a dataset holds
    return folder


def test_folders_targan_did_not_make_are_never_replaced(thesis: Path, data: Path, weights: Path,
                                                       tmp_path: Path) -> None:
    checkpoint = tmp_path / "netG.pkl"
    checkpoint.write_bytes(b"checkpoint")
    commands = [
        ["train-segmenter", "--data", data, "--modality", "ct", "--out", thesis, "--overwrite"],
        ["convert", checkpoint, "-o", thesis, "--overwrite"],
        ["data", "phantom", thesis, "--overwrite"],
        ["train", "--data", data, "--out", thesis, "--overwrite", "--preset", "tiny"],
        ["demo", "--out", thesis, "--overwrite", "--quick"],
    ]
    before = tree_digest(thesis)
    for command in commands:
        refusal(targan(*command), str(thesis), MARKER, "targan did not make it", exit_code=1)
        assert tree_digest(thesis) == before, command


def test_enrich_never_removes_cases_of_a_dataset_it_did_not_make(tmp_path: Path) -> None:
    inputs, raw = tmp_path / "in", tmp_path / "raw"
    write_case(inputs / "case0.nii.gz")
    folder = raw / "Dataset501_LiverCT"
    write_case(folder / "imagesTs" / "case9_0000.nii.gz", seed=3)  # made by hand or by nnU-Net tools
    before = tree_digest(raw)
    refusal(targan("enrich", inputs, "--from", "ct", "--single-channel", "-o", raw, "--overwrite"),
            str(folder), "not made by `targan enrich`")
    assert tree_digest(raw) == before


def test_a_folder_targan_made_is_marked_and_replaced_with_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "DATA"
    assert targan("data", "phantom", out, "--cases", "1", "--size", "16", "--slices", "4",
                  "--test-cases", "0").returncode == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker == {"made_by": "targan-cli", "command": "data phantom", "kind": "dataset",
                      "version": targan_cli.__version__}
    (out / "stale.txt").write_text("from before")
    result = targan("data", "phantom", out, "--cases", "1", "--size", "16", "--slices", "4", "--test-cases", "0",
                    "--seed", "1", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (out / "stale.txt").exists() and (out / MARKER).is_file()


def test_a_folder_targan_made_is_replaced_only_by_one_of_its_kind(data: Path, tmp_path: Path) -> None:
    other = tmp_path / "OTHER"
    assert targan("data", "phantom", other, "--cases", "1", "--size", "16", "--slices", "4",
                  "--test-cases", "0").returncode == 0
    checkpoint = tmp_path / "netG.pkl"
    checkpoint.write_bytes(b"checkpoint")
    before = tree_digest(other)
    for command, kind in ((["train-segmenter", "--data", data, "--modality", "ct", "--out", other], "segmenter folder"),
                          (["convert", checkpoint, "-o", other], "weights folder"),
                          (["train", "--data", data, "--out", other, "--preset", "tiny"], "run folder")):
        refusal(targan(*command, "--overwrite"), str(other), f"is a dataset that targan made, not a {kind}")
        assert tree_digest(other) == before


def test_files_are_replaced_only_by_files_of_their_kind(tmp_path: Path, weights: Path) -> None:
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    write_mask(pred / "case.nii.gz", seed=1)
    write_mask(truth / "case.nii.gz", seed=2)
    scan = write_case(tmp_path / "scan.nii.gz", seed=3)  # a volume, not an input of evaluate
    notes = tmp_path / "notes.csv"
    notes.write_bytes(b"\x00\x01binary, not a report")
    not_a_volume = tmp_path / "out.nii.gz"
    not_a_volume.write_text('{"a": "report named like a volume"}')
    before = tree_digest(scan, notes, not_a_volume)
    evaluate = ["evaluate", "-m", "dice", "--pred", pred, "--truth", truth, "--overwrite"]
    refusal(targan(*evaluate, "--json", scan), str(scan), "is not a json file")
    refusal(targan(*evaluate, "--csv", notes), str(notes), "is not a csv file")
    refusal(targan("translate", scan, "-o", not_a_volume, "--from", "ct", "--to", "t1w",
                   "-w", weights, "--device", "cpu", "--overwrite"), str(not_a_volume), "is not a volume file")
    assert tree_digest(scan, notes, not_a_volume) == before

    report = tmp_path / "report.json"
    report.write_text('{"old": true}')  # a report: replaced
    result = targan(*evaluate, "--json", report)
    assert result.returncode == 0, result.stderr
    assert "old" not in json.loads(report.read_text())
    volume = tmp_path / "old.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)), volume)  # a volume: replaced
    result = targan("translate", scan, "-o", volume, "--from", "ct", "--to", "t1w", "-w", weights,
                    "--device", "cpu", "--overwrite")
    assert result.returncode == 0, result.stderr
    assert nib.load(volume).shape == nib.load(scan).shape
