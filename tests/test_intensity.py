"""Intensity mapping between stored units and [-1, 1], and the body mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from targan_cli.config import IntensitySettings
from targan_cli.core.intensity import (
    best_intensity_mapping,
    body_mask,
    denormalize,
    fit_reference_high,
    from_unit,
    normalize,
    robust_high,
    slabs,
    to_unit,
)
from targan_cli.errors import TarganError
import targan_cli.core.intensity as intensity_module

CT = IntensitySettings(kind="ct", window_level=40.0, window_width=400.0)  # [-160, 240] HU


def _mr_phantom(seed: int = 0) -> np.ndarray:
    """(Z, H, W) raw MR: a bright ellipse of tissue (with a dark hole) on faint background noise."""
    rng = np.random.default_rng(seed)
    z, h, w = np.meshgrid(np.arange(4), np.arange(32), np.arange(28), indexing="ij")
    body = ((h - 16) / 12.0) ** 2 + ((w - 14) / 10.0) ** 2 < 1
    values = np.where(body, 400.0 + 2.0 * h + 5.0 * z, 0.0) + rng.uniform(0, 8, size=body.shape)
    values[:, 14:18, 12:16] = 5.0  # gas inside the body
    return values.astype(np.float32)


def test_ct_round_trip_within_the_window_and_clipping_outside() -> None:
    hu = np.array([[[-1000.0, -160.0, -100.0, 0.0, 40.0, 239.5, 240.0, 3000.0]]])
    normalized = normalize(hu, CT)
    assert normalized.dtype == np.float32
    assert np.allclose(normalized[0, 0], [-1, -1, -0.7, -0.2, 0, 0.9975, 1, 1])
    back = denormalize(normalized, CT)
    assert back.dtype == np.float32
    assert np.allclose(back[0, 0, 1:7], hu[0, 0, 1:7], atol=1e-3)
    assert back[0, 0, 0] == -160 and back[0, 0, -1] == 240  # clipped to the window
    assert np.array_equal(denormalize(np.array([-3.0, 2.0]), CT), [-160.0, 240.0])


def test_slabs_cover_the_first_axis_once_in_whole_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intensity_module, "SLAB_VOXELS", 3 * 20)
    parts = list(slabs(np.zeros((10, 4, 5))))
    assert [(part.start, min(part.stop, 10)) for part in parts] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert len(list(slabs(np.zeros((2, 100, 100))))) == 2  # a slice larger than a slab: one each
    assert len(list(slabs(np.zeros(7)))) == 1


@pytest.mark.parametrize("slab_slices", [1, 3, 100])
def test_slab_by_slab_gives_the_bits_of_whole_volume_float32_arithmetic(monkeypatch: pytest.MonkeyPatch,
                                                                         slab_slices: int) -> None:
    """CT int16 -> [-1, 1] and back, against the same float32 operations written out on the whole
    volume here, whatever the slab size."""
    monkeypatch.setattr(intensity_module, "SLAB_VOXELS", slab_slices * 6 * 7)
    hu = np.random.default_rng(5).integers(-1100, 1500, (8, 6, 7)).astype(np.int16)
    unit = np.clip((hu.astype(np.float32) - np.float32(-160.0)) / np.float32(400.0), 0, 1) * np.float32(2) - 1
    assert normalize(hu, CT).dtype == np.float32 and np.array_equal(normalize(hu, CT), unit)
    model = np.random.default_rng(6).uniform(-1.5, 1.5, (8, 6, 7)).astype(np.float32)
    back = (np.clip(model, -1, 1) + np.float32(1)) / np.float32(2) * np.float32(400) + np.float32(-160)
    assert np.array_equal(denormalize(model, CT), back)


def test_mr_volume_round_trip_with_its_own_high() -> None:
    raw = _mr_phantom()
    settings = IntensitySettings(kind="mr", percentile=99.5)
    high = robust_high(raw, settings)
    normalized = normalize(raw, settings)
    assert normalized.min() >= -1 and normalized.max() <= 1
    back = denormalize(normalized, IntensitySettings(kind="mr", reference_high=high))
    inside = raw <= high
    assert np.allclose(back[inside], raw[inside], rtol=1e-5, atol=1e-3)
    assert np.allclose(back[~inside], high)  # clipped at the robust maximum
    assert 0 < (~inside).mean() < 0.01


def test_robust_high_ignores_background_noise_and_a_hot_voxel() -> None:
    raw = _mr_phantom()
    settings = IntensitySettings(kind="mr", percentile=50.0)
    body_median = np.median(raw[body_mask(from_unit(np.clip(raw / 500.0, 0, 1)))])
    assert robust_high(raw, settings) == pytest.approx(body_median, rel=1e-6)
    assert 430 < body_median < 450  # tissue, not the noise around it
    hot = raw.copy()
    hot[0, 0, 0] = 1e6
    assert robust_high(hot, settings) == pytest.approx(body_median, rel=0.01)
    assert robust_high(raw * 3, settings) == pytest.approx(3 * body_median, rel=1e-5)


@pytest.mark.parametrize(("raw", "message"), [
    (np.zeros((2, 4, 4)), "every voxel equals 0"),
    (np.full((2, 4, 4), 7.0), "every voxel equals 7"),
    (-np.arange(32.0).reshape(2, 4, 4), "no positive intensities"),
])
def test_degenerate_mr_volumes_are_named(raw: np.ndarray, message: str) -> None:
    with pytest.raises(TarganError, match=message):
        robust_high(raw, IntensitySettings(kind="mr"))


def test_mr_denormalize_needs_the_reference_high() -> None:
    with pytest.raises(TarganError, match="reference_high"):
        denormalize(np.zeros((1, 2, 2)), IntensitySettings(kind="mr"))
    out = denormalize(np.array([-1.0, 0.0, 1.0]), IntensitySettings(kind="mr", reference_high=800.0))
    assert np.array_equal(out, [0.0, 400.0, 800.0])


def test_official_slice_scaling_floors_noise_and_scales_each_slice() -> None:
    raw = np.stack([
        np.array([[10.0, 60.0], [110.0, 160.0]]),
        np.array([[0.0, 0.0], [1000.0, 2000.0]]),
        np.full((2, 2), 30.0),  # all below the noise floor: a blank slice
    ])
    settings = IntensitySettings(kind="mr", scaling="official_slice", noise_floor=50.0)
    out = normalize(raw, settings)
    assert np.allclose(to_unit(out[0]), [[0.0, 60 / 160], [110 / 160, 1.0]])
    assert np.allclose(to_unit(out[1]), [[0.0, 0.0], [0.5, 1.0]])
    assert np.array_equal(out[2], np.full((2, 2), -1.0))


def test_unit_helpers_invert_each_other_on_arrays_and_tensors() -> None:
    values = np.linspace(-1, 1, 9)
    assert np.allclose(from_unit(to_unit(values)), values)
    assert np.allclose(to_unit(values)[[0, 4, 8]], [0, 0.5, 1])
    tensor = torch.linspace(-1, 1, 5)
    assert torch.allclose(to_unit(tensor), torch.tensor([0, 0.25, 0.5, 0.75, 1]))


def test_fit_reference_high_is_the_median_and_refuses_bad_input() -> None:
    assert fit_reference_high([300.0, 900.0, 500.0]) == 500.0
    with pytest.raises(TarganError, match="no MR volumes"):
        fit_reference_high([])
    with pytest.raises(TarganError, match="positive"):
        fit_reference_high([300.0, 0.0])


def test_body_mask_drops_speckle_and_fills_holes() -> None:
    normalized = from_unit(np.clip(_mr_phantom() / 500.0, 0, 1))
    speckle = [(1, 2), (30, 25), (0, 27)]
    for row, column in speckle:
        normalized[:, row, column] = 1.0  # bright noise outside the body
    mask = body_mask(normalized)
    assert mask.shape == normalized.shape and mask.dtype == bool
    assert not any(mask[:, row, column].any() for row, column in speckle)
    assert mask[:, 14:18, 12:16].all()  # the gas inside the body is filled
    assert mask[:, 16, 14].all() and not mask[:, 2, 2].any()
    h, w = np.meshgrid(np.arange(32), np.arange(28), indexing="ij")
    ellipse = ((h - 16) / 12.0) ** 2 + ((w - 14) / 10.0) ** 2 < 1
    assert np.array_equal(mask[0], ellipse)


def test_body_mask_equals_scipys_fill_holes_on_random_planes() -> None:
    """The region filter and hole filling against scipy's own: label, keep regions of at least
    min_fraction of the largest, ``ndimage.binary_fill_holes`` (4-connected), slice by slice."""
    from scipy import ndimage

    rng = np.random.default_rng(7)
    for trial in range(200):
        shape = (int(rng.integers(1, 5)), int(rng.integers(1, 25)), int(rng.integers(1, 25)))
        normalized = np.where(rng.random(shape) < rng.uniform(0.2, 0.8), 0.5, -1.0).astype(np.float32)
        min_fraction = 0.0 if trial % 10 == 0 else float(rng.uniform(0, 0.6))
        expected = np.zeros(shape, dtype=bool)
        for index, plane in enumerate(normalized > -0.9):
            labels, count = ndimage.label(plane)
            if count:
                sizes = ndimage.sum_labels(plane, labels, np.arange(1, count + 1))
                kept = np.isin(labels, 1 + np.flatnonzero(sizes >= min_fraction * sizes.max()))
                expected[index] = ndimage.binary_fill_holes(kept)
        assert np.array_equal(body_mask(normalized, min_fraction=min_fraction), expected), trial
        fortran = np.asfortranarray(normalized)  # as volumes in their file's voxel order come
        assert np.array_equal(body_mask(fortran, min_fraction=min_fraction), expected), trial


def test_body_mask_keeps_both_legs_and_handles_empty_slices() -> None:
    normalized = -np.ones((2, 10, 20), np.float32)
    normalized[0, 2:8, 1:8] = 0.5  # one leg (42 pixels)
    normalized[0, 2:8, 11:17] = 0.5  # the other (36 pixels)
    normalized[0, 0, 19] = 0.5  # one noisy pixel
    mask = body_mask(normalized)
    assert mask[0].sum() == 42 + 36 and not mask[0, 0, 19]
    assert not mask[1].any()
    with pytest.raises(ValueError, match="Z, H, W"):
        body_mask(normalized[0])


def test_body_mask_of_a_ct_finds_the_patient_not_the_air() -> None:
    hu = np.full((1, 20, 20), -1000.0)
    hu[0, 4:16, 3:17] = 30.0  # soft tissue
    hu[0, 8:11, 8:11] = -900.0  # bowel gas
    mask = body_mask(normalize(hu, CT))
    assert mask.sum() == 12 * 14 and mask[0, 9, 9]


def test_the_best_intensity_mapping_is_the_truths_mean_per_input_bin() -> None:
    """Worked by hand: the oracle is constant on each of 40 equal bins of [-1, 1], equal there to
    the truth's mean over the masked voxels of that bin, and ``background`` outside the mask."""
    source = np.array([[[-1.0, -0.99, 0.0, 0.04, 1.0, 0.5]]], dtype=np.float32)  # bins 0, 0, 20, 20, 39, 30
    truth = np.array([[[0.2, 0.4, -0.5, 0.1, 0.9, 7.0]]], dtype=np.float32)
    mask = np.array([[[True, True, True, True, True, False]]])
    mapped = best_intensity_mapping(source, truth, mask, background=-1.0)
    np.testing.assert_allclose(mapped, [[[0.3, 0.3, -0.2, -0.2, 0.9, -1.0]]], rtol=0, atol=1e-6)


def test_no_intensity_mapping_fits_the_truth_better_than_the_oracle() -> None:
    rng = np.random.default_rng(3)
    source = rng.uniform(-1, 1, (3, 20, 20)).astype(np.float32)
    truth = (np.cos(3 * source) + rng.normal(0, 0.3, source.shape)).astype(np.float32)
    mask = rng.random(source.shape) < 0.7
    oracle = best_intensity_mapping(source, truth, mask)
    best = ((oracle - truth)[mask] ** 2).mean()
    bins = np.digitize(source, np.linspace(-1, 1, 41)[1:-1])
    for _ in range(50):  # any other value per bin does worse
        table = rng.normal(0, 1, 40).astype(np.float32)
        assert ((table[bins] - truth)[mask] ** 2).mean() > best
