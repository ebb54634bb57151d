"""The DATA layout reader and the training slice cache, on tiny real NIfTI files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from targan_cli.config import DatasetSpec, IntensitySettings, ModalitySpec
from targan_cli.core.intensity import fit_reference_high, robust_high
from targan_cli.data import dataset as dataset_module
from targan_cli.data.dataset import SliceDataset, load_slices, open_data_dir
from targan_cli.errors import TarganError
from targan_cli.io.volume import Volume, read_volume, to_slices
from volume_factories import canonical_affine, oriented, write_nifti


def _mr_canonical(shape: tuple[int, int, int], seed: int, scale: float = 1.0) -> np.ndarray:
    """A (Z, H, W) MR-like volume: a bright disk on a zero background."""
    rng = np.random.default_rng(seed)
    z, h, w = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    disk = ((h - shape[1] / 2) ** 2 + (w - shape[2] / 2) ** 2) < (min(shape[1:]) / 2.6) ** 2
    return np.where(disk, scale * (200 + 30 * z + rng.integers(0, 100, size=shape)), 0).astype(np.int16)


def _ct_canonical(shape: tuple[int, int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, h, w = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    disk = ((h - shape[1] / 2) ** 2 + (w - shape[2] / 2) ** 2) < (min(shape[1:]) / 2.6) ** 2
    body = 20 + 10 * z + 4 * h - 3 * w + rng.integers(-5, 6, size=shape)
    return np.where(disk, body, -1000).astype(np.int16)


def _liver(canonical: np.ndarray) -> np.ndarray:
    """An asymmetric (Z, H, W) mask: the upper-left quadrant of the body, on odd slices only."""
    mask = np.zeros(canonical.shape, dtype=np.uint8)
    mask[1::2, : canonical.shape[1] // 2, : canonical.shape[2] // 3] = 1
    return mask


def write_case(root: Path, split: str, modality: str, case: str, canonical: np.ndarray,
               label: np.ndarray | None = None, axcodes: str = "RAS") -> Path:
    """Write a canonical (Z, H, W) array (and label) in the voxel order ``axcodes``."""
    images = root / split / modality / "images"
    images.mkdir(parents=True, exist_ok=True)
    array, affine = oriented(canonical, axcodes)
    path = write_nifti(images / f"{case}.nii.gz", array, affine)
    if label is not None:
        labels = root / split / modality / "labels"
        labels.mkdir(parents=True, exist_ok=True)
        label_array, label_affine = oriented(label, axcodes)
        write_nifti(labels / f"{case}.nii.gz", label_array, label_affine)
    return path


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    """Two CT and two MR training cases (different voxel orders), one test case each."""
    root = tmp_path / "DATA"
    shape = (3, 16, 16)
    for index, axcodes in enumerate(("RAS", "LPS")):
        ct = _ct_canonical(shape, index)
        write_case(root, "train", "ct", f"c{index}", ct, _liver(ct), axcodes)
        mr = _mr_canonical((2 + index, 16, 16), index, scale=1 + index)
        write_case(root, "train", "t1w", f"m{index}", mr, _liver(mr), axcodes)
    write_case(root, "test", "ct", "c9", _ct_canonical(shape, 9), None)
    write_case(root, "test", "t1w", "m9", _mr_canonical(shape, 9), None)
    return root


# ----------------------------------------------------------------------------- layout


def test_layout_without_dataset_json(data_root: Path) -> None:
    paired = data_root / "test" / "ct" / "paired" / "t1w"
    paired.mkdir(parents=True)
    write_nifti(paired / "c9.nii.gz", *oriented(_mr_canonical((3, 16, 16), 1), "RAS"))

    data = open_data_dir(data_root)
    assert data.spec.modality_names == ("ct", "t1w")  # sorted folder names
    assert [m.intensity.kind for m in data.spec.modalities] == ["ct", "mr"]
    train = data.cases("train")
    assert [(c.modality, c.case_id) for c in train] == [("ct", "c0"), ("ct", "c1"), ("t1w", "m0"),
                                                         ("t1w", "m1")]
    assert all(c.split == "train" and c.label is not None and c.label.name == f"{c.case_id}.nii.gz"
               for c in train)
    assert train[0].image == data_root / "train" / "ct" / "images" / "c0.nii.gz"
    (test_ct,) = data.cases("test", "ct")
    assert test_ct.label is None
    assert test_ct.paired == {"t1w": paired / "c9.nii.gz"}
    assert data.cases("test", "t1w")[0].paired == {}


def test_dataset_json_sets_order_and_settings(data_root: Path) -> None:
    spec = DatasetSpec(modalities=(ModalitySpec("t1w", IntensitySettings(kind="mr", percentile=99.0)),
                                   ModalitySpec("ct", IntensitySettings(kind="ct", window_level=50.0)),
                                   ModalitySpec("t2w", IntensitySettings(kind="mr"))), name="tiny")
    (data_root / "dataset.json").write_text(json.dumps(spec.to_dict()))
    data = open_data_dir(data_root)
    assert data.spec == spec
    assert [c.modality for c in data.cases("train")] == ["t1w", "t1w", "ct", "ct"]
    assert data.cases("train", "t2w") == []


def test_modality_folder_missing_from_dataset_json(data_root: Path) -> None:
    spec = DatasetSpec(modalities=(ModalitySpec("ct", IntensitySettings(kind="ct")),
                                   ModalitySpec("t2w", IntensitySettings(kind="mr"))))
    (data_root / "dataset.json").write_text(json.dumps(spec.to_dict()))
    with pytest.raises(TarganError, match="t1w are not listed in dataset.json") as error:
        open_data_dir(data_root)
    assert error.value.path == data_root / "train"


def _break_label_without_image(root: Path) -> Path:
    orphan = root / "train" / "ct" / "labels" / "ghost.nii.gz"
    write_nifti(orphan, *oriented(np.zeros((3, 16, 16), np.uint8), "RAS"))
    return orphan


def _break_non_nifti(root: Path) -> Path:
    stray = root / "train" / "ct" / "images" / "notes.txt"
    stray.write_text("x")
    return stray


def _break_case_name(root: Path) -> Path:
    bad = root / "train" / "ct" / "images" / "-bad name.nii.gz"
    write_nifti(bad, *oriented(_ct_canonical((3, 16, 16), 0), "RAS"))
    return bad


def _break_symlink_outside(root: Path) -> Path:
    outside = root.parent / "elsewhere.nii.gz"
    write_nifti(outside, *oriented(_ct_canonical((3, 16, 16), 0), "RAS"))
    link = root / "train" / "ct" / "images" / "c5.nii.gz"
    link.symlink_to(outside)
    return link


def _break_modality_symlink(root: Path) -> Path:
    outside = root.parent / "other_modality"
    (outside / "images").mkdir(parents=True)
    link = root / "train" / "t2w"
    link.symlink_to(outside, target_is_directory=True)
    return link


def _break_unexpected_folder(root: Path) -> Path:
    typo = root / "train" / "ct" / "label"
    typo.mkdir()
    return typo


def _break_paired_folder(root: Path) -> Path:
    wrong = root / "test" / "ct" / "paired" / "ct"
    wrong.mkdir(parents=True)
    return wrong


@pytest.mark.parametrize(("breaker", "message"), [
    (_break_label_without_image, "has no image"),
    (_break_non_nifti, "not a .nii / .nii.gz file"),
    (_break_case_name, "is not usable"),
    (_break_symlink_outside, "outside the dataset"),
    (_break_modality_symlink, "outside the dataset"),
    (_break_unexpected_folder, "unexpected 'label'"),
    (_break_paired_folder, "other modalities"),
])
def test_layout_errors_name_the_path(data_root: Path, breaker, message: str) -> None:
    culprit = breaker(data_root)
    with pytest.raises(TarganError, match=message) as error:
        open_data_dir(data_root)
    assert error.value.path == culprit


def test_missing_or_empty_dataset_folder(tmp_path: Path) -> None:
    with pytest.raises(TarganError, match="dataset folder not found"):
        open_data_dir(tmp_path / "nope")
    with pytest.raises(TarganError, match="no modalities"):
        open_data_dir(tmp_path)
    write_case(tmp_path, "train", "ct", "a", _ct_canonical((2, 8, 8), 0))
    with pytest.raises(TarganError, match="at least two modalities"):
        open_data_dir(tmp_path)


def test_unknown_split_or_modality(data_root: Path) -> None:
    data = open_data_dir(data_root)
    with pytest.raises(TarganError, match="unknown split 'val'"):
        data.cases("val")
    with pytest.raises(TarganError, match="unknown modality 'pet'"):
        data.cases("train", "pet")


# ----------------------------------------------------------------------------- slices


def test_slice_set_shapes_ranges_and_order(data_root: Path) -> None:
    data = open_data_dir(data_root)
    steps: list[int] = []
    slices = load_slices(data, "train", 16, progress=steps.append)
    assert steps == [1, 1, 1, 1]  # one per volume
    assert len(slices) == 3 + 3 + 2 + 3 and slices.image_size == 16
    assert slices.images.shape == (11, 16, 16) and slices.images.dtype == np.float32
    assert slices.labels.dtype == np.uint8 and slices.bodies.dtype == np.uint8
    assert slices.modality.dtype == np.int64 and slices.case_index.dtype == np.int64
    assert isinstance(slices.images, np.memmap)
    assert slices.images.min() >= -1.0 and slices.images.max() <= 1.0
    assert set(np.unique(slices.labels)) <= {0, 1} and set(np.unique(slices.bodies)) == {0, 1}
    assert slices.case_ids == ("ct/c0", "ct/c1", "t1w/m0", "t1w/m1")
    assert slices.modality.tolist() == [0] * 6 + [1] * 5
    assert slices.case_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3]

    # Same in-plane size as the model: no resizing, so every volume, whatever its voxel order,
    # comes out as its canonical slices, and each label lands on its own slices.
    for case_number, case in enumerate(data.cases("train")):
        rows = slices.case_index == case_number
        canonical, _ = to_slices(read_volume(case.image))
        expected_label, _ = to_slices(read_volume(case.label))
        np.testing.assert_array_equal(slices.labels[rows], expected_label)
        if case.modality == "ct":
            low, high = data.spec.modalities[0].intensity.window
            expected = (np.clip(canonical, low, high) - low) / (high - low) * 2 - 1
            np.testing.assert_allclose(slices.images[rows], expected, atol=1e-6)
    # The body covers the disk, not the corners.
    assert slices.bodies[:, 8, 8].all() and not slices.bodies[:, 0, 0].any()


def test_non_square_slices_are_padded_and_resized(tmp_path: Path) -> None:
    root = tmp_path / "DATA"
    ct = _ct_canonical((2, 12, 6), 0)
    write_case(root, "train", "ct", "a", ct, _liver(ct))
    write_case(root, "train", "mr", "b", _mr_canonical((2, 6, 12), 1))
    slices = load_slices(open_data_dir(root), "train", 24)
    assert slices.images.shape == (4, 24, 24)
    # CT is 12 rows x 6 columns: padded left and right with -1 (air), 6 model pixels each side.
    assert np.all(slices.images[:2, :, :5] == -1.0) and np.all(slices.images[:2, :, -5:] == -1.0)
    assert not slices.bodies[:2, :, :5].any()
    assert slices.labels[:2].sum() > 0  # the mask survives nearest resizing
    assert np.all(slices.labels[:2, :, :6] == 0)


def test_reference_high_is_fitted_on_mr_volumes(data_root: Path) -> None:
    data = open_data_dir(data_root)
    slices = load_slices(data, "train", 16)
    settings = data.spec.modalities[1].intensity
    assert settings.reference_high is None
    highs = [robust_high(to_slices(read_volume(c.image))[0], settings) for c in data.cases("train", "t1w")]
    assert highs[1] > 1.5 * highs[0]  # the second MR case is scaled x2
    fitted = slices.modalities[1].intensity
    assert fitted.reference_high == pytest.approx(fit_reference_high(highs))
    assert fitted.percentile == settings.percentile
    assert slices.modalities[0] == data.spec.modalities[0]  # CT untouched


def test_reference_high_kept_when_given(data_root: Path) -> None:
    spec = DatasetSpec(modalities=(ModalitySpec("ct", IntensitySettings(kind="ct")),
                                   ModalitySpec("t1w", IntensitySettings(kind="mr", reference_high=777.0))))
    (data_root / "dataset.json").write_text(json.dumps(spec.to_dict()))
    slices = load_slices(open_data_dir(data_root), "train", 16)
    assert slices.modalities == spec.modalities


def test_cache_is_reused_without_reading_volumes(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = open_data_dir(data_root)
    first = load_slices(data, "train", 16)
    (cache,) = (data_root / ".cache").iterdir()
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}

    def refuse(path):
        raise AssertionError(f"read {path} again")

    monkeypatch.setattr(dataset_module, "read_volume", refuse)
    steps: list[int] = []
    second = load_slices(open_data_dir(data_root), "train", 16, progress=steps.append)
    assert steps == [4]
    np.testing.assert_array_equal(first.images, second.images)
    assert second.modalities == first.modalities and second.case_ids == first.case_ids
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == stamps
    assert list((data_root / ".cache").iterdir()) == [cache]


@pytest.mark.parametrize("change", ["touch", "size", "settings", "split", "new_case"])
def test_cache_is_rebuilt_when_inputs_change(data_root: Path, change: str) -> None:
    first_data = open_data_dir(data_root)
    load_slices(first_data, "train", 16)
    size, split = 16, "train"
    if change == "touch":
        image = data_root / "train" / "ct" / "images" / "c0.nii.gz"
        stat = image.stat()
        os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    elif change == "size":
        size = 8
    elif change == "settings":
        spec = DatasetSpec(modalities=(ModalitySpec("ct", IntensitySettings(kind="ct", window_width=300.0)),
                                       ModalitySpec("t1w", IntensitySettings(kind="mr"))))
        (data_root / "dataset.json").write_text(json.dumps(spec.to_dict()))
    elif change == "split":
        split = "test"
    else:
        write_case(data_root, "train", "ct", "c2", _ct_canonical((2, 16, 16), 5))
    slices = load_slices(open_data_dir(data_root), split, size)
    assert len(list((data_root / ".cache").iterdir())) == 2
    assert slices.image_size == size


def test_damaged_cache_is_rebuilt(data_root: Path, tmp_path: Path) -> None:
    data = open_data_dir(data_root)
    cache_root = tmp_path / "my-cache"
    first = load_slices(data, "train", 16, cache_dir=cache_root)
    assert not (data_root / ".cache").exists()
    (cache,) = cache_root.iterdir()
    (cache / "images.npy").write_bytes(b"broken")
    again = load_slices(data, "train", 16, cache_dir=cache_root)
    np.testing.assert_array_equal(first.labels, again.labels)
    assert np.load(cache / "images.npy").shape == (11, 16, 16)


def test_label_on_another_grid_is_an_error(data_root: Path) -> None:
    label = data_root / "train" / "ct" / "labels" / "c1.nii.gz"
    write_nifti(label, np.zeros((16, 16, 4), np.uint8), canonical_affine((16, 16, 4)))
    with pytest.raises(TarganError, match="differs from its image") as error:
        load_slices(open_data_dir(data_root), "train", 16)
    assert error.value.path == label
    assert "c1.nii.gz" in str(error.value) and "images" in str(error.value)


def test_label_values_other_than_one_are_target(data_root: Path) -> None:
    label = data_root / "train" / "ct" / "labels" / "c0.nii.gz"
    canonical = _liver(_ct_canonical((3, 16, 16), 0)) * 255
    write_nifti(label, *oriented(canonical, "RAS"))
    slices = load_slices(open_data_dir(data_root), "train", 16)
    np.testing.assert_array_equal(slices.labels[:3], canonical // 255)


def test_blank_mr_volume_names_the_file(data_root: Path) -> None:
    blank = write_case(data_root, "train", "t1w", "m2", np.zeros((2, 16, 16), np.int16))
    with pytest.raises(TarganError, match="blank") as error:
        load_slices(open_data_dir(data_root), "train", 16)
    assert error.value.path == blank


def test_empty_split_is_an_error(data_root: Path) -> None:
    for folder in (data_root / "test").rglob("*.nii.gz"):
        folder.unlink()
    with pytest.raises(TarganError, match="no test cases"):
        load_slices(open_data_dir(data_root), "test", 16)


def test_slice_dataset_items(data_root: Path) -> None:
    slices = load_slices(open_data_dir(data_root), "train", 16)
    items = SliceDataset(slices)
    assert len(items) == 11
    image, label, body, modality = items[7]
    assert image.shape == label.shape == body.shape == (1, 16, 16)
    assert image.dtype == label.dtype == body.dtype == torch.float32
    assert modality.dtype == torch.int64 and modality.ndim == 0 and int(modality) == 1
    np.testing.assert_array_equal(image[0].numpy(), slices.images[7])
    np.testing.assert_array_equal(label[0].numpy(), slices.labels[7].astype(np.float32))
    batch = next(iter(torch.utils.data.DataLoader(items, batch_size=4)))
    assert batch[0].shape == (4, 1, 16, 16) and batch[3].tolist() == [0, 0, 0, 0]


def test_volume_helper_round_trip_sanity() -> None:
    """The test helper's oriented arrays map back to the same canonical slices (guards the fixtures)."""
    canonical = _ct_canonical((3, 16, 16), 0)
    for axcodes in ("RAS", "LPS"):
        array, affine = oriented(canonical, axcodes)
        np.testing.assert_array_equal(to_slices(Volume(array, affine))[0], canonical)


def test_phantom_dataset_loads(tmp_path: Path) -> None:
    """The phantom writer and this reader agree on the layout, paired renderings included."""
    from targan_cli.data.phantom import write_phantom_dataset

    summary = write_phantom_dataset(tmp_path / "DATA", cases=1, size=16, slices=4, test_cases=1)
    data = open_data_dir(tmp_path / "DATA")
    assert data.spec.modality_names == summary.modalities
    test = data.cases("test")
    assert [c.case_id for c in test] == list(summary.test_cases) * 3
    assert all(c.label is not None and set(c.paired) == set(summary.modalities) - {c.modality} for c in test)
    slices = load_slices(data, "train", 16)
    assert len(slices) == sum(summary.slices.values())
    assert slices.labels.any() and slices.bodies.any()
    assert all(m.intensity.reference_high is not None for m in slices.modalities if m.intensity.kind == "mr")


def test_invalid_dataset_json_names_the_file(data_root: Path) -> None:
    (data_root / "dataset.json").write_text(json.dumps({"modalities": [], "colour": "blue"}))
    with pytest.raises(TarganError, match="unknown field") as error:
        open_data_dir(data_root)
    assert error.value.path == data_root / "dataset.json"


_LOAD_IN_ANOTHER_PROCESS = """
import sys
from targan_cli.data.dataset import load_slices, open_data_dir
built = []
slices = load_slices(open_data_dir(sys.argv[1]), "train", 16, progress=built.append)
print(len(slices), len(built))
"""


@pytest.mark.skipif(dataset_module.fcntl is None, reason="no POSIX file locks on this system")
def test_two_processes_needing_the_same_cache_build_it_once(data_root: Path) -> None:
    """While one process holds the cache folder (as during a build), another waits without
    building; once it is free, one of the two builds and the other reads what it built."""
    cache_root = data_root / ".cache"
    cache_root.mkdir()
    holder = os.open(cache_root, os.O_RDONLY)
    dataset_module.fcntl.flock(holder, dataset_module.fcntl.LOCK_EX)  # what a building process holds
    other = subprocess.Popen([sys.executable, "-c", _LOAD_IN_ANOTHER_PROCESS, str(data_root)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3)  # ample time for the other process to reach the lock
        waiting, written = other.poll() is None, list(cache_root.iterdir())
        os.close(holder)  # let go: now both race for the cache
        steps: list[int] = []
        ours = load_slices(open_data_dir(data_root), "train", 16, progress=steps.append)
        stdout, stderr = other.communicate(timeout=120)
    finally:
        if other.poll() is None:
            other.kill()
    assert waiting and written == [], "the other process did not wait for the cache"
    assert other.returncode == 0, stderr
    count, their_calls = (int(value) for value in stdout.split())
    assert count == len(ours) == 11
    # A build reports each of the 4 volumes; a reader reports all 4 at once.
    assert sorted([len(steps), their_calls]) == [1, 4], (steps, their_calls)
    assert len(list(cache_root.iterdir())) == 1
