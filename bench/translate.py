"""Slices/s of translate's inference path against a one-slice-at-a-time loop, and how close the
generator gets to this machine's convolution speed.

Figures, all from this one process, each the best of ``--rounds`` rounds:
- ``translate_slices`` (batched, the path of ``targan translate``) against a straightforward loop
  that calls a copy of the same generator, in the default layout and with its up blocks and norms
  as METHOD.md writes them (upsample, then 3x3 conv; torch's instance norm), on one slice at a time under
  ``torch.no_grad``, and the ratio; on the CPU both first under glibc malloc's defaults (a plain
  Python process), then with malloc tuned as every targan command tunes it (``tune_cpu_allocator``,
  which cannot be undone in a process), and the ratio of targan's path (tuned) to the plain loop
  (defaults);
- the generator's GFLOP/s inside ``translate_slices`` (FLOPs counted with
  torch.utils.flop_counter, both as executed and in the direct form of the up blocks), against
  the best GFLOP/s of a plain channels_last 3x3 convolution at a few of the generator's sizes:
  how close to this machine's limit the whole path runs.

    .venv/bin/python bench/translate.py --preset paper --image-size 256 --slices 16
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it, before torch loads OpenMP

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from targan_cli.config import PRESETS, preset  # noqa: E402
from targan_cli.core.device import (autocast, check_precision, configure_process, pick_device,  # noqa: E402
                                    tune_cpu_allocator)
from targan_cli.core.inference import translate_slices  # noqa: E402
from targan_cli.core.networks import Generator, use_fast_forms  # noqa: E402

TARGET = 1


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--slices", type=int, default=16, help="slices translated by each path")
    parser.add_argument("--batch-size", type=int, default=16, help="translate's batch size (its default)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds of every figure (best is kept)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="autocast of translate's path (the loop is always fp32)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def synthetic_slices(count: int, size: int, seed: int) -> np.ndarray:
    """CT-like normalized slices (Z, S, S) in [-1, 1]: air around an elliptic body with texture."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    body = (rows / 0.7) ** 2 + (cols / 0.9) ** 2 <= 1
    slices = np.full((count, size, size), -1.0, dtype=np.float32)
    for index in range(count):
        texture = 0.2 * rng.standard_normal((size, size)).astype(np.float32)
        slices[index][body] = np.clip(-0.1 + 0.02 * index + texture[body], -1, 1)
    return slices


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(run: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    started = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - started


def one_slice_loop(generator: Generator, slices: np.ndarray, device: torch.device) -> np.ndarray:
    """The straightforward path: one slice per generator call, default layout, fp32."""
    target = torch.tensor([TARGET], device=device)
    outputs = np.empty_like(slices)
    with torch.no_grad():
        for index, plane in enumerate(slices):
            image = torch.from_numpy(plane).to(device)[None, None]  # (1, 1, S, S)
            outputs[index] = generator(image, target)[0, 0].clamp(-1, 1).cpu().numpy()
    return outputs


def generator_flops_per_slice(generator: Generator, size: int, device: torch.device,
                              direct: bool) -> float:
    """FLOPs of one slice as the generator runs it, or (``direct``) with every up block in the direct
    form (upsample, then 3x3 conv: 2.25x the FLOPs of the phase form), the usual way to count
    "effective" FLOPs of a fast algorithm."""
    counter = FlopCounterMode(display=False)
    generator = use_fast_forms(copy.deepcopy(generator), False) if direct else generator
    with torch.inference_mode(), counter:
        generator(torch.zeros(1, 1, size, size, device=device), torch.tensor([TARGET], device=device))
    return float(counter.get_total_flops())


def best_convolution_gflops(config, batch: int, device: torch.device,
                            dtype: torch.dtype | None) -> tuple[float, str]:
    """The best GFLOP/s of a plain channels_last 3x3 convolution at four of the generator's sizes."""
    best, best_shape = 0.0, ""
    for level in range(4):
        channels = config.base_width * 2**level
        size = config.image_size // 2**level
        convolution = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(
            device, memory_format=torch.channels_last)
        inputs = torch.randn(batch, channels, size, size, device=device).contiguous(memory_format=torch.channels_last)
        flops = 2 * 9 * channels * channels * size * size * batch

        def run() -> None:
            with torch.inference_mode(), autocast(device, dtype):
                convolution(inputs)

        run()  # warm-up: the first call chooses and prepares the kernel
        gflops = flops / min(seconds(run, device) for _ in range(3)) / 1e9
        if gflops > best:
            best, best_shape = gflops, f"{batch}x{channels}x{size}x{size}"
    return best, best_shape


def timed_paths(generator: Generator, literal: Generator, slices: np.ndarray, args: argparse.Namespace,
                device: torch.device, dtype: torch.dtype | None) -> tuple[float, float, float, str]:
    """Rounds of (batched, loop, convolution probe), each figure the best of its rounds: the
    machine's load changes from minute to minute, and the best is the least disturbed.
    Returns slices/s of translate_slices and of the loop, the best conv GFLOP/s and its shape."""
    batched_times, looped_times, convolution_rates = [], [], []
    for _ in range(args.rounds):
        batched_times.append(seconds(lambda: translate_slices(generator, slices, TARGET, batch_size=args.batch_size,
                                                              dtype=dtype), device))
        looped_times.append(seconds(lambda: one_slice_loop(literal, slices, device), device))
        convolution_rates.append(best_convolution_gflops(generator.config, args.batch_size, device, dtype))
    rounds = lambda times: ", ".join(f"{args.slices / t:.2f}" for t in times)  # noqa: E731
    print(f"  translate_slices  {args.slices / min(batched_times):8.2f} slices/s  (rounds: {rounds(batched_times)})")
    print(f"  one-slice loop    {args.slices / min(looped_times):8.2f} slices/s  (rounds: {rounds(looped_times)})")
    best, shape = max(convolution_rates)
    return args.slices / min(batched_times), args.slices / min(looped_times), best, shape


def main() -> None:
    args = parse_args()
    configure_process(tune_allocator=False)  # as the CLI, but glibc malloc untuned until part 2
    device = pick_device(args.device)
    dtype = check_precision(args.precision, device)
    config = preset(args.preset, image_size=args.image_size)
    torch.manual_seed(args.seed)
    generator = Generator(config).eval().to(device)
    # The loop's generator: default layout (translate_slices may switch its own), every up block
    # as METHOD.md writes it (upsampling then a 3x3 conv) and torch's instance norm.
    literal = use_fast_forms(copy.deepcopy(generator), False)
    slices = synthetic_slices(args.slices, args.image_size, args.seed)
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"preset {args.preset}, image {args.image_size}, {args.slices} slices, batch {args.batch_size}, "
          f"precision {args.precision}")

    # Warm-up: one full batch on CUDA (cuDNN picks its algorithms per shape), one slice elsewhere.
    warm = slices[: args.batch_size if device.type == "cuda" else 1]
    translate_slices(generator, warm, TARGET, batch_size=args.batch_size, dtype=dtype)
    one_slice_loop(literal, warm[:1], device)
    difference = float(np.abs(translate_slices(generator, slices[:2], TARGET, batch_size=args.batch_size)
                              - one_slice_loop(literal, slices[:2], device)).max())
    print(f"largest fp32 output difference between the two paths: {difference:.1e}")

    # On the CPU, part 1 runs under glibc malloc's defaults (any plain Python process), part 2 with
    # malloc tuned as every targan command tunes it (which cannot be undone in a process).
    # Elsewhere host malloc hardly matters: part 2 only.
    default_looped = None
    if device.type == "cpu":
        print("glibc defaults:")
        default_batched, default_looped, _, _ = timed_paths(generator, literal, slices, args, device, dtype)
        print(f"  speed-up {default_batched / default_looped:.2f}x")
    tuned = tune_cpu_allocator()
    print("tuned allocator:" if tuned else "allocator (tuning unavailable):")
    batched_rate, looped_rate, best, best_shape = timed_paths(generator, literal, slices, args, device, dtype)
    print(f"  speed-up {batched_rate / looped_rate:.2f}x")
    if default_looped:
        print(f"translate_slices as targan runs it (tuned) against the loop in a plain process (glibc "
              f"defaults): {batched_rate / default_looped:.2f}x")
    print(f"best plain 3x3 convolution {best:.1f} GFLOP/s ({best_shape}, channels_last)")
    for direct in (False, True):
        flops = generator_flops_per_slice(generator, args.image_size, device, direct)
        achieved = flops * batched_rate / 1e9
        counted = "direct-form (effective)" if direct else "executed"
        print(f"generator, {counted:>23} FLOPs: {flops / 1e9:6.1f} GFLOP/slice, {achieved:6.1f} GFLOP/s in "
              f"translate_slices, {achieved / best:.2f} of the plain convolution")
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
