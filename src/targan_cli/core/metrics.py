"""Evaluation metrics: Dice and RAVD of liver masks, paired PSNR/SSIM/MAE, Frechet distance.

Dice and RAVD follow the paper's Table 2 (both in %). The paired metrics compare a synthetic
volume with its ground truth inside a mask (body or liver). The Frechet distance (FID) wraps
torchmetrics' ``FrechetInceptionDistance`` around any feature module that maps single-channel
slices ``(N, 1, H, W)`` in the model range [-1, 1] to ``(N, D)`` features; ``io/features.py``
loads them from files (a TorchScript module, or the Inception-v3 FID network).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from targan_cli.errors import TarganError

SSIM_SIGMA = 1.5
"""Gaussian window of SSIM (Wang et al. 2004): sigma 1.5, 11 x 11 taps, K1 = 0.01, K2 = 0.03."""

_SSIM_RADIUS = 5  # torchmetrics' window radius for sigma 1.5: int(3.5 * 1.5 + 0.5)
_SSIM_SLICES_PER_BATCH = 8  # bounds memory: SSIM keeps ~10 float64 copies of each padded slice


def _binary_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both masks as boolean arrays (non-zero is foreground), after checking their shapes agree."""
    pred_mask, ref_mask = np.asarray(pred) != 0, np.asarray(ref) != 0
    if pred_mask.shape != ref_mask.shape:
        raise TarganError(f"mask shapes differ: predicted {pred_mask.shape}, reference {ref_mask.shape}")
    return pred_mask, ref_mask


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice overlap in % of two binary masks (non-zero is foreground), any dimension.

    Both empty gives 100.0 (the prediction agrees that there is nothing); one empty gives 0.0.
    """
    pred_mask, ref_mask = _binary_pair(pred, ref)
    total = np.count_nonzero(pred_mask) + np.count_nonzero(ref_mask)
    if total == 0:
        return 100.0
    return 200.0 * np.count_nonzero(pred_mask & ref_mask) / total


def ravd(pred: np.ndarray, ref: np.ndarray) -> float:
    """Relative absolute volume difference in %: ``|V_pred - V_ref| / V_ref * 100``.

    Volumes are voxel counts (the voxel size cancels, both masks share one grid). An empty
    reference has no relative volume: the result is ``nan``, which ``summarize`` leaves out and
    the caller reports, rather than an error.
    """
    pred_mask, ref_mask = _binary_pair(pred, ref)
    ref_volume = np.count_nonzero(ref_mask)
    if ref_volume == 0:
        return float("nan")
    return 100.0 * abs(np.count_nonzero(pred_mask) - ref_volume) / ref_volume


def paired_metrics(
    pred: np.ndarray, truth: np.ndarray, mask: np.ndarray, data_range: float
) -> dict[str, float]:
    """PSNR (dB), SSIM and MAE of ``pred`` against ``truth`` over the voxels where ``mask`` is set.

    ``pred``, ``truth`` and ``mask`` are ``(Z, H, W)`` volumes on one grid; ``data_range`` is the
    intensity span of the images (2.0 for the model range [-1, 1]). PSNR and MAE use the masked
    voxels only. SSIM is computed per axial slice on the whole slice (Gaussian window, see
    ``SSIM_SIGMA``, reflected borders, torchmetrics) and its map is averaged over the masked
    voxels, so the window still sees the tissue around the mask. An empty mask gives ``nan``
    for all three; identical images inside the mask give PSNR ``inf``.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio
    from torchmetrics.functional.regression import mean_absolute_error

    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    pred_volume = np.asarray(pred, dtype=np.float64)
    truth_volume = np.asarray(truth, dtype=np.float64)
    mask_volume = np.asarray(mask) != 0
    if not pred_volume.shape == truth_volume.shape == mask_volume.shape or pred_volume.ndim != 3:
        raise TarganError(
            f"paired metrics need three (Z, H, W) volumes of one shape, got prediction {pred_volume.shape}, "
            f"ground truth {truth_volume.shape}, mask {mask_volume.shape}"
        )
    if not mask_volume.any():
        return {"psnr": math.nan, "ssim": math.nan, "mae": math.nan}
    if min(pred_volume.shape[1:]) <= _SSIM_RADIUS:
        raise TarganError(f"SSIM needs slices larger than {_SSIM_RADIUS} x {_SSIM_RADIUS} pixels, "
                          f"got {pred_volume.shape[1]} x {pred_volume.shape[2]}")

    pred_tensor, truth_tensor = torch.from_numpy(pred_volume), torch.from_numpy(truth_volume)
    mask_tensor = torch.from_numpy(mask_volume)
    pred_voxels, truth_voxels = pred_tensor[mask_tensor], truth_tensor[mask_tensor]
    return {
        "psnr": float(peak_signal_noise_ratio(pred_voxels, truth_voxels, data_range=float(data_range))),
        "ssim": _masked_ssim(pred_tensor, truth_tensor, mask_tensor, float(data_range)),
        "mae": float(mean_absolute_error(pred_voxels, truth_voxels)),
    }


def _masked_ssim(pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor, data_range: float) -> float:
    """Mean of the per-slice SSIM maps over the masked voxels; only slices with mask voxels count."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    slices = torch.nonzero(mask.flatten(1).any(dim=1)).flatten()
    ssim_sum = 0.0
    for start in range(0, len(slices), _SSIM_SLICES_PER_BATCH):
        batch = slices[start:start + _SSIM_SLICES_PER_BATCH]
        _, ssim_map = structural_similarity_index_measure(
            pred[batch].unsqueeze(1), truth[batch].unsqueeze(1),  # (Z, 1, H, W)
            gaussian_kernel=True, sigma=SSIM_SIGMA, data_range=data_range, return_full_image=True,
        )
        ssim_sum += float(ssim_map[:, 0][mask[batch]].sum())
    return ssim_sum / int(mask.sum())


def summarize(values: Sequence[float]) -> tuple[float, float, int]:
    """Mean, population standard deviation (ddof=0, as ``numpy.std``) and count of the finite values.

    ``nan`` (e.g. RAVD with an empty reference) and infinities (PSNR of identical images) are left
    out; with no finite value the result is ``(nan, nan, 0)``.
    """
    array = np.asarray(values, dtype=np.float64).ravel()
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        return math.nan, math.nan, 0
    return float(finite.mean()), float(finite.std()), int(finite.size)


BOOTSTRAP_RESAMPLES = 2000
"""Resamples of the bootstrap confidence intervals (seeded: the same values give the same interval)."""


def bootstrap_interval(values: Sequence[float], confidence: float = 0.95,
                       resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap ``confidence`` interval of the mean of the finite ``values``
    (``scipy.stats.bootstrap``, volumes resampled with replacement).

    With fewer than two finite values there is no interval: ``(nan, nan)``; with all values
    equal the interval is that value. The interval describes the spread of these few volumes
    only, not of a population they would represent.
    """
    from scipy import stats

    array = np.asarray(values, dtype=np.float64).ravel()
    finite = array[np.isfinite(array)]
    if finite.size < 2:
        return math.nan, math.nan
    if np.all(finite == finite[0]):
        return float(finite[0]), float(finite[0])
    result = stats.bootstrap((finite,), np.mean, confidence_level=confidence, n_resamples=resamples,
                             method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    interval = result.confidence_interval
    return float(interval.low), float(interval.high)


def first_line(error: BaseException) -> str:
    """The gist of an exception for a one-line message: its first sentence."""
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0] if text else type(error).__name__


def feature_dimension(features: nn.Module, image_size: tuple[int, int], device: torch.device) -> int:
    """D of a feature module, found by running it on blank slices, in batches of 2 and 3 (the last
    batch of a run is smaller than the others)."""
    dimensions = []
    for count in (2, 3):
        probe = torch.zeros(count, 1, *image_size, device=device)
        try:
            with torch.no_grad():
                output = features(probe)
        except Exception as error:  # noqa: BLE001 - the user's module may raise anything
            raise TarganError(f"the FID feature module fails on a ({count}, 1, {image_size[0]}, "
                              f"{image_size[1]}) batch of slices: {first_line(error)}") from None
        if not isinstance(output, torch.Tensor) or output.ndim != 2 or output.shape[0] != count:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise TarganError(f"the FID feature module must map (N, 1, H, W) slices to (N, D) features, "
                              f"it gives {shape} for N = {count}")
        dimensions.append(int(output.shape[1]))
    if dimensions[0] != dimensions[1]:
        raise TarganError(f"the FID feature module gives {dimensions[0]} features per slice for N = 2 "
                          f"but {dimensions[1]} for N = 3; D must not depend on the batch")
    return dimensions[0]


class _CheckedFeatures(nn.Module):
    """The user's feature module with the ``num_features`` torchmetrics asks for and a shape check."""

    def __init__(self, features: nn.Module, num_features: int) -> None:
        super().__init__()
        self.features = features
        self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.features(images)
        if output.shape != (images.shape[0], self.num_features):
            raise TarganError(f"the FID feature module gave features of shape {tuple(output.shape)} for "
                              f"{images.shape[0]} slices, expected ({images.shape[0]}, {self.num_features})")
        return output.double()  # torchmetrics accumulates in float64 and returns the features' dtype


def _fid_metric_class() -> type:
    """torchmetrics' FrechetInceptionDistance; that module imports torch-fidelity when it is installed."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as error:
        raise TarganError(f"torchmetrics' FID module does not import ({first_line(error)}); "
                          "torch-fidelity needs a working torchvision, or uninstall torch-fidelity") from None
    return FrechetInceptionDistance


class FrechetDistance:
    """Frechet distance between the features of real and synthetic slices (FID with any features).

    ``features`` maps ``(N, 1, H, W)`` float slices in [-1, 1] to ``(N, D)``; it is run once on
    blank ``image_size`` slices to find D. Statistics accumulate over ``update`` calls in float64;
    the covariances are the unbiased (N - 1) estimates, as in torchmetrics.
    """

    def __init__(
        self, features: nn.Module, image_size: tuple[int, int], device: torch.device | str = "cpu"
    ) -> None:
        self.device = torch.device(device)
        features = features.to(self.device).eval()
        num_features = feature_dimension(features, image_size, self.device)
        self._metric: Any = _fid_metric_class()(
            feature=_CheckedFeatures(features, num_features), normalize=True, reset_real_features=True,
        ).to(self.device)

    @property
    def num_features(self) -> int:
        """D, the length of one slice's feature vector."""
        return int(self._metric.inception.num_features)

    @property
    def real_count(self) -> int:
        """Real slices seen since the last reset."""
        return int(self._metric.real_features_num_samples)

    @property
    def synthetic_count(self) -> int:
        """Synthetic slices seen since the last reset."""
        return int(self._metric.fake_features_num_samples)

    def update(self, images: torch.Tensor, real: bool) -> None:
        """Add a batch of slices ``(N, 1, H, W)`` in [-1, 1] to the real or the synthetic set."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"expected slices of shape (N, 1, H, W), got {tuple(images.shape)}")
        if images.shape[0] == 0:
            return
        try:
            with torch.no_grad():
                self._metric.update(images.to(self.device, torch.float32), real=real)
        except RuntimeError as error:
            raise TarganError(f"the FID feature module fails on a batch of shape {tuple(images.shape)}: "
                              f"{first_line(error)}") from None

    def compute(self) -> float:
        """The Frechet distance ``|mu_r - mu_s|^2 + Tr(S_r + S_s - 2 (S_r S_s)^(1/2))``."""
        if self.real_count < 2 or self.synthetic_count < 2:
            raise TarganError(f"FID needs at least 2 real and 2 synthetic slices, got {self.real_count} real "
                              f"and {self.synthetic_count} synthetic")
        return float(self._metric.compute())

    def reset(self) -> None:
        """Forget both sets of slices."""
        self._metric.reset()
