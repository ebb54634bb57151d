"""Translate stacks of normalized slices with the generator, one batch at a time.

This is the one inference path of the tool (translate, enrich, evaluate, demo, training
samples). Slices of any in-plane size are padded to a square and resized to the model size
inside the batch, on the device, and resized back; only the current batch lives on the device,
and the output is written into one preallocated array, so memory grows with the volume, not
with the network's intermediates. ``SliceBatcher`` takes the slices of several volumes (a
folder run), in batches that span them on CUDA; ``translate_slices`` is one volume through it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from targan_cli.config import ModelConfig
from targan_cli.core.device import autocast, memory_format
from targan_cli.core.networks import Discriminator, Generator
from targan_cli.core.slicing import PlaneFit, from_model, plane_fit, to_model

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
    of memory. One ``SliceJob`` through a ``SliceBatcher`` (on CUDA, the last batch padded).
    """
    if out is None:
        out = np.empty(slices.shape, dtype=np.float32)
    batcher = SliceBatcher(generator, batch_size=batch_size, device=device, dtype=dtype, progress=progress)
    batcher.add(SliceJob(slices, target, out))
    batcher.run(flush=True)
    return out


@dataclass(eq=False)
class SliceJob:
    """Slices (Z, H, W) in [-1, 1] to translate to modality index ``target``, into ``out`` (float32,
    the same shape; it may be ``slices`` itself); ``done()`` is called once every slice is in ``out``."""

    slices: np.ndarray
    target: int
    out: np.ndarray
    done: Callable[[], None] | None = None
    fit: PlaneFit | None = None  # set by SliceBatcher.add
    handed: int = 0  # slices put into batches so far
    collected: int = 0  # slices written to ``out`` so far


def spans_volumes(device: torch.device) -> bool:
    """Whether batches span volumes (``SliceBatcher``'s ``span``) on ``device``: on CUDA, where a batch
    costs about the same full or not; not on the CPU, where a batch costs its slices and spanning
    would only add the padding that keeps the outputs independent of the batches."""
    return device.type == "cuda"


class SliceBatcher:
    """The generator on the slices of queued ``SliceJob``s (a folder's volumes), one batch at a time.

    With ``span`` (default: ``spans_volumes(device)``) every batch holds ``batch_size`` slices taken
    from the jobs in turn, across volumes, the last batch of a run padded (its last slice again), so
    that the device always gets full batches. A slice's output then does not depend on which
    volume's slices share its batch: each slice is fitted to the model size on its own (its job's
    ``PlaneFit``), the network is per sample (instance norm), and with the batch size fixed its
    kernels give the same bits in any position and company (measured on the CPU, 1 and 2 threads:
    with the batch size changed they do not always, e.g. 16 against 5 slices on one thread, 1 ulp),
    so a folder's outputs are those of its volumes translated one at a time, padded likewise
    (tested). Without ``span``, each job's slices are batched on their own and the last batch of a
    job is not padded.

    ``add`` queues a job (``first``: ahead of the waiting ones, e.g. a second pass over a finished
    output); ``run`` translates every full batch of the waiting slices (without ``span``: all of
    them), or with ``flush`` all of them, including those of jobs that the finished jobs' ``done``
    add. On CUDA the batches are pipelined: the input goes up from page-locked memory and the output
    comes back into page-locked memory asynchronously, and batch k is collected only after batch
    k + 1 has been queued, so that the GPU never waits for the host's copying; the generator is
    switched to channels_last (in place), the layout its convolutions are fastest in.
    """

    def __init__(self, generator: Generator, *, batch_size: int = 16, device: torch.device | None = None,
                 dtype: torch.dtype | None = None, progress: Callable[[int], None] | None = None,
                 span: bool | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.device = generator_device(generator) if device is None else device
        self.layout = memory_format(self.device)
        self.generator = generator.to(memory_format=self.layout)
        self.batch_size = batch_size
        self.dtype = dtype
        self.progress = progress
        self.overlap = self.device.type == "cuda"
        self.span = spans_volumes(self.device) if span is None else span
        self._jobs: deque[SliceJob] = deque()  # with slices not yet in a batch
        self._codes: dict[int, torch.Tensor] = {}
        self._queued: deque[tuple[list[tuple[SliceJob, int, int, torch.Tensor]], torch.cuda.Event | None]] = deque()

    @property
    def waiting(self) -> int:
        """The queued slices not yet put into a batch."""
        return sum(len(job.slices) - job.handed for job in self._jobs)

    def add(self, job: SliceJob, first: bool = False) -> None:
        slices, out = job.slices, job.out
        if slices.ndim != 3:
            raise ValueError(f"expected slices (Z, H, W), got shape {slices.shape}")
        if not 0 <= job.target < self.generator.config.num_modalities:
            raise ValueError(f"target {job.target} is not a modality index of this generator "
                             f"(0 to {self.generator.config.num_modalities - 1})")
        if out.shape != slices.shape or out.dtype != np.float32:
            raise ValueError(f"out must be float32 of shape {slices.shape}, got {out.dtype} {out.shape}")
        job.fit = plane_fit(slices.shape[1], slices.shape[2], self.generator.config.image_size)
        if len(slices) == 0:
            if job.done is not None:
                job.done()
            return
        if first:
            self._jobs.appendleft(job)
        else:
            self._jobs.append(job)

    def run(self, flush: bool = False) -> None:
        with torch.inference_mode():
            while True:
                waiting = self.waiting
                if waiting and (flush or not self.span or waiting >= self.batch_size):
                    self._launch()
                    keep = 1 if self.overlap else 0
                elif flush and self._queued:
                    keep = 0
                else:
                    return
                # Reading batch k + 1 came before writing batch k here: ``out`` may be ``slices``.
                while len(self._queued) > keep:
                    self._collect()

    def _target_codes(self, target: int) -> torch.Tensor:
        """``batch_size`` copies of a modality index on the device, made once (no copy from the host
        per batch, which on CUDA would wait for the queued batches)."""
        if target not in self._codes:
            self._codes[target] = torch.full((self.batch_size,), target, dtype=torch.long, device=self.device)
        return self._codes[target]

    def _launch(self) -> None:
        """Put the next ``batch_size`` waiting slices (without ``span``: of one job) through the generator
        (on CUDA, asynchronously)."""
        pieces: list[tuple[SliceJob, int, int]] = []
        room = self.batch_size
        while room and self._jobs and (self.span or not pieces):
            job = self._jobs[0]
            start = job.handed
            stop = job.handed = min(len(job.slices), start + room)
            pieces.append((job, start, stop))
            room -= stop - start
            if stop == len(job.slices):
                self._jobs.popleft()
        images, codes = [], []
        for job, start, stop in pieces:
            batch = torch.from_numpy(np.ascontiguousarray(job.slices[start:stop], dtype=np.float32))
            if self.overlap:
                batch = batch.pin_memory()
            batch = batch.to(self.device, non_blocking=True).unsqueeze(1)  # (n, 1, H, W)
            images.append(to_model(batch, job.fit, fill=BACKGROUND))  # (n, 1, S, S)
            codes.append(self._target_codes(job.target)[: stop - start])
        count = sum(len(code) for code in codes)
        if self.span and count < self.batch_size:  # the last slice again: see the class's note
            images.append(images[-1][-1:].expand(self.batch_size - count, -1, -1, -1))
            codes.append(codes[-1][-1:].expand(self.batch_size - count))
        batch = (torch.cat(images) if len(images) > 1 else images[0]).contiguous(memory_format=self.layout)
        targets = torch.cat(codes) if len(codes) > 1 else codes[0]
        with autocast(self.device, self.dtype):
            outputs = self.generator(batch, targets)
        outputs = outputs[:count].float()
        done = None
        results, offset = [], 0
        for job, start, stop in pieces:
            result = from_model(outputs[offset:offset + stop - start], job.fit).clamp_(-1.0, 1.0)[:, 0]  # (n, H, W)
            offset += stop - start
            if self.overlap:
                host = torch.empty(result.shape, dtype=torch.float32, pin_memory=True)
                host.copy_(result, non_blocking=True)
                result = host
            else:
                result = result.cpu()
            results.append((job, start, stop, result))
        if self.overlap:
            done = torch.cuda.Event()
            done.record()
        self._queued.append((results, done))

    def _collect(self) -> None:
        """Write the oldest batch's outputs into their jobs' ``out``; call ``done`` of the finished jobs."""
        results, done = self._queued.popleft()
        if done is not None:
            done.synchronize()
        for job, start, stop, result in results:
            job.out[start:stop] = result.numpy()
            job.collected += stop - start
            if self.progress is not None:
                self.progress(stop - start)
            if job.collected == len(job.slices) and job.done is not None:
                job.done()


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
