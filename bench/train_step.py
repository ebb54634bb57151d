"""Median time of the real training step against the literal reference step, in one process.

Both trainers start from the same weights; their first step (untimed) runs on the same batch and
random draws, and the largest loss difference is printed; the next (untimed) counts the FLOPs of
each step. ``reference_step`` runs on ``Trainer.literal`` (METHOD.md as written: G run again for
the G step, one D call per input, fp32, default layout, torch.optim.Adam's default implementation,
upsample-then-conv up blocks). Then the two steps alternate, so that both see the same machine
load, on the CPU twice: first under glibc malloc's defaults (how the official script, or any plain Python
process, runs), then with malloc tuned as every targan command tunes it (``tune_cpu_allocator``,
which cannot be undone in a process). Printed: medians and ratios of each part, and the headline
ratio of the reference as the official code runs (defaults) to train_step as targan runs (tuned).

    .venv/bin/python bench/train_step.py --preset paper --image-size 64 --batch-size 4 --steps 5
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it, before torch loads OpenMP

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils.flop_counter import flop_registry  # noqa: E402

from targan_cli.config import PRESETS, preset  # noqa: E402
from targan_cli.core.device import check_precision, configure_process, pick_device, tune_cpu_allocator  # noqa: E402
from targan_cli.core.training import Batch, TarGAN, Trainer, TrainConfig, derived_generator  # noqa: E402

SCHEDULE_STEPS = 25_000  # 50 epochs of CHAOS at batch 4


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each kind")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps of each kind before the timed ones")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="autocast of the real step (the reference step is always fp32)")
    parser.add_argument("--compile", action="store_true", help="torch.compile G and S in the real step")
    parser.add_argument("--no-reference", action="store_true", help="time the real step only")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def make_batches(count: int, batch_size: int, size: int, num_modalities: int, pin: bool) -> list[Batch]:
    """Random images in [-1, 1] with an elliptic organ in half of the samples, body masks, modalities."""
    generator = torch.Generator().manual_seed(1234)
    rows = torch.linspace(-1, 1, size).view(-1, 1)
    cols = torch.linspace(-1, 1, size).view(1, -1)
    organ = (((rows + 0.2) / 0.35) ** 2 + ((cols - 0.3) / 0.25) ** 2 <= 1).float()  # (H, W)
    batches = []
    for index in range(count):
        images = torch.rand(batch_size, 1, size, size, generator=generator) * 2 - 1
        masks = torch.zeros(batch_size, 1, size, size)
        masks[: (batch_size + 1) // 2, 0] = organ
        bodies = (images > -0.6).float()
        modalities = (torch.arange(batch_size) + index) % num_modalities
        tensors = (images, masks, bodies, modalities)
        batches.append(tuple(t.pin_memory() for t in tensors) if pin else tensors)
    return batches


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, batch: Batch, generator: torch.Generator, device: torch.device) -> tuple[float, dict]:
    synchronize(device)
    started = time.perf_counter()
    losses = step(batch, generator)
    synchronize(device)
    return (time.perf_counter() - started) * 1000, losses


class FlopCount(TorchDispatchMode):
    """Sums torch.utils.flop_counter's per-operator FLOP formulas over every operator that runs.

    FlopCounterMode itself also tracks modules, with hooks that autograd.grad refuses when a
    module's input is the leaf it differentiates (the reference step's D(x_hat)).
    """

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def counted_gflop(step, batch: Batch, generator: torch.Generator) -> float:
    """GFLOP of one step: forward, backward and the penalty's double backward."""
    with FlopCount() as counter:
        step(batch, generator)
    return counter.flops / 1e9


def timed_pairs(fast: Trainer, reference: Trainer | None, batches: list[Batch], warmup: int, seed: int,
                offset: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Alternate the two steps over ``batches``, the first ``warmup`` pairs untimed; ms of each."""
    fast_ms, reference_ms = [], []
    for index, batch in enumerate(batches):
        elapsed, _ = timed(fast.train_step, batch, derived_generator(seed, offset + index), device)
        if index >= warmup:
            fast_ms.append(elapsed)
        if reference is not None:
            elapsed, _ = timed(reference.reference_step, batch, derived_generator(seed, offset + index), device)
            if index >= warmup:
                reference_ms.append(elapsed)
    return fast_ms, reference_ms


def report(label: str, fast_ms: list[float], reference_ms: list[float]) -> None:
    runs = lambda times: ", ".join(f"{t:.0f}" for t in times)  # noqa: E731
    print(f"{label}: train_step median {statistics.median(fast_ms):8.1f} ms/step (runs: {runs(fast_ms)})")
    if reference_ms:
        # Each reference step runs right after a real step: the ratio of each pair is the least
        # disturbed by the machine's load drifting over the run.
        pairs = [reference / fast for fast, reference in zip(fast_ms, reference_ms)]
        print(f"{label}: reference_step median {statistics.median(reference_ms):8.1f} ms/step "
              f"(runs: {runs(reference_ms)})")
        print(f"{label}: speed-up {statistics.median(reference_ms) / statistics.median(fast_ms):.2f}x "
              f"(ratio of medians), {statistics.median(pairs):.2f}x (median of step pairs)")


def main() -> None:
    args = parse_args()
    configure_process(tune_allocator=False)  # as the CLI, but glibc malloc untuned until part 2
    device = pick_device(args.device)
    dtype = check_precision(args.precision, device)
    model_config = preset(args.preset, image_size=args.image_size)
    train_config = TrainConfig()
    torch.manual_seed(args.seed)
    model = TarGAN(model_config, train_config)
    reference_model = None if args.no_reference else copy.deepcopy(model)
    fast = Trainer(model, train_config, device, precision=dtype, compile=args.compile)
    reference = None if reference_model is None else Trainer.literal(reference_model, train_config, device)

    rounds = args.warmup + args.steps
    batches = make_batches(2 + 2 * rounds, args.batch_size, args.image_size, model_config.num_modalities,
                           pin=device.type == "cuda")
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"preset {args.preset}, image {args.image_size}, batch {args.batch_size}, "
          f"precision {args.precision}{', compiled' if args.compile else ''}, "
          f"memory format {'channels_last' if fast.memory_format == torch.channels_last else 'contiguous'}")

    # Step 0: same weights, batch and random draws; then the FLOPs of each step.
    fast_losses = fast.train_step(batches[0], derived_generator(args.seed, 0))
    if reference is not None:
        reference_losses = reference.reference_step(batches[0], derived_generator(args.seed, 0))
        difference = max(abs(fast_losses[name].item() - reference_losses[name].item())
                         / max(1.0, abs(reference_losses[name].item())) for name in reference_losses)
        print(f"first step, same weights and batch: {len(reference_losses)} loss terms, "
              f"largest difference {difference:.2e} (relative to max(1, |loss|))")
    fast_gflop = counted_gflop(fast.train_step, batches[1], derived_generator(args.seed, 1))
    line = f"GFLOP per step: train_step {fast_gflop:.1f}"
    if reference is not None:
        reference_gflop = counted_gflop(reference.reference_step, batches[1], derived_generator(args.seed, 1))
        line += f", reference_step {reference_gflop:.1f} (ratio {reference_gflop / fast_gflop:.2f})"
    print(line)

    # On the CPU, part 1 runs under glibc malloc's defaults, as the official script and any plain
    # Python process run, and part 2 with malloc tuned as every targan command tunes it (which
    # cannot be undone in a process). Elsewhere host malloc hardly matters: part 2 only.
    default_reference = None
    if device.type == "cpu":
        default_fast, default_reference = timed_pairs(fast, reference, batches[2:2 + rounds], args.warmup,
                                                      args.seed, 2, device)
        report("glibc defaults", default_fast, default_reference)
    tuned = tune_cpu_allocator()
    tuned_fast, tuned_reference = timed_pairs(fast, reference, batches[2 + rounds:], args.warmup, args.seed,
                                              2 + rounds, device)
    report("tuned allocator" if tuned else "allocator (tuning unavailable)", tuned_fast, tuned_reference)

    fast_median = statistics.median(tuned_fast)
    print(f"{SCHEDULE_STEPS:,} steps (the paper's CHAOS schedule) at this rate: "
          f"{fast_median * SCHEDULE_STEPS / 60e3:.0f} min")
    if default_reference:
        print(f"train_step as targan runs it (tuned) against reference_step as the official code runs "
              f"(glibc defaults): {statistics.median(default_reference) / fast_median:.2f}x")
    print(f"load average after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
