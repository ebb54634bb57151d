"""Translate a stack of normalized slices with the generator, one batch at a time.

This is the one inference path of the tool (translate, enrich, evaluate, demo, training
samples). Slices of any in-plane size are padded to a square and resized to the model size
inside the batch, on the device, and resized back; only the current batch lives on the device,
and the output is written into one preallocated array, so memory grows with the volume, not
with the network's intermediates.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from targan_cli.config import ModelConfig
from targan_cli.core.device import autocast, memory_format
from targan_cli.core.networks import Discriminator, Generator
from targan_cli.core.slicing import from_model, plane_fit, to_model

# The background of [-1, 1] images: padding to a square adds "air", not mid-grey.
BACKGROUND = -1.0


def generator_device(generator: Generator) -> torch.device:
    """The device that holds the generator's parameters."""
    return next(generator.parameters()).device


def translate_slices(
    generator: Generator,
    slices: np.ndarray,
    target: int,
    *,
    batch_size: int = 16,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: Callable[[int], None] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Normalized slices (Z, H, W) in [-1, 1] -> translated slices (Z, H, W) float32 in [-1, 1].

    ``target`` is the modality index (the order of the weights' config). ``device`` defaults to
    the generator's; ``dtype`` is the autocast dtype (None: fp32). ``progress(n)`` is called
    after each batch with the number of slices it held. ``out`` receives the result and may be
    ``slices`` itself (each batch is read before it is overwritten), which saves a volume's worth
    of memory. On CUDA the generator is switched to channels_last (in place), the layout its
    convolutions are fastest in.
    """
    if slices.ndim != 3:
        raise ValueError(f"expected slices (Z, H, W), got shape {slices.shape}")
    if not 0 <= target < generator.config.num_modalities:
        raise ValueError(f"target {target} is not a modality index of this generator "
                         f"(0 to {generator.config.num_modalities - 1})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = generator_device(generator) if device is None else device
    depth, height, width = slices.shape
    fit = plane_fit(height, width, generator.config.image_size)
    layout = memory_format(device)
    generator = generator.to(memory_format=layout)
    if out is None:
        out = np.empty((depth, height, width), dtype=np.float32)
    elif out.shape != slices.shape or out.dtype != np.float32:
        raise ValueError(f"out must be float32 of shape {slices.shape}, got {out.dtype} {out.shape}")
    # On CUDA the batches are pipelined: the input goes up from page-locked memory and the output
    # comes back into page-locked memory asynchronously, and batch k is collected only after
    # batch k + 1 has been queued, so that the GPU never waits for the host's copying.
    overlap = device.type == "cuda"
    queued: list[tuple[int, int, torch.Tensor, torch.cuda.Event | None]] = []

    def collect() -> None:
        start, stop, host, done = queued.pop(0)
        if done is not None:
            done.synchronize()
        out[start:stop] = host.numpy()
        if progress is not None:
            progress(stop - start)

    with torch.inference_mode():
        targets = torch.full((batch_size,), target, dtype=torch.long, device=device)
        for start in range(0, depth, batch_size):
            stop = min(start + batch_size, depth)
            batch = torch.from_numpy(np.ascontiguousarray(slices[start:stop], dtype=np.float32))
            if overlap:
                batch = batch.pin_memory()
            batch = batch.to(device, non_blocking=True).unsqueeze(1)  # (N, 1, H, W)
            images = to_model(batch, fit, fill=BACKGROUND).contiguous(memory_format=layout)  # (N, 1, S, S)
            with autocast(device, dtype):
                outputs = generator(images, targets[: stop - start])
            outputs = from_model(outputs.float(), fit).clamp_(-1.0, 1.0)[:, 0]  # (N, H, W)
            if overlap:
                host = torch.empty(outputs.shape, dtype=torch.float32, pin_memory=True)
                host.copy_(outputs, non_blocking=True)
                done = torch.cuda.Event()
                done.record()
                queued.append((start, stop, host, done))
            else:
                queued.append((start, stop, outputs.cpu(), None))
            # Reading batch k + 1 above came before writing batch k here: ``out`` may be ``slices``.
            while len(queued) > (1 if overlap else 0):
                collect()
        while queued:
            collect()
    return out


def classify_slices(discriminator: Discriminator, slices: np.ndarray, config: ModelConfig, *,
                    batch_size: int = 16) -> np.ndarray:
    """Normalized slices (Z, H, W) in [-1, 1] -> (Z, n) logits of the discriminator's "real, of
    modality s" classes (the first n of its 2n), fitted to the model size as the generator's input."""
    num_modalities = config.num_modalities
    if slices.ndim != 3:
        raise ValueError(f"expected slices (Z, H, W), got shape {slices.shape}")
    device = next(discriminator.parameters()).device
    fit = plane_fit(slices.shape[1], slices.shape[2], config.image_size)
    logits = np.empty((slices.shape[0], num_modalities), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, slices.shape[0], batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(slices[start:start + batch_size], dtype=np.float32))
            images = to_model(batch.to(device).unsqueeze(1), fit, fill=BACKGROUND)  # (N, 1, S, S)
            logits[start:start + len(batch)] = discriminator(images).cls[:, :num_modalities].float().cpu().numpy()
    return logits
