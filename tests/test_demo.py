"""`targan demo --quick`: every promised file, translations on their inputs' grids, and a report
whose numbers are the JSON's."""

import json
import re

import pytest
from typer.testing import CliRunner

from targan_cli.cli import app
from targan_cli.io.volume import read_volume


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
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
    assert "identity baseline" in stdout


def test_translations_keep_their_inputs_geometry(demo):
    out, _ = demo
    outputs = sorted((out / "translations").glob("*.nii.gz"))
    assert len(outputs) == 6  # three sources, two targets each
    for path in outputs:
        case, source = re.match(r"(.+)_(\w+?)_to_\w+\.nii\.gz", path.name).groups()
        original = read_volume(out / "data" / "test" / source / "images" / f"{case}.nii.gz")
        translated = read_volume(path)
        assert translated.shape == original.shape
        assert (translated.affine == original.affine).all()


def test_the_report_shows_the_json_numbers(demo):
    out, _ = demo
    metrics = json.loads((out / "metrics.json").read_text())
    report = (out / "report.md").read_text()
    labels = [column["label"] for column in metrics["columns"]]
    assert [row["model"] for row in metrics["rows"]] == ["TarGAN (demo)", "identity (copy input)"]
    table = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:4]]
             for line in report.splitlines() if line.startswith("| ") and "±" in line}
    assert sorted(table) == sorted(labels)
    for index, label in enumerate(labels):
        for row, cell in zip(metrics["rows"], table[label]):
            summary = row["cells"][index]
            assert cell == f"{summary['mean']:.3f} ± {summary['std']:.3f}", (label, row["model"])
    verdicts = json.loads((out / "demo.json").read_text())["beats_identity_baseline"]
    assert set(verdicts) == set(labels)
    assert f"in {sum(verdicts.values())} of {len(verdicts)} columns" in report


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
