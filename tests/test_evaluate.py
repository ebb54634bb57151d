"""`targan evaluate`: FID, S-score and paired metrics on phantoms; DICE/RAVD from folders; outputs; errors."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from targan_cli.cli import app
from targan_cli.config import ModalitySpec
from targan_cli.console import summary_cell
from targan_cli.core.intensity import normalize
from targan_cli.core.metrics import dice
from targan_cli.data.dataset import Case, open_data_dir
from targan_cli.data.phantom import write_phantom_dataset
from targan_cli.errors import TarganError, UsageError
from targan_cli.io.features import load_feature_module
from targan_cli.io.volume import read_volume, to_slices
from targan_cli.io.weights import load_weights
from targan_cli.workflows.evaluate import (
    CSV_FIELDS,
    Column,
    EvaluatedModel,
    EvaluationResult,
    Record,
    build_result,
    evaluate,
    evaluate_models,
    generator_model,
    parse_metrics,
    write_json,
)
from targan_cli.workflows.segment import (
    SegmenterConfig,
    build_network,
    label_slices,
    load_segmenter,
    save_segmenter,
    segment_volume,
    train_segmenter,
)
from targan_cli.workflows.translate import translate_volume
from weights_factories import make_tiny_weights

runner = CliRunner()
SIZE = 32
ALL_TRANSLATION_METRICS = ["fid", "sscore", "psnr", "ssim", "mae"]


class PooledFeatures(nn.Module):
    """A tiny FID feature module: the 2 x 2 average pool of a slice, (N, 1, H, W) -> (N, 4)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(images, 2).flatten(1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Phantoms (2 test cases imaged in every modality, CT 8 slices, MR 4), tiny weights, random
    segmenters of every modality and a torch.export feature file (dynamic batch)."""
    root = tmp_path_factory.mktemp("evaluate")
    write_phantom_dataset(root / "data", cases=1, size=SIZE, slices=8, seed=5, test_cases=2)
    make_tiny_weights(root / "weights", image_size=SIZE)
    data = open_data_dir(root / "data")
    for index, spec in enumerate(data.spec.modalities):
        torch.manual_seed(index)
        config = SegmenterConfig(spec.name, spec.intensity, image_size=SIZE, width=4, depth=3)
        save_segmenter(root / "segmenters" / spec.name, build_network(config), config)
    example = (torch.zeros(2, 1, SIZE, SIZE),)
    program = torch.export.export(PooledFeatures(), example, dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(root / "features.pt2"))
    return {"root": root, "data": root / "data", "weights": root / "weights",
            "segmenters": root / "segmenters", "features": root / "features.pt2"}


@pytest.fixture(scope="module")
def full_run(setup: dict[str, Path]) -> EvaluationResult:
    """Every translation metric of the tiny generator, with JSON and CSV outputs."""
    return evaluate(ALL_TRANSLATION_METRICS, data=setup["data"], weights=[str(setup["weights"])],
                    segmenters=setup["segmenters"], fid_features=setup["features"], device="cpu", baselines=False,
                    json_out=setup["root"] / "run.json", csv_out=setup["root"] / "run.csv")


def _normalized(path: Path, settings) -> np.ndarray:
    return normalize(to_slices(read_volume(path))[0], settings)


def _oracle(label: str, modalities: tuple[ModalitySpec, ...], image_of) -> EvaluatedModel:
    """A model whose 'translation' is a real image of the same case (phantom slices are 32 x 32,
    the model size, so no resizing happens)."""
    settings = {m.name: m.intensity for m in modalities}

    def translate(case: Case, slices: np.ndarray, source: str, target: str) -> np.ndarray:
        return _normalized(image_of(case, target), settings[target])

    return EvaluatedModel(label, modalities, SIZE, translate)


# ----------------------------------------------------------------------------- translation metrics


def test_table_layout_and_per_volume_records(setup: dict[str, Path], full_run: EvaluationResult) -> None:
    names = ("t1w", "t2w", "ct")
    expected = ([f"FID {t}" for t in names] + [f"S {t}" for t in names]
                + [f"{metric} {t} {region}" for metric in ("PSNR", "SSIM", "MAE") for t in names
                   for region in ("body", "liver")])
    assert [column.label for column in full_run.columns] == expected
    assert full_run.models == (str(Path(full_run.settings["models"][0]["source"])),)
    records = full_run.records
    # 3 sources x 2 cases x 2 targets = 12 translations, each with its per-volume values
    assert sum(r.metric == "sscore" for r in records) == 12
    assert sum(r.metric == "psnr" for r in records) == 24  # body and liver
    fids = [r for r in records if r.metric == "fid"]
    assert [r.target for r in fids] == list(names) and all(r.case is None for r in fids)
    assert all(r.value > 0 for r in fids)
    test_cases = {case.case_id for case in open_data_dir(setup["data"]).cases("test", "ct")}
    assert len(test_cases) == 2 and {r.case for r in records if r.case is not None} == test_cases
    for record in records:
        if record.metric != "fid":
            assert record.source != record.target and math.isfinite(record.value)
    assert all(0.0 <= r.value <= 100.0 for r in records if r.metric == "sscore")

    s_ct = [r.value for r in records if r.metric == "sscore" and r.target == "ct"]
    summary = full_run.summaries[0][expected.index("S ct")]
    assert (summary.mean, summary.std, summary.count) == pytest.approx((np.mean(s_ct), np.std(s_ct), 4))
    assert full_run.best == tuple(None for _ in expected)  # one model: nothing to highlight


def test_json_and_csv_carry_every_record_versions_and_settings(setup: dict[str, Path],
                                                              full_run: EvaluationResult) -> None:
    document = json.loads((setup["root"] / "run.json").read_text())
    assert len(document["records"]) == len(full_run.records) == 87
    assert set(document["records"][0]) == {"model", "case", "source", "target", "metric", "region", "value"}
    assert {"targan-cli", "torch", "torchmetrics"} <= set(document["versions"])
    settings = document["settings"]
    assert settings["metrics"] == ALL_TRANSLATION_METRICS and settings["split"] == "test"
    assert settings["fid_features"] == f"torch.export:{setup['features'].resolve()}" and settings["data_range"] == 2.0
    assert set(settings["segmenters"]) == {"t1w", "t2w", "ct"}
    assert [c["label"] for c in document["columns"]] == [c.label for c in full_run.columns]
    assert len(document["rows"][0]["cells"]) == len(full_run.columns)

    lines = (setup["root"] / "run.csv").read_text().splitlines()
    assert lines[0].startswith("# versions: ") and lines[1].startswith("# settings: ")
    assert json.loads(lines[0].removeprefix("# versions: "))["torch"] == torch.__version__
    rows = list(csv.DictReader(lines[2:]))
    assert tuple(rows[0]) == CSV_FIELDS and len(rows) == 87
    sscore = next(r for r in rows if r["metric"] == "sscore")
    match = next(r for r in full_run.records if r.metric == "sscore" and r.case == sscore["case"]
                 and r.source == sscore["source"] and r.target == sscore["target"])
    assert float(sscore["value"]) == match.value


def test_an_sscore_is_the_dice_of_translate_then_segment(setup: dict[str, Path], full_run: EvaluationResult) -> None:
    data = open_data_dir(setup["data"])
    case = data.cases("test", "ct")[0]
    image = read_volume(case.image)
    translated = translate_volume(image, load_weights(setup["weights"]), "ct", "t1w")
    mask = segment_volume(translated, load_segmenter(setup["segmenters"] / "t1w"))
    expected = dice(mask, np.asarray(read_volume(case.label).array))
    record = next(r for r in full_run.records
                  if (r.metric, r.source, r.target, r.case) == ("sscore", "ct", "t1w", case.case_id))
    assert record.value == pytest.approx(expected, abs=1e-9)
    assert label_slices(case.label, image).any()  # a real liver to overlap with


def test_paired_truth_against_itself_is_perfect(setup: dict[str, Path], tmp_path: Path) -> None:
    data = open_data_dir(setup["data"])
    truth = _oracle("paired truth", data.spec.modalities, lambda case, target: case.paired[target])
    result = evaluate_models(data, [truth], ["psnr", "ssim", "mae"])
    values = {metric: [r.value for r in result.records if r.metric == metric] for metric in ("psnr", "ssim", "mae")}
    assert len(values["psnr"]) == 24
    assert all(v == math.inf for v in values["psnr"])
    assert values["ssim"] == pytest.approx([1.0] * 24)
    assert values["mae"] == [0.0] * 24
    cells = [summary_cell(summary, column.digits) for summary, column in zip(result.summaries[0], result.columns)]
    assert cells[0] == "inf" and cells[-1] == "0.0000 ± 0.0000 [0.0000, 0.0000]"
    document = json.loads(write_json(result, tmp_path / "perfect.json").read_text())  # strict JSON
    assert {r["value"] for r in document["records"] if r["metric"] == "psnr"} == {"inf"}
    assert document["rows"][0]["cells"][0] == {"mean": None, "std": None, "ci95": [None, None], "count": 0, "missing": 0, "infinite": 4}


def test_a_case_without_its_paired_rendering_is_counted_as_n_a_and_named(setup: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    copy = tmp_path / "data"
    shutil.copytree(setup["data"], copy, ignore=shutil.ignore_patterns(".cache"))
    gone = sorted((copy / "test" / "ct" / "paired" / "t1w").iterdir())[0]
    gone.unlink()
    data = open_data_dir(copy)
    # the translation of the case without its t1w rendering is never compared: any MR image does
    truth = _oracle("paired truth", data.spec.modalities,
                    lambda case, target: case.paired.get(target, case.paired.get("t2w")))
    result = evaluate_models(data, [truth], ["psnr"])
    column = next(i for i, c in enumerate(result.columns) if c.label == "PSNR t1w body")
    summary = result.summaries[0][column]
    assert (summary.count, summary.missing, summary.infinite) == (0, 1, 3)  # 4 t1w cases: 3 perfect, 1 n/a
    assert [r.case for r in result.records if r.target == "t1w" and r.value is None and r.region == "body"] == [
        gone.name.removesuffix(".nii.gz")]
    assert list(result.notes) == [f"1 test case has no paired t1w rendering (the first belongs at {gone}): "
                            "n/a in the t1w psnr cells"]


def test_fid_is_zero_when_the_synthetic_slices_are_the_real_ones(setup: dict[str, Path],
                                                                  full_run: EvaluationResult) -> None:
    data = open_data_dir(setup["data"])
    two = tuple(m for m in data.spec.modalities if m.name in ("t1w", "ct"))  # one source per target
    real = _oracle("real images", two,
                   lambda case, target: setup["data"] / "test" / target / "images" / case.image.name)
    features = load_feature_module(setup["features"])
    result = evaluate_models(data, [real], ["fid"], fid_features=features)
    fids = {r.target: r.value for r in result.records}
    assert set(fids) == {"t1w", "ct"}
    assert all(abs(value) < 1e-6 for value in fids.values())
    assert min(r.value for r in full_run.records if r.metric == "fid") > 1e-3


def test_several_models_are_rows_with_the_best_value_of_each_column() -> None:
    records = [Record("a", "fid", "ct", None, None, None, 2.0),
               Record("b", "fid", "ct", None, None, None, 1.0),
               Record("a", "sscore", "ct", None, "x", "t1w", 60.0),
               Record("a", "sscore", "ct", None, "y", "t1w", 40.0),
               Record("b", "sscore", "ct", None, "x", "t1w", 30.0)]
    result = build_result("t", ["a", "b"], [Column("fid", "ct"), Column("sscore", "ct"), Column("sscore", "t1w")],
                          records, {})
    assert result.best == (1, 0, None)  # lower FID, higher S; no values for S t1w
    assert result.summaries[0][1].mean == 50.0 and result.summaries[0][1].std == 10.0
    assert result.summaries[1][2] is None
    assert summary_cell(result.summaries[0][1], 2) == "50.00 ± 10.00 [40.00, 60.00]"  # two values: their means resampled span them
    assert summary_cell(result.summaries[1][0], 4) == "1.0000"


# ----------------------------------------------------------------------------- segmentation metrics


def _write_masks(folder: Path, masks: dict[str, np.ndarray], affine: np.ndarray = np.eye(4)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for case, mask in masks.items():
        nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), folder / f"{case}.nii.gz")
    return folder


@pytest.fixture
def masks(tmp_path: Path) -> dict[str, Path]:
    """Case a: perfect; b: disjoint, half the volume; c: empty reference, one predicted voxel."""
    shape = (4, 4, 3)
    reference_a = np.zeros(shape)
    reference_a[1:3, 1:3, 1] = 1  # 4 voxels
    reference_b = reference_a.copy()
    predicted_b = np.zeros(shape)
    predicted_b[0, 0, 0:2] = 1  # 2 voxels, none shared
    predicted_c = np.zeros(shape)
    predicted_c[3, 3, 2] = 1
    truth = _write_masks(tmp_path / "truth", {"a": reference_a, "b": reference_b, "c": np.zeros(shape)})
    pred = _write_masks(tmp_path / "pred", {"a": reference_a, "b": predicted_b, "c": predicted_c})
    return {"truth": truth, "pred": pred, "root": tmp_path}


def test_dice_and_ravd_from_folders_hand_checked(masks: dict[str, Path]) -> None:
    result = evaluate(["dice", "ravd"], predictions=[masks["pred"], masks["truth"]], truth=masks["truth"])
    values = {(r.model, r.metric, r.case): r.value for r in result.records}
    pred, truth = str(masks["pred"]), str(masks["truth"])
    assert values[pred, "dice", "a"] == 100.0 and values[pred, "ravd", "a"] == 0.0
    assert values[pred, "dice", "b"] == 0.0 and values[pred, "ravd", "b"] == 50.0
    assert values[pred, "dice", "c"] == 0.0 and math.isnan(values[pred, "ravd", "c"])
    assert values[truth, "dice", "c"] == 100.0  # both empty agree
    dice_summary, ravd_summary = result.summaries[0]
    assert dice_summary.mean == pytest.approx(100 / 3) and dice_summary.std == pytest.approx(math.sqrt(2) * 100 / 3)
    assert (ravd_summary.mean, ravd_summary.std, ravd_summary.count, ravd_summary.missing) == (25.0, 25.0, 2, 1)
    assert summary_cell(ravd_summary, 2) == "25.00 ± 25.00 [0.00, 50.00] (1 n/a)"
    assert result.best == (1, 1)
    assert f"{pred}: RAVD n/a for case c (empty reference)" in result.notes
    assert [column.label for column in result.columns] == ["DICE", "RAVD"]


def test_dice_ravd_cli_table_and_errors(masks: dict[str, Path]) -> None:
    out = masks["root"] / "table2.json"
    result = runner.invoke(app, ["evaluate", "--metric", "dice,ravd", "--pred", str(masks["pred"]),
                                 "--truth", str(masks["truth"]), "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert "DICE" in result.stdout and "25.00 ± 25.00 [0.00, 50.00] (1 n/a)" in result.stdout
    assert "RAVD n/a for case c (empty reference)" in result.stdout
    document = json.loads(out.read_text())
    assert len(document["records"]) == 6
    assert next(r for r in document["records"] if r["case"] == "c" and r["metric"] == "ravd")["value"] is None

    dice_only = ["evaluate", "-m", "dice", "--pred", str(masks["pred"]), "--truth", str(masks["truth"])]
    (masks["pred"] / "b.nii.gz").unlink()
    missing = runner.invoke(app, dice_only)
    assert missing.exit_code == 1 and "no prediction for case 'b'" in missing.stderr
    _write_masks(masks["pred"], {"b": np.zeros((4, 4, 2))})
    other_grid = runner.invoke(app, dice_only)
    assert other_grid.exit_code == 1 and "prediction grid" in other_grid.stderr
    exists = runner.invoke(app, [*dice_only, "--json", str(out)])
    assert exists.exit_code == 1 and "already exists" in exists.stderr


# ----------------------------------------------------------------------------- CLI and errors


def test_evaluate_cli_end_to_end(setup: dict[str, Path]) -> None:
    out = setup["root"] / "cli.csv"
    result = runner.invoke(app, ["evaluate", "-m", "sscore", "--data", str(setup["data"]),
                                 "-w", str(setup["weights"]), "--segmenters", str(setup["segmenters"]),
                                 "--device", "cpu", "--csv", str(out)])
    assert result.exit_code == 0, result.output
    assert all(f"S {name}" in result.stdout for name in ("t1w", "t2w", "ct"))
    assert str(setup["weights"]) in result.stdout and " ± " in result.stdout
    assert len(list(csv.DictReader(out.read_text().splitlines()[2:]))) == 12 * 4  # the model, 3 baselines
    assert f"{setup['weights']} beats identity (copy input) in " in result.stdout
    assert "body mean-fill in " in result.stdout and "histogram-matched source in " in result.stdout


@pytest.mark.parametrize("arguments, code, message", [
    (["-m", "bleu"], 2, "unknown metric 'bleu'; choose from fid, sscore, psnr, ssim, mae, dice, ravd"),
    (["-m", "fid,dice"], 2, "dice and ravd compare --pred with --truth"),
    (["-m", "sscore", "--pred", "x", "--truth", "y"], 2, "--pred and --truth go with --metric dice"),
    (["-m", "sscore"], 2, "need --data DATA"),
    (["-m", "dice", "--pred", "x"], 2, "need --truth TRUTH_DIR"),
])
def test_usage_errors_are_one_line_with_exit_code_2(arguments: list[str], code: int, message: str) -> None:
    result = runner.invoke(app, ["evaluate", *arguments])
    assert result.exit_code == code, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_sscore_without_segmenters_says_how_to_train_them(setup: dict[str, Path], tmp_path: Path) -> None:
    common = ["evaluate", "-m", "sscore", "--data", str(setup["data"]), "-w", str(setup["weights"]),
              "--device", "cpu"]
    without = runner.invoke(app, common)
    assert without.exit_code == 2 and "sscore needs --segmenters DIR" in without.stderr
    partial = tmp_path / "segmenters"
    shutil.copytree(setup["segmenters"] / "ct", partial / "ct")
    result = runner.invoke(app, [*common, "--segmenters", str(partial)])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert f"no t1w segmenter; train one with `targan train-segmenter --data {setup['data']} --modality t1w " \
           f"--out {partial / 't1w'}`" in result.stderr


def test_paired_metrics_without_paired_data_are_an_error(setup: dict[str, Path], tmp_path: Path) -> None:
    unpaired = tmp_path / "data"
    shutil.copytree(setup["data"], unpaired, ignore=shutil.ignore_patterns("paired", ".cache"))
    result = runner.invoke(app, ["evaluate", "-m", "psnr", "--data", str(unpaired), "-w", str(setup["weights"]),
                                 "--device", "cpu"])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "psnr need paired ground truth (test/<source>/paired/<target>/<case>.nii.gz" in result.stderr


def test_fid_feature_and_output_problems_are_found_before_any_work(setup: dict[str, Path], tmp_path: Path) -> None:
    common = ["evaluate", "-m", "fid", "--data", str(setup["data"]), "-w", str(setup["weights"]), "--device", "cpu"]
    missing = runner.invoke(app, [*common, "--fid-features", str(tmp_path / "absent.pt")])
    assert missing.exit_code == 1 and "FID feature module file not found" in missing.stderr
    broken = tmp_path / "broken.pt2"
    broken.write_bytes(b"PK not really an archive")
    bad = runner.invoke(app, [*common, "--fid-features", str(broken)])
    assert bad.exit_code == 1 and len(bad.stderr.strip().splitlines()) == 1  # no logged traceback
    assert "not a torch.export program" in bad.stderr and "broken.pt2" in bad.stderr
    existing = tmp_path / "out.json"
    existing.write_text("{}")
    refused = runner.invoke(app, [*common, "--fid-features", str(setup["features"]), "--json", str(existing)])
    assert refused.exit_code == 1 and "already exists; pass --overwrite" in refused.stderr
    assert existing.read_text() == "{}"
    fixed = tmp_path / "fixed.pt2"  # exported for batches of 2 only
    torch.export.save(torch.export.export(PooledFeatures(), (torch.zeros(2, 1, SIZE, SIZE),)), str(fixed))
    static = runner.invoke(app, [*common, "--fid-features", str(fixed)])
    assert static.exit_code == 1 and len(static.stderr.strip().splitlines()) == 1
    assert "fixed.pt2: the FID feature module fails on a (3, 1," in static.stderr and "dynamic batch" in static.stderr
    fixed.unlink()
    features = ["--fid-features", str(setup["features"])]
    same = runner.invoke(app, [*common, *features, "--json", str(tmp_path / "t"), "--csv", str(tmp_path / "." / "t")])
    assert same.exit_code == 2 and "--json and --csv name the same file" in same.stderr
    (tmp_path / "folder").mkdir()
    folder = runner.invoke(app, [*common, *features, "--json", str(tmp_path / "folder"), "--overwrite"])
    assert folder.exit_code == 1 and "folder: is a folder: name a file to write" in folder.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.pt2", "folder", "out.json"]  # nothing written


def test_parse_metrics_accepts_repeats_commas_and_case() -> None:
    assert parse_metrics(["FID, sscore", "fid", "psnr"]) == ("fid", "sscore", "psnr")
    with pytest.raises(UsageError, match="at least one --metric"):
        parse_metrics([" , "])


def test_models_must_share_two_modalities_with_the_dataset(setup: dict[str, Path]) -> None:
    data = open_data_dir(setup["data"])
    lonely = _oracle("ct only", tuple(m for m in data.spec.modalities if m.name == "ct"),
                     lambda case, target: case.image)
    with pytest.raises(TarganError, match="at least two modalities in common"):
        evaluate_models(data, [lonely], ["mae"])


def test_sscore_with_trained_segmenters_separates_a_perfect_translation_from_a_random_one(
        setup: dict[str, Path], tmp_path: Path) -> None:
    data = open_data_dir(setup["data"])
    for name in ("t1w", "ct"):  # one training case each: about 55 % Dice on the paired renderings
        train_segmenter(setup["data"], name, tmp_path / name, epochs=20, image_size=SIZE, width=8, depth=3,
                        batch_size=2, device="cpu")
    weights = load_weights(setup["weights"])
    two = tuple(m for m in weights.config.modalities if m.name in ("t1w", "ct"))
    perfect = _oracle("paired truth", two, lambda case, target: case.paired[target])
    random = dataclasses.replace(generator_model(weights, "random"), modalities=two)
    result = evaluate_models(data, [perfect, random], ["sscore"], segmenters=tmp_path)
    means = [[summary.mean for summary in row] for row in result.summaries]  # [model][target]
    assert min(means[0]) > 40.0
    assert all(perfect_mean > random_mean + 25.0 for perfect_mean, random_mean in zip(*means))
    assert result.best == (0, 0)
