"""Mutation check of the training objective: does a one-line change to a label, target, mask,
detach, input or skip connection in the objective or in D/S make a test fail?

Each mutation replaces one line fragment in a copy of ``src/`` (the working tree is not touched),
then runs the tests of the objective against the copy (``PYTHONPATH`` points at it) and prints
CAUGHT (a test failed) or MISSED. Run it from the repository root:

    python bench/mutate.py            # every mutation, about 10 minutes on 2 cores
    python bench/mutate.py -k cross   # those whose name contains "cross"
    python bench/mutate.py --list
    python bench/mutate.py --tests tests/test_objective.py   # what one test file catches alone

Exit status 1 when a mutation is missed (or does not apply: the source moved on).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OBJECTIVE_TESTS = ["tests/test_objective.py", "tests/test_golden_training.py", "tests/test_losses.py",
                   "tests/test_training.py"]
NETWORK_TESTS = ["tests/test_golden_training.py", "tests/test_networks.py", "tests/test_official.py"]

LOSSES = "src/targan_cli/core/losses.py"
TRAINING = "src/targan_cli/core/training.py"
NETWORKS = "src/targan_cli/core/networks.py"

# (name, file, old fragment (exactly once in the file), new fragment, tests)
MUTATIONS: list[tuple[str, str, str, str, list[str]]] = [
    # labels
    ("real label at n + s", LOSSES, "F.one_hot(modality.long(), 2 * num_modalities)",
     "F.one_hot(modality.long() + num_modalities, 2 * num_modalities)", OBJECTIVE_TESTS),
    ("fake label at s", LOSSES, "F.one_hot(source.long() + num_modalities, 2 * num_modalities)",
     "F.one_hot(source.long(), 2 * num_modalities)", OBJECTIVE_TESTS),
    ("D real term labelled fake", TRAINING, "classification_loss(real.cls, real_labels(sources, n))",
     "classification_loss(real.cls, fake_labels(sources, n))", OBJECTIVE_TESTS),
    ("D fake term labelled real", TRAINING, "classification_loss(fake.cls, fake_labels(sources, n))",
     "classification_loss(fake.cls, real_labels(sources, n))", OBJECTIVE_TESTS),
    ("G x class target = source", TRAINING, "classification_loss(critique_x.cls, real_labels(targets, n))",
     "classification_loss(critique_x.cls, real_labels(sources, n))", OBJECTIVE_TESTS),
    ("G x class target = fake label", TRAINING, "classification_loss(critique_x.cls, real_labels(targets, n))",
     "classification_loss(critique_x.cls, fake_labels(targets, n))", OBJECTIVE_TESTS),
    ("G r class target = source", TRAINING, "real_labels(targets[has_organ], n)",
     "real_labels(sources[has_organ], n)", OBJECTIVE_TESTS),
    # targets and inputs
    ("targets = sources", TRAINING, "targets = sources[permutation.to(self.device)]", "targets = sources",
     OBJECTIVE_TESTS),
    ("cycle back to the target", TRAINING, "x_rec, r_rec = self._generator(x_t, sources, r_t)",
     "x_rec, r_rec = self._generator(x_t, targets, r_t)", OBJECTIVE_TESTS),
    ("cycle of x against x_t", TRAINING, '"g_x_rec": cycle_loss(x_s, x_rec)', '"g_x_rec": cycle_loss(x_t, x_rec)',
     OBJECTIVE_TESTS),
    ("cycle of r against x_s", TRAINING, 'terms["g_r_rec"] = cycle_loss(r_s, r_rec)',
     'terms["g_r_rec"] = cycle_loss(x_s, r_rec)', OBJECTIVE_TESTS),
    ("D_x real and fake swapped", TRAINING, 'critic_pass(model.disc_x, x_s, x_t.detach(), alpha, sources, "d_x")',
     'critic_pass(model.disc_x, x_t.detach(), x_s, alpha, sources, "d_x")', OBJECTIVE_TESTS),
    ("D_r real = whole image", TRAINING, "critic_pass(model.disc_r, r_s[has_organ], r_t.detach()",
     "critic_pass(model.disc_r, x_s[has_organ], r_t.detach()", OBJECTIVE_TESTS),
    ("D_r mixing weight 1 - a", TRAINING, "alpha[has_organ], sources[has_organ], \"d_r\")",
     "1 - alpha[has_organ], sources[has_organ], \"d_r\")", OBJECTIVE_TESTS),
    ("G adversarial r through D_x", TRAINING, "                critique_r = model.disc_r(r_t[has_organ])",
     "                critique_r = model.disc_x(r_t[has_organ])", OBJECTIVE_TESTS),
    ("reference step: G adversarial r through D_x", TRAINING, "\n        critique_r = model.disc_r(r_t[has_organ])",
     "\n        critique_r = model.disc_x(r_t[has_organ])", OBJECTIVE_TESTS),
    ("reference step: shape r of x_t", TRAINING, "shape_r = model.shape(r_t) if", "shape_r = model.shape(x_t) if",
     OBJECTIVE_TESTS),
    ("interpolate fake-heavy", LOSSES, "(a * real + (1 - a) * fake)", "(a * fake + (1 - a) * real)",
     OBJECTIVE_TESTS),
    ("critic sign", LOSSES, "return fake_scores.mean() - real_scores.mean()",
     "return real_scores.mean() - fake_scores.mean()", OBJECTIVE_TESTS),
    ("generator adversarial sign", LOSSES, "return -fake_scores.mean()", "return fake_scores.mean()",
     OBJECTIVE_TESTS),
    ("BCE divided by outputs", LOSSES, 'reduction="sum") / logits.shape[0]', 'reduction="sum") / logits.numel()',
     OBJECTIVE_TESTS),
    ("GP one-sided", LOSSES, "return ((gradient.norm(2, dim=1) - 1) ** 2).mean()",
     "return ((gradient.norm(2, dim=1) - 1).clamp(min=0) ** 2).mean()", OBJECTIVE_TESTS),
    ("GP not differentiable", LOSSES, "interpolated, create_graph=True)", "interpolated, create_graph=False)",
     OBJECTIVE_TESTS),
    ("to01 unclamped", LOSSES, "return ((image + 1) / 2).clamp(0, 1)", "return (image + 1) / 2", OBJECTIVE_TESTS),
    # masks
    ("shape x against the organ", TRAINING, 'shape_loss(shape_x, b_x)', 'shape_loss(shape_x, y)', OBJECTIVE_TESTS),
    ("shape r against the body", TRAINING, 'shape_loss(shape_r, y)', 'shape_loss(shape_r, b_x)', OBJECTIVE_TESTS),
    ("crossing with the body mask", TRAINING, "crossing_loss(x_t, r_t, y)", "crossing_loss(x_t, r_t, b_x)",
     OBJECTIVE_TESTS),
    ("crossing without the mask", LOSSES, "to01(widened(image)) * mask - to01(widened(area))",
     "to01(widened(image)) - to01(widened(area))", OBJECTIVE_TESTS),
    ("target area from the body", TRAINING, "r_s = target_area(x_s, y)", "r_s = target_area(x_s, b_x)",
     OBJECTIVE_TESTS),
    ("target area background 0", LOSSES, "return to_pm1(mask * to01(image))", "return mask * image",
     OBJECTIVE_TESTS),
    ("organ filter by the body", TRAINING, "has_organ = y.flatten(1).amax(dim=1) > 0",
     "has_organ = b_x.flatten(1).amax(dim=1) > 0", OBJECTIVE_TESTS),
    ("official mask threshold 0", TRAINING, "b_x = (x_s > -1).to(self.dtype)", "b_x = (x_s > 0).to(self.dtype)",
     OBJECTIVE_TESTS),
    ("flip rows, not columns", TRAINING, "return torch.where(flip, tensor.flip(-1), tensor)",
     "return torch.where(flip, tensor.flip(-2), tensor)", OBJECTIVE_TESTS),
    # detaches
    ("cycle input detached", TRAINING, "x_rec, r_rec = self._generator(x_t, sources, r_t)",
     "x_rec, r_rec = self._generator(x_t.detach(), sources, r_t.detach())", OBJECTIVE_TESTS),
    ("G adversarial x detached", TRAINING, "                critique_x = model.disc_x(x_t)",
     "                critique_x = model.disc_x(x_t.detach())", OBJECTIVE_TESTS),
    ("shape input detached", TRAINING, "shapes = self._shape(torch.cat([x_t, r_t]) if use_target else x_t)",
     "shapes = self._shape((torch.cat([x_t, r_t]) if use_target else x_t).detach())", OBJECTIVE_TESTS),
    ("crossing r_t detached", TRAINING, "crossing_loss(x_t, r_t, y)", "crossing_loss(x_t, r_t.detach(), y)",
     OBJECTIVE_TESTS),
    # weights, optimizers, EMA
    ("untraceable weight = rcls", TRAINING, 'c.lambda_u * terms[f"{prefix}_cls_fake"]',
     'c.lambda_rcls * terms[f"{prefix}_cls_fake"]', OBJECTIVE_TESTS),
    ("G class weight = rec", TRAINING, 'c.lambda_fcls * terms["g_x_cls"]', 'c.lambda_rec * terms["g_x_cls"]',
     OBJECTIVE_TESTS),
    ("D learning rate of G", TRAINING, '"disc_x": (model.disc_x, config.lr_d)', '"disc_x": (model.disc_x, config.lr_g)',
     OBJECTIVE_TESTS),
    ("S learning rate of D", TRAINING, '"shape": (model.shape, config.lr_g)', '"shape": (model.shape, config.lr_d)',
     OBJECTIVE_TESTS),
    ("D_r not stepped", TRAINING, 'self._step_optimizers(["disc_x", "disc_r"] if use_target else ["disc_x"], scaler_d,',
     'self._step_optimizers(["disc_x"], scaler_d,', OBJECTIVE_TESTS),
    ("no EMA update in train_step", TRAINING,
     "model.ema.update_parameters(model.generator)\n        return _detached(losses)\n\n    def reference_step",
     "return _detached(losses)\n\n    def reference_step", OBJECTIVE_TESTS),
    ("reference step: D fakes to the sources", TRAINING, "x_t, r_t = translate(x_s, targets, r_s)\n\n        def",
     "x_t, r_t = translate(x_s, sources, r_s)\n\n        def", OBJECTIVE_TESTS),
    # D and S (and G's skips)
    ("skip: second half of the channels", NETWORKS, "skip = features[:, : features.shape[1] // 2]",
     "skip = features[:, features.shape[1] - features.shape[1] // 2:]", NETWORK_TESTS),
    ("S skip after the upsampled path", NETWORKS, "x = block(torch.cat([skip, upsample(x)], dim=1))",
     "x = block(torch.cat([upsample(x), skip], dim=1))", NETWORK_TESTS),
    ("S average pooling", NETWORKS, "x = block(x if level == 0 else F.max_pool2d(x, 2))",
     "x = block(x if level == 0 else F.avg_pool2d(x, 2))", NETWORK_TESTS),
    ("S without sigmoid", NETWORKS, "return torch.sigmoid(logits) if self.sigmoid else logits", "return logits",
     NETWORK_TESTS),
    ("D ReLU", NETWORKS, "                       nn.LeakyReLU(NEGATIVE_SLOPE)]",
     "                       nn.ReLU()]", NETWORK_TESTS),
    ("D class logits reversed", NETWORKS, "self.cls(features).flatten(1))", "self.cls(features).flatten(1).flip(1))",
     NETWORK_TESTS),
    ("decoder skip first", NETWORKS, "x = block(torch.cat([x, skip], dim=1))\n        x = torch.cat([x, deepest_first[-1]], dim=1)",
     "x = block(torch.cat([skip, x], dim=1))\n        x = torch.cat([x, deepest_first[-1]], dim=1)", NETWORK_TESTS),
    ("shared block skip first", NETWORKS, "x = block(torch.cat([x, skip], dim=1))\n        return x  # (N, C_enc",
     "x = block(torch.cat([skip, x], dim=1))\n        return x  # (N, C_enc", NETWORK_TESTS),
    ("target stream reads the image", NETWORKS, "self.encoder_r(self._with_label(area, onehot))",
     "self.encoder_r(self._with_label(x, onehot))", NETWORK_TESTS),
]


def apply(tree: Path, path: str, old: str, new: str) -> bool:
    file = tree / path
    text = file.read_text()
    if text.count(old) != 1:
        return False
    file.write_text(text.replace(old, new))
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", default="", help="run only the mutations whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--tests", nargs="+", default=None,
                        help="run these test files for every mutation instead of each mutation's own")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if args.k.lower() in m[0].lower()]
    if args.list:
        for name, path, *_ in chosen:
            print(f"{name}  ({path})")
        return 0
    caught = 0
    problems = []
    with tempfile.TemporaryDirectory(prefix="targan-mutate-") as folder:
        for index, (name, path, old, new, tests) in enumerate(chosen, 1):
            tree = Path(folder) / f"m{index}"
            shutil.copytree(ROOT / "src", tree / "src")
            if not apply(tree, path, old, new):
                print(f"[{index:2}/{len(chosen)}] DOES NOT APPLY  {name}", flush=True)
                problems.append(name)
                continue
            env = {**os.environ, "PYTHONPATH": str(tree / "src"), "PYTHONDONTWRITEBYTECODE": "1"}
            start = time.monotonic()
            result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:xdist", "-p", "no:cacheprovider",
                                     "-x", "-q", *(args.tests or tests)], cwd=ROOT, env=env, capture_output=True, text=True)
            seconds = time.monotonic() - start
            failed = [line.split(" - ")[0].removeprefix("FAILED ") for line in result.stdout.splitlines()
                      if line.startswith(("FAILED", "ERROR"))]
            if result.returncode != 0:
                caught += 1
                print(f"[{index:2}/{len(chosen)}] CAUGHT  {name}  ({seconds:.0f} s; {failed[0] if failed else 'error'})",
                      flush=True)
            else:
                problems.append(name)
                print(f"[{index:2}/{len(chosen)}] MISSED  {name}  ({seconds:.0f} s)", flush=True)
            shutil.rmtree(tree)
    print(f"\ncaught {caught} of {len(chosen)} mutations")
    if problems:
        print("missed or not applied: " + "; ".join(problems))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
