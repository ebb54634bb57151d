"""Network shapes, parameter counts of the official configuration, and the generator's two modes."""

import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from targan_cli.config import PRESETS, ModelConfig, preset
from targan_cli.core.losses import gradient_penalty
from targan_cli.core.networks import (Discriminator, Generator, InstanceNorm, LiveTapsConv2d, ShapeController,
                                      live_taps, nearest_upsample_conv3x3,
                                      parameter_count, target_onehot, use_fast_forms)
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
    ({"base_width": 0}, "base_width must be an integer from 1 to 4096, got 0"),
    ({"num_modalities": 1}, "num_modalities must be an integer from 2 to"),
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


_MAPPED_BLOCKS_ON_A_THREAD = """
import ctypes, sys, threading
import numpy as np
from targan_cli.core.device import tune_cpu_allocator

class Mallinfo2(ctypes.Structure):  # glibc's struct mallinfo2 (malloc.h)
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "tuned":
    assert tune_cpu_allocator()
mapped = []

def allocate() -> None:  # a volume-sized block on a thread, as translate's readers and writers make
    before = libc.mallinfo2().hblks
    block = np.ones(100 << 20, dtype=np.uint8)
    mapped.append(libc.mallinfo2().hblks - before)
    del block

thread = threading.Thread(target=allocate)
thread.start()
thread.join()
print(mapped[0])
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator tuning is glibc's mallopt")
def test_the_tuned_allocator_keeps_volume_sized_blocks_of_threads_in_the_heap():
    # glibc maps a 100 MiB block with mmap by default, and on a thread (whose arena's heaps are at
    # most 64 MiB) whatever the mmap threshold; tuned, the block comes from the one main heap.
    def mapped(mode: str) -> int:
        result = subprocess.run([sys.executable, "-c", _MAPPED_BLOCKS_ON_A_THREAD, mode], capture_output=True,
                                text=True, check=True)
        return int(result.stdout)

    assert mapped("default") == 1
    assert mapped("tuned") == 0


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 16, 16)])
def test_the_phase_form_equals_upsampling_then_convolving_in_float64(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=generator, dtype=torch.float64)
    weight = torch.randn(6, shape[1], 3, 3, generator=generator, dtype=torch.float64)
    direct = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, padding=1)
    torch.testing.assert_close(nearest_upsample_conv3x3(x, weight), direct, rtol=0, atol=1e-12)
    channels_last = nearest_upsample_conv3x3(x.contiguous(memory_format=torch.channels_last), weight)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(channels_last, direct, rtol=0, atol=1e-12)


def test_the_generator_gives_the_same_translation_in_either_form_of_its_up_blocks():
    torch.manual_seed(0)
    generator = Generator(preset("tiny", image_size=64)).double().eval()
    x, target = torch.rand(2, 1, 64, 64, dtype=torch.float64) * 2 - 1, torch.tensor([0, 2])
    with torch.no_grad():
        phase = generator(x, target)
        direct = use_fast_forms(generator, False)(x, target)
    assert not any(block.fast_form for block in generator.modules() if hasattr(block, "fast_form"))
    torch.testing.assert_close(phase, direct, rtol=0, atol=1e-10)
    assert not torch.equal(phase, generator(x, torch.tensor([1, 1])))  # the comparison can fail


@pytest.mark.parametrize("axis, taps", [
    ((2, 4, 2, 1), (1, 2)),  # the paper D's last conv at 64 px: a 2 x 2 map, 4 x 4 kernel padded by 1
    ((1, 3, 1, 1), (1, 1)),  # a 3 x 3 head on a 1 x 1 map: the centre tap
    ((4, 4, 2, 1), (0, 3)),  # every tap meets the map
    ((8, 3, 1, 1), (0, 2)),
    ((3, 4, 2, 1), (1, 3)),  # one window over rows -1 to 2
    ((1, 4, 1, 2), (1, 2)),  # two windows, each meets the map with another tap
])
def test_live_taps_are_the_taps_that_meet_the_input(axis, taps):
    assert live_taps(*axis) == taps
    size, kernel, stride, padding = axis
    first, last = taps
    outputs = (size + 2 * padding - kernel) // stride + 1
    met = [t for t in range(kernel) if any(0 <= o * stride - padding + t < size for o in range(outputs))]
    assert met == list(range(first, last + 1))  # exactly the taps that meet the map


def _penalized_critic(disc: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A discriminator loss with a gradient penalty: needs the double backward, as training does."""
    x = x.clone().requires_grad_()
    critique = disc(x)
    return critique.src.mean() + critique.cls.square().mean() + gradient_penalty(critique.src, x)


@pytest.mark.parametrize("kernel, stride, padding, size", [(4, 2, 1, 2), (3, 1, 1, 1), (4, 1, 2, 1), (4, 2, 1, 6)])
def test_the_conv_without_its_padding_only_taps_equals_the_plain_conv_with_every_gradient(kernel, stride,
                                                                                         padding, size):
    torch.manual_seed(kernel + size)
    conv = LiveTapsConv2d(5, 7, kernel, stride, padding).double()
    x = torch.randn(3, 5, size, size, dtype=torch.float64, requires_grad=True)
    results = []
    for fast in (True, False):
        conv.fast_form = fast
        out = conv(x)
        grad_x, = torch.autograd.grad(out.square().sum(), x, create_graph=True)
        grads = torch.autograd.grad(out.sum() + grad_x.square().sum(), [x, conv.weight, conv.bias])
        results.append((out, *grads))
    for fast, plain in zip(*results):
        torch.testing.assert_close(fast, plain, rtol=0, atol=1e-12)
    if size < kernel:  # the padding-only taps get exactly no gradient, as in the plain conv
        first, last = live_taps(size, kernel, stride, padding)
        dead = torch.ones(kernel, kernel, dtype=torch.bool)
        dead[first:last + 1, first:last + 1] = False
        assert results[0][2][:, :, dead].abs().max() == 0 and results[0][2].abs().max() > 0


def test_the_discriminator_gives_the_same_losses_and_gradients_in_either_form_of_its_convs():
    # disc_depth 5 at 32 px: the last strided conv sees a 2 x 2 map, the src head a 1 x 1 one.
    torch.manual_seed(1)
    disc = Discriminator(preset("tiny", image_size=32, disc_depth=5)).double()
    x = torch.rand(3, 1, 32, 32, dtype=torch.float64) * 2 - 1
    results = []
    for fast in (True, False):
        use_fast_forms(disc, fast)
        disc.zero_grad(set_to_none=True)
        loss = _penalized_critic(disc, x)
        loss.backward()
        results.append((loss.detach(), {name: p.grad.clone() for name, p in disc.named_parameters()}))
    (fast_loss, fast_grads), (plain_loss, plain_grads) = results
    torch.testing.assert_close(fast_loss, plain_loss, rtol=0, atol=1e-12)
    for name in plain_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name], rtol=0, atol=1e-11, msg=name)
    last = disc.main[-2].weight  # (O, C, 4, 4), of which the 2 x 2 centre meets the map
    assert fast_grads["main.8.weight"][:, :, 0].abs().max() == 0 and last.shape[-1] == 4


@pytest.mark.parametrize("grad", [False, True])
def test_the_instance_norm_equals_torch_instance_norm_with_its_gradients(grad):
    torch.manual_seed(3)
    norm = InstanceNorm(6, affine=True)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2.0), norm.bias.uniform_(-1.0, 1.0)
    x = (torch.randn(3, 6, 9, 11, dtype=torch.float64) * 4 + 2).requires_grad_(grad)
    ours = norm.double()(x)
    reference = F.instance_norm(x, weight=norm.weight, bias=norm.bias, eps=norm.eps)
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-12)
    assert ours.std() > 0.5  # normalised, then scaled: not a trivial output
    if grad:
        upstream = torch.randn_like(ours)
        ours_grads = torch.autograd.grad(ours, (x, norm.weight, norm.bias), upstream, retain_graph=True)
        reference_grads = torch.autograd.grad(reference, (x, norm.weight, norm.bias), upstream)
        for a, b in zip(ours_grads, reference_grads):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    literal = use_fast_forms(norm, False)(x)  # the benchmarks' reference: torch's own kernel
    assert torch.equal(literal, reference) and not torch.equal(ours, reference)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_the_instance_norm_is_as_accurate_as_torch_instance_norm_in_float32(layout):
    """Channels far from zero mean (after a LeakyReLU, say) are where a one-pass variance fails."""
    torch.manual_seed(4)
    exact_input = torch.randn(2, 8, 16, 16, dtype=torch.float64) * 0.1 + 10
    exact = F.instance_norm(exact_input)
    x = exact_input.float().contiguous(memory_format=layout)
    ours = (InstanceNorm(8, affine=True)(x).double() - exact).abs().max()
    theirs = (F.instance_norm(x).double() - exact).abs().max()
    assert ours < max(4 * theirs, 1e-5), (ours, theirs)
