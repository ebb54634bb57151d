"""Fit slices of any in-plane size to the model's square images and back, keeping the aspect ratio.

A slice is padded (centered) to a square with a fill value, then resized to the model size;
the inverse resizes back to the padded square and crops the padding away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

ResizeMode = Literal["bilinear", "nearest"]


@dataclass(frozen=True)
class PlaneFit:
    """How an (height, width) slice maps to a (size, size) model image."""

    height: int
    width: int
    size: int  # the model's image size
    pad_top: int
    pad_bottom: int
    pad_left: int
    pad_right: int

    @property
    def side(self) -> int:
        """The side of the padded square."""
        return max(self.height, self.width)


def plane_fit(height: int, width: int, size: int) -> PlaneFit:
    """Centered padding of a (height, width) slice to a square, to be resized to ``size``."""
    if min(height, width, size) < 1:
        raise ValueError(f"sizes must be positive, got height {height}, width {width}, size {size}")
    side = max(height, width)
    pad_rows, pad_columns = side - height, side - width
    return PlaneFit(height, width, size, pad_rows // 2, pad_rows - pad_rows // 2,
                    pad_columns // 2, pad_columns - pad_columns // 2)


def to_model(batch: torch.Tensor, fit: PlaneFit, fill: float, mode: ResizeMode = "bilinear") -> torch.Tensor:
    """(N, C, height, width) -> (N, C, size, size): pad to a square with ``fill``, then resize."""
    _check(batch, (fit.height, fit.width))
    padded = F.pad(batch, (fit.pad_left, fit.pad_right, fit.pad_top, fit.pad_bottom), value=fill)
    return _resize(padded, fit.size, mode)  # (N, C, size, size)


def from_model(batch: torch.Tensor, fit: PlaneFit, mode: ResizeMode = "bilinear") -> torch.Tensor:
    """(N, C, size, size) -> (N, C, height, width): resize to the padded square, crop the padding."""
    _check(batch, (fit.size, fit.size))
    square = _resize(batch, fit.side, mode)  # (N, C, side, side)
    return square[..., fit.pad_top:fit.pad_top + fit.height, fit.pad_left:fit.pad_left + fit.width]


def _check(batch: torch.Tensor, plane: tuple[int, int]) -> None:
    if batch.ndim != 4 or tuple(batch.shape[-2:]) != plane:
        raise ValueError(f"expected a (N, C, {plane[0]}, {plane[1]}) batch, got {tuple(batch.shape)}")


def _resize(batch: torch.Tensor, side: int, mode: ResizeMode) -> torch.Tensor:
    """Resize (N, C, s, s) to (N, C, side, side); a no-op at the same size, so it is exact there."""
    if batch.shape[-1] == side:
        return batch
    if mode == "nearest":
        # "nearest-exact" samples pixel centres (PIL's rule); masks keep their values and dtype.
        values = batch if batch.is_floating_point() else batch.float()
        return F.interpolate(values, size=(side, side), mode="nearest-exact").to(batch.dtype)
    if mode == "bilinear":
        if not batch.is_floating_point():
            raise ValueError(f"bilinear resizing needs a floating-point batch, got {batch.dtype}")
        # Antialiasing low-passes before downsampling (no aliasing); it has no effect when upsampling.
        return F.interpolate(batch, size=(side, side), mode="bilinear", align_corners=False, antialias=True)
    raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
