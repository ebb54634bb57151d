"""Rule 7: NIfTI volumes with NaN or infinite voxels or affine are refused with one line (never an
empty mask with exit code 0, never infinite voxels translated); absurd shapes are a memory refusal
naming the file and the size, before anything that large is allocated.

The CLI runs in a subprocess on real files written with nibabel; the input stays byte-identical
and no output appears."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cli_safety import refusal, targan, tree_digest, weights, write_case  # noqa: F401 (fixtures)
from targan_cli.config import IntensitySettings
from targan_cli.errors import TarganError
from targan_cli.io.volume import read_volume
from targan_cli.workflows.segment import SegmenterConfig, build_network, save_segmenter


def _nifti(path: Path, array: np.ndarray, affine: np.ndarray, nifti2: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = (nib.Nifti2Image if nifti2 else nib.Nifti1Image)(array, affine)
    nib.save(image, path)
    return path


def _bad_volumes(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, words of its refusal)."""
    voxels = np.full((16, 16, 4), 100.0, np.float32)
    nan, inf = voxels.copy(), voxels.copy()
    nan[3, 4, 1] = np.nan
    inf[5, 5, 2] = -np.inf
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    broken = affine.copy()
    broken[0, 3] = np.inf
    return {
        "nan voxels": (_nifti(folder / "nan.nii.gz", nan, affine), "1 voxel is NaN or infinite"),
        "inf voxels": (_nifti(folder / "inf.nii.gz", inf, affine), "1 voxel is NaN or infinite"),
        "inf affine": (_nifti(folder / "affine.nii.gz", voxels, broken), "has no usable orientation"),
        "1 x 200000 x 1": (_nifti(folder / "line.nii.gz", np.zeros((1, 200000, 1), np.int16), affine, nifti2=True),
                           "one slice would take 149.0 GiB of memory"),
    }


@pytest.mark.parametrize("name", ["nan voxels", "inf voxels", "inf affine", "1 x 200000 x 1"])
def test_translate_and_segment_refuse_bad_values_and_absurd_shapes(tmp_path: Path, weights: Path, name: str) -> None:
    path, words = _bad_volumes(tmp_path / "in")[name]
    before = tree_digest(tmp_path / "in")
    refusal(targan("translate", path, "-o", tmp_path / "out.nii.gz", "--from", "ct", "--to", "t1w", "-w", weights,
                   "--device", "cpu"), str(path), words, exit_code=1)
    segmenter = tmp_path / "segmenter"
    config = SegmenterConfig("ct", IntensitySettings(kind="ct"), image_size=16, width=4, depth=3)
    save_segmenter(segmenter, build_network(config), config)
    refusal(targan("segment", path, "-o", tmp_path / "mask.nii.gz", "--segmenter", segmenter, "--device", "cpu"),
            str(path), words, exit_code=1)
    assert tree_digest(tmp_path / "in") == before
    assert not (tmp_path / "out.nii.gz").exists() and not (tmp_path / "mask.nii.gz").exists()


def test_enrich_refuses_a_case_with_infinite_voxels_before_writing(tmp_path: Path, weights: Path) -> None:
    inputs = tmp_path / "in"
    write_case(inputs / "case0.nii.gz")
    path, words = _bad_volumes(tmp_path / "bad")["inf voxels"]
    os.replace(path, inputs / "case1.nii.gz")
    before = tree_digest(inputs)
    refusal(targan("enrich", inputs, "--from", "ct", "-o", tmp_path / "raw", "-w", weights, "--device", "cpu"),
            str(inputs / "case1.nii.gz"), words, exit_code=1)
    assert tree_digest(inputs) == before


def test_a_header_declaring_more_than_the_memory_is_refused_before_reading(tmp_path: Path, weights: Path) -> None:
    """A sparse .nii file (no disk used) as large as its header says, larger than this machine's memory."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    slices = memory // (4 * 512 * 512) + 1  # float32 slices: more than the memory
    header = nib.Nifti1Header()
    header.set_data_shape((512, 512, slices))
    header.set_data_dtype(np.uint8)
    path = tmp_path / "huge.nii"
    with path.open("wb") as handle:
        header.write_to(handle)
        handle.truncate(int(header.get_data_offset()) + 512 * 512 * slices)
    with pytest.raises(TarganError, match=rf"declares \(512, 512, {slices}\) voxels, [0-9.]+ GiB as float32, "
                                          r"more than this machine's memory") as caught:
        read_volume(path)
    assert caught.value.path == path
    refusal(targan("translate", path, "-o", tmp_path / "out.nii.gz", "--from", "ct", "--to", "t1w", "-w", weights,
                   "--device", "cpu"), str(path), "more than this machine's memory")
