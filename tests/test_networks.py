"""Network shapes, parameter counts of the official configuration, and the generator's two modes."""

import pytest
import torch

from targan_cli.config import PRESETS, ModelConfig, preset
from targan_cli.core.networks import (Discriminator, Generator, ShapeController, parameter_count,
                                      target_onehot)
from targan_cli.errors import TarganError


def test_paper_preset_has_the_official_parameter_counts():
    config = PRESETS["paper"]
    assert parameter_count(Generator(config)) == 33_750_656
    assert parameter_count(Discriminator(config)) == 44_915_648
    assert parameter_count(ShapeController.from_config(config)) == 1_942_289


@pytest.mark.parametrize("config", [
    preset("tiny"),
    preset("tiny", image_size=32, disc_depth=3),
    ModelConfig(num_modalities=4, image_size=48, base_width=4, encoder_depth=1, shared_depth=2,
                disc_width=4, disc_depth=3, shape_width=2, shape_depth=3),
    ModelConfig(num_modalities=2, image_size=64, base_width=6, encoder_depth=3, shared_depth=2,
                disc_width=4, disc_depth=5, shape_width=2, shape_depth=2),
])
def test_every_network_builds_and_keeps_shapes(config):
    torch.manual_seed(0)
    n, size = 3, config.image_size
    x = torch.rand(n, 1, size, size) * 2 - 1
    area = torch.rand(n, 1, size, size) * 2 - 1
    target = torch.arange(n) % config.num_modalities
    generator = Generator(config)
    image = generator(x, target)
    image2, area2 = generator(x, target, area)
    assert image.shape == image2.shape == area2.shape == (n, 1, size, size)
    assert image.abs().max() <= 1
    torch.testing.assert_close(image, image2)  # the whole-image stream does not depend on the area
    critique = Discriminator(config)(x)
    side = size // 2**config.disc_depth
    assert critique.src.shape == (n, 1, side, side)
    assert critique.cls.shape == (n, 2 * config.num_modalities)
    mask = ShapeController.from_config(config)(x)
    assert mask.shape == (n, 1, size, size) and 0 <= mask.min() and mask.max() <= 1


def test_target_as_indices_or_onehot_rows_gives_the_same_result_and_leaves_inputs_alone():
    config = preset("tiny", image_size=32, disc_depth=3)
    generator = Generator(config).eval()
    x = torch.rand(2, 1, 32, 32) * 2 - 1
    x_before = x.clone()
    indices = torch.tensor([2, 0])
    onehot = target_onehot(indices, 3)
    assert torch.equal(onehot, torch.tensor([[0.0, 0, 1], [1, 0, 0]]))
    torch.testing.assert_close(generator(x, indices), generator(x, onehot))
    assert torch.equal(x, x_before)


def test_targets_change_the_output():
    config = preset("tiny", image_size=32, disc_depth=3)
    torch.manual_seed(1)
    generator = Generator(config).eval()
    x = torch.rand(1, 1, 32, 32) * 2 - 1
    assert not torch.allclose(generator(x, torch.tensor([0])), generator(x, torch.tensor([1])))


def test_bad_targets_are_refused():
    with pytest.raises(ValueError, match="target must be"):
        target_onehot(torch.zeros(2, 5), 3)


@pytest.mark.parametrize("overrides, message", [
    ({"image_size": 100}, "not divisible"),
    ({"base_width": 0}, "positive integer"),
    ({"num_modalities": 1}, "at least 2"),
])
def test_config_validation_names_the_value(overrides, message):
    with pytest.raises(TarganError, match=message):
        preset("paper", **overrides)


def test_unknown_preset():
    with pytest.raises(TarganError, match="unknown preset 'huge'"):
        preset("huge")


def test_the_process_setup_flushes_denormals_on_the_cpu():
    from targan_cli.core.device import configure_process

    configure_process()
    tiny = torch.tensor([1e-42], dtype=torch.float32)  # a denormal float32
    assert (tiny * 1.0).item() == 0.0
