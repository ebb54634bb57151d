"""Fitting slices to the model's square size and back."""

from __future__ import annotations

import pytest
import torch

from targan_cli.core.slicing import from_model, plane_fit, to_model


def _smooth(height: int, width: int) -> torch.Tensor:
    """(1, 1, height, width) a smooth image in [-1, 1]."""
    rows = torch.linspace(0, 1, height)[:, None]
    columns = torch.linspace(0, 1, width)[None, :]
    return (torch.sin(3 * rows) * torch.cos(2 * columns))[None, None]


@pytest.mark.parametrize(
    ("height", "width", "pads"),
    [
        (40, 30, (0, 0, 5, 5)),  # portrait: columns padded
        (30, 40, (5, 5, 0, 0)),  # landscape: rows padded
        (33, 33, (0, 0, 0, 0)),  # square
        (27, 30, (1, 2, 0, 0)),  # odd padding: the extra row goes to the bottom
    ],
)
def test_shapes_and_padding(height: int, width: int, pads: tuple[int, int, int, int]) -> None:
    fit = plane_fit(height, width, 16)
    assert (fit.pad_top, fit.pad_bottom, fit.pad_left, fit.pad_right) == pads
    assert fit.side == max(height, width)
    batch = torch.rand(3, 2, height, width)
    model = to_model(batch, fit, fill=-1.0)
    assert model.shape == (3, 2, 16, 16)
    assert from_model(model, fit).shape == (3, 2, height, width)


def test_padding_uses_the_fill_value_and_keeps_the_image_centered() -> None:
    fit = plane_fit(4, 8, 8)  # padded square is already the model size: no resize
    batch = torch.ones(1, 1, 4, 8)
    model = to_model(batch, fit, fill=-1.0)
    assert torch.equal(model[0, 0, :2], -torch.ones(2, 8)) and torch.equal(model[0, 0, 6:], -torch.ones(2, 8))
    assert torch.equal(model[0, 0, 2:6], torch.ones(4, 8))


@pytest.mark.parametrize(("height", "width", "size"), [(96, 80, 64), (50, 61, 64), (64, 48, 128)])
def test_round_trip_of_a_smooth_image_is_close(height: int, width: int, size: int) -> None:
    image = _smooth(height, width)
    fit = plane_fit(height, width, size)
    back = from_model(to_model(image, fit, fill=-1.0), fit)
    assert back.shape == image.shape
    interior = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    assert (back - image)[interior].abs().max() < 0.05
    assert (back - image).abs().mean() < 0.02


def test_image_at_model_size_is_exactly_unchanged() -> None:
    image = torch.rand(2, 1, 32, 32)
    fit = plane_fit(32, 32, 32)
    model = to_model(image, fit, fill=-1.0)
    assert torch.equal(model, image)
    assert torch.equal(from_model(model, fit), image)
    wide = torch.rand(1, 1, 20, 32)
    wide_fit = plane_fit(20, 32, 32)
    assert torch.equal(from_model(to_model(wide, wide_fit, fill=0.0), wide_fit), wide)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.uint8])
def test_masks_stay_binary_and_keep_their_type(dtype: torch.dtype) -> None:
    mask = torch.zeros(1, 1, 90, 70, dtype=dtype)
    mask[..., 20:60, 15:50] = 1
    fit = plane_fit(90, 70, 64)
    model = to_model(mask, fit, fill=0, mode="nearest")
    assert model.dtype == dtype and set(model.unique().tolist()) == {0, 1}
    back = from_model(model, fit, mode="nearest")
    assert back.dtype == dtype and set(back.unique().tolist()) == {0, 1}
    disagreement = (back.float() - mask.float()).abs().mean()
    assert disagreement < 0.03


def test_bad_shapes_and_modes_are_refused() -> None:
    fit = plane_fit(10, 12, 8)
    with pytest.raises(ValueError, match="batch"):
        to_model(torch.zeros(1, 10, 12), fit, fill=0.0)
    with pytest.raises(ValueError, match="batch"):
        from_model(torch.zeros(1, 1, 10, 12), fit)
    with pytest.raises(ValueError, match="mode"):
        to_model(torch.zeros(1, 1, 10, 12), fit, fill=0.0, mode="bicubic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        plane_fit(0, 12, 8)
