"""The TarGAN training step: networks, optimizers, EMA, mixed precision and gradient averaging.

``Trainer.train_step`` runs G once per step and uses its detached outputs for the discriminator
step and its attached outputs, through the updated discriminators, for the generator step: G does
not change in between, so this is METHOD.md's maths with one G forward fewer than the official
code. ``Trainer.reference_step`` follows METHOD.md literally (G evaluated twice, separate
discriminator calls, fp32, default memory format); a test holds the two to the same losses.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from targan_cli.config import ModelConfig
from targan_cli.core.device import autocast, memory_format
from targan_cli.core.losses import (classification_loss, critic_loss, crossing_loss, cycle_loss,
                                    fake_labels, generator_adversarial_loss, gradient_penalty,
                                    interpolate, real_labels, shape_loss, target_area, widened)
from targan_cli.core.networks import Critique, Discriminator, Generator, ShapeController, use_fast_forms

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
"""(images (N, 1, H, W) in [-1, 1], organ masks (N, 1, H, W), body masks (N, 1, H, W), modalities (N,))."""


@dataclass(frozen=True)
class TrainConfig:
    """Loss weights, optimizer settings and ablation switches; the defaults are the paper's."""

    lambda_gp: float = 10.0  # gradient penalty
    lambda_rcls: float = 1.0  # D: classification of real images
    lambda_fcls: float = 1.0  # G: classification of translated images as their target
    lambda_rec: float = 1.0  # cycle reconstruction
    lambda_cross: float = 50.0  # crossing loss
    lambda_u: float = 0.01  # D: the untraceable constraint (fakes classified by their source)
    lambda_shape: float = 1.0  # shape-controller loss
    lr_g: float = 1e-4  # G and S
    lr_d: float = 3e-4  # D_x and D_r (TTUR)
    betas: tuple[float, float] = (0.5, 0.9)
    ema_decay: float = 0.999
    flip_probability: float = 0.5
    # The official body mask, every pixel above the background (x > -1), instead of the given one
    # (the DATA cache's: threshold, speckle removed, holes filled); docs/train.md says why.
    official_body_mask: bool = False
    use_shape_controller: bool = True
    use_target_stream: bool = True
    use_crossing_loss: bool = True

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name.startswith("lambda_") and not 0 <= value < math.inf:
                raise ValueError(f"{field.name} must be finite and >= 0, got {value}")
        if not (0 < self.lr_g < math.inf and 0 < self.lr_d < math.inf):
            raise ValueError(f"learning rates must be positive and finite, got lr_g={self.lr_g}, lr_d={self.lr_d}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 <= self.flip_probability <= 1:
            raise ValueError(f"flip_probability must be in [0, 1], got {self.flip_probability}")
        object.__setattr__(self, "betas", tuple(float(beta) for beta in self.betas))

    @property
    def crossing(self) -> bool:
        """The crossing loss needs the target stream."""
        return self.use_crossing_loss and self.use_target_stream

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"train config has unknown field(s) {', '.join(unknown)}")
        return cls(**data)


class TarGAN(nn.Module):
    """Every network of one training run: G, D_x, D_r, S and the EMA copy of G.

    ``disc_r`` is None without the target stream, ``shape`` None without the shape controller.
    """

    def __init__(self, model_config: ModelConfig, train_config: TrainConfig):
        super().__init__()
        self.model_config = model_config
        self.generator = Generator(model_config)
        self.disc_x = Discriminator(model_config)
        self.disc_r = Discriminator(model_config) if train_config.use_target_stream else None
        self.shape = ShapeController.from_config(model_config) if train_config.use_shape_controller else None
        self.ema = AveragedModel(self.generator, multi_avg_fn=get_ema_multi_avg_fn(train_config.ema_decay))
        # The first update copies G; later ones are ema = decay * ema + (1 - decay) * G, so the EMA
        # starts from G's initial weights, as in the official code.
        self.ema.update_parameters(self.generator)
        self.ema.requires_grad_(False)

    @property
    def ema_generator(self) -> Generator:
        return self.ema.module

    def discriminators(self) -> list[Discriminator]:
        return [d for d in (self.disc_x, self.disc_r) if d is not None]


class StepDraws(NamedTuple):
    """A training step's random choices: which samples flip, the permutation of the sources that
    gives the targets, and the gradient penalty's mixing weights (each (N,))."""

    flip: torch.Tensor
    permutation: torch.Tensor
    alpha: torch.Tensor

    @classmethod
    def draw(cls, count: int, generator: torch.Generator, flip_probability: float) -> StepDraws:
        """Drawn from ``generator`` in this order: flips, permutation, mixing weights."""
        flip = torch.rand(count, generator=generator) < flip_probability
        permutation = torch.randperm(count, generator=generator)
        return cls(flip, permutation, torch.rand(count, generator=generator))


def derived_generator(*keys: int) -> torch.Generator:
    """A CPU torch.Generator seeded from integers (e.g. seed, rank, step) via numpy's SeedSequence.

    The key count leads the entropy, so that (a, b) and (a, b, 0) give different streams.
    """
    seed = int(np.random.SeedSequence([len(keys), *(int(key) for key in keys)]).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def _adam(parameters: Iterable[nn.Parameter], lr: float, betas: tuple[float, float],
          device: torch.device, fused: bool) -> torch.optim.Adam:
    """Adam; ``fused``: one kernel over all parameters on the CPU and CUDA (on the CPU it runs 2.5x
    faster than the per-tensor loop: one pass over the ~125 M parameters of a paper-preset run
    instead of one per operation), multi-tensor elsewhere; else torch's default implementation."""
    if not fused:
        return torch.optim.Adam(parameters, lr=lr, betas=betas)
    fast = {"fused": True} if device.type in ("cpu", "cuda") else {"foreach": True}
    return torch.optim.Adam(parameters, lr=lr, betas=betas, **fast)


def average_gradients(modules: Iterable[nn.Module]) -> None:
    """All-reduce (mean) the gradients of ``modules`` across processes, in one flat buffer.

    A parameter without a gradient on some rank contributes zeros, so every rank reduces the same
    tensors and ends with the same gradients.
    """
    parameters = [p for module in modules for p in module.parameters() if p.requires_grad]
    if not parameters:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for parameter, chunk in zip(parameters, flat.split([p.numel() for p in parameters])):
        if parameter.grad is None:
            parameter.grad = torch.empty_like(parameter)  # keeps the parameter's memory format
        parameter.grad.copy_(chunk.view(parameter.shape))


def _detached(terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: value.detach() for name, value in terms.items()}


class Trainer:
    """Optimizers and the two training steps for a ``TarGAN`` bundle on one device.

    ``precision`` is an autocast dtype (None: fp32); fp16 uses a GradScaler per backward pass.
    ``fused_optimizers=False`` uses torch.optim.Adam's default implementation, as the official
    code does (the benchmark's literal reference).
    Under an initialised torch.distributed process group the gradients are averaged across ranks
    before every optimizer step (the discriminator step's double backward rules out the
    DistributedDataParallel wrapper).
    """

    def __init__(self, model: TarGAN, config: TrainConfig, device: torch.device,
                 precision: torch.dtype | None = None, channels_last: bool | None = None,
                 compile: bool = False, fused_optimizers: bool = True):
        self.config = config
        self.device = device
        self.precision = precision
        self.memory_format = memory_format(device) if channels_last is None else (
            torch.channels_last if channels_last else torch.contiguous_format)
        self.model = model.to(device, memory_format=self.memory_format)
        self.dtype = next(model.generator.parameters()).dtype  # of the batches: float32, or float64 in tests
        self.num_modalities = model.model_config.num_modalities
        self.distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        networks = {"generator": (model.generator, config.lr_g), "disc_x": (model.disc_x, config.lr_d),
                    "disc_r": (model.disc_r, config.lr_d), "shape": (model.shape, config.lr_g)}
        self.optimizers: dict[str, torch.optim.Optimizer] = {
            name: _adam(network.parameters(), lr, config.betas, device, fused_optimizers)
            for name, (network, lr) in networks.items() if network is not None}
        fp16 = precision == torch.float16
        self.scalers = {name: torch.amp.GradScaler(device.type, enabled=fp16) for name in ("disc", "gen")}
        # Compiled forwards share the parameters; the discriminators stay eager (the gradient
        # penalty's double backward is not supported by torch.compile).
        self._generator: Callable[..., Any] = torch.compile(model.generator) if compile else model.generator
        self._shape: Callable[..., Any] | None = (
            torch.compile(model.shape) if compile and model.shape is not None else model.shape)

    @classmethod
    def literal(cls, model: TarGAN, config: TrainConfig, device: torch.device) -> Trainer:
        """The trainer of ``reference_step`` as the benchmark runs it: METHOD.md as written, the way
        the official code runs it (fp32, default memory format, torch.optim.Adam's default
        implementation, every up block as upsampling then a 3x3 conv, torch's instance norm, every
        discriminator conv over all its taps)."""
        use_fast_forms(model, False)
        return cls(model, config, device, precision=None, channels_last=False, fused_optimizers=False)

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(),
                "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
                "scalers": {name: scaler.state_dict() for name, scaler in self.scalers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"], strict=True)
        if set(state["optimizers"]) != set(self.optimizers):
            raise ValueError(f"checkpoint optimizers {sorted(state['optimizers'])} do not match "
                             f"{sorted(self.optimizers)}")
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        for name, scaler in self.scalers.items():
            if scaler.is_enabled() and state["scalers"].get(name):
                scaler.load_state_dict(state["scalers"][name])

    def broadcast_state(self) -> None:
        """Copy rank 0's weights to every rank (identical starting points under DDP)."""
        if self.distributed:
            for tensor in self.model.state_dict().values():
                dist.broadcast(tensor, src=0)

    # -- shared pieces of both steps ------------------------------------------------------------

    def _prepare(self, batch: Batch, randomness: torch.Generator | StepDraws) -> tuple[torch.Tensor, ...]:
        """Move to the device, flip horizontally per sample, draw targets and GP mixing weights.

        The random draws come from ``randomness`` (``StepDraws.draw``) in both steps, so that the
        same generator state gives the same step; a ``StepDraws`` gives them explicitly.
        """
        images, masks, bodies, sources = batch
        draws = randomness if isinstance(randomness, StepDraws) else StepDraws.draw(
            images.shape[0], randomness, self.config.flip_probability)
        flip, permutation, alpha = draws
        flip = flip.to(self.device).view(-1, 1, 1, 1)

        def place(tensor: torch.Tensor) -> torch.Tensor:
            tensor = tensor.to(self.device, self.dtype, non_blocking=True)
            return torch.where(flip, tensor.flip(-1), tensor)  # (N, 1, H, W)

        x_s, y, b_x = (place(t) for t in (images, masks, bodies))
        if self.config.official_body_mask:
            b_x = (x_s > -1).to(self.dtype)  # the official mask: every pixel above the background
        sources = sources.to(self.device, torch.long)
        targets = sources[permutation.to(self.device)]
        r_s = target_area(x_s, y)
        has_organ = y.flatten(1).amax(dim=1) > 0  # (N,) samples whose organ mask is not empty
        return x_s, y, b_x, r_s, sources, targets, alpha.to(self.device), has_organ

    def _discriminator_terms(self, real: Critique, fake: Critique, penalty: torch.Tensor,
                             sources: torch.Tensor, prefix: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = self.num_modalities
        terms = {
            f"{prefix}_adv": critic_loss(widened(real.src), widened(fake.src)),
            f"{prefix}_cls_real": classification_loss(real.cls, real_labels(sources, n)),
            f"{prefix}_cls_fake": classification_loss(fake.cls, fake_labels(sources, n)),
            f"{prefix}_gp": penalty,
        }
        c = self.config
        total = (terms[f"{prefix}_adv"] + c.lambda_rcls * terms[f"{prefix}_cls_real"]
                 + c.lambda_u * terms[f"{prefix}_cls_fake"] + c.lambda_gp * terms[f"{prefix}_gp"])
        return total, terms

    def _generator_terms(self, *, x_s: torch.Tensor, y: torch.Tensor, b_x: torch.Tensor, r_s: torch.Tensor,
                         sources: torch.Tensor, targets: torch.Tensor, has_organ: torch.Tensor,
                         x_t: torch.Tensor, r_t: torch.Tensor | None, x_rec: torch.Tensor,
                         r_rec: torch.Tensor | None, critique_x: Critique, critique_r: Critique | None,
                         shape_x: torch.Tensor | None, shape_r: torch.Tensor | None,
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Every generator term (unweighted) and the weighted total; None marks an absent stream."""
        c, n = self.config, self.num_modalities
        terms = {"g_x_adv": generator_adversarial_loss(widened(critique_x.src)),
                 "g_x_cls": classification_loss(critique_x.cls, real_labels(targets, n)),
                 "g_x_rec": cycle_loss(x_s, x_rec)}
        total = terms["g_x_adv"] + c.lambda_fcls * terms["g_x_cls"] + c.lambda_rec * terms["g_x_rec"]
        if critique_r is not None:
            terms["g_r_adv"] = generator_adversarial_loss(widened(critique_r.src))
            terms["g_r_cls"] = classification_loss(critique_r.cls, real_labels(targets[has_organ], n))
            total = total + terms["g_r_adv"] + c.lambda_fcls * terms["g_r_cls"]
        if r_rec is not None:
            terms["g_r_rec"] = cycle_loss(r_s, r_rec)
            total = total + c.lambda_rec * terms["g_r_rec"]
        if shape_x is not None:
            terms["g_shape_x"] = shape_loss(shape_x, b_x)
            total = total + c.lambda_shape * terms["g_shape_x"]
        if shape_r is not None:
            terms["g_shape_r"] = shape_loss(shape_r, y)
            total = total + c.lambda_shape * terms["g_shape_r"]
        if c.crossing:
            terms["g_cross"] = crossing_loss(x_t, r_t, y)
            total = total + c.lambda_cross * terms["g_cross"]
        return total, terms

    def _step_optimizers(self, names: Iterable[str], scaler: torch.amp.GradScaler,
                         modules: list[nn.Module]) -> None:
        if self.distributed:
            average_gradients(modules)
        for name in names:
            optimizer = self.optimizers[name]
            # A network without gradients this step (D_r when no sample shows the organ) is not
            # stepped, so that its Adam moments do not decay on an absent loss.
            if any(p.grad is not None for group in optimizer.param_groups for p in group["params"]):
                scaler.step(optimizer)
        scaler.update()

    def _zero_grad(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)

    def _penalty_scale(self, scaler: torch.amp.GradScaler) -> float:
        return scaler.get_scale() if scaler.is_enabled() else 1.0

    # -- the steps ------------------------------------------------------------------------------

    def train_step(self, batch: Batch, generator: torch.Generator | StepDraws) -> dict[str, torch.Tensor]:
        """One D step and one G step; returns every loss term as a detached 0-d tensor.

        Terms on the target stream are absent when no sample of the batch shows the organ.
        """
        model, config = self.model, self.config
        x_s, y, b_x, r_s, sources, targets, alpha, has_organ = self._prepare(batch, generator)
        x_s, r_s = (t.contiguous(memory_format=self.memory_format) for t in (x_s, r_s))
        use_target = config.use_target_stream
        organ_any = use_target and bool(has_organ.any())
        count = x_s.shape[0]

        with autocast(self.device, self.precision):
            if use_target:
                x_t, r_t = self._generator(x_s, targets, r_s)
            else:
                x_t, r_t = self._generator(x_s, targets), None

        # Discriminator step on the detached fakes: one forward over [real, fake, interpolated].
        self._zero_grad()
        scaler_d = self.scalers["disc"]
        losses: dict[str, torch.Tensor] = {}

        def critic_pass(disc: Discriminator, real: torch.Tensor, fake: torch.Tensor, mix: torch.Tensor,
                        labels: torch.Tensor, prefix: str) -> torch.Tensor:
            x_hat = interpolate(real, fake, mix)
            with autocast(self.device, self.precision):
                critique = disc(torch.cat([real, fake, x_hat]))
            real_c, fake_c, hat_c = (Critique(src, cls) for src, cls in
                                     zip(critique.src.split(real.shape[0]), critique.cls.split(real.shape[0])))
            penalty = gradient_penalty(hat_c.src, x_hat, self._penalty_scale(scaler_d))
            total, terms = self._discriminator_terms(real_c, fake_c, penalty, labels, prefix)
            losses.update(terms)
            return total

        d_loss = critic_pass(model.disc_x, x_s, x_t.detach(), alpha, sources, "d_x")
        if organ_any:
            d_loss = d_loss + critic_pass(model.disc_r, r_s[has_organ], r_t.detach()[has_organ],
                                          alpha[has_organ], sources[has_organ], "d_r")
        losses["d_total"] = d_loss
        scaler_d.scale(d_loss).backward()
        self._step_optimizers(["disc_x", "disc_r"] if use_target else ["disc_x"], scaler_d,
                              model.discriminators())

        # Generator step through the updated discriminators (their parameters need no gradient).
        self._zero_grad()
        for disc in model.discriminators():
            disc.requires_grad_(False)
        try:
            with autocast(self.device, self.precision):
                critique_x = model.disc_x(x_t)
                critique_r = model.disc_r(r_t[has_organ]) if organ_any else None
                if use_target:
                    x_rec, r_rec = self._generator(x_t, sources, r_t)
                else:
                    x_rec, r_rec = self._generator(x_t, sources), None
                shape_x = shape_r = None
                if self._shape is not None:
                    shapes = self._shape(torch.cat([x_t, r_t]) if use_target else x_t)
                    shape_x, shape_r = (shapes[:count], shapes[count:]) if use_target else (shapes, None)
            g_loss, terms = self._generator_terms(
                x_s=x_s, y=y, b_x=b_x, r_s=r_s, sources=sources, targets=targets, has_organ=has_organ,
                x_t=x_t, r_t=r_t, x_rec=x_rec, r_rec=r_rec, critique_x=critique_x, critique_r=critique_r,
                shape_x=shape_x, shape_r=shape_r)
            losses.update(terms)
            losses["g_total"] = g_loss
            scaler_g = self.scalers["gen"]
            scaler_g.scale(g_loss).backward()
        finally:
            for disc in model.discriminators():
                disc.requires_grad_(True)
        self._step_optimizers([name for name in ("generator", "shape") if name in self.optimizers], scaler_g,
                              [m for m in (model.generator, model.shape) if m is not None])
        model.ema.update_parameters(model.generator)
        return _detached(losses)

    def reference_step(self, batch: Batch, generator: torch.Generator | StepDraws) -> dict[str, torch.Tensor]:
        """METHOD.md literally: fakes for D from a no-grad G pass, G run again for its own step,
        one discriminator call per input, fp32, default memory format. Same losses as train_step."""
        if self.precision is not None:
            raise ValueError("reference_step runs in fp32: build the Trainer with precision=None")
        model, config = self.model, self.config
        x_s, y, b_x, r_s, sources, targets, alpha, has_organ = self._prepare(batch, generator)
        use_target = config.use_target_stream
        organ_any = use_target and bool(has_organ.any())
        generator_net = model.generator

        def translate(image: torch.Tensor, target: torch.Tensor, area: torch.Tensor,
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
            return generator_net(image, target, area) if use_target else (generator_net(image, target), None)

        losses: dict[str, torch.Tensor] = {}
        self._zero_grad()
        with torch.no_grad():
            x_t, r_t = translate(x_s, targets, r_s)

        def critic_pass(disc: Discriminator, real: torch.Tensor, fake: torch.Tensor, mix: torch.Tensor,
                        labels: torch.Tensor, prefix: str) -> torch.Tensor:
            x_hat = interpolate(real, fake, mix)
            penalty = gradient_penalty(disc(x_hat).src, x_hat)
            total, terms = self._discriminator_terms(disc(real), disc(fake), penalty, labels, prefix)
            losses.update(terms)
            return total

        d_loss = critic_pass(model.disc_x, x_s, x_t, alpha, sources, "d_x")
        if organ_any:
            d_loss = d_loss + critic_pass(model.disc_r, r_s[has_organ], r_t[has_organ], alpha[has_organ],
                                          sources[has_organ], "d_r")
        losses["d_total"] = d_loss
        d_loss.backward()
        self._step_optimizers(["disc_x", "disc_r"] if use_target else ["disc_x"], self.scalers["disc"],
                              model.discriminators())

        self._zero_grad()
        x_t, r_t = translate(x_s, targets, r_s)
        critique_x = model.disc_x(x_t)
        critique_r = model.disc_r(r_t[has_organ]) if organ_any else None
        x_rec, r_rec = translate(x_t, sources, r_t)
        shape_x = model.shape(x_t) if model.shape is not None else None
        shape_r = model.shape(r_t) if model.shape is not None and use_target else None
        g_loss, terms = self._generator_terms(
            x_s=x_s, y=y, b_x=b_x, r_s=r_s, sources=sources, targets=targets, has_organ=has_organ,
            x_t=x_t, r_t=r_t, x_rec=x_rec, r_rec=r_rec, critique_x=critique_x, critique_r=critique_r,
            shape_x=shape_x, shape_r=shape_r)
        losses.update(terms)
        losses["g_total"] = g_loss
        g_loss.backward()
        self._step_optimizers([name for name in ("generator", "shape") if name in self.optimizers],
                              self.scalers["gen"], [m for m in (model.generator, model.shape) if m is not None])
        model.ema.update_parameters(model.generator)
        return _detached(losses)
