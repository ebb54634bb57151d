"""The TarGAN networks: the two-stream generator, the PatchGAN discriminator, the shape controller.

Every width is derived from ``ModelConfig`` (METHOD.md, "Networks"); the ``paper`` preset is the
official network, parameter for parameter, so that converted official checkpoints load strictly.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from targan_cli.config import ModelConfig

NEGATIVE_SLOPE = 0.01
# Smallest input side at which an up block convolves the four output phases at the input resolution.
PHASE_FORM_MIN_SIZE = 16


class InstanceNorm(nn.InstanceNorm2d):
    """nn.InstanceNorm2d (affine, no running statistics), computed as a group norm with one channel
    per group for inputs in the default layout: the same statistics and parameters, as accurate
    (the tests compare both against float64), and torch's CPU group-norm kernel is 2-2.5x faster
    (52 vs 132 ms on a 16 x 64 x 256 x 256 feature map; its backward too). Inputs in another layout
    (channels_last, as on CUDA) keep instance_norm: the CPU group norm loses precision there
    (measured: 0.12 off for channels of mean 10 and std 0.1)."""

    fast_form = True  # False: instance_norm, as the official network computes it (``use_fast_forms``)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast_form and x.is_contiguous():
            return F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)
        return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)


def _conv_norm_act(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
        InstanceNorm(out_channels, affine=True),
        nn.LeakyReLU(NEGATIVE_SLOPE, inplace=True),
    ]


class DoubleConv(nn.Sequential):
    """[conv3x3 (no bias), InstanceNorm (affine), LeakyReLU(0.01)] twice: METHOD.md's block(a -> b)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(*_conv_norm_act(in_channels, out_channels), *_conv_norm_act(out_channels, out_channels))


class DownBlock(nn.Module):
    """Double conv, then (skip = first half of the channels, output average-pooled 2x2)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.convs = DoubleConv(in_channels, out_channels)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.convs(x)  # (N, C, H, W)
        skip = features[:, : features.shape[1] // 2]  # (N, C/2, H, W): only half the channels skip
        if not torch.is_grad_enabled():
            # A view would keep all of ``features`` alive until the decoder: copy out the half.
            skip = skip.clone()
        return skip, F.avg_pool2d(features, 2)  # (N, C, H/2, W/2)


def phase_kernels(weight: torch.Tensor) -> torch.Tensor:
    """3x3 kernels (O, I, 3, 3) -> the 2x2 kernels (4 O, I, 2, 2) of ``nearest_upsample_conv3x3``.

    Along one axis, output pixel 2i (phase 0) sees input pixels (i-1, i, i) through taps
    (w0, w1, w2), i.e. (i-1, i) through (w0, w1 + w2); pixel 2i + 1 (phase 1) sees (i, i + 1)
    through (w0 + w1, w2). Phases are stacked (row, column) = 00, 01, 10, 11, O channels each.
    """
    w0, w1, w2 = weight.unbind(2)  # rows
    kernels = []
    for rows in (torch.stack([w0, w1 + w2], 2), torch.stack([w0 + w1, w2], 2)):  # (O, I, 2, 3)
        c0, c1, c2 = rows.unbind(3)
        kernels += [torch.stack([c0, c1 + c2], 3), torch.stack([c0 + c1, c2], 3)]
    return torch.cat(kernels)


def nearest_upsample_conv3x3(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """conv3x3(nearest_upsample_x2(x)) with zero padding 1 and no bias, computed at x's resolution.

    Each output phase is a 2x2 convolution of x (``phase_kernels``): 16 instead of 36
    multiply-adds per input pixel and channel pair, equal to the direct form up to rounding.
    One convolution over x padded by 1 yields all four phases on an (H + 1) x (W + 1) grid; phase
    (a, b) is its window at offset (a, b), written to output pixels (2i + a, 2j + b).
    """
    batch, _, height, width = x.shape
    channels = weight.shape[0]
    phases = F.conv2d(x, phase_kernels(weight), padding=1)  # (N, 4 O, H + 1, W + 1)
    channels_last = phases.is_contiguous(memory_format=torch.channels_last) and not phases.is_contiguous()
    out = torch.empty((batch, channels, 2 * height, 2 * width), dtype=phases.dtype, device=phases.device,
                      memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for index, (a, b) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        out[:, :, a::2, b::2] = phases[:, index * channels:(index + 1) * channels, a:a + height, b:b + width]
    return out  # (N, O, 2H, 2W)


class UpBlock(nn.Module):
    """Double conv (in -> out), then nearest upsampling x2 and conv3x3 (out -> out/2) + IN + LeakyReLU.

    From ``PHASE_FORM_MIN_SIZE`` up, the upsampling and the conv run as one
    ``nearest_upsample_conv3x3`` (measured on the CPU: 1.3x to 2x faster, forward and backward);
    below it the extra row and column of its grid cost more than they save. ``up`` keeps the
    official layout, hence the checkpoint keys.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.convs = DoubleConv(in_channels, out_channels)
        self.up = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                *_conv_norm_act(out_channels, out_channels // 2))
        self.fast_form = True  # False: upsample, then conv, as METHOD.md writes it (``use_fast_forms``)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x)
        if not self.fast_form or min(x.shape[-2:]) < PHASE_FORM_MIN_SIZE:
            return self.up(x)
        _, conv, norm, activation = self.up
        return activation(norm(nearest_upsample_conv3x3(x, conv.weight)))


def use_fast_forms(module: nn.Module, enabled: bool) -> nn.Module:
    """Switch every up block, ``InstanceNorm`` and ``LiveTapsConv2d`` in ``module`` to its faster
    equal form (the default) or to the literal form, as METHOD.md writes it and the official code
    runs it: upsample-then-conv up blocks, torch's instance norm, plain convolutions (the
    benchmarks' reference, the FLOP count of the direct form); returns ``module``."""
    for block in module.modules():
        if isinstance(block, (UpBlock, InstanceNorm, LiveTapsConv2d)):
            block.fast_form = enabled
    return module


class Encoder(nn.Module):
    """Encoder_x or Encoder_r: ``encoder_depth`` down blocks from the (1 + n)-channel input."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        widths = [config.base_width * 2**level for level in range(config.encoder_depth)]
        inputs = [1 + config.num_modalities, *widths[:-1]]
        self.blocks = nn.ModuleList(DownBlock(a, b) for a, b in zip(inputs, widths))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        skips = []
        for block in self.blocks:
            skip, x = block(x)
            skips.append(skip)
        return skips, x  # skips from full resolution down; x: (N, C_enc, H / 2^depth, W / 2^depth)


class SharedBlock(nn.Module):
    """The middle U-Net shared by both streams: down blocks, a bottom up-block, up blocks."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        first = config.base_width * 2 ** (config.encoder_depth - 1)  # channels arriving from an encoder
        levels = config.shared_depth - 1
        down_in = [first * 2**level for level in range(levels)]
        self.downs = nn.ModuleList(DownBlock(c, 2 * c) for c in down_in)
        bottom_in = first * 2**levels
        self.bottom = UpBlock(bottom_in, 2 * bottom_in)  # output: bottom_in channels, one level up
        # Going up, level j concatenates the upsampled path (2c channels) with the skip of down block
        # j (c channels, half of its 2c outputs) and returns c channels one level up.
        self.ups = nn.ModuleList(UpBlock(3 * c, 2 * c) for c in reversed(down_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.downs:
            skip, x = block(x)
            skips.append(skip)
        x = self.bottom(x)
        for block, skip in zip(self.ups, reversed(skips)):
            x = block(torch.cat([x, skip], dim=1))
        return x  # (N, C_enc, H_enc * 2, W_enc * 2)


class Decoder(nn.Module):
    """Decoder_x or Decoder_r: up blocks with the encoder's skips, a final double conv, 1x1 conv, tanh."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        widths = [config.base_width * 2**level for level in range(config.encoder_depth)]
        # Level i (from the deepest encoder level but one, up to level 1) takes the path (widths[i])
        # plus the skip (widths[i] / 2) and returns widths[i] / 2 channels one level up.
        self.ups = nn.ModuleList(UpBlock(w + w // 2, w) for w in reversed(widths[1:]))
        self.final = DoubleConv(widths[0] + widths[0] // 2, widths[0])
        self.head = nn.Conv2d(widths[0], 1, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        deepest_first = skips[::-1]
        for block, skip in zip(self.ups, deepest_first):
            x = block(torch.cat([x, skip], dim=1))
        x = torch.cat([x, deepest_first[-1]], dim=1)  # rebinding frees the path before the final convs
        return torch.tanh(self.head(self.final(x)))  # (N, 1, H, W) in [-1, 1]


def target_onehot(target: torch.Tensor, num_modalities: int) -> torch.Tensor:
    """Modality indices (N,) or one-hot rows (N, n) -> float one-hot rows (N, n)."""
    if target.dim() == 1:
        return F.one_hot(target.long(), num_modalities).float()
    if target.dim() == 2 and target.shape[1] == num_modalities:
        return target.float()
    raise ValueError(f"target must be (N,) indices or (N, {num_modalities}) one-hot rows, got {tuple(target.shape)}")


class Generator(nn.Module):
    """G(x, target) -> x_t; G(x, target, area) -> (x_t, r_t).

    ``x`` and ``area`` are (N, 1, H, W) in [-1, 1]; ``target`` holds modality indices (N,) or one-hot
    rows (N, n). The target stream (Encoder_r, Decoder_r) runs only when ``area`` is given.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.encoder_x = Encoder(config)
        self.encoder_r = Encoder(config)
        self.shared = SharedBlock(config)
        self.decoder_x = Decoder(config)
        self.decoder_r = Decoder(config)

    def _with_label(self, image: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        n, _, height, width = image.shape
        planes = onehot.to(image.dtype)[:, :, None, None].expand(n, onehot.shape[1], height, width)
        return torch.cat([image, planes], dim=1)  # (N, 1 + n, H, W)

    def forward(self, x: torch.Tensor, target: torch.Tensor, area: torch.Tensor | None = None):
        onehot = target_onehot(target.to(x.device), self.config.num_modalities)
        skips_x, encoded_x = self.encoder_x(self._with_label(x, onehot))
        if area is None:
            return self.decoder_x(self.shared(encoded_x), skips_x)
        skips_r, encoded_r = self.encoder_r(self._with_label(area, onehot))
        # Instance norm is per sample, so both streams share one pass through the shared block.
        shared_x, shared_r = self.shared(torch.cat([encoded_x, encoded_r])).chunk(2)
        return self.decoder_x(shared_x, skips_x), self.decoder_r(shared_r, skips_r)


def live_taps(size: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    """Along one axis of a convolution, the first and last kernel taps that meet the input in some
    output window; the taps outside them meet only zero padding. With those left out and the
    padding reduced by ``first`` on both sides, the outputs stay where they were; where they would
    not, (0, kernel - 1)."""
    outputs = (size + 2 * padding - kernel) // stride + 1
    first = max(0, padding - (outputs - 1) * stride)  # the last window still reaches the input
    last = min(kernel - 1, size - 1 + padding)  # the first window still reaches the input
    if first > last or (size + 2 * (padding - first) - (last - first + 1)) // stride + 1 != outputs:
        return 0, kernel - 1  # nothing to leave out without moving the outputs
    return first, last


class LiveTapsConv2d(nn.Conv2d):
    """nn.Conv2d that leaves out the kernel taps which meet only zero padding at the input's size,
    and runs as a matrix product when a single window remains.

    At the paper preset and 64 x 64 the discriminator's last 4 x 4 stride-2 conv (2,048 x 1,024
    channels, 134 MB of weights) sees a 2 x 2 map padded by 1: 12 of its 16 taps multiply zeros,
    yet oneDNN's backward computes and accumulates the whole weight gradient through them, about
    1 s of a 6.5 s training step (both discriminators). Here the 4 live taps are gathered once per
    call and the layer is one matrix product over them (a layer's forward, penalty and backward:
    0.1 s instead of 0.57 s). Same outputs and gradients (exactly zero on the dropped taps, as in
    the plain conv), same parameters, hence the same checkpoints. Maps that meet every tap (the
    paper preset at 256 x 256) take the plain convolution.
    """

    fast_form = True  # False: always the plain convolution (``use_fast_forms``)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.fast_form and self.groups == 1 and self.dilation == (1, 1)
                and self.padding_mode == "zeros" and isinstance(self.padding, tuple)):
            return super().forward(x)
        (top, bottom), (left, right) = (live_taps(*axis) for axis in
                                        zip(x.shape[-2:], self.kernel_size, self.stride, self.padding))
        kernel = (bottom - top + 1, right - left + 1)
        if kernel == self.kernel_size:
            return super().forward(x)
        # The live taps, gathered: 5x faster than copying the strided slice (2-float runs).
        rows = torch.arange(top, bottom + 1, device=x.device)
        columns = torch.arange(left, right + 1, device=x.device)
        taps = (rows[:, None] * self.kernel_size[1] + columns).flatten()
        flat = self.weight.flatten(2)  # (O, C, kh * kw)
        weight = flat.gather(2, taps.expand(*flat.shape[:2], -1)).unflatten(2, kernel)  # (O, C, kh', kw')
        padding = (self.padding[0] - top, self.padding[1] - left)
        if padding == (0, 0) and tuple(x.shape[-2:]) == kernel:  # one window: a matrix product
            return F.linear(x.flatten(1), weight.flatten(1), self.bias)[:, :, None, None]  # (N, O, 1, 1)
        return F.conv2d(x, weight, self.bias, self.stride, padding)


class Critique(NamedTuple):
    src: torch.Tensor  # (N, 1, h, w) patch map of real/fake scores
    cls: torch.Tensor  # (N, 2n) logits: s = real of modality s, n + s = fake translated from s


class Discriminator(nn.Module):
    """PatchGAN D_x or D_r with a src (real/fake) head and a 2n-way modality classification head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        widths = [config.disc_width * 2**level for level in range(config.disc_depth)]
        layers: list[nn.Module] = []
        for in_channels, out_channels in zip([1, *widths[:-1]], widths):
            layers += [LiveTapsConv2d(in_channels, out_channels, kernel_size=4, stride=2, padding=1),
                       nn.LeakyReLU(NEGATIVE_SLOPE)]
        self.main = nn.Sequential(*layers)
        self.src = LiveTapsConv2d(widths[-1], 1, kernel_size=3, padding=1, bias=False)
        final_size = config.image_size // 2**config.disc_depth
        self.cls = LiveTapsConv2d(widths[-1], 2 * config.num_modalities, kernel_size=final_size, bias=False)

    def forward(self, x: torch.Tensor) -> Critique:
        features = self.main(x)  # (N, C, H / 2^depth, W / 2^depth)
        return Critique(self.src(features), self.cls(features).flatten(1))


class ShapeController(nn.Module):
    """Plain U-Net S: max-pool down, transposed-conv up with skips, 1x1 conv, sigmoid -> (N, 1, H, W).

    Also serves as the liver segmenter of the evaluation (``out_channels`` logits when
    ``sigmoid=False``).
    """

    def __init__(self, width: int, depth: int, in_channels: int = 1, out_channels: int = 1,
                 sigmoid: bool = True):
        super().__init__()
        widths = [width * 2**level for level in range(depth)]
        self.downs = nn.ModuleList(DoubleConv(a, b) for a, b in zip([in_channels, *widths[:-1]], widths))
        self.upsamplers = nn.ModuleList(nn.ConvTranspose2d(2 * w, w, kernel_size=2, stride=2)
                                        for w in reversed(widths[:-1]))
        self.ups = nn.ModuleList(DoubleConv(2 * w, w) for w in reversed(widths[:-1]))
        self.head = nn.Conv2d(widths[0], out_channels, kernel_size=1)
        self.sigmoid = sigmoid

    @classmethod
    def from_config(cls, config: ModelConfig) -> ShapeController:
        return cls(config.shape_width, config.shape_depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for level, block in enumerate(self.downs):
            x = block(x if level == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for upsample, block, skip in zip(self.upsamplers, self.ups, reversed(skips[:-1])):
            x = block(torch.cat([skip, upsample(x)], dim=1))
        logits = self.head(x)
        return torch.sigmoid(logits) if self.sigmoid else logits


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
