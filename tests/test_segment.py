"""The liver segmenter: training on phantoms, save -> load, `targan segment` geometry, errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from dicom_factories import scanner_series
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner
from volume_factories import anatomy

from targan_cli.cli import app
from targan_cli.config import IntensitySettings
from targan_cli.data.phantom import write_phantom_dataset
from targan_cli.errors import TarganError
from targan_cli.io.atomic import MARKER
from targan_cli.io.dicom import read_dicom
from targan_cli.io.volume import read_volume, to_slices
from targan_cli.workflows.segment import (
    CONFIG_FILE,
    SEGMENTER_FILE,
    SegmenterConfig,
    build_network,
    default_image_size,
    label_slices,
    load_segmenter,
    save_segmenter,
    segment_slices,
    segment_volume,
    segmentation_loss,
    train_segmenter,
)

runner = CliRunner()
TINY = dict(epochs=2, image_size=32, width=4, depth=3, batch_size=8, device="cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Phantoms at 32 x 32: 2 training cases per modality, 2 test cases (CT 8 slices, MR 4)."""
    root = tmp_path_factory.mktemp("segment") / "data"
    write_phantom_dataset(root, cases=2, size=32, slices=8, seed=3, test_cases=2)
    return root


@pytest.fixture(scope="module")
def t1w_segmenter(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("segmenters") / "t1w"
    train_segmenter(data, "t1w", out, **TINY)
    return out


def test_training_writes_a_strict_segmenter_folder_with_its_settings(data: Path, t1w_segmenter: Path) -> None:
    assert sorted(p.name for p in t1w_segmenter.iterdir()) == [MARKER, CONFIG_FILE, SEGMENTER_FILE]
    config = json.loads((t1w_segmenter / CONFIG_FILE).read_text())
    assert (config["modality"], config["image_size"], config["width"], config["depth"]) == ("t1w", 32, 4, 3)
    assert config["intensity"]["kind"] == "mr"
    assert config["intensity"]["reference_high"] > 0  # fitted on the training volumes
    provenance = config["provenance"]
    assert (provenance["train_cases"], provenance["epochs"], provenance["seed"]) == (2, 2, 0)
    assert provenance["test_cases"] == 2 and 0.0 <= provenance["test_dice"] <= 100.0
    loaded = load_segmenter(t1w_segmenter)
    assert not loaded.network.training and loaded.config.modality == "t1w"
    assert loaded.config.intensity == IntensitySettings.from_dict(config["intensity"])


def test_training_is_deterministic_for_a_seed_and_reports_its_losses(data: Path, tmp_path: Path) -> None:
    first = train_segmenter(data, "ct", tmp_path / "a", **{**TINY, "epochs": 1})
    second = train_segmenter(data, "ct", tmp_path / "b", **{**TINY, "epochs": 1})
    other = train_segmenter(data, "ct", tmp_path / "c", **{**TINY, "epochs": 1}, seed=1)
    assert (first.train_cases, first.train_slices, len(first.epoch_losses)) == (2, 16, 1)
    assert first.epoch_losses == second.epoch_losses
    weights = [load_file(str(folder / SEGMENTER_FILE)) for folder in (tmp_path / "a", tmp_path / "b", tmp_path / "c")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert not all(torch.equal(weights[0][name], weights[2][name]) for name in weights[0])
    assert first.epoch_losses != other.epoch_losses


def test_segmentation_loss_is_near_zero_for_perfect_logits_and_large_for_inverted_ones() -> None:
    labels = torch.zeros(2, 1, 8, 8)
    labels[0, 0, 2:6, 2:6] = 1.0
    perfect = (labels * 2 - 1) * 30  # logits of +-30
    assert float(segmentation_loss(perfect, labels)) < 1e-3
    assert float(segmentation_loss(-perfect, labels)) > 10.0  # BCE ~30 on every pixel, Dice loss ~1


def test_save_then_load_gives_the_same_logits(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = SegmenterConfig("ct", IntensitySettings(kind="ct"), image_size=16, width=4, depth=3)
    network = build_network(config).eval()
    save_segmenter(tmp_path / "seg", network, config)
    loaded = load_segmenter(tmp_path / "seg")
    images = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded.network(images), network(images), rtol=0, atol=0)


def test_save_refuses_an_existing_folder_unless_overwrite(tmp_path: Path) -> None:
    config = SegmenterConfig("ct", IntensitySettings(kind="ct"), image_size=16, width=4, depth=3)
    folder = save_segmenter(tmp_path / "seg", build_network(config), config)
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, CONFIG_FILE, SEGMENTER_FILE]
    wider = dataclasses.replace(config, width=8)
    with pytest.raises(TarganError, match="already exists"):
        save_segmenter(folder, build_network(wider), wider)
    assert load_segmenter(folder).config.width == 4
    save_segmenter(folder, build_network(wider), wider, overwrite=True)
    assert load_segmenter(folder).config.width == 8


def test_segment_slices_thresholds_the_logits_resized_back_to_the_slices(tmp_path: Path) -> None:
    config = SegmenterConfig("ct", IntensitySettings(kind="ct"), image_size=16, width=4, depth=3)
    network = build_network(config).eval()
    save_segmenter(tmp_path / "seg", network, config)
    segmenter = load_segmenter(tmp_path / "seg")
    slices = np.random.default_rng(0).uniform(-1, 1, (3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = network(torch.from_numpy(slices)[:, None])[:, 0].numpy() > 0
    np.testing.assert_array_equal(segment_slices(segmenter, slices, batch_size=2), expected)
    odd = segment_slices(segmenter, slices[:, :12, :], batch_size=2)  # padded to a square and back
    assert odd.shape == (3, 12, 16) and odd.dtype == bool


def test_loading_refuses_mismatched_tensors_and_unknown_config_fields(t1w_segmenter: Path, tmp_path: Path) -> None:
    wider = tmp_path / "wider"
    wider.mkdir()
    config = json.loads((t1w_segmenter / CONFIG_FILE).read_text())
    (wider / CONFIG_FILE).write_text(json.dumps({**config, "width": 8}))
    save_file(load_file(str(t1w_segmenter / SEGMENTER_FILE)), str(wider / SEGMENTER_FILE))
    with pytest.raises(TarganError, match="tensors do not match config.json") as caught:
        load_segmenter(wider)
    assert caught.value.path == wider / SEGMENTER_FILE

    (wider / CONFIG_FILE).write_text(json.dumps({**config, "colour": "red"}))
    with pytest.raises(TarganError, match="unknown field"):
        load_segmenter(wider)
    (wider / CONFIG_FILE).write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(TarganError, match="format version 99"):
        load_segmenter(wider)
    with pytest.raises(TarganError, match="train-segmenter"):
        load_segmenter(tmp_path / "absent")


def test_segment_cli_writes_a_uint8_mask_on_the_input_grid(data: Path, t1w_segmenter: Path, tmp_path: Path) -> None:
    image = next((data / "test" / "t1w" / "images").iterdir())
    output = tmp_path / "mask.nii.gz"
    result = runner.invoke(app, ["segment", str(image), "-o", str(output), "--segmenter", str(t1w_segmenter),
                                 "--from", "t1w", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "t1w liver" in result.stdout and "mL" in result.stdout
    written, source = nib.load(output), nib.load(image)
    assert written.get_data_dtype() == np.uint8
    assert written.shape == source.shape
    np.testing.assert_array_equal(written.affine, source.affine)
    volume = read_volume(image)
    expected = segment_volume(volume, load_segmenter(t1w_segmenter))
    np.testing.assert_array_equal(np.asarray(written.dataobj), expected)
    assert set(np.unique(expected)) <= {0, 1}

    again = runner.invoke(app, ["segment", str(image), "-o", str(output), "--segmenter", str(t1w_segmenter)])
    assert again.exit_code == 1 and "already exists" in again.stderr
    before = image.read_bytes()
    itself = runner.invoke(app, ["segment", str(image), "-o", str(image), "--segmenter", str(t1w_segmenter),
                                 "--overwrite"])
    assert itself.exit_code == 1 and "is also an input" in itself.stderr and image.read_bytes() == before


def test_segment_cli_errors_are_one_line(data: Path, t1w_segmenter: Path, tmp_path: Path) -> None:
    image = next((data / "test" / "ct" / "images").iterdir())
    cases = [
        (["--from", "ct"], 2, "trained on t1w images"),
        (["-o", str(tmp_path / "mask.png")], 2, "name it NAME.nii.gz"),
    ]
    for extra, code, message in cases:
        arguments = ["segment", str(image), "--segmenter", str(t1w_segmenter), *extra]
        if "-o" not in extra:
            arguments += ["-o", str(tmp_path / "mask.nii.gz")]
        result = runner.invoke(app, arguments)
        assert result.exit_code == code, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    missing = runner.invoke(app, ["segment", str(image), "-o", str(tmp_path / "m.nii.gz"),
                                  "--segmenter", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "train-segmenter" in missing.stderr


def test_train_segmenter_cli_and_its_errors(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "seg"
    common = ["train-segmenter", "--data", str(data), "--out", str(out), "--epochs", "1",
              "--width", "4", "--depth", "3", "--device", "cpu"]
    result = runner.invoke(app, [*common, "--modality", "t2w"])
    assert result.exit_code == 0, result.output
    assert "t2w: 2 cases" in result.stdout and "2 real test volumes" in result.stdout
    config = load_segmenter(out).config
    assert (config.modality, config.image_size) == ("t2w", 32)  # default: the phantoms' 32 x 32 slices

    for extra, code, message in [
        (["--modality", "t2w"], 1, "already exists"),
        (["--modality", "pet", "--overwrite"], 2, "unknown modality 'pet'"),
        (["--modality", "ct", "--image-size", "30", "--overwrite"], 2, "not divisible by 4"),
        (["--modality", "ct", "--epochs", "0", "--overwrite"], 2, "--epochs must be at least 1"),
    ]:
        failed = runner.invoke(app, [*common, *extra])
        assert failed.exit_code == code, failed.output
        assert message in failed.stderr and len(failed.stderr.strip().splitlines()) == 1


def test_training_needs_labelled_cases(data: Path, tmp_path: Path) -> None:
    unlabelled = tmp_path / "data"
    for path in data.rglob("*.nii.gz"):
        if "labels" not in path.parts and "paired" not in path.parts:
            target = unlabelled / path.relative_to(data)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    (unlabelled / "dataset.json").write_text((data / "dataset.json").read_text())
    with pytest.raises(TarganError, match="no labelled ct training cases"):
        train_segmenter(unlabelled, "ct", tmp_path / "seg", **TINY)


def test_label_slices_refuse_a_label_on_another_grid(data: Path, tmp_path: Path) -> None:
    image_path = next((data / "test" / "ct" / "images").iterdir())
    image = read_volume(image_path)
    label_path = data / "test" / "ct" / "labels" / image_path.name
    assert label_slices(label_path, image).shape == to_slices(image)[0].shape
    label = nib.load(label_path)
    affine = label.affine.copy()
    affine[0, 3] += 5.0  # the same array 5 mm to the side
    moved = tmp_path / "moved.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj), affine), moved)
    with pytest.raises(TarganError, match="label grid") as caught:
        label_slices(moved, image)
    assert caught.value.path == moved


@pytest.mark.parametrize("shape, depth, expected", [((30, 20, 3), 3, 32), ((30, 20, 3), 5, 32),
                                                    ((300, 200, 3), 5, 256), ((64, 64, 3), 5, 64)])
def test_the_default_image_size_is_the_slice_size_capped_and_rounded(
        tmp_path: Path, shape: tuple[int, int, int], depth: int, expected: int) -> None:
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.eye(4)), path)
    assert default_image_size(path, depth) == expected


def test_segment_picks_one_series_of_a_dicom_study_with_series(data: Path, t1w_segmenter: Path,
                                                                 tmp_path: Path) -> None:
    """A study folder with a CT and an MR series: refused with the list and the way out (--series),
    which segment now has; the MR series picked by a prefix of its UID gives that series' mask."""
    mr_uid, ct_uid = "1.2.826.0.1.3680043.10.511.2.7", "1.2.826.0.1.3680043.10.511.1.1"
    study = tmp_path / "study"
    scanner_series(study, (anatomy((4, 32, 32)) + 1024).astype(np.uint16), series_uid=ct_uid, intercept=-1024)
    scanner_series(study, np.abs(anatomy((4, 32, 32), seed=5)).astype(np.uint16) + 300, series_uid=mr_uid,
                   modality="MR", names="ima")
    output = tmp_path / "mask.nii.gz"
    arguments = ["segment", str(study), "-o", str(output), "--segmenter", str(t1w_segmenter), "--device", "cpu"]

    refused = runner.invoke(app, arguments)
    assert refused.exit_code == 2 and "Pick one with --series" in refused.stderr and not output.exists()
    assert len(refused.stderr.strip().splitlines()) == 1

    result = runner.invoke(app, [*arguments, "--series", "1.2.826.0.1.3680043.10.511.2"])
    assert result.exit_code == 0, result.output
    expected = segment_volume(read_dicom(study, mr_uid).volume, load_segmenter(t1w_segmenter))
    np.testing.assert_array_equal(np.asarray(nib.load(output).dataobj), expected)

    image = next((data / "test" / "t1w" / "images").iterdir())
    for source, message in ((image, "this is a NIfTI file"), (data / "test" / "t1w" / "images", "holds several cases")):
        misused = runner.invoke(app, ["segment", str(source), "-o", str(tmp_path / "other"), "--segmenter",
                                      str(t1w_segmenter), "--series", mr_uid])
        assert misused.exit_code == 2 and message in misused.stderr, misused.output
