"""Helpers of the objective tests: deterministic weights by a written rule, and the gradients each
optimizer steps on, read by a hook on the optimizer (nothing in the training step is changed)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def rule_weights(parameters: Iterable[tuple[str, tuple[int, ...]]], seed: int,
                 dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Weights for (name, shape) pairs in the given order, by the rule of tests/data/README.md:
    one torch.Generator seeded ``seed``, ``randn`` per tensor, scaled by sqrt(2 / fan-in) for
    convolution kernels, 1 + 0.1 randn for norm weights, 0.1 randn for biases."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in parameters:
        values = torch.randn(tuple(shape), generator=generator, dtype=dtype)
        if len(shape) == 1:
            values = 1 + 0.1 * values if name.endswith("weight") else 0.1 * values
        else:
            values = values * (2.0 / (shape[1] * shape[2] * shape[3])) ** 0.5
        state[name] = values
    return state


class GradientLog:
    """The gradients each of a Trainer's optimizers steps on, step by step: ``grads[name][k]`` maps
    the parameter names of the network ``name`` ("generator", "disc_x", "disc_r", "shape": the
    optimizers' names are the networks' attribute names) to their gradients (zeros for a parameter
    without one). Recorded by ``register_step_pre_hook``: nothing in the step is changed."""

    def __init__(self, trainer):
        self.grads: dict[str, list[dict[str, torch.Tensor]]] = {name: [] for name in trainer.optimizers}
        for name, optimizer in trainer.optimizers.items():
            names = {id(p): key for key, p in getattr(trainer.model, name).named_parameters()}
            optimizer.register_step_pre_hook(lambda opt, args, kwargs, name=name, names=names: self.grads[name].append(
                {names[id(p)]: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
                 for group in opt.param_groups for p in group["params"]}))
