"""Tests for core/metrics.py (Dice, RAVD, paired PSNR/SSIM/MAE, Frechet distance) and the FID
feature modules loaded from files by io/features.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from scipy.ndimage import gaussian_filter
from torch import nn

from targan_cli.core.metrics import FrechetDistance, dice, paired_metrics, ravd, summarize
from targan_cli.errors import TarganError
from targan_cli.io.features import (
    INCEPTION_WEIGHTS_FILE,
    feature_module_kind,
    fid_install_command,
    inception_features,
    inception_weights_cache_path,
    load_feature_module,
)


def _torch_fidelity_imports() -> bool:
    try:
        import torch_fidelity.feature_extractor_inceptionv3  # noqa: F401
    except ImportError:
        return False
    return True


TORCH_FIDELITY = _torch_fidelity_imports()


Voxel = tuple[int, int, int]


def _masks(pred_voxels: list[Voxel], ref_voxels: list[Voxel]) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.zeros((3, 4, 4), np.uint8), np.zeros((3, 4, 4), np.uint8)
    for voxel in pred_voxels:
        pred[voxel] = 1
    for voxel in ref_voxels:
        ref[voxel] = 1
    return pred, ref


# --- Dice and RAVD -----------------------------------------------------------------------------

def test_dice_perfect_disjoint_and_empty_cases() -> None:
    mask = np.zeros((3, 4, 4), bool)
    mask[1, 1:3, 1:3] = True
    other = np.zeros_like(mask)
    other[2, 0, 0] = True
    empty = np.zeros_like(mask)
    assert dice(mask, mask) == 100.0
    assert dice(mask, other) == 0.0
    assert dice(empty, empty) == 100.0
    assert dice(empty, mask) == 0.0
    assert dice(mask, empty) == 0.0


def test_dice_partial_overlap_in_3d_counts_non_zero_labels() -> None:
    # pred 4 voxels, ref 6 voxels over two slices, 3 shared: 2 * 3 / (4 + 6) = 60 %
    pred, ref = _masks([(0, 0, 0), (0, 0, 1), (1, 0, 0), (2, 3, 3)],
                       [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 1, 1), (1, 2, 2), (2, 0, 0)])
    assert dice(pred, ref) == pytest.approx(60.0)
    assert dice(pred * 2, ref * 7) == pytest.approx(60.0)  # labels other than 1 are foreground too


def test_ravd_hand_computed() -> None:
    ref_voxels = [(0, 0, i) for i in range(4)] + [(1, 0, 0), (1, 0, 1)]  # 6 voxels
    smaller, ref = _masks(ref_voxels[:4], ref_voxels)
    larger, _ = _masks(ref_voxels + [(2, 1, 0), (2, 1, 1), (2, 1, 2)], ref_voxels)  # 9 voxels
    assert ravd(ref, ref) == 0.0
    assert ravd(smaller, ref) == pytest.approx(100.0 * 2 / 6)
    assert ravd(larger, ref) == pytest.approx(50.0)
    assert ravd(np.zeros_like(ref), ref) == 100.0


def test_ravd_of_an_empty_reference_is_nan() -> None:
    pred, ref = _masks([(0, 0, 0)], [])
    assert math.isnan(ravd(pred, ref))
    assert math.isnan(ravd(ref, ref))


def test_mask_shape_mismatch_is_a_targan_error() -> None:
    with pytest.raises(TarganError, match="shapes differ"):
        dice(np.zeros((2, 4, 4)), np.zeros((2, 4, 5)))
    with pytest.raises(TarganError, match="shapes differ"):
        ravd(np.zeros((2, 4, 4)), np.zeros((3, 4, 4)))


# --- paired PSNR / SSIM / MAE ------------------------------------------------------------------

def _reference_ssim_map(pred: np.ndarray, truth: np.ndarray, data_range: float) -> np.ndarray:
    """SSIM map of Wang et al. per slice, written independently with scipy's Gaussian filter.

    Same window as torchmetrics: sigma 1.5, radius 5 (11 taps), borders mirrored without
    repeating the edge pixel (scipy 'mirror' = numpy/torch 'reflect').
    """
    def smooth(image: np.ndarray) -> np.ndarray:
        return gaussian_filter(image, sigma=1.5, radius=5, mode="mirror")

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    maps = []
    for x, y in zip(pred, truth):
        mu_x, mu_y = smooth(x), smooth(y)
        var_x, var_y = smooth(x * x) - mu_x ** 2, smooth(y * y) - mu_y ** 2
        cov = smooth(x * y) - mu_x * mu_y
        maps.append(((2 * mu_x * mu_y + c1) * (2 * cov + c2))
                    / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2)))
    return np.stack(maps)


def _paired_volumes(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = gaussian_filter(rng.uniform(-1, 1, (4, 20, 24)), sigma=(0, 2, 2)) * 3  # smooth structures
    pred = truth + rng.normal(0.0, 0.2, truth.shape)
    mask = np.zeros(truth.shape, bool)
    mask[1, 5:15, 4:20] = True
    mask[2, 0:6, 0:8] = True  # touches the border, where the SSIM window is reflected
    return pred, truth, mask


def test_paired_psnr_and_mae_hand_computed_inside_the_mask_only() -> None:
    truth = np.zeros((2, 16, 16))
    mask = np.zeros(truth.shape, bool)
    mask[0, 4:12, 4:12] = True
    pred = truth + 0.1
    pred[~mask] = 5.0  # large errors outside the mask must not count
    result = paired_metrics(pred, truth, mask, data_range=2.0)
    assert result["mae"] == pytest.approx(0.1)
    assert result["psnr"] == pytest.approx(10 * math.log10(2.0 ** 2 / 0.1 ** 2))  # 26.02 dB


def test_paired_ssim_matches_an_independent_scipy_ssim_averaged_over_the_mask() -> None:
    pred, truth, mask = _paired_volumes()
    result = paired_metrics(pred, truth, mask, data_range=2.0)
    expected = _reference_ssim_map(pred, truth, 2.0)[mask].mean()
    # float64 throughout: the two implementations differ only by summation order (~1e-15)
    assert result["ssim"] == pytest.approx(expected, abs=1e-9)
    assert 0.2 < result["ssim"] < 0.99  # a real, non-degenerate value
    squared_error = ((pred - truth)[mask] ** 2).mean()
    assert result["psnr"] == pytest.approx(10 * math.log10(4.0 / squared_error))
    assert result["mae"] == pytest.approx(np.abs(pred - truth)[mask].mean())


def test_paired_ssim_depends_on_the_mask() -> None:
    pred, truth, mask = _paired_volumes(seed=1)
    pred[2] = truth[2]  # slice 2 is perfect, slice 1 noisy
    only_perfect = np.zeros_like(mask)
    only_perfect[2] = mask[2]
    assert paired_metrics(pred, truth, only_perfect, 2.0)["ssim"] == pytest.approx(1.0)
    assert paired_metrics(pred, truth, mask, 2.0)["ssim"] < 0.99


def test_paired_identical_images_and_empty_mask() -> None:
    _, truth, mask = _paired_volumes()
    perfect = paired_metrics(truth, truth, mask, data_range=2.0)
    assert perfect["psnr"] == math.inf
    assert perfect["ssim"] == pytest.approx(1.0)
    assert perfect["mae"] == 0.0
    empty = paired_metrics(truth + 1, truth, np.zeros_like(mask), data_range=2.0)
    assert set(empty) == {"psnr", "ssim", "mae"}
    assert all(math.isnan(value) for value in empty.values())


def test_paired_metrics_reject_bad_inputs() -> None:
    pred, truth, mask = _paired_volumes()
    with pytest.raises(TarganError, match="one shape"):
        paired_metrics(pred[:, :, :-1], truth, mask, 2.0)
    with pytest.raises(TarganError, match="one shape"):
        paired_metrics(pred[0], truth[0], mask[0], 2.0)
    with pytest.raises(ValueError, match="data_range"):
        paired_metrics(pred, truth, mask, 0.0)
    with pytest.raises(TarganError, match="SSIM needs slices larger"):
        paired_metrics(pred[:, :5, :5], truth[:, :5, :5], mask[:, :5, :5] | True, 2.0)


# --- Frechet distance --------------------------------------------------------------------------

class FixedLinearFeatures(nn.Module):
    """Flattens (N, 1, 2, 2) slices and applies a fixed 3 x 4 matrix: no `num_features` attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("matrix", torch.tensor([[1.0, 0.5, 0.0, -1.0],
                                                     [0.0, 2.0, 1.0, 0.0],
                                                     [0.3, 0.0, -0.7, 1.5]]))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1) @ self.matrix.T  # (N, 3)


def _closed_form_fid(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    covariance_mean = scipy.linalg.sqrtm(sigma1 @ sigma2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * covariance_mean))


def _gaussian_slices(
    rng: np.random.Generator, mean: np.ndarray, covariance: np.ndarray, count: int
) -> torch.Tensor:
    """``count`` samples of N(mean, covariance) in 4-D, laid out as (count, 1, 2, 2) slices."""
    samples = rng.multivariate_normal(mean, covariance, size=count)  # (count, 4)
    return torch.from_numpy(samples).float().reshape(count, 1, 2, 2)


MEAN_REAL, MEAN_SYNTHETIC = np.array([0.0, 0.2, -0.1, 0.3]), np.array([0.3, -0.1, 0.0, 0.5])
COV_REAL = np.array([[0.20, 0.05, 0.00, 0.02], [0.05, 0.10, 0.01, 0.00],
                     [0.00, 0.01, 0.15, 0.03], [0.02, 0.00, 0.03, 0.12]])
COV_SYNTHETIC = np.diag([0.10, 0.25, 0.05, 0.20])


def test_frechet_distance_equals_the_closed_form_of_the_sample_statistics() -> None:
    rng = np.random.default_rng(0)
    real = _gaussian_slices(rng, MEAN_REAL, COV_REAL, 300)
    synthetic = _gaussian_slices(rng, MEAN_SYNTHETIC, COV_SYNTHETIC, 200)
    fid = FrechetDistance(FixedLinearFeatures(), image_size=(2, 2))
    assert fid.num_features == 3
    for batch in real.split(64):  # accumulation over batches equals one pass
        fid.update(batch, real=True)
    fid.update(synthetic, real=False)
    assert (fid.real_count, fid.synthetic_count) == (300, 200)

    matrix = FixedLinearFeatures().matrix.double().numpy()
    real_features = real.double().flatten(1).numpy() @ matrix.T
    synthetic_features = synthetic.double().flatten(1).numpy() @ matrix.T
    expected = _closed_form_fid(real_features.mean(0), np.cov(real_features, rowvar=False),
                                synthetic_features.mean(0), np.cov(synthetic_features, rowvar=False))
    assert fid.compute() == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_approaches_the_population_closed_form() -> None:
    # identity features on 2 x 2 slices: the features are the Gaussian samples themselves
    rng = np.random.default_rng(1)
    fid = FrechetDistance(nn.Flatten(), image_size=(2, 2))
    fid.update(_gaussian_slices(rng, MEAN_REAL, COV_REAL, 40_000), real=True)
    fid.update(_gaussian_slices(rng, MEAN_SYNTHETIC, COV_SYNTHETIC, 40_000), real=False)
    expected = _closed_form_fid(MEAN_REAL, COV_REAL, MEAN_SYNTHETIC, COV_SYNTHETIC)
    assert expected > 0.2
    # estimation error with 40k samples per set is about 1 % here; 5 % leaves room for the seed
    assert fid.compute() == pytest.approx(expected, rel=0.05)


def test_frechet_distance_of_one_set_with_itself_is_zero_and_reset_forgets() -> None:
    slices = torch.randn(50, 1, 2, 2, generator=torch.Generator().manual_seed(2))
    fid = FrechetDistance(nn.Flatten(), image_size=(2, 2))
    fid.update(slices, real=True)
    fid.update(slices, real=False)
    assert fid.compute() == pytest.approx(0.0, abs=1e-8)
    fid.update(slices + 1.0, real=False)
    assert fid.compute() > 0.1
    fid.reset()
    assert (fid.real_count, fid.synthetic_count) == (0, 0)
    fid.update(slices[:1], real=True)
    fid.update(slices, real=False)
    with pytest.raises(TarganError, match="at least 2 real and 2 synthetic"):
        fid.compute()


class BatchDependentFeatures(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)[:, : images.shape[0]]  # D = N: wrong for every other batch size


def test_frechet_distance_rejects_bad_feature_modules_and_inputs() -> None:
    with pytest.raises(TarganError, match="2 features per slice for N = 2 but 3 for N = 3"):
        FrechetDistance(BatchDependentFeatures(), image_size=(4, 4))
    with pytest.raises(TarganError, match=r"\(N, D\) features, it gives \(2, 1, 2, 2\)"):
        FrechetDistance(nn.Identity(), image_size=(2, 2))
    with pytest.raises(TarganError, match="fails on a \\(2, 1, 8, 8\\) batch"):
        FrechetDistance(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()), image_size=(8, 8))
    fid = FrechetDistance(nn.Flatten(), image_size=(2, 2))
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\)"):
        fid.update(torch.zeros(4, 3, 2, 2), real=True)
    with pytest.raises(TarganError, match="features of shape \\(4, 9\\)"):
        fid.update(torch.zeros(4, 1, 3, 3), real=True)  # a size the module was not probed with


# --- feature modules from files ----------------------------------------------------------------

class PooledFeatures(nn.Module):
    """A small convolutional feature module: (N, 1, H, W) -> (N, 4)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(images)).mean(dim=(2, 3))


def test_torchscript_features_round_trip_through_a_file(tmp_path: Path) -> None:
    module = PooledFeatures().eval()
    path = tmp_path / "features.pt"
    torch.jit.script(module).save(str(path))
    loaded = load_feature_module(path, image_size=(16, 16))
    slices = torch.rand(5, 1, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded(slices), module(slices))

    fid = FrechetDistance(loaded, image_size=(16, 16))
    assert fid.num_features == 4
    fid.update(slices, real=True)
    fid.update(slices * 0.5, real=False)
    assert fid.compute() > 0.0


def _export(module: nn.Module, path: Path, dynamic: bool = True) -> Path:
    dynamic_shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    program = torch.export.export(module, (torch.zeros(2, 1, 16, 16),), dynamic_shapes=dynamic_shapes)
    torch.export.save(program, str(path))
    return path


def test_exported_features_round_trip_through_a_file(tmp_path: Path) -> None:
    module = PooledFeatures().eval()
    path = _export(module, tmp_path / "features.pt2")
    assert feature_module_kind(path) == "torch.export" and feature_module_kind("f.pt") == "torchscript"
    loaded = load_feature_module(path, image_size=(16, 16))
    slices = torch.rand(5, 1, 16, 16) * 2 - 1
    torch.testing.assert_close(loaded(slices), module(slices))
    assert loaded.eval() is loaded  # the exported graph itself refuses eval(); FID code calls it

    fid = FrechetDistance(loaded, image_size=(16, 16))
    assert fid.num_features == 4
    fid.update(slices, real=True)
    fid.update(slices[:3] * 0.5, real=False)  # another batch size
    fid.update(slices[3:] * 0.5, real=False)
    assert fid.compute() > 0.0


def test_a_bad_or_static_exported_file_is_a_one_line_error_naming_it(
        tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    bad = tmp_path / "features.pt2"
    bad.write_bytes(b"not an archive" * 10)
    with pytest.raises(TarganError, match="not a torch.export program") as caught:
        load_feature_module(bad)
    assert caught.value.path == bad
    # torch.export.load logs a whole traceback (to stderr in a plain process) unless silenced.
    assert capfd.readouterr().err == "" and not [r for r in caplog.records if r.name.startswith("torch")]

    static = _export(PooledFeatures().eval(), tmp_path / "static.pt2", dynamic=False)  # batch fixed at 2
    with pytest.raises(TarganError, match=r"fails on a \(3, 1, 16, 16\) batch.*dynamic batch dimension"):
        load_feature_module(static, image_size=(16, 16))


@pytest.mark.parametrize("content", [b"not a model at all", None])
def test_a_bad_feature_file_is_a_targan_error_naming_it(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "features.pt"
    if content is None:
        torch.save(PooledFeatures().state_dict(), path)  # a state dict, not a TorchScript module
    else:
        path.write_bytes(content)
    with pytest.raises(TarganError, match="not a TorchScript module") as caught:
        load_feature_module(path)
    assert caught.value.path == path


def test_a_missing_or_unfit_feature_file_is_a_targan_error_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "absent.pt"
    with pytest.raises(TarganError, match="not found") as caught:
        load_feature_module(missing)
    assert caught.value.path == missing

    rgb_only = tmp_path / "rgb.pt"
    torch.jit.script(nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten())).save(str(rgb_only))
    assert isinstance(load_feature_module(rgb_only), nn.Module)  # no probe without a size
    with pytest.raises(TarganError, match="fails on a \\(2, 1, 8, 8\\) batch") as caught:
        load_feature_module(rgb_only, image_size=(8, 8))
    assert caught.value.path == rgb_only


@pytest.mark.skipif(TORCH_FIDELITY, reason="checks the message shown when torch-fidelity is not installed")
def test_inception_features_without_torch_fidelity_say_how_to_get_them() -> None:
    with pytest.raises(TarganError) as caught:
        inception_features(None)
    message = caught.value.message
    assert f"`{fid_install_command()}`" in message and "--no-deps" in message  # keeps the installed torch
    assert f"download on first use to {inception_weights_cache_path()}" in message
    assert "offline" in message and "--inception-weights FILE" in message and "--fid-features FILE" in message


@pytest.mark.skipif(not TORCH_FIDELITY, reason="needs torch-fidelity (optional, with torchvision)")
def test_inception_features_with_missing_or_bad_weights_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.pth"
    with pytest.raises(TarganError, match=INCEPTION_WEIGHTS_FILE) as caught:
        inception_features(missing)
    assert str(inception_weights_cache_path()) in caught.value.message
    assert "--inception-weights FILE" in caught.value.message
    garbage = tmp_path / INCEPTION_WEIGHTS_FILE
    garbage.write_bytes(b"junk")
    with pytest.raises(TarganError, match="not the Inception-v3 FID weights") as caught:
        inception_features(garbage)
    assert caught.value.path == garbage


def test_inception_weights_live_in_the_torch_hub_cache() -> None:
    path = inception_weights_cache_path()
    assert path.name == INCEPTION_WEIGHTS_FILE
    assert path.parent == Path(torch.hub.get_dir()) / "checkpoints"


# --- summaries ---------------------------------------------------------------------------------

def test_summarize_leaves_out_nan_and_inf() -> None:
    mean, std, count = summarize([1.0, 2.0, float("nan"), 3.0, float("inf")])
    assert (mean, count) == (2.0, 3)
    assert std == pytest.approx(math.sqrt(2.0 / 3.0))  # population std
    assert summarize([5.0]) == (5.0, 0.0, 1)


@pytest.mark.parametrize("values", [[], [float("nan"), float("nan")]])
def test_summarize_without_finite_values(values: list[float]) -> None:
    mean, std, count = summarize(values)
    assert math.isnan(mean) and math.isnan(std) and count == 0


def test_bootstrap_interval_of_the_mean() -> None:
    from targan_cli.core.metrics import bootstrap_interval

    assert bootstrap_interval([40.0, 60.0]) == (40.0, 60.0)  # resampled means are 40, 50 or 60
    assert all(math.isnan(value) for value in bootstrap_interval([1.0, float("nan")]))  # one finite value
    assert bootstrap_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)
    values = np.random.default_rng(3).normal(10.0, 2.0, size=40)
    means = values[np.random.default_rng(4).integers(0, values.size, size=(20_000, values.size))].mean(axis=1)
    expected = np.percentile(means, [2.5, 97.5])  # the percentile bootstrap, by hand
    assert bootstrap_interval(values) == pytest.approx(tuple(expected), abs=0.08)
    assert bootstrap_interval(values, seed=0) == bootstrap_interval(values, seed=0)
