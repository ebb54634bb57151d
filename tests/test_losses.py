"""Each loss term on small hand-made tensors whose values are computed by hand."""

import math

import pytest
import torch

from targan_cli.core.losses import (classification_loss, critic_loss, crossing_loss, cycle_loss, fake_labels,
                                    generator_adversarial_loss, gradient_penalty, interpolate, real_labels,
                                    shape_loss, target_area, to01, to_pm1)


def test_to01_scales_and_clamps_and_to_pm1_inverts_it():
    values = torch.tensor([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0])
    assert to01(values).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]
    inside = torch.tensor([-1.0, -0.2, 0.4, 1.0])
    torch.testing.assert_close(to_pm1(to01(inside)), inside)


def test_target_area_keeps_the_organ_and_sets_the_background_to_minus_one():
    image = torch.tensor([[0.5, -0.5], [1.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert target_area(image, mask).tolist() == [[0.5, -1.0], [1.0, -1.0]]


def test_labels_are_2n_way_one_hot_real_at_s_fake_at_n_plus_s():
    sources = torch.tensor([0, 2, 1])
    assert real_labels(sources, 3).tolist() == [[1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0], [0, 1, 0, 0, 0, 0]]
    assert fake_labels(sources, 3).tolist() == [[0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 0]]
    assert real_labels(sources, 3).dtype == torch.float32


def test_wgan_terms():
    real = torch.tensor([[[[1.0, 3.0]]], [[[5.0, 7.0]]]])  # mean 4
    fake = torch.tensor([[[[0.0, 2.0]]], [[[-2.0, 4.0]]]])  # mean 1
    assert critic_loss(real, fake).item() == pytest.approx(-4.0 + 1.0)
    assert generator_adversarial_loss(fake).item() == pytest.approx(-1.0)


def test_classification_loss_sums_over_outputs_and_divides_by_the_batch():
    logits = torch.zeros(2, 4)  # every output: BCE(0, label) = log 2
    labels = real_labels(torch.tensor([0, 1]), 2)
    assert classification_loss(logits, labels).item() == pytest.approx(4 * math.log(2))
    logits = torch.tensor([[100.0, -100.0, -100.0, -100.0], [0.0, -100.0, -100.0, -100.0]])
    # First row right with certainty (0); second row: log 2 for the wrong 0 logit, 0 for the rest.
    assert classification_loss(logits, torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]])).item() == pytest.approx(
        math.log(2) / 2)


def test_interpolate_mixes_per_sample_and_is_a_leaf_that_requires_grad():
    real = torch.ones(2, 1, 2, 2)
    fake = -torch.ones(2, 1, 2, 2)
    mixed = interpolate(real, fake, torch.tensor([0.25, 1.0]))
    assert mixed.requires_grad and mixed.is_leaf
    assert mixed[0].unique().tolist() == [-0.5] and mixed[1].unique().tolist() == [1.0]


def test_gradient_penalty_of_a_linear_critic_is_known():
    # D(x) = sum(w * x) per sample: the gradient is w, its norm 3 for (1, 2, 2, 0) -> (3 - 1)^2 = 4.
    weights = torch.tensor([1.0, 2.0, 2.0, 0.0]).view(1, 1, 2, 2)
    x_hat = interpolate(torch.randn(3, 1, 2, 2), torch.randn(3, 1, 2, 2), torch.rand(3))
    scores = (x_hat * weights).sum(dim=(1, 2, 3))
    penalty = gradient_penalty(scores, x_hat)
    assert penalty.item() == pytest.approx(4.0)
    # Per sample: a critic 0.5 * sum(w * x) on one sample has gradient norm 1.5 there -> (0.25 + 4 + 4) / 3.
    scale = torch.tensor([0.5, 1.0, 1.0]).view(3, 1, 1, 1)
    penalty = gradient_penalty((x_hat * weights * scale).sum(dim=(1, 2, 3)), x_hat)
    assert penalty.item() == pytest.approx((0.25 + 4 + 4) / 3)


def test_gradient_penalty_is_differentiable_and_output_scale_does_not_change_it():
    weight = torch.tensor(2.0, requires_grad=True)
    x_hat = interpolate(torch.ones(2, 1, 1, 2), torch.zeros(2, 1, 1, 2), torch.tensor([0.5, 0.5]))
    penalty = gradient_penalty((weight * x_hat).sum(dim=(1, 2, 3)), x_hat)  # norm 2 * sqrt(2)
    assert penalty.item() == pytest.approx((2 * math.sqrt(2) - 1) ** 2)
    scaled = gradient_penalty((weight * x_hat).sum(dim=(1, 2, 3)), x_hat, output_scale=1024.0)
    assert scaled.item() == pytest.approx(penalty.item())
    (gradient,) = torch.autograd.grad(penalty, weight)  # d/dw (w sqrt(2) - 1)^2 = 2 (w sqrt 2 - 1) sqrt 2
    assert gradient.item() == pytest.approx(2 * (2 * math.sqrt(2) - 1) * math.sqrt(2))


def test_shape_cycle_and_crossing_losses():
    predicted = torch.tensor([[0.0, 1.0], [0.5, 0.5]])
    mask = torch.tensor([[0.0, 0.0], [1.0, 1.0]])
    assert shape_loss(predicted, mask).item() == pytest.approx((0 + 1 + 0.25 + 0.25) / 4)
    assert cycle_loss(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 0.5])).item() == pytest.approx((1 + 1.5) / 2)
    image = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])  # to01: 1, 0.5, 0, 1
    area = torch.tensor([[0.0, -1.0], [-1.0, -1.0]])  # to01: 0.5, 0, 0, 0
    organ = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # |1 * 1 - 0.5| + |0 - 0| + |0 - 0| + |1 * 1 - 0| = 1.5 over 4 pixels
    assert crossing_loss(image, area, organ).item() == pytest.approx(1.5 / 4)
    assert crossing_loss(image, target_area(image, organ), organ).item() == pytest.approx(0.0)
