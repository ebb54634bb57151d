"""What does the demo's whole-image critic D_x say about fat? Real, translated and edited CT.

The demo's CT translations keep the bright subcutaneous fat of their MR input
(docs/demo-experiments.md).
This script asks the trained critic of a demo run (its last checkpoint) why nothing pushes the
generator to darken it. On the run's training slices it scores, with both of D_x's heads:

- real CT, real T1w, real T2w, and CT translated from each MR modality (G and its EMA copy);
- real CT with its fat (body voxels of -130 to -60 HU around the phantom's fat at -100 HU, mapped
  through the run's own CT window: -0.85 to -0.5 in the demo's) painted at soft-tissue level
  (+0.08 in [-1, 1], what the demo's model puts there), and brighter still (+0.5).

Per group it prints the mean real/fake score (the src head's patch map averaged over each slice;
higher is "more real" in the WGAN sense) and the classification head's probability of real CT
(softmax over its 2n classes). If painting the fat bright barely moves either, the adversarial
and the classification terms give the generator no reason to make fat dark.

    targan demo --out /tmp/demo && python bench/demo_critic.py /tmp/demo

Takes a few seconds on 2 CPU cores; docs/demo-experiments.md records the figures (on the phantoms
before 2026-12-06), docs/demo.md those of today's default run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from targan_cli.config import ModelConfig
from targan_cli.core.training import TarGAN, TrainConfig
from targan_cli.core.intensity import normalize
from targan_cli.data.dataset import load_slices, open_data_dir
from targan_cli.workflows.demo import DATA, RUN
from targan_cli.workflows.train import CHECKPOINTS, LAST_CHECKPOINT, load_checkpoint

FAT_HU = (-130.0, -60.0)  # around the phantom's CT fat (-100 HU, noise 8-16 HU)
PAINTED = (0.08, 0.5)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("demo", type=Path, help="a folder `targan demo` wrote")
    parser.add_argument("--run", type=Path, help="another run on the demo's phantoms (default: DEMO/run)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    run = args.run or args.demo / RUN
    state = load_checkpoint(run / CHECKPOINTS / LAST_CHECKPOINT)
    model = TarGAN(ModelConfig.from_dict(state["settings"]["model"]),
                   TrainConfig.from_dict(state["settings"]["train"]))
    model.load_state_dict(state["trainer"]["model"])
    model.eval()
    slices = load_slices(open_data_dir(args.demo / DATA), "train", model.model_config.image_size)
    names = [modality.name for modality in slices.modalities]
    ct = names.index("ct")
    images = torch.from_numpy(np.array(slices.images)).unsqueeze(1)
    bodies = torch.from_numpy(np.array(slices.bodies)).unsqueeze(1).bool()
    modality = torch.from_numpy(np.array(slices.modality))
    print(f"run {run} at step {state['step']}; D_x on the training slices")
    print(f"{'slices':44s} {'n':>4s}  {'real/fake score':>16s}  {'P(real CT)':>10s}")

    def show(label: str, x: torch.Tensor) -> None:
        with torch.no_grad():
            critique = model.disc_x(x)
        score = critique.src.mean((1, 2, 3))
        probability = torch.softmax(critique.cls, 1)[:, ct]
        print(f"{label:44s} {len(x):4d}  {score.mean():+8.3f} (sd {score.std():.3f})  {probability.mean():10.3f}")

    real_ct = images[modality == ct]
    show("real CT", real_ct)
    for index, name in enumerate(names):
        if index == ct:
            continue
        source = images[modality == index]
        show(f"real {name}", source)
        target = torch.full((len(source),), ct)
        with torch.no_grad():
            show(f"CT translated from {name} (G)", model.generator(source, target))
            show(f"CT translated from {name} (EMA G)", model.ema_generator(source, target))
    low, high = normalize(np.array(FAT_HU), slices.modalities[ct].intensity)
    body = bodies[modality == ct]
    fat = body & (real_ct > float(low)) & (real_ct < float(high))
    print(f"fat: {float(fat.sum() / body.sum()):.1%} of the CT body")
    for level in PAINTED:
        show(f"real CT, fat painted at {level:+.2f}", torch.where(fat, torch.tensor(level), real_ct))


if __name__ == "__main__":
    main()
