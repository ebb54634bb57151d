"""`targan demo --quick`: every promised file, translations on their inputs' grids, and a report
whose numbers are the JSON's."""

import json
import re

import numpy as np

import pytest
from typer.testing import CliRunner

from targan_cli.cli import app


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The --quick demo, trained once per test session and shared by the tests that read it."""
    out = tmp_path_factory.mktemp("demo") / "targan-demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--quick", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out, result.stdout


def test_every_promised_file_exists(demo):
    out, stdout = demo
    for name in ("report.md", "montage.png", "metrics.json", "demo.json", "data/dataset.json",
                 "run/checkpoints/last.pt", "run/metrics.jsonl", "run/export/model.safetensors",
                 "run/export/config.json"):
        assert (out / name).is_file(), name
    assert f"Report   {out / 'report.md'}" in stdout
    assert "TarGAN (demo) beats identity (copy input) in " in stdout


def test_every_file_the_report_names_exists(demo):
    out, _ = demo
    report = (out / "report.md").read_text()
    named = [name for name in re.findall(r"`([^`\s]+)`", report) + re.findall(r"\]\(([^)\s]+)\)", report)
             if "/" in name or re.search(r"\.(png|json|jsonl|md|pt|nii\.gz|safetensors)$", name)]
    assert len(named) > 10
    missing = [name for name in named if not (out / name).exists() and not name.startswith("docs/")]
    assert not missing, missing
    assert "sample" not in report  # the demo writes no sample grids


def test_quick_wording_follows_the_options(demo):

    out, stdout = demo
    report = (out / "report.md").read_text()
    assert "a `--quick` smoke run" in report and "--max-steps 4 " in report and "4 steps where" in report
    assert "A --quick smoke run" in stdout
    assert "get the layout" not in report and "scores about the same" not in report  # no fixed claims


def test_the_report_names_every_setting_that_differs_from_the_paper(demo):
    """The training command and the list of settings that differ from the paper's follow the
    settings the run used (its checkpoint's), against the paper's values written out here."""
    from targan_cli.workflows.demo import DemoSettings
    from targan_cli.workflows.train import load_checkpoint

    out, _ = demo
    report = " ".join((out / "report.md").read_text().split())
    settings = load_checkpoint(out / "run" / "checkpoints" / "last.pt")["settings"]["train"]
    for option, key in (("--lr-g", "lr_g"), ("--lr-d", "lr_d"), ("--lambda-rec", "lambda_rec"),
                        ("--lambda-gp", "lambda_gp"), ("--ema-decay", "ema_decay")):
        assert f"{option} {settings[key]:g}" in report, option
    paper = {"lr_g": 1e-4, "lambda_rec": 1.0, "lambda_gp": 10.0, "ema_decay": 0.999}
    assert f"learning rates {settings['lr_g'] / paper['lr_g']:g} times the paper's" in report
    assert f"a cycle weight of {settings['lambda_rec']:g} instead of 1" in report
    assert f"a gradient-penalty weight of {settings['lambda_gp']:g} instead of 10" in report
    assert f"an EMA decay of {settings['ema_decay']:g} instead of 0.999" in report
    assert DemoSettings(lr_g=1e-4, lr_d=3e-4, lambda_rec=1.0, ema_decay=0.999, lambda_gp=10.0).paper_differences() == []
    assert DemoSettings(lr_g=1e-4, lr_d=3e-4, lambda_rec=1.0, ema_decay=0.999, lambda_gp=2.0).paper_differences() == [
        "a gradient-penalty weight of 2 instead of 10"]
    assert DemoSettings(lr_g=2e-4, lr_d=1e-3, lambda_rec=1.0, ema_decay=0.999, lambda_gp=10.0).paper_differences() == [
        "learning rates of 0.0002 for G and S and 0.001 for D instead of 0.0001 and 0.0003"]


def test_the_report_shows_the_json_numbers(demo):
    out, _ = demo
    metrics = json.loads((out / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    labels = [column["label"] for column in metrics["columns"]]
    models = [row["model"] for row in metrics["rows"]]
    assert models == ["TarGAN (demo)", "identity (copy input)", "body mean-fill", "histogram-matched source"]
    assert f"| metric | {' | '.join(models)} | n |" in report
    table = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
             for line in report.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in labels}
    assert sorted(table) == sorted(labels)
    for index, label in enumerate(labels):
        cells = [row["cells"][index] for row in metrics["rows"]]
        for cell, summary in zip(table[label], cells):
            low, high = summary["ci95"]
            assert cell == f"{summary['mean']:.3f} [{low:.3f}, {high:.3f}]", (label, cell)
        assert table[label][-1] == str(cells[0]["count"])  # n per column
        assert cells[0]["count"] == sum(1 for r in metrics["records"] if r["model"] == "TarGAN (demo)"
                                        and r["metric"] == metrics["columns"][index]["metric"]
                                        and r["target"] == metrics["columns"][index]["target"]
                                        and r["region"] == metrics["columns"][index]["region"])
    summary = json.loads((out / "demo.json").read_text())
    for baseline, columns in summary["beats"].items():
        assert set(columns) == set(labels)
        row = models.index(baseline)
        for index, label in enumerate(labels):  # recomputed from the means
            ours, theirs = metrics["rows"][0]["cells"][index]["mean"], metrics["rows"][row]["cells"][index]["mean"]
            better = ours < theirs if metrics["columns"][index]["lower_is_better"] else ours > theirs
            assert columns[label] == better, (baseline, label)
        assert f"{baseline} in {sum(columns.values())} of {len(columns)} columns" in report
    assert summary["verdict"] in report


def test_the_columns_out_of_reach_are_the_oracles_losses(demo):
    """demo.json's out_of_reach is recomputed from oracle.json's means, and the report names the
    columns the model loses that the oracle loses too."""
    out, stdout = demo
    oracle = json.loads((out / "oracle.json").read_text())
    summary = json.loads((out / "demo.json").read_text())
    report = (out / "report.md").read_text()
    models = [row["model"] for row in oracle["rows"]]
    assert models == ["best intensity mapping (oracle)", "identity (copy input)", "body mean-fill",
                      "histogram-matched source"]
    assert [column["label"] for column in oracle["columns"]] == list(next(iter(summary["beats"].values())))
    parts = []  # the report's "COLUMNS to the BASELINE" for each baseline, built here from the JSON
    for baseline, reach in summary["out_of_reach"].items():
        row = models.index(baseline)
        expected = []
        for index, column in enumerate(oracle["columns"]):
            ours, theirs = oracle["rows"][0]["cells"][index]["mean"], oracle["rows"][row]["cells"][index]["mean"]
            if not (ours < theirs if column["lower_is_better"] else ours > theirs):
                expected.append(column["label"])
        assert reach == expected, baseline
        lost_too = [label for label in expected if not summary["beats"][baseline][label]]
        if lost_too:
            parts.append(f"{', '.join(lost_too)} to the {baseline}")
    if parts:
        sentence = f"(an oracle that sees the answer) loses {'; '.join(parts)}: no voxel-by-voxel"
        assert sentence in " ".join(report.split())
        assert sentence in " ".join(stdout.split())  # on the terminal too
    elif not summary["beats_every_baseline"]:
        assert "wins every column the model loses" in report


def test_the_montage_shows_a_modality_in_one_window(demo):
    """The CT input of a CT row and the true CT beside it are the same image: in one window, their
    tiles are identical (they were windowed apart before)."""
    from PIL import Image

    out, _ = demo
    tile, margin = 128, 6
    with Image.open(out / "montage.png") as image:
        pixels = np.asarray(image.convert("L"))
    rows = (pixels.shape[0] - margin) // (tile + margin)
    left = pixels.shape[1] - 7 * (tile + margin)  # 7 columns of tiles after the row labels
    top = pixels.shape[0] - rows * (tile + margin) - 2 * margin - 11  # above the caption line
    ct_row = rows - 1  # the last rows show the CT source
    column = lambda c: pixels[top + ct_row * (tile + margin): top + ct_row * (tile + margin) + tile,  # noqa: E731
                              left + c * (tile + margin): left + c * (tile + margin) + tile]
    assert column(0).std() > 0 and np.array_equal(column(0), column(6))
    assert "One window per modality in every column" in (out / "report.md").read_text()


def test_montage_is_a_labelled_grid(demo):
    from PIL import Image

    out, _ = demo
    with Image.open(out / "montage.png") as image:
        width, height = image.size
    assert width > 7 * 128 and height > 3 * 128  # input + 3 x (synthetic, truth) columns; 3 sources


def test_an_existing_demo_is_kept_without_overwrite(demo, tmp_path):
    out, _ = demo
    before = (out / "report.md").read_bytes()
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--quick"])
    assert result.exit_code == 1 and "already exists; pass --overwrite" in result.stderr
    assert (out / "report.md").read_bytes() == before
    other = tmp_path / "documents"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    result = CliRunner().invoke(app, ["demo", "--out", str(other), "--quick", "--overwrite"])
    assert result.exit_code == 1 and "targan did not make it" in result.stderr
    assert (other / "thesis.tex").read_text() == "precious"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("precious")
    result = CliRunner().invoke(app, ["demo", "--out", str(a_file), "--quick", "--overwrite"])
    assert result.exit_code == 1 and "notes.txt: exists and is not a folder" in result.stderr
    assert "Traceback" not in result.output and a_file.read_text() == "precious"


def test_json_summary_on_stdout(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--out", str(tmp_path / "d"), "--quick", "--device", "cpu", "--json", "-"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["quick"] is True and summary["files"]["report"] == str(tmp_path / "d" / "report.md")
    assert summary["verdict"] == json.loads((tmp_path / "d" / "demo.json").read_text())["verdict"]
