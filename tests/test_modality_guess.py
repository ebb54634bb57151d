"""The input's modality from its intensities: real-like MR (noise, a slightly negative minimum from
resampling undershoot) and CT profiles; a --from that contradicts the input is warned about; the
preview shows each modality in its one window."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from targan_cli.cli import app
from targan_cli.core.intensity import guess_kind
from weights_factories import make_tiny_weights


def _abdomen(shape=(24, 64, 64), seed=0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Masks of an ellipse body with subcutaneous fat, a liver and a spine, on a grid (Z, Y, X)."""
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]].astype(np.float64)
    cy, cx = shape[1] / 2, shape[2] / 2
    radius = ((y - cy) / (0.38 * shape[1])) ** 2 + ((x - cx) / (0.45 * shape[2])) ** 2
    body = radius < 1.0
    fat = body & (radius > 0.75)
    liver = body & ~fat & (((y - cy + 4) / 10) ** 2 + ((x - cx + 10) / 12) ** 2 < 1.0)
    bone = body & ~fat & (((y - cy - 12) / 4) ** 2 + ((x - cx) / 4) ** 2 < 1.0)
    return np.zeros(shape), {"body": body, "fat": fat, "liver": liver, "bone": bone}


def mr_like(seed: int = 0) -> np.ndarray:
    """T1-like magnitudes: Rician background noise, tissue and bright fat, then resampled with a
    cubic spline (which undershoots below zero next to the skin)."""
    rng = np.random.default_rng(seed)
    volume, masks = _abdomen()
    volume[masks["body"]] = 350.0
    volume[masks["liver"]] = 500.0
    volume[masks["fat"]] = 1100.0
    volume[masks["bone"]] = 150.0
    volume = ndimage.gaussian_filter(volume, (0, 1.0, 1.0))  # the scanner's point spread
    noisy = np.hypot(volume + rng.normal(0, 18, volume.shape), rng.normal(0, 18, volume.shape))
    return ndimage.zoom(noisy, (1.0, 1.37, 1.37), order=3)  # resampled to a finer grid


def ct_like(seed: int = 0, air_margin: bool = True) -> np.ndarray:
    rng = np.random.default_rng(seed)
    volume, masks = _abdomen()
    volume[:] = -1000.0
    volume[masks["body"]] = 40.0
    volume[masks["fat"]] = -100.0
    volume[masks["liver"]] = 60.0
    volume[masks["bone"]] = 700.0
    volume = ndimage.zoom(volume + rng.normal(0, 15, volume.shape), (1.0, 1.37, 1.37), order=3)
    return volume if air_margin else volume[:, 14:-14, 8:-8]  # cropped to little air around the body


def test_real_like_mr_with_resampling_undershoot_is_mr() -> None:
    volume = mr_like()
    assert volume.min() < -10  # the spline undershoots below zero
    assert guess_kind(volume) == "mr"
    volume.flat[:: volume.size // 40] = -47.0  # a scanner's offset of a few voxels: the case from the issue
    assert volume.min() == -47.0 and guess_kind(volume) == "mr"
    assert guess_kind(mr_like(seed=3) * 0.05) == "mr"  # scale does not matter


def test_ct_profiles_are_ct() -> None:
    assert guess_kind(ct_like()) == "ct"
    assert guess_kind(ct_like(seed=2, air_margin=False)) == "ct"  # lungs and bowel gas are not needed: air margin cropped
    assert guess_kind(ct_like().astype(np.int16)) == "ct"


def test_neither_when_the_values_do_not_tell() -> None:
    normalized = np.clip(ct_like() / 500.0, -1, 1)  # already scaled to [-1, 1]: background at -1
    assert guess_kind(normalized) is None
    assert guess_kind(mr_like() - 400.0) is None  # an MR shifted far below zero is not raw MR
    assert guess_kind(np.zeros((4, 4, 4))) is None
    assert guess_kind(np.array([])) is None


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("guess") / "weights")


def test_a_wrong_from_is_warned_about(tmp_path: Path, weights: Path) -> None:
    path = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(mr_like().astype(np.float32), np.diag([0.7, 0.7, 5.0, 1.0])), path)
    result = CliRunner().invoke(app, ["translate", str(path), "--from", "ct", "--to", "t2w", "-o",
                                      str(tmp_path / "out.nii.gz"), "--weights", str(weights), "--device", "cpu",
                                      "--no-qc"])  # QC of untrained weights warns on its own
    assert result.exit_code == 0, result.output
    assert ("warning: --from ct is CT in these weights but its values look like MR; check --from" in
            result.stderr.replace("\n", " "))
    right = CliRunner().invoke(app, ["translate", str(path), "--from", "t1w", "--to", "t2w", "-o",
                                     str(tmp_path / "out2.nii.gz"), "--weights", str(weights), "--device", "cpu",
                                     "--no-qc"])
    assert right.exit_code == 0 and "warning" not in right.stderr
    guessed = CliRunner().invoke(app, ["translate", str(path), "--to", "ct", "-o", str(tmp_path / "out3.nii.gz"),
                                       "--weights", str(weights), "--device", "cpu"])
    assert guessed.exit_code == 2 and "values look like MR, which fits several modalities" in guessed.stderr


def test_the_preview_shows_mr_in_its_modality_window(tmp_path: Path, weights: Path) -> None:
    """An MR input whose body is at half the weights' reference level shows mid-grey (one window,
    0 to the reference level), not white as a window fitted to each image would make it."""
    from PIL import Image

    from weights_factories import TINY_REFERENCE_HIGH

    volume = np.zeros((24, 24, 8), dtype=np.float32)
    volume[4:20, 4:20] = TINY_REFERENCE_HIGH / 2
    path = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(volume, np.eye(4)), path)
    result = CliRunner().invoke(app, ["translate", str(path), "--from", "t1w", "--to", "t2w", "-o",
                                      str(tmp_path / "out.nii.gz"), "--weights", str(weights), "--device", "cpu",
                                      "--preview", str(tmp_path / "qc.png")])
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "qc.png") as image:
        pixels = np.asarray(image.convert("L"))
    tile, margin = 192, 6
    left = pixels.shape[1] - 2 * (tile + margin)  # the input column, after the row labels
    column = pixels[40:-40, left + 4:left + tile - 4]  # below the column label, above the caption
    assert abs(int(column.max()) - 128) <= 2


def test_the_modality_check_chooses_only_among_modalities_of_the_inputs_kind(weights: Path) -> None:
    """A discriminator that takes every input for t2w cannot make a CT in Hounsfield units into an
    MR input: the check chooses only among the input's kind (here one, ct); for an MR input it
    does choose between t1w and t2w."""
    from targan_cli.io.volume import Volume
    from targan_cli.io.weights import read_weights_config
    from targan_cli.workflows.translate import SourceChoice, infer_source

    config = read_weights_config(weights)
    asked: list[list[str]] = []

    def says_t2w(candidates: list[str]) -> SourceChoice | None:
        asked.append(candidates)
        return SourceChoice("t2w", "the check says t2w") if "t2w" in candidates else None

    affine = np.diag([0.7, 0.7, 5.0, 1.0])
    ct = infer_source(config, Volume(ct_like().transpose(2, 1, 0), affine), None, "t1w", predict=says_t2w)
    assert ct.name == "ct" and "look like CT" in ct.reason
    mr = infer_source(config, Volume(mr_like().transpose(2, 1, 0), affine), None, "ct", predict=says_t2w)
    assert mr.name == "t2w" and asked == [["t1w", "t2w"]]
