"""Rule 1: an output never is, contains or lies inside an input of the same command (real paths:
links and ``..`` resolved), with --overwrite or not; refused before any work, naming both paths.

Each case runs the CLI in a subprocess and checks: a non-zero exit code, no traceback, one error
line naming the output and the input, every input byte for byte as before, nothing new written.
Among them the four data-loss cases of issue 17 (evaluate --json/--csv, train-segmenter --out,
convert -o, enrich), which used to delete or replace the input.
"""

from __future__ import annotations

import os
from pathlib import Path


from cli_safety import data, refusal, targan, tree_digest, write_case, weights  # noqa: F401 (fixtures)
from test_chaos import build_chaos_tree


def _refused_untouched(arguments: list[object], inputs: list[Path], *words: object) -> str:
    before = tree_digest(*inputs)
    line = refusal(targan(*arguments), *map(str, words), exit_code=1)
    assert tree_digest(*inputs) == before
    return line


# ----------------------------------------------------------------------------- the data-loss cases


def test_evaluate_json_or_csv_onto_an_input_is_refused(tmp_path: Path) -> None:
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    write_case(pred / "case.nii.gz", seed=1)
    write_case(truth / "case.nii.gz", seed=2)
    for option, target in (("--json", pred / "case.nii.gz"), ("--csv", truth / "case.nii.gz"),
                           ("--json", truth)):
        _refused_untouched(["evaluate", "-m", "dice", "--pred", pred, "--truth", truth, option, target,
                            "--overwrite"], [pred, truth], target, "input")


def test_evaluate_reports_inside_the_data_or_weights_are_refused(tmp_path: Path, data: Path, weights: Path) -> None:
    for option, target in (("--json", data / "dataset.json"), ("--csv", weights / "config.json")):
        _refused_untouched(["evaluate", "-m", "psnr", "--data", data, "-w", weights, option, target, "--overwrite",
                            "--device", "cpu"], [data, weights], target, "input")


def test_train_segmenter_out_onto_its_data_is_refused(data: Path) -> None:
    _refused_untouched(["train-segmenter", "--data", data, "--modality", "ct", "--out", data, "--overwrite"],
                       [data], data, "is also an input")
    _refused_untouched(["train-segmenter", "--data", data / "train", "--modality", "ct", "--out", data,
                        "--overwrite"], [data], data, "holds the input")


def test_convert_into_the_folder_holding_the_checkpoint_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "downloads"
    checkpoint = folder / "netG_use_50.pkl"
    folder.mkdir()
    checkpoint.write_bytes(b"a checkpoint the user downloaded")
    _refused_untouched(["convert", checkpoint, "-o", folder, "--overwrite"], [folder], folder, "holds the input",
                       checkpoint)
    link = tmp_path / "link"
    link.symlink_to(folder)
    _refused_untouched(["convert", checkpoint, "-o", tmp_path / "link" / ".." / "downloads", "--overwrite"],
                       [folder], "holds the input")


def test_enrich_whose_input_lies_inside_the_dataset_folder_is_refused(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    folder = raw / "Dataset501_LiverCT"
    inputs = folder / "my_cases"
    write_case(inputs / "case0.nii.gz")
    write_case(folder / "imagesTs" / "case0_0000.nii.gz")  # a dataset already there
    before = tree_digest(raw)
    refusal(targan("enrich", inputs, "--from", "ct", "--single-channel", "-o", raw, "--overwrite",
                   "--device", "cpu"), str(folder), "holds the input", str(inputs))
    assert tree_digest(raw) == before


# ----------------------------------------------------------------------------- other commands


def test_translate_outputs_overlapping_inputs_are_refused(tmp_path: Path, weights: Path) -> None:
    cases = tmp_path / "cases"
    source = write_case(cases / "a.nii.gz")
    common = ["--from", "ct", "--to", "t1w", "-w", weights, "--device", "cpu", "--overwrite"]
    _refused_untouched(["translate", source, "-o", source, *common], [cases], "is also an input")
    _refused_untouched(["translate", cases, "-o", cases / "out", *common], [cases], "lies inside the input")
    _refused_untouched(["translate", cases, "-o", cases / "sub" / ".." / "..", *common], [cases], "holds the input")
    alias = tmp_path / "alias.nii.gz"
    alias.symlink_to(source)
    _refused_untouched(["translate", alias, "-o", source, *common], [cases, alias], "is also an input")
    _refused_untouched(["translate", source, "-o", weights / "out.nii.gz", *common], [cases, weights],
                       "lies inside the input", weights)
    os.link(source, tmp_path / "hard.nii.gz")
    _refused_untouched(["translate", source, "-o", tmp_path / "hard.nii.gz", *common], [cases], "is also an input")


def test_segment_train_and_import_outputs_overlapping_inputs_are_refused(tmp_path: Path, data: Path) -> None:
    source = write_case(tmp_path / "in" / "a.nii.gz")
    segmenter = tmp_path / "segmenter"
    segmenter.mkdir()
    _refused_untouched(["segment", source, "-o", source, "--segmenter", segmenter, "--overwrite"], [source],
                       "is also an input")
    _refused_untouched(["segment", source, "-o", segmenter / "mask.nii.gz", "--segmenter", segmenter],
                       [source, segmenter], "lies inside the input")
    _refused_untouched(["train", "--data", data, "--out", data / "run", "--preset", "tiny"], [data],
                       "lies inside the input")
    _refused_untouched(["train", "--data", data, "--out", data, "--overwrite", "--preset", "tiny"], [data],
                       "is also an input")
    chaos = build_chaos_tree(tmp_path / "chaos")
    _refused_untouched(["data", "import-chaos", chaos, chaos / "DATA", "--overwrite"], [chaos],
                       "lies inside the input")


def test_weights_named_by_the_environment_are_an_input_too(tmp_path: Path, weights: Path) -> None:
    """$TARGAN_WEIGHTS (no --weights) names an input as much as --weights does."""
    from cli_safety import ENVIRONMENT

    source = write_case(tmp_path / "cases" / "a.nii.gz")
    before = tree_digest(weights)
    result = targan("translate", source, "-o", weights / "out.nii.gz", "--from", "ct", "--to", "t1w",
                    "--device", "cpu", "--overwrite", env={**ENVIRONMENT, "TARGAN_WEIGHTS": str(weights)})
    refusal(result, "lies inside the input", str(weights), exit_code=1)
    assert tree_digest(weights) == before


def test_outputs_among_the_hub_cache_of_the_weights_are_refused(tmp_path: Path) -> None:
    """Weights named by a Hub repo id are read from that repo's folder in the Hugging Face cache: an
    output there (or a folder holding it, replaced with --overwrite) would destroy the snapshots."""
    from cli_safety import ENVIRONMENT

    hub = tmp_path / "hub"
    repo = hub / "models--someone--weights"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    scans = tmp_path / "scans"
    write_case(scans / "scan.nii.gz", seed=1)
    environment = {**ENVIRONMENT, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    for source, output, words in ((scans / "scan.nii.gz", snapshot / "out.nii.gz", ("lies inside the input", repo)),
                                  (scans, hub, ("holds the input", repo))):  # a folder run writes a folder
        before = tree_digest(hub, scans)
        line = refusal(targan("translate", source, "--from", "ct", "--to", "t1w", "-w", "someone/weights", "-o",
                              output, "--overwrite", env=environment), *map(str, words), exit_code=1)
        assert tree_digest(hub, scans) == before, line
