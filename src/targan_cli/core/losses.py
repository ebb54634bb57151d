"""The TarGAN loss terms (METHOD.md, "Losses"), each a small pure function of tensors.

Weights (the lambdas) are applied by the training step, so every function here returns the
unweighted term that is also logged. Images are in [-1, 1]; masks are {0, 1} floats.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def widened(tensor: torch.Tensor) -> torch.Tensor:
    """fp16 and bf16 (autocast outputs) as fp32; fp32 and fp64 as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def to01(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped: METHOD.md's to01."""
    return ((image + 1) / 2).clamp(0, 1)


def to_pm1(image01: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]."""
    return image01 * 2 - 1


def target_area(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """r = y * x in [0, 1] space, returned in [-1, 1]: the target organ only, background -1."""
    return to_pm1(mask * to01(image))


def real_labels(modality: torch.Tensor, num_modalities: int) -> torch.Tensor:
    """2n-way one-hot rows (N, 2n) with index s: "real, of modality s"."""
    return F.one_hot(modality.long(), 2 * num_modalities).float()


def fake_labels(source: torch.Tensor, num_modalities: int) -> torch.Tensor:
    """2n-way one-hot rows (N, 2n) with index n + s: "fake, translated from modality s"."""
    return F.one_hot(source.long() + num_modalities, 2 * num_modalities).float()


def critic_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """WGAN critic term -mean(D(real)) + mean(D(fake)) over patch maps."""
    return fake_scores.mean() - real_scores.mean()


def generator_adversarial_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """WGAN generator term -mean(D(fake))."""
    return -fake_scores.mean()


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE with logits summed over the 2n outputs and the batch, divided by N (the official reduction)."""
    logits = widened(logits)
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="sum") / logits.shape[0]


def interpolate(real: torch.Tensor, fake: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x_hat = a * real + (1 - a) * fake with one a per sample (alpha: (N,)); a leaf that requires grad."""
    a = alpha.to(real.dtype).view(-1, *([1] * (real.dim() - 1)))
    return (a * real + (1 - a) * fake).detach().requires_grad_(True)


def gradient_penalty(scores: torch.Tensor, interpolated: torch.Tensor, output_scale: float = 1.0) -> torch.Tensor:
    """mean over samples of (||d sum(scores) / d x_hat||_2 - 1)^2, differentiable (create_graph).

    ``scores`` is D.src(x_hat). ``output_scale`` multiplies the scores before differentiation and
    divides the gradient after it (the GradScaler factor under fp16, so that it does not underflow).
    """
    (gradient,) = torch.autograd.grad(widened(scores).sum() * output_scale, interpolated, create_graph=True)
    gradient = widened(gradient).flatten(1) / output_scale  # (N, H * W)
    return ((gradient.norm(2, dim=1) - 1) ** 2).mean()


def shape_loss(predicted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE between the shape controller's probabilities and a {0, 1} mask."""
    predicted = widened(predicted)
    return F.mse_loss(predicted, mask.to(predicted.dtype))


def cycle_loss(original: torch.Tensor, reconstructed: torch.Tensor) -> torch.Tensor:
    """Reconstruction (cycle) term mean|x - G(G(x, t), s)|."""
    return F.l1_loss(widened(reconstructed), widened(original))


def crossing_loss(image: torch.Tensor, area: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean|to01(x_t) * y - to01(r_t)|: the whole-image translation, cut to the organ, matches the area's."""
    return (to01(widened(image)) * mask - to01(widened(area))).abs().mean()
