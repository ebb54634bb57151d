"""The paper's ablation direction (Table 3) on phantoms: full TarGAN, without the shape controller
(no S, no shape loss), without the crossing loss; same data, seed, steps and settings.

Each variant trains the tiny preset from the same seed on the same phantom DATA folder, then its
EMA generator translates every held-out case into every other modality, scored against the
phantom's paired renderings (PSNR, SSIM, MAE in the model range [-1, 1]) inside the liver (the
target area) and inside the body (the whole image). Prints one row per variant, the means over
all translations (every source, target and test case). Run from the repository root:

    python bench/ablation.py                 # about 15 minutes on 2 shared CPU cores
    python bench/ablation.py --steps 20      # a quick try of the script

The training settings are the demo's (``workflows.demo.FULL``: learning rates, cycle, gradient
penalty and EMA weights; docs/demo.md), because the paper's need tens of thousands of steps.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from targan_cli.data.dataset import open_data_dir  # noqa: E402
from targan_cli.data.phantom import write_phantom_dataset  # noqa: E402
from targan_cli.io.weights import load_weights  # noqa: E402
from targan_cli.workflows.demo import FULL  # noqa: E402
from targan_cli.workflows.evaluate import evaluate_models, generator_model  # noqa: E402
from targan_cli.workflows.train import train  # noqa: E402

VARIANTS = {
    "TarGAN (full)": {},
    "w/o S (shape controller)": {"shape_controller": False},
    "w/o C (crossing loss)": {"crossing_loss": False},
}
METRICS = ("psnr", "ssim", "mae")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--cases", type=int, default=FULL.cases)
    parser.add_argument("--test-cases", type=int, default=FULL.test_cases)
    parser.add_argument("--size", type=int, default=FULL.size, help="phantom slice size")
    parser.add_argument("--image-size", type=int, default=FULL.image_size)
    parser.add_argument("--batch-size", type=int, default=FULL.batch_size)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="keep the data and runs here (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_flush_denormal(True)

    with tempfile.TemporaryDirectory(prefix="targan-ablation-") as temporary:
        folder = args.out or Path(temporary)
        data_folder = folder / "data"
        write_phantom_dataset(data_folder, cases=args.cases, size=args.size, test_cases=args.test_cases,
                              seed=args.seed, overwrite=True)
        data = open_data_dir(data_folder)
        rows = {}
        for name, flags in VARIANTS.items():
            started = time.perf_counter()
            run = train(data_folder, folder / f"run-{len(rows)}", epochs=10_000, preset="tiny",
                        image_size=args.image_size, batch_size=args.batch_size, max_steps=args.steps,
                        device="cpu", seed=args.seed, log_every=50, sample_every=0, overwrite=True,
                        **FULL.training_options(), **flags)
            weights = load_weights(run.export_dir, device=torch.device("cpu"))
            result = evaluate_models(data, [generator_model(weights, name, args.batch_size)], METRICS,
                                     split="test", device=torch.device("cpu"), batch_size=args.batch_size)
            means = {}
            for region in ("liver", "body"):
                for metric in METRICS:
                    values = [r.value for r in result.records
                              if r.metric == metric and r.region == region and r.value is not None]
                    finite = np.asarray(values, dtype=np.float64)
                    means[region, metric] = float(finite[np.isfinite(finite)].mean())
            rows[name] = means
            print(f"{name}: trained and scored in {time.perf_counter() - started:.0f} s", flush=True)

    print(f"\n{args.steps} steps, batch {args.batch_size}, {args.image_size} px, {args.cases} training cases "
          f"per modality, {args.test_cases} test cases, seed {args.seed}; means over all translations")
    header = "| variant | " + " | ".join(f"{region} {metric.upper()}" for region in ("liver", "body")
                                          for metric in METRICS) + " |"
    print(header)
    print("|---" * (1 + 2 * len(METRICS)) + "|")
    for name, means in rows.items():
        print(f"| {name} | " + " | ".join(f"{means[region, metric]:.4f}" if metric != "psnr"
                                          else f"{means[region, metric]:.2f}"
                                          for region in ("liver", "body") for metric in METRICS) + " |")


if __name__ == "__main__":
    main()
