"""How far can any translation get on the demo's held-out phantoms? Oracles against the baselines.

The demo's report compares its model with trivial baselines (identity, body mean-fill,
histogram-matched source). Where the model loses a column, is it the model, or can nothing that
maps the input win there? This script evaluates, with the report's own code (the same phantoms,
metrics, regions and baselines), translations that cheat by looking at the answer:

- the "best intensity mapping (oracle)" that the demo's report also uses
  (``core.intensity.best_intensity_mapping``): each input intensity (40 bins over [-1, 1]) mapped
  to the mean of the truth's voxels of that intensity in the body, fitted on the very volume it is
  scored on: the best any voxel-by-voxel intensity mapping can do;
- "smoothed intensity oracle": the same on the input smoothed by a Gaussian (sigma 1 pixel), so
  that noise is averaged out with the neighbours: a mapping that uses a little context;
- "truth's own mean": the truth's body filled with its own mean body intensity (the body
  mean-fill baseline, knowing the test volume's exact level);
- "flat liver at the truth's level": the intensity oracle, with the liver (the source's label)
  filled with the truth's own mean liver intensity: what a model that recognised the liver and
  knew its exact level, but none of its inner structure, would score.

    targan demo --out /tmp/demo && python bench/demo_ceiling.py /tmp/demo

Takes a demo folder (its phantoms, and its model's weights for the intensity settings and a row
of their own), or ``--data`` and ``--weights`` for another run on the demo's phantoms.

It prints, per oracle, the verdict sentence of the report (which baseline it beats in which
columns); docs/demo.md records the figures. Takes about 20 seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from targan_cli.core.intensity import best_intensity_mapping, body_mask
from targan_cli.data.dataset import Case, open_data_dir
from targan_cli.io.volume import read_volume
from targan_cli.io.weights import load_weights
from targan_cli.workflows.demo import DATA, FULL, PAIRED_METRICS, RUN
from targan_cli.workflows.evaluate import (BACKGROUND, EvaluatedModel, at_model_size, evaluate_models,
                                           generator_model, intensity_oracle, paired_truth, trivial_baselines,
                                           verdict)
from targan_cli.workflows.segment import label_slices


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path, nargs="?", help="a folder `targan demo` wrote")
    parser.add_argument("--data", type=Path, help="the phantoms (default: DEMO/data)")
    parser.add_argument("--weights", type=Path, help="a model trained on them (default: DEMO/run/export)")
    args = parser.parse_args()
    if args.demo is None and (args.data is None or args.weights is None):
        parser.error("give a demo folder, or --data and --weights")
    args.data = args.data or args.demo / DATA
    args.weights = args.weights or args.demo / RUN / "export"
    return args


def oracle(label: str, modalities, image_size: int, kind: str) -> EvaluatedModel:
    """The other oracles (the plain intensity oracle is ``evaluate.intensity_oracle``)."""
    names = [spec.name for spec in modalities]

    def translate(case: Case, slices: np.ndarray, source: str, target: str) -> np.ndarray:
        truth = paired_truth(case, target, modalities[names.index(target)].intensity, image_size)
        body = body_mask(slices)
        if kind == "own mean":
            return np.where(body, np.float32(truth[body_mask(truth)].mean()), np.float32(BACKGROUND))
        if kind == "smoothed":
            return best_intensity_mapping(ndimage.gaussian_filter(slices, sigma=(0, 1, 1)), truth, body)
        mapped = best_intensity_mapping(slices, truth, body)  # "flat liver"
        label = label_slices(case.label, read_volume(case.image)).astype(np.float32)
        liver = at_model_size(label * 2 - 1, image_size) > 0  # at least half liver
        return np.where(liver, np.float32(truth[liver].mean()), mapped)

    return EvaluatedModel(label, tuple(modalities), image_size, translate, {"source": label})


def main() -> None:
    args = parse_args()
    data = open_data_dir(args.data)
    weights = load_weights(args.weights, None, torch.device("cpu"))
    modalities = weights.config.modalities  # the intensity settings, MR reference levels included
    baselines, _ = trivial_baselines(data, modalities, FULL.image_size)
    oracles = [intensity_oracle(modalities, FULL.image_size),
               oracle("smoothed intensity oracle", modalities, FULL.image_size, "smoothed"),
               oracle("truth's own mean", modalities, FULL.image_size, "own mean"),
               oracle("flat liver at the truth's level", modalities, FULL.image_size, "flat liver")]
    models = [generator_model(weights, "model", FULL.batch_size), *oracles, *baselines]
    result = evaluate_models(data, models, PAIRED_METRICS, split="test", batch_size=FULL.batch_size)
    width = max(len(column.label) for column in result.columns)
    print(f"{'column':{width}s}  " + "  ".join(f"{label[:18]:>18s}" for label in result.models))
    for index, column in enumerate(result.columns):
        cells = [summaries[index] for summaries in result.summaries]
        print(f"{column.label:{width}s}  " + "  ".join(f"{cell.mean:18.3f}" if cell else f"{'-':>18s}"
                                                   for cell in cells))
    print(f"n = {result.summaries[0][0].count} volumes per cell")
    for model in models[:len(models) - len(baselines)]:
        print(verdict(result, model.label))


if __name__ == "__main__":
    main()
