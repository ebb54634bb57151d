"""How well translate's QC flags bad inputs: detection rate per failure kind, false alarms on clean ones.

Writes a phantom dataset, trains a tiny model on it (or takes --weights), then translates every
test volume (each test patient in every modality) clean and as each failure kind of
``data.phantom.QC_FAILURES``, and counts the QC grades (core/qc.py). A failure is detected when
its grade is check or poor; a clean volume graded check or poor is a false alarm.

    python bench/qc.py --out /tmp/qc-bench            # training: minutes to 20 minutes on 2 CPU cores
    python bench/qc.py --out /tmp/qc-bench --weights RUN/export   # grading alone: about 2 minutes

The table it prints is the one in docs/translate.md ("Can I trust this output?").
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from targan_cli.core import qc
from targan_cli.data.dataset import open_data_dir
from targan_cli.data.phantom import QC_FAILURES, qc_failure, write_phantom_dataset
from targan_cli.errors import TarganError
from targan_cli.io.volume import read_volume
from targan_cli.io.weights import load_weights
from targan_cli.workflows.train import train
from targan_cli.workflows.translate import synthesize

TARGET = {"ct": "t2w", "t1w": "ct", "t2w": "ct"}


def train_tiny(data: Path, run: Path, steps: int, seed: int = 0) -> Path:
    """The demo's fast settings of 2026-12-04 (before its 1,000-step default), at 32 x 32: the model
    the thresholds were calibrated with (tests/data/qc_tiny)."""
    result = train(data, run, epochs=10_000, preset="tiny", image_size=32, batch_size=8, max_steps=steps,
                   device="cpu", ema_decay=0.98, lr_g=2e-3, lr_d=6e-3, lambda_rec=10.0, seed=seed, log_every=50,
                   sample_every=0, overwrite=True)
    return result.export_dir


def grade_case(weights, image, contrast: str, kind: str, rng: np.random.Generator) -> dict:
    """The QC of one volume, clean (``kind`` "clean") or made into a failure case."""
    array, claimed = (image.array, contrast) if kind == "clean" else qc_failure(kind, image.array, contrast, rng)
    volume = image.with_array(array)
    try:
        translation = synthesize(volume, weights, claimed, TARGET[contrast] if TARGET[contrast] != claimed else
                                 contrast, batch_size=16, dtype=None, qc=True)
    except TarganError as error:  # e.g. a blank MR volume is refused outright: detected
        return {"grade": "refused", "reason": error.message, "cycle": None}
    quality = translation.quality
    return {"grade": quality.grade.grade, "reason": "; ".join(quality.grade.reasons), "cycle": quality.cycle_volume,
            "slices": [None if np.isnan(v) else float(v) for v in quality.cycle_slices],
            "predicted": quality.vote.predicted if quality.vote else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--weights", type=Path, default=None)
    parser.add_argument("--test-cases", type=int, default=8, help="patients; each gives one volume per modality")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    data = args.out / "data"
    started = time.perf_counter()
    write_phantom_dataset(data, cases=4, size=32, slices=8, test_cases=args.test_cases, seed=args.seed,
                          overwrite=True)
    weights_folder = args.weights or train_tiny(data, args.out / "run", args.steps)
    weights = load_weights(weights_folder)
    layout = open_data_dir(data)
    rng = np.random.default_rng(args.seed)
    rows: dict[str, list[dict]] = {kind: [] for kind in ("clean", *QC_FAILURES)}
    for contrast in layout.spec.modality_names:
        for case in layout.cases("test", contrast):
            image = read_volume(case.image)
            for kind in rows:
                rows[kind].append({"modality": contrast, **grade_case(weights, image, contrast, kind, rng)})
    summary = {}
    print(f"weights {weights_folder}; thresholds: cycle check {qc.CYCLE_CHECK}, poor {qc.CYCLE_POOR}")
    print("| input | volumes | ok | check | poor | refused | flagged | median cycle score |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, results in rows.items():
        counts = {grade: sum(r["grade"] == grade for r in results) for grade in ("ok", "check", "poor", "refused")}
        flagged = (len(results) - counts["ok"]) / len(results)
        cycles = [r["cycle"] for r in results if r["cycle"] is not None and not np.isnan(r["cycle"])]
        median = f"{np.median(cycles):.3f}" if cycles else "n/a"
        what = "false alarms" if kind == "clean" else "detected"
        print(f"| {kind} | {len(results)} | {counts['ok']} | {counts['check']} | {counts['poor']} | "
              f"{counts['refused']} | {flagged:.0%} {what} | {median} |")
        summary[kind] = {"volumes": len(results), **counts, "flagged_rate": flagged, "results": results}
    (args.out / "qc_bench.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    print(f"{time.perf_counter() - started:.0f} s; details in {args.out / 'qc_bench.json'}")


if __name__ == "__main__":
    main()
