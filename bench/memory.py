"""Peak memory (RSS) of ``targan translate`` on a 512 x 512 x D CT-like volume, paper preset.

Writes random paper-preset weights and an int16 NIfTI volume to a temporary folder, then runs
the real ``translate`` workflow (read -> normalize -> generator in batches -> denormalize ->
write) in a fresh subprocess and reads that process's peak resident set size with
``resource.getrusage(RUSAGE_SELF).ru_maxrss``. The target: under 4 GiB at D = 300.

    .venv/bin/python bench/memory.py --depth 300
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it, before torch loads OpenMP

LIMIT_GIB = 4.0
GIB = 1024**3


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=32, help="slices of the volume (the target is 300)")
    parser.add_argument("--side", type=int, default=512, help="in-plane size of the volume")
    parser.add_argument("--batch-size", type=int, default=16, help="translate's batch size (its default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", nargs=3, metavar=("WEIGHTS", "VOLUME", "OUTPUT"), help=argparse.SUPPRESS)
    return parser.parse_args()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def child(weights: str, volume: str, output: str, batch_size: int, device: str) -> None:
    """Runs in the measured process: everything ``targan translate`` does, then the peak RSS."""
    from targan_cli.core.device import configure_process

    configure_process()
    from targan_cli.workflows.translate import translate

    before = peak_rss_bytes()  # the interpreter, torch and the package, before any work
    started = time.perf_counter()
    result = translate(volume, output, to="t2w", source="ct", weights=weights, device=device,
                       batch_size=batch_size)
    print(json.dumps({"peak_rss": peak_rss_bytes(), "rss_after_imports": before, "slices": result.slices,
                      "seconds": time.perf_counter() - started}))


def write_inputs(folder: Path, depth: int, side: int) -> tuple[Path, Path]:
    """Random paper-preset weights (official modalities t1w, t2w, ct) and a CT-like int16 volume."""
    import nibabel as nib
    import numpy as np
    import torch

    from targan_cli.config import WeightsConfig, official_modalities, preset
    from targan_cli.core.networks import Generator
    from targan_cli.io.weights import save_weights

    torch.manual_seed(0)
    generator = Generator(preset("paper"))
    config = WeightsConfig(model=generator.config, modalities=official_modalities(), preset="paper",
                           provenance={"source": "bench/memory.py", "weights": "random"})
    weights = save_weights(folder / "weights", generator, config)
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[-1:1:side * 1j, -1:1:side * 1j]
    body = (rows / 0.7) ** 2 + (cols / 0.9) ** 2 <= 1
    volume = np.full((side, side, depth), -1000, dtype=np.int16)  # air, HU
    for index in range(depth):
        plane = volume[:, :, index]
        plane[body] = rng.normal(40, 30, int(body.sum())).astype(np.int16)
    affine = np.diag([0.7, 0.7, 2.5, 1.0])
    path = folder / "ct.nii.gz"
    nib.save(nib.Nifti1Image(volume, affine), path)
    return weights, path


def main() -> None:
    args = parse_args()
    if args.child:
        child(*args.child, batch_size=args.batch_size, device=args.device)
        return
    with tempfile.TemporaryDirectory(prefix="targan-memory-") as temporary:
        folder = Path(temporary)
        weights, volume = write_inputs(folder, args.depth, args.side)
        command = [sys.executable, __file__, "--batch-size", str(args.batch_size), "--device", args.device,
                   "--child", str(weights), str(volume), str(folder / "t2w.nii.gz")]
        print(f"translating a {args.side} x {args.side} x {args.depth} int16 CT volume, paper preset, "
              f"batch {args.batch_size}, device {args.device}; load average {os.getloadavg()[0]:.2f}")
        finished = subprocess.run(command, check=True, capture_output=True, text=True)
        figures = json.loads(finished.stdout.strip().splitlines()[-1])
    peak = figures["peak_rss"] / GIB
    print(f"peak RSS {peak:.2f} GiB (of which {figures['rss_after_imports'] / GIB:.2f} GiB before any work), "
          f"{figures['slices']} slices in {figures['seconds']:.0f} s; "
          f"target < {LIMIT_GIB:.0f} GiB: {'met' if peak < LIMIT_GIB else 'NOT met'}")


if __name__ == "__main__":
    main()
