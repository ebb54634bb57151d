"""core/inference.py: batched slice translation with in-batch resizing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from targan_cli.core.inference import SliceBatcher, SliceJob, spans_volumes, translate_slices
from targan_cli.core.networks import Generator
from targan_cli.core.slicing import from_model, plane_fit, to_model
from weights_factories import tiny_generator


@pytest.fixture(scope="module")
def generator() -> Generator:
    return tiny_generator(seed=0, image_size=32)


def _slices(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=shape).astype(np.float32)


def test_output_keeps_shape_and_range_for_a_non_square_plane(generator: Generator) -> None:
    slices = _slices((5, 24, 20))
    translated = translate_slices(generator, slices, target=1, batch_size=2)
    assert translated.shape == (5, 24, 20)
    assert translated.dtype == np.float32
    assert translated.min() >= -1.0 and translated.max() <= 1.0
    assert translated.std() > 1e-3  # a real image, not a constant
    assert not np.allclose(translated[0], translated[1])  # each slice is its own


def test_model_sized_slices_equal_a_direct_generator_call(generator: Generator) -> None:
    slices = _slices((3, 32, 32))
    with torch.inference_mode():
        expected = generator(torch.from_numpy(slices)[:, None], torch.full((3,), 2))[:, 0].numpy()
    np.testing.assert_allclose(translate_slices(generator, slices, target=2), expected, atol=1e-6)


def test_a_slice_is_padded_with_background_to_a_square(generator: Generator) -> None:
    """Upscaled 16 x 12 slices equal the generator's output on the background-padded 32 x 32 image."""
    slices = _slices((2, 16, 12))
    translated = translate_slices(generator, slices, target=0)
    square = np.full((2, 16, 16), -1.0, dtype=np.float32)
    square[:, :, 2:14] = slices
    upscaled = translate_slices(generator, square, target=0)[:, :, 2:14]
    np.testing.assert_allclose(translated, upscaled, atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_batch_size_does_not_change_the_result(generator: Generator, batch_size: int) -> None:
    slices = _slices((7, 20, 24), seed=1)
    reference = translate_slices(generator, slices, target=1, batch_size=7)
    np.testing.assert_allclose(translate_slices(generator, slices, target=1, batch_size=batch_size),
                               reference, atol=1e-4)


def test_cpu_fp32_is_deterministic(generator: Generator) -> None:
    slices = _slices((4, 20, 24), seed=2)
    first = translate_slices(generator, slices, target=2, batch_size=3)
    assert np.array_equal(first, translate_slices(generator, slices, target=2, batch_size=3))


def test_the_target_changes_the_output(generator: Generator) -> None:
    slices = _slices((2, 24, 20), seed=3)
    assert not np.allclose(translate_slices(generator, slices, target=0),
                           translate_slices(generator, slices, target=2), atol=1e-3)


def test_progress_advances_once_per_batch_by_its_size(generator: Generator) -> None:
    advanced: list[int] = []
    translate_slices(generator, _slices((7, 20, 24)), target=0, batch_size=3, progress=advanced.append)
    assert advanced == [3, 3, 1]


def test_an_empty_stack_gives_an_empty_result(generator: Generator) -> None:
    assert translate_slices(generator, np.zeros((0, 20, 24), np.float32), target=0).shape == (0, 20, 24)


@pytest.mark.parametrize("kwargs, message", [
    ({"target": 3}, "not a modality index"),
    ({"target": -1}, "not a modality index"),
    ({"target": 0, "batch_size": 0}, "batch_size must be at least 1"),
])
def test_bad_arguments_raise(generator: Generator, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        translate_slices(generator, _slices((2, 8, 8)), **kwargs)


def test_slices_must_be_three_dimensional(generator: Generator) -> None:
    with pytest.raises(ValueError, match=r"expected slices \(Z, H, W\)"):
        translate_slices(generator, np.zeros((8, 8), np.float32), target=0)


def _batch_sizes(generator: Generator) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    sizes: list[int] = []
    return sizes, generator.register_forward_hook(lambda module, args, output: sizes.append(len(args[0])))


def _alone_in_a_full_batch(generator: Generator, plane: np.ndarray, target: int, batch_size: int) -> np.ndarray:
    """One slice through the generator directly, in a batch of ``batch_size`` copies of itself."""
    fit = plane_fit(*plane.shape, generator.config.image_size)
    with torch.inference_mode():
        images = to_model(torch.from_numpy(plane)[None, None].expand(batch_size, 1, -1, -1), fit, fill=-1.0)
        return from_model(generator(images, torch.full((batch_size,), target)), fit).clamp(-1, 1)[0, 0].numpy()


def test_spanning_batches_are_full_and_give_each_slice_its_own_bits(generator: Generator) -> None:
    """Three volumes of different planes and targets, 6 + 3 + 13 slices, in full batches of 16 that
    span them; every slice is bit for bit the generator's output on that slice alone (in a full batch,
    the batch size the kernels see). Fails if the last batch is not padded (6 slices on one thread
    differ from 16 in the last bit) or if a slice lands in another volume's output."""
    jobs = [SliceJob(_slices(shape, seed), target, np.empty(shape, np.float32))
            for shape, seed, target in (((6, 24, 20), 5, 1), ((3, 16, 16), 6, 0), ((13, 24, 20), 7, 2))]
    finished: list[int] = []
    for index, job in enumerate(jobs):
        job.done = lambda index=index: finished.append(index)
    sizes, hook = _batch_sizes(generator)
    try:
        batcher = SliceBatcher(generator, batch_size=16, span=True)
        for job in jobs:
            batcher.add(job)
        batcher.run()  # 22 slices waiting: one full batch, the 6 left wait for more
        assert sizes == [16] and finished == [0, 1]
        batcher.run(flush=True)
    finally:
        hook.remove()
    assert sizes == [16, 16] and finished == [0, 1, 2]
    for job in jobs:
        expected = np.stack([_alone_in_a_full_batch(generator, plane, job.target, 16) for plane in job.slices])
        assert np.array_equal(job.out, expected)


def test_batches_span_volumes_on_cuda_only_and_the_cpu_keeps_each_volumes_batches(generator: Generator) -> None:
    assert spans_volumes(torch.device("cuda")) and spans_volumes(torch.device("cuda", 1))
    assert not spans_volumes(torch.device("cpu"))
    sizes, hook = _batch_sizes(generator)
    try:
        translate_slices(generator, _slices((7, 16, 16)), target=0, batch_size=3)  # the CPU's default
    finally:
        hook.remove()
    assert sizes == [3, 3, 1]  # the last batch not padded


def test_without_span_each_volume_is_batched_on_its_own(generator: Generator) -> None:
    sizes, hook = _batch_sizes(generator)
    try:
        batcher = SliceBatcher(generator, batch_size=4, span=False)
        outputs = [np.empty((count, 16, 16), np.float32) for count in (5, 3)]
        for count, out in zip((5, 3), outputs):
            batcher.add(SliceJob(_slices((count, 16, 16), count), 1, out))
        batcher.run()  # without span nothing waits for a later volume
    finally:
        hook.remove()
    assert sizes == [4, 1, 3]


def test_a_follow_up_job_runs_ahead_of_the_waiting_ones_and_may_read_the_finished_output(
        generator: Generator) -> None:
    """The QC cycle: when the first pass (in place) is done, a second pass over its output is added
    first; it equals translating the first pass's output on its own."""
    slices, other = _slices((4, 16, 16), 8), _slices((8, 16, 16), 9)
    first = slices.copy()
    cycled = np.empty_like(slices)
    order: list[str] = []
    batcher = SliceBatcher(generator, batch_size=4, span=True)
    batcher.add(SliceJob(first, 1, first, lambda: (order.append("first"), batcher.add(
        SliceJob(first, 0, cycled, lambda: order.append("cycle")), first=True))))
    batcher.add(SliceJob(other, 1, np.empty_like(other), lambda: order.append("other")))
    batcher.run(flush=True)
    assert order == ["first", "cycle", "other"]
    expected = translate_slices(generator, slices, target=1, batch_size=4)
    assert np.array_equal(first, expected)
    assert np.array_equal(cycled, translate_slices(generator, expected, target=0, batch_size=4))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_is_close_to_cpu_fp32(generator: Generator, dtype: torch.dtype) -> None:
    slices = _slices((5, 40, 36), seed=4)
    reference = translate_slices(generator, slices, target=1)
    cuda_generator = tiny_generator(seed=0, image_size=32).cuda()
    translated = translate_slices(cuda_generator, slices, target=1, dtype=dtype)
    assert np.abs(translated - reference).mean() < 0.02
