"""core/qc.py (cycle score, clipping, modality vote, grades) and translate's QC on phantoms with a
tiny model trained once per test session: each failure kind is flagged, clean inputs pass."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from targan_cli.cli import app
from targan_cli.core import qc
from targan_cli.core.qc import ModalityVote, clipped_fraction, cycle_errors, grade, modality_vote
from targan_cli.data.dataset import open_data_dir
from targan_cli.data.phantom import QC_FAILURES, qc_failure, write_phantom_dataset
from targan_cli.io.volume import read_volume, write_volume
from targan_cli.io.weights import DISCRIMINATOR_FILE, Weights, load_weights
from targan_cli.workflows import translate as translate_module
from targan_cli.workflows.train import load_checkpoint, train
from targan_cli.workflows.translate import synthesize, translate
from weights_factories import make_tiny_weights


# ----------------------------------------------------------------------------- the numbers


def test_cycle_errors_average_inside_the_body_per_slice_and_per_volume() -> None:
    source = np.zeros((3, 10, 10), dtype=np.float32)
    reconstructed = source.copy()
    body = np.zeros(source.shape, dtype=bool)
    body[0, :5] = True  # 50 pixels
    body[1, :2] = True  # 20 pixels
    body[2, 0, 0] = True  # 1 pixel: below MIN_SLICE_BODY_FRACTION, not scored
    reconstructed[0, :5] = 0.4  # |diff| / 2 = 0.2 on slice 0's body
    reconstructed[1, :2] = -1.0  # 0.5 on slice 1's body
    reconstructed[0, 5:] = 2.0  # outside the body: ignored
    per_slice, volume = cycle_errors(source, reconstructed, body)
    assert per_slice[0] == pytest.approx(0.2) and per_slice[1] == pytest.approx(0.5) and np.isnan(per_slice[2])
    assert volume == pytest.approx((50 * 0.2 + 20 * 0.5) / 70)  # voxel-weighted, not slice-weighted


def test_clipped_fraction_counts_body_voxels_at_or_beyond_the_bounds() -> None:
    values = np.array([[[-200.0, -160.0, 0.0, 240.0, 500.0, -1000.0]]])
    body = np.array([[[True, True, True, True, True, False]]])
    assert clipped_fraction(values, body, -160.0, 240.0) == pytest.approx(4 / 5)
    assert clipped_fraction(values, body, None, 240.0) == pytest.approx(2 / 5)
    assert clipped_fraction(values, body, -160.0, None) == pytest.approx(2 / 5)  # -1000 is outside the body
    assert clipped_fraction(values, body, None, None) == 0.0
    assert clipped_fraction(values, np.zeros_like(body), -160.0, 240.0) == 0.0


def test_modality_vote_is_the_majority_of_scored_slices() -> None:
    logits = np.array([[0.0, 5.0, 0.0], [0.0, 5.0, 0.0], [9.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    vote = modality_vote(logits, ("t1w", "t2w", "ct"), np.array([True, True, True, False]))
    assert (vote.predicted, vote.share) == ("t2w", pytest.approx(2 / 3))
    assert vote.shares == pytest.approx({"t1w": 1 / 3, "t2w": 2 / 3, "ct": 0.0})
    assert modality_vote(logits, ("t1w", "t2w", "ct"), np.zeros(4, dtype=bool)) is None


def test_grades_follow_the_thresholds() -> None:
    clean = np.full(4, qc.CYCLE_CHECK / 2)
    assert grade(clean, qc.CYCLE_CHECK / 2, 0.4).grade == "ok"
    assert grade(clean, (qc.CYCLE_CHECK + qc.CYCLE_POOR) / 2, 0.4).grade == "check"
    assert grade(clean, qc.CYCLE_POOR * 1.01, 0.4).grade == "poor"
    assert grade(clean, 0.0, qc.MIN_BODY_FRACTION / 2).grade == "poor"  # no body
    some = np.array([qc.CYCLE_POOR * 1.1, qc.CYCLE_POOR * 1.1, qc.CYCLE_CHECK, 0.0, np.nan])
    checked = grade(some, qc.CYCLE_CHECK / 2, 0.4)
    assert checked.grade == "check" and checked.flagged == (0, 1)  # half the scored slices flagged
    disagree = ModalityVote("t2w", 0.9, {"t1w": 0.1, "t2w": 0.9})
    wrong = grade(clean, qc.CYCLE_CHECK / 2, 0.4, disagree, "t1w")
    assert wrong.grade == "poor" and "predicts t2w on 90% of the slices, not t1w" in wrong.reasons[0]
    assert grade(clean, qc.CYCLE_CHECK / 2, 0.4, disagree, "t2w").grade == "ok"


# ----------------------------------------------------------------------------- translate's QC on phantoms

QC_WEIGHTS = Path(__file__).parent / "data" / "qc_tiny"  # bench/qc.py's model: 300 steps on phantoms, 2 MB
TARGET = {"ct": "t2w", "t1w": "ct", "t2w": "ct"}


@pytest.fixture(scope="session")
def qc_weights() -> Weights:
    """The tiny model the QC thresholds were calibrated with (tests/data/qc_tiny, trained by
    bench/qc.py: 300 steps take minutes on 2 CPU cores, too long to train per test session)."""
    return load_weights(QC_WEIGHTS)


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The first test patient of bench/qc.py's data (a patient the model never saw), per modality."""
    root = tmp_path_factory.mktemp("qc") / "data"
    write_phantom_dataset(root, cases=4, size=32, slices=8, test_cases=1, seed=1)
    return {case.modality: case.image for case in open_data_dir(root).cases("test")}


def _quality(weights: Weights, image: Path, contrast: str, kind: str):
    volume = read_volume(image)
    array, claimed = (volume.array, contrast) if kind == "clean" else qc_failure(
        kind, volume.array, contrast, np.random.default_rng(0))
    return synthesize(volume.with_array(array), weights, claimed, TARGET[contrast], batch_size=8, dtype=None,
                      qc=True).quality


@pytest.mark.parametrize("contrast", ["t1w", "t2w", "ct"])
def test_clean_phantoms_pass(qc_weights: Weights, phantoms: dict[str, Path], contrast: str) -> None:
    quality = _quality(qc_weights, phantoms[contrast], contrast, "clean")
    assert quality.grade.grade == "ok", quality.grade.reasons
    assert quality.vote.predicted == contrast and quality.cycle_volume < qc.CYCLE_CHECK


@pytest.mark.parametrize("kind", QC_FAILURES)
@pytest.mark.parametrize("contrast", ["t1w", "t2w", "ct"])
def test_each_failure_kind_is_flagged(qc_weights: Weights, phantoms: dict[str, Path], contrast: str,
                                      kind: str) -> None:
    quality = _quality(qc_weights, phantoms[contrast], contrast, kind)
    assert quality.grade.grade in ("check", "poor"), (quality.cycle_volume, quality.vote)
    clean = _quality(qc_weights, phantoms[contrast], contrast, "clean")
    if kind != "empty" or contrast != "ct":  # an empty CT has no body slice to score
        assert quality.cycle_volume > clean.cycle_volume


def test_a_wrong_from_is_named_with_the_predicted_modality(qc_weights: Weights, phantoms: dict[str, Path],
                                                           tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["translate", str(phantoms["t2w"]), "--from", "t1w", "--to", "ct", "-o",
                                      str(tmp_path / "ct.nii.gz"), "-w", str(QC_WEIGHTS), "--device", "cpu",
                                      "--preview", str(tmp_path / "preview.png")])
    assert result.exit_code == 0, result.output
    text = re.sub(r"\s+", " ", result.output)
    assert re.search(r"warning: \S+ct\.nii\.gz: QC poor: .*the modality check predicts t2w on \d+% of the slices, "
                     "not t1w", text), text
    assert re.search(r"ct\.nii\.gz\s+│\s+written\s+│\s+t1w\s+│\s+poor\s+│", result.output)
    sidecar = json.loads((tmp_path / "ct.json").read_text())
    assert sidecar["QC"]["Grade"] == "poor" and sidecar["QC"]["ModalityCheck"]["Predicted"] == "t2w"


def test_from_auto_takes_the_modality_the_check_predicts(qc_weights: Weights, phantoms: dict[str, Path],
                                                         tmp_path: Path) -> None:
    for contrast in ("t1w", "t2w", "ct"):  # NIfTI files: the values alone cannot tell T1w from T2w
        result = translate(phantoms[contrast], tmp_path / f"{contrast}.nii.gz", to=TARGET[contrast], source="auto",
                           weights=QC_WEIGHTS, device="cpu")
        assert result.sources[0].name == contrast
        # Hounsfield units say CT by themselves; between the MR modalities the check decides
        expected = "the values look like CT" if contrast == "ct" else f"the modality check predicts {contrast} on"
        assert result.sources[0].reason.startswith(expected)


def test_flagged_slices_are_marked_in_the_preview(qc_weights: Weights, phantoms: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    labels: list[str] = []
    real = translate_module.save_montage
    monkeypatch.setattr(translate_module, "save_montage",
                        lambda path, rows, row_labels, *a, **k: labels.extend(row_labels) or real(path, rows, row_labels,
                                                                                                   *a, **k))
    volume = read_volume(phantoms["t1w"])  # RAS voxel order: axis 2 runs inferior -> superior
    inverted, _ = qc_failure("inverted", volume.array, "t1w", np.random.default_rng(0))
    half = volume.array.copy()
    half[..., 2:] = inverted[..., 2:]  # the upper slices inverted, the lowest two clean
    source = write_volume(tmp_path / "half.nii.gz", volume.with_array(half))
    result = translate(source, tmp_path / "ct.nii.gz", to="ct", source="t1w", weights=QC_WEIGHTS, device="cpu",
                       preview=tmp_path / "preview.png")
    flagged = set(result.volumes[0].quality.grade.flagged)
    assert flagged and flagged <= set(range(2, volume.shape[2])) and (tmp_path / "preview.png").is_file()
    shown = [int(label.split()[1].split("/")[0]) - 1 for label in labels]
    assert [label.endswith("QC FLAGGED") for label in labels] == [index in flagged for index in shown]


def test_weights_without_a_discriminator_say_the_check_is_unavailable(phantoms: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    weights = make_tiny_weights(tmp_path / "old")  # a generator only, like converted or older weights
    result = CliRunner().invoke(app, ["translate", str(phantoms["ct"]), "--from", "ct", "--to", "t2w", "-o",
                                      str(tmp_path / "t2w.nii.gz"), "-w", str(weights), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].endswith("QC on (modality check unavailable)")
    assert json.loads((tmp_path / "t2w.json").read_text())["QC"]["ModalityCheck"] == "unavailable"


def test_training_exports_the_discriminator_with_the_generator(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_phantom_dataset(data, cases=1, size=32, slices=4, test_cases=0)
    result = train(data, tmp_path / "run", epochs=1, max_steps=1, preset="tiny", image_size=32, batch_size=2,
                   device="cpu", sample_every=0)
    exported = load_weights(result.export_dir)
    assert exported.discriminator is not None
    saved = load_file(str(result.export_dir / DISCRIMINATOR_FILE))
    trained = load_checkpoint(result.checkpoint)["trainer"]["model"]
    assert all(torch.equal(saved[name], trained[f"disc_x.{name}"]) for name in saved)
