"""`targan enrich`: nnU-Net v2 raw datasets with synthetic channels, on tiny phantoms and weights."""

import hashlib
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from targan_cli.cli import app
from targan_cli.data.phantom import write_phantom_dataset
from targan_cli.errors import TarganError, UsageError
from targan_cli.workflows.enrich import channel_names, enrich, verify_nnunet_dataset
from volume_factories import anatomy, canonical_affine, write_nifti
from weights_factories import TINY_REFERENCE_HIGH, make_tiny_weights

runner = CliRunner()
for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):  # the developer's own nnU-Net folders
    os.environ.pop(variable, None)
TRAIN_CT = ("phantom_004", "phantom_005")  # write_phantom_dataset(cases=2): ct is the third modality
TEST_CASE = "phantom_006"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom") / "data"
    write_phantom_dataset(root, cases=2, size=32, slices=4, seed=0, test_cases=1)
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny", image_size=32)


@pytest.fixture(scope="module")
def enriched(tmp_path_factory, data, weights):
    """CT train and test splits enriched with every other modality into one dataset."""
    raw = tmp_path_factory.mktemp("raw")
    enrich(data / "train" / "ct", raw, weights=weights, device="cpu")
    return enrich(data / "test" / "ct", raw, weights=weights, device="cpu")


def _nifti(path):
    image = nib.load(path)
    return np.asanyarray(image.dataobj), image


def _mtimes(folder):
    return {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------- the dataset


def test_channels_are_the_real_image_and_its_translations_on_its_exact_grid(enriched, data):
    folder = enriched.folder
    assert folder.name == "Dataset501_LiverCTEnriched"
    assert enriched.channels == ("CT", "synthetic_t1w", "synthetic_t2w")
    assert (enriched.training, enriched.test) == (2, 1)
    for case, split, images in [(c, "train", "imagesTr") for c in TRAIN_CT] + [(TEST_CASE, "test", "imagesTs")]:
        real, real_image = _nifti(data / split / "ct" / "images" / f"{case}.nii.gz")
        files = sorted((folder / images).glob(f"{case}_*.nii.gz"))
        assert [f.name for f in files] == [f"{case}_{c:04d}.nii.gz" for c in range(3)]
        channel0, image0 = _nifti(files[0])
        assert channel0.dtype == real.dtype and np.array_equal(channel0, real)
        for file in files:
            array, image = _nifti(file)
            assert array.shape == real.shape
            assert np.array_equal(image.affine, real_image.affine)
            assert np.array_equal(image.header.get_sform(), real_image.header.get_sform())
        t1w, _ = _nifti(files[1])
        assert t1w.dtype == np.float32 and not np.array_equal(t1w, channel0)
        assert 0.0 <= t1w.min() and t1w.max() <= TINY_REFERENCE_HIGH  # MR units of the weights
    for case in TRAIN_CT:
        label, label_image = _nifti(folder / "labelsTr" / f"{case}.nii.gz")
        truth, truth_image = _nifti(data / "train" / "ct" / "labels" / f"{case}.nii.gz")
        assert label.dtype == np.uint8 and set(np.unique(label)) <= {0, 1} and label.any()
        assert np.array_equal(label, truth != 0)
        assert np.array_equal(label_image.affine, truth_image.affine)
    assert not (folder / "labelsTr" / f"{TEST_CASE}.nii.gz").exists()  # test labels stay for evaluation


def test_dataset_json(enriched, weights):
    spec = json.loads((enriched.folder / "dataset.json").read_text())
    assert spec["channel_names"] == {"0": "CT", "1": "synthetic_t1w", "2": "synthetic_t2w"}
    assert spec["labels"] == {"background": 0, "liver": 1}
    assert spec["numTraining"] == 2
    assert spec["file_ending"] == ".nii.gz"
    assert spec["name"] == "LiverCTEnriched"
    assert "TarGAN" in spec["reference"] and "CC-BY-NC-SA" in spec["licence"]
    sha256 = hashlib.sha256((weights / "model.safetensors").read_bytes()).hexdigest()
    assert spec["targan"]["weights"]["sha256"] == sha256
    assert spec["targan"]["synthetic_modalities"] == ["t1w", "t2w"]
    # nnU-Net v2 picks CTNormalization for the name "ct" (casefolded), z-scoring for the others.
    assert [name.casefold() == "ct" for name in spec["channel_names"].values()] == [True, False, False]


def test_verify_accepts_the_written_dataset(enriched):
    assert verify_nnunet_dataset(enriched.folder) == []


def _drop_channel(folder):
    (folder / "imagesTr" / f"{TRAIN_CT[0]}_0001.nii.gz").unlink()


def _extra_channel(folder):
    shutil.copy(folder / "imagesTr" / f"{TRAIN_CT[0]}_0000.nii.gz", folder / "imagesTr" / f"{TRAIN_CT[0]}_0003.nii.gz")


def _drop_label(folder):
    (folder / "labelsTr" / f"{TRAIN_CT[1]}.nii.gz").unlink()


def _wrong_count(folder):
    spec = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**spec, "numTraining": 3}))


def _undeclared_label(folder):
    path = folder / "labelsTr" / f"{TRAIN_CT[0]}.nii.gz"
    array, image = _nifti(path)
    nib.save(nib.Nifti1Image(np.where(array > 0, 2, 0).astype(np.uint8), image.affine, image.header), path)


def _moved_channel(folder):
    path = folder / "imagesTr" / f"{TRAIN_CT[0]}_0002.nii.gz"
    array, image = _nifti(path)
    affine = image.affine.copy()
    affine[:3, 3] += 5.0  # another origin
    nib.save(nib.Nifti1Image(array, affine), path)


def _other_shape(folder):
    path = folder / "imagesTs" / f"{TEST_CASE}_0001.nii.gz"
    array, image = _nifti(path)
    nib.save(nib.Nifti1Image(array[:-1], image.affine), path)


def _stray_file(folder):
    shutil.copy(folder / "imagesTr" / f"{TRAIN_CT[0]}_0000.nii.gz", folder / "imagesTr" / ".DS_copy.nii.gz")


def _no_channel_names(folder):
    spec = json.loads((folder / "dataset.json").read_text())
    del spec["channel_names"]
    (folder / "dataset.json").write_text(json.dumps(spec))


@pytest.mark.parametrize("corrupt, expected", [
    (_drop_channel, f"imagesTr/{TRAIN_CT[0]}: missing channel file(s) {TRAIN_CT[0]}_0001.nii.gz"),
    (_extra_channel, f"{TRAIN_CT[0]}_0003.nii.gz beyond the 3"),
    (_drop_label, f"imagesTr/{TRAIN_CT[1]}: no label labelsTr/{TRAIN_CT[1]}.nii.gz"),
    (_wrong_count, "numTraining is 3 but imagesTr holds 2"),
    (_undeclared_label, "label value(s) 2 are not declared"),
    (_moved_channel, f"imagesTr/{TRAIN_CT[0]}_0002.nii.gz: spacing, origin or direction"),
    (_other_shape, f"imagesTs/{TEST_CASE}_0001.nii.gz: shape"),
    (_stray_file, ".DS_copy.nii.gz does not end in _XXXX.nii.gz"),
    (_no_channel_names, "lacks the required key(s) channel_names"),
])
def test_verify_finds_what_nnunet_would_reject(enriched, tmp_path, corrupt, expected):
    folder = tmp_path / enriched.folder.name
    shutil.copytree(enriched.folder, folder)
    corrupt(folder)
    problems = verify_nnunet_dataset(folder)
    assert any(expected in problem for problem in problems), problems


# ----------------------------------------------------------------------------- resuming


def test_second_run_writes_nothing_and_a_half_written_case_is_redone(tmp_path, data, weights):
    raw = tmp_path / "raw"
    first = enrich(data / "train" / "ct", raw, weights=weights, targets=["t2w"], device="cpu")
    assert first.written == TRAIN_CT and first.channels == ("CT", "synthetic_t2w")
    before = _mtimes(raw)

    again = enrich(data / "train" / "ct", raw, weights=weights, targets=["t2w"], device="cpu")
    assert again.written == () and again.skipped == TRAIN_CT
    assert _mtimes(raw) == before

    half = first.folder / "imagesTr" / f"{TRAIN_CT[1]}_0001.nii.gz"
    half.unlink()
    leftover = first.folder / "imagesTr" / f".{TRAIN_CT[1]}_0001.tmp-x1y2.nii.gz"  # a killed run's temporary
    leftover.write_bytes(b"partial")
    ticks = []
    redone = enrich(data / "train" / "ct", raw, weights=weights, targets=["t2w"], device="cpu", progress=ticks.append)
    assert redone.written == (TRAIN_CT[1],) and redone.skipped == (TRAIN_CT[0],)
    assert ticks == [1, 1]
    assert half.is_file() and not leftover.exists()
    after = _mtimes(raw)
    assert all(after[p] == t for p, t in before.items() if TRAIN_CT[0] in p.name or p.name == "dataset.json")
    redone_label = first.folder / "labelsTr" / f"{TRAIN_CT[1]}.nii.gz"
    assert after[redone_label] != before[redone_label]
    assert verify_nnunet_dataset(first.folder) == []

    rewritten = enrich(data / "train" / "ct", raw, weights=weights, targets=["t2w"], device="cpu", overwrite=True)
    assert rewritten.written == TRAIN_CT


def test_other_settings_need_overwrite_which_replaces_the_old_cases(tmp_path, data, weights):
    raw = tmp_path / "raw"
    enrich(data / "train" / "ct", raw, weights=weights, targets=["t1w"], device="cpu", name="Liver")
    with pytest.raises(TarganError, match="was made with other settings .*channels CT, synthetic_t1w"):
        enrich(data / "train" / "ct", raw, single_channel=True, name="Liver")
    retrained = make_tiny_weights(tmp_path / "retrained", seed=1, image_size=32)
    with pytest.raises(TarganError, match="was made with other settings .*weights sha256"):
        enrich(data / "train" / "ct", raw, weights=retrained, targets=["t1w"], device="cpu", name="Liver")
    result = enrich(data / "train" / "ct", raw, single_channel=True, name="Liver", overwrite=True)
    assert result.channels == ("CT",)
    assert sorted(p.name for p in (result.folder / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in TRAIN_CT]
    assert verify_nnunet_dataset(result.folder) == []


# ----------------------------------------------------------------------------- inputs


def test_single_channel_baseline_of_an_mr_modality(tmp_path, data):
    result = enrich(data / "train" / "t1w", tmp_path, single_channel=True, dataset_id=7)
    assert result.folder == tmp_path / "Dataset007_LiverT1W"
    spec = json.loads((result.folder / "dataset.json").read_text())
    assert spec["channel_names"] == {"0": "t1w"}  # a real MR channel: z-scored by nnU-Net
    assert "weights" not in spec["targan"] and spec["numTraining"] == 2
    assert sorted(p.name for p in (result.folder / "imagesTr").iterdir()) == ["phantom_000_0000.nii.gz",
                                                                              "phantom_001_0000.nii.gz"]


def _plain_folder(folder, cases, label_cases=(), label_shape=None):
    """Volumes of a plain folder (no DATA layout) and, for ``label_cases``, labels beside it."""
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    affine = canonical_affine((5, 12, 10))
    for index, case in enumerate(cases):
        image = anatomy((5, 12, 10), seed=index)
        write_nifti(folder / "images" / f"{case}.nii.gz", image, affine)
        if case in label_cases:
            label = (image > 60).astype(np.uint8)
            label = label if label_shape is None else label[:label_shape]
            write_nifti(folder / "labels" / f"{case}.nii.gz", label, affine)
    return folder / "images", folder / "labels"


def test_plain_folder_labels_are_optional_and_unlabelled_cases_go_to_imagesTs(tmp_path, weights):
    images, labels = _plain_folder(tmp_path / "in", ["a", "b"], label_cases=["a"])
    result = enrich(images, tmp_path / "raw", source="ct", weights=weights, targets=["t1w"], device="cpu",
                    labels=labels)
    assert (result.training, result.test) == (1, 1)
    assert sorted(p.name for p in (result.folder / "imagesTs").iterdir()) == ["b_0000.nii.gz", "b_0001.json",
                                                                            "b_0001.nii.gz"]
    assert sorted(p.name for p in (result.folder / "labelsTr").iterdir()) == ["a.nii.gz"]

    no_labels = enrich(images, tmp_path / "raw", source="ct", single_channel=True, dataset_id=502)
    assert (no_labels.training, no_labels.test) == (0, 2)
    assert json.loads((no_labels.folder / "dataset.json").read_text())["numTraining"] == 0
    assert verify_nnunet_dataset(no_labels.folder) == []

    # "a" is now a case without a label, but the dataset has it as a training case.
    with pytest.raises(TarganError, match="'a' is already in the dataset with a label"):
        enrich(images, tmp_path / "raw", source="ct", weights=weights, targets=["t1w"], device="cpu")


def test_a_label_off_the_image_grid_names_both_files(tmp_path):
    images, labels = _plain_folder(tmp_path / "in", ["a"], label_cases=["a"], label_shape=4)
    result = enrich(images, tmp_path / "raw", source="ct", single_channel=True, labels=labels)
    [(case, message)] = result.failed
    assert case == "a" and result.written == ()
    assert "labels/a.nii.gz" in message and "images/a.nii.gz" in message and "grid" in message
    assert not (tmp_path / "raw").exists()  # checked before anything was written, the dataset folder included


def test_a_label_of_several_structures_is_refused(tmp_path):
    images, labels = _plain_folder(tmp_path / "in", ["a"], label_cases=["a"])
    array, image = _nifti(labels / "a.nii.gz")
    nib.save(nib.Nifti1Image((array * 63 + (array == 0) * 126).astype(np.uint8), image.affine), labels / "a.nii.gz")
    [(case, message)] = enrich(images, tmp_path / "raw", source="ct", single_channel=True, labels=labels).failed
    assert case == "a" and "2 different non-zero values" in message


@pytest.mark.parametrize("options, message", [
    ({"dataset_id": 0}, "--dataset-id must be an integer from 1 to 999"),
    ({"dataset_id": 1000}, "--dataset-id must be an integer from 1 to 999"),
    ({"name": "Liver-CT"}, "--name must hold only letters, digits and underscores"),
    ({"name": ""}, "--name must hold only"),
    ({"weights": "x"}, "--single-channel writes the real images only"),
])
def test_bad_options_are_usage_errors(tmp_path, data, options, message):
    with pytest.raises(UsageError, match=message):
        enrich(data / "train" / "ct", tmp_path, single_channel=True, **options)


def test_modality_choices(tmp_path, data, weights):
    with pytest.raises(UsageError, match="--to ct is the input modality"):
        enrich(data / "train" / "ct", tmp_path, weights=weights, targets=["ct"], device="cpu")
    with pytest.raises(TarganError, match="unknown modality 'pet'"):
        enrich(data / "train" / "ct", tmp_path, weights=weights, targets=["pet"], device="cpu")
    with pytest.raises(UsageError, match="--from t1w contradicts the input folder"):
        enrich(data / "train" / "ct", tmp_path, source="t1w", single_channel=True)
    assert not list(tmp_path.iterdir())


def test_an_id_taken_by_another_dataset_is_refused(tmp_path, data, monkeypatch):
    (tmp_path / "raw" / "Dataset501_Spleen").mkdir(parents=True)
    with pytest.raises(TarganError, match="dataset id 501 is taken by .*Dataset501_Spleen; nnU-Net needs unique ids"):
        enrich(data / "train" / "ct", tmp_path / "raw", single_channel=True)
    # nnU-Net also looks up ids in its preprocessed and results folders.
    (tmp_path / "preprocessed" / "Dataset502_Kidney").mkdir(parents=True)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    with pytest.raises(TarganError, match="dataset id 502 is taken by .*preprocessed/Dataset502_Kidney"):
        enrich(data / "train" / "ct", tmp_path / "raw", single_channel=True, dataset_id=502)
    assert enrich(data / "train" / "ct", tmp_path / "raw", single_channel=True, dataset_id=503).training == 2


def test_channel_names_keep_nnunet_normalisation_apart():
    assert channel_names("ct", ("t1w", "t2w"), source_is_ct=True) == ("CT", "synthetic_t1w", "synthetic_t2w")
    assert channel_names("t2w", ("ct",), source_is_ct=False) == ("t2w", "synthetic_ct")
    assert channel_names("zscore", (), source_is_ct=False) == ("MR_zscore",)


# ----------------------------------------------------------------------------- command line


def test_cli_writes_a_dataset_into_nnunet_raw(tmp_path, data, weights):
    raw = tmp_path / "nnUNet_raw"
    arguments = ["enrich", str(data / "train" / "ct"), "--weights", str(weights), "--to", "t2w", "--to", "t1w",
                 "--device", "cpu", "--dataset-id", "42"]
    result = runner.invoke(app, arguments, env={"nnUNet_raw": str(raw)})
    assert result.exit_code == 0, result.output
    assert "Dataset042_LiverCTEnriched" in result.stdout and "2 cases written" in result.stdout
    spec = json.loads((raw / "Dataset042_LiverCTEnriched" / "dataset.json").read_text())
    assert spec["channel_names"] == {"0": "CT", "1": "synthetic_t2w", "2": "synthetic_t1w"}  # --to order

    baseline = runner.invoke(app, [*arguments[:2], "--single-channel", "--dataset-id", "43"],
                             env={"nnUNet_raw": str(raw)})
    assert baseline.exit_code == 0, baseline.output
    assert verify_nnunet_dataset(raw / "Dataset043_LiverCT") == []


@pytest.mark.parametrize("arguments, code, message", [
    (["--single-channel", "--dataset-id", "1000"], 2, "--dataset-id must be an integer from 1 to 999"),
    (["--single-channel", "--name", "a b"], 2, "--name must hold only"),
    (["--single-channel", "--to", "t1w"], 2, "drop --weights and --to"),
])
def test_cli_errors_are_one_line_with_exit_codes(tmp_path, data, arguments, code, message):
    result = runner.invoke(app, ["enrich", str(data / "train" / "ct"), "-o", str(tmp_path), *arguments])
    assert result.exit_code == code
    assert message in result.output and "Traceback" not in result.output


def test_cli_input_problems(tmp_path):
    missing = runner.invoke(app, ["enrich", str(tmp_path / "nope"), "-o", str(tmp_path), "--single-channel",
                                  "--from", "ct"])
    assert missing.exit_code == 1 and "input folder not found" in missing.output
    images, _ = _plain_folder(tmp_path / "in", ["a"])
    no_modality = runner.invoke(app, ["enrich", str(images), "-o", str(tmp_path), "--single-channel"])
    assert no_modality.exit_code == 2 and "pass --from" in no_modality.output
    no_output = runner.invoke(app, ["enrich", str(images), "--single-channel", "--from", "ct"],
                              env={"nnUNet_raw": ""})
    assert no_output.exit_code == 2 and "$nnUNet_raw" in no_output.output
