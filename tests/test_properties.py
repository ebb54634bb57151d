"""Property-based tests (hypothesis): the intensity mapping, and volume round trips through files.

Intensity: for random windows, volumes, scales and dtypes, normalization lands in [-1, 1], keeps
the order of values, inverts within the window (CT) or up to the robust maximum (MR), and
denormalization never leaves the target's range. Volumes: random shapes, stored dtypes and
affines with any axis order, flips, rotation and spacing survive write -> read exactly, and
canonical slicing inverts. (test_volume.py holds the plain random round trip; these add axis
permutations and flips, and the dtypes it does not cover.)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from targan_cli.config import IntensitySettings
from targan_cli.core.intensity import denormalize, from_unit, normalize, robust_high, to_unit
from targan_cli.errors import TarganError
from targan_cli.io.volume import Volume, from_slices, read_volume, to_slices, write_volume
from volume_factories import rotation, write_nifti

EXAMPLES = settings(max_examples=30, deadline=None)


def reals(low: float, high: float, width: int = 64) -> st.SearchStrategy[float]:
    """Floats in [low, high] without subnormals: core.device.pick_device, which any in-process
    command runs, flushes them to zero for the whole process, and hypothesis then refuses them."""
    return st.floats(low, high, allow_nan=False, allow_subnormal=False, width=width)


FINITE = reals(-1e4, 1e4, width=32)

ct_settings = st.builds(
    lambda level, width: IntensitySettings(kind="ct", window_level=level, window_width=width),
    reals(-600, 600), reals(1.0, 4000.0))
slice_shapes = st.tuples(st.integers(1, 4), st.integers(1, 12), st.integers(1, 12))  # (Z, H, W)


# ----------------------------------------------------------------------------- CT


@EXAMPLES
@given(ct=ct_settings, data=st.data())
def test_ct_normalization_is_ordered_bounded_and_inverts_inside_the_window(ct: IntensitySettings,
                                                                           data: st.DataObject) -> None:
    low, high = ct.window
    hu = data.draw(arrays(np.float64, data.draw(slice_shapes), elements=reals(low, high)))
    normalized = normalize(hu, ct)
    assert normalized.dtype == np.float32 and normalized.shape == hu.shape
    assert normalized.min() >= -1.0 and normalized.max() <= 1.0
    back = denormalize(normalized, ct)
    assert np.allclose(back, hu, rtol=0, atol=ct.window_width * 1e-6 + abs(ct.window_level) * 1e-6)
    order = np.argsort(hu, axis=None, kind="stable")
    assert np.all(np.diff(normalized.ravel()[order]) >= 0)  # monotone: a brighter voxel never maps darker


@EXAMPLES
@given(ct=ct_settings, hu=arrays(np.float32, st.tuples(st.just(1), st.integers(1, 8), st.integers(1, 8)),
                                 elements=FINITE))
def test_ct_values_outside_the_window_clip_to_its_ends(ct: IntensitySettings, hu: np.ndarray) -> None:
    low, high = ct.window
    margin = 1e-5 * max(abs(low), abs(high), 1.0)  # beyond float32 rounding of the window's ends
    normalized = normalize(hu, ct)
    values = hu.astype(np.float64)
    assert np.all(normalized[values <= low - margin] == -1.0) and np.all(normalized[values >= high + margin] == 1.0)
    assert np.all(np.abs(normalized) <= 1.0)


# ----------------------------------------------------------------------------- MR


@st.composite
def mr_volumes(draw: st.DrawFn) -> np.ndarray:
    """(Z, H, W) MR-like values: a body of random tissue on faint noise, in any integer or float dtype."""
    depth, height, width = draw(st.integers(1, 3)), draw(st.integers(6, 14)), draw(st.integers(6, 14))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.uniform(0, 3, size=(depth, height, width))
    top, left = draw(st.integers(0, height - 4)), draw(st.integers(0, width - 4))
    bottom, right = draw(st.integers(top + 3, height)), draw(st.integers(left + 3, width))
    brightest = draw(reals(200, 3000))
    values[:, top:bottom, left:right] = rng.uniform(100, brightest, size=(depth, bottom - top, right - left))
    dtype = draw(st.sampled_from([np.uint16, np.int16, np.int32, np.float32, np.float64]))
    return np.round(values).astype(dtype) if np.issubdtype(dtype, np.integer) else values.astype(dtype)


@EXAMPLES
@given(raw=mr_volumes(), percentile=reals(90.0, 100.0))
def test_mr_normalization_inverts_up_to_the_robust_maximum(raw: np.ndarray, percentile: float) -> None:
    mr = IntensitySettings(kind="mr", percentile=percentile)
    normalized = normalize(raw, mr)
    assert normalized.dtype == np.float32 and normalized.shape == raw.shape
    assert normalized.min() >= -1.0 and normalized.max() <= 1.0
    high = robust_high(raw, mr)
    back = denormalize(normalized, IntensitySettings(kind="mr", percentile=percentile, reference_high=high))
    expected = np.clip(raw.astype(np.float64), 0, high)
    assert np.allclose(back, expected, rtol=1e-5, atol=high * 1e-6)


@EXAMPLES
@given(raw=mr_volumes(), scale=st.sampled_from([2.0 ** k for k in range(-6, 9)]))
def test_mr_normalization_does_not_depend_on_the_scanner_scale(raw: np.ndarray, scale: float) -> None:
    # Powers of two scale exactly, so that no voxel crosses the body threshold by rounding.
    mr = IntensitySettings(kind="mr")
    values = raw.astype(np.float64)
    assert np.allclose(normalize(values * scale, mr), normalize(values, mr), atol=1e-5)
    assert np.allclose(normalize(raw, mr), normalize(values, mr), atol=1e-6)  # the stored dtype does not matter


@EXAMPLES
@given(raw=mr_volumes(), floor=reals(0.0, 150.0))
def test_official_slice_scaling_spans_each_slice(raw: np.ndarray, floor: float) -> None:
    official = IntensitySettings(kind="mr", scaling="official_slice", noise_floor=floor)
    unit = to_unit(normalize(raw, official).astype(np.float64))
    floored = np.where(raw < floor, 0.0, raw.astype(np.float64))
    for index, plane in enumerate(floored):
        if plane.max() > plane.min():
            assert unit[index].min() == pytest.approx(0.0, abs=1e-6)
            assert unit[index].max() == pytest.approx(1.0, abs=1e-6)
            assert np.allclose(unit[index], (plane - plane.min()) / (plane.max() - plane.min()), atol=1e-6)
        else:
            assert np.all(unit[index] == 0.0)


def test_blank_volumes_are_refused_whatever_their_dtype() -> None:
    for dtype in (np.uint8, np.int16, np.float32):
        with pytest.raises(TarganError, match="blank"):
            normalize(np.full((2, 4, 4), 9, dtype), IntensitySettings(kind="mr"))


# ----------------------------------------------------------------------------- back to stored units


@EXAMPLES
@given(ct=ct_settings, high=reals(1.0, 1e4), values=arrays(np.float32, st.integers(1, 50), elements=FINITE))
def test_denormalization_never_leaves_the_target_range(ct: IntensitySettings, high: float,
                                                       values: np.ndarray) -> None:
    low, top = ct.window
    hu = denormalize(values, ct)
    ulp = 1e-6 * max(abs(low), abs(top), 1.0)  # float32 rounding at the window's ends
    assert hu.dtype == np.float32 and hu.min() >= low - ulp and hu.max() <= top + ulp
    mr = denormalize(values, IntensitySettings(kind="mr", reference_high=high))
    assert mr.min() >= 0.0 and mr.max() <= np.float32(high)


@EXAMPLES
@given(values=arrays(np.float64, st.integers(1, 20), elements=reals(-1e3, 1e3)))
def test_unit_helpers_are_inverse(values: np.ndarray) -> None:
    assert np.allclose(to_unit(from_unit(values)), values, rtol=1e-12, atol=1e-9)
    assert np.allclose(from_unit(to_unit(values)), values, rtol=1e-12, atol=1e-9)


# ----------------------------------------------------------------------------- volume files


@st.composite
def affines(draw: st.DrawFn) -> np.ndarray:
    """Any axis order and flips, then spacing, a rotation of up to 40 degrees and an origin."""
    permutation = draw(st.permutations(range(3)))
    flips = draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=3, max_size=3))
    axes = np.zeros((4, 4))
    axes[3, 3] = 1.0
    for column, row in enumerate(permutation):
        axes[row, column] = flips[column]
    spacing = np.diag([*draw(st.lists(reals(0.3, 6.0), min_size=3, max_size=3)), 1.0])
    turn = rotation(draw(reals(-40, 40)), draw(st.integers(0, 2)))
    affine = turn @ axes @ spacing
    affine[:3, 3] = draw(st.lists(reals(-300, 300), min_size=3, max_size=3))
    return affine


@st.composite
def stored_arrays(draw: st.DrawFn) -> np.ndarray:
    shape = draw(st.tuples(st.integers(1, 7), st.integers(1, 7), st.integers(1, 7)))
    dtype = draw(st.sampled_from([np.int8, np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        # int32 beyond int16 is written as float32: exact up to 2**24
        return rng.integers(max(info.min, -2**24), min(info.max, 2**24), size=shape, endpoint=True).astype(dtype)
    return (rng.normal(size=shape) * draw(st.sampled_from([1e-3, 1.0, 1e4]))).astype(np.float32).astype(dtype)


@EXAMPLES
@given(array=stored_arrays(), affine=affines(), suffix=st.sampled_from([".nii", ".nii.gz"]))
def test_volume_files_round_trip_any_orientation_and_dtype(array: np.ndarray, affine: np.ndarray,
                                                           suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        source = write_nifti(Path(folder) / f"in{suffix}", array, affine)
        volume = read_volume(source)  # the affine as the header stores it (float32)
        assert np.allclose(volume.affine, affine, atol=1e-3)
        again = read_volume(write_volume(Path(folder) / f"out{suffix}", volume))
    assert np.array_equal(again.affine, volume.affine)
    assert again.shape == array.shape
    assert np.array_equal(again.array, array)
    slices, frame = to_slices(again)
    assert sorted(slices.shape) == sorted(array.shape)
    assert np.array_equal(from_slices(slices, frame), array.astype(np.float32))
    copy = Volume(from_slices(slices, frame), again.affine)
    assert np.array_equal(to_slices(copy)[0], slices)  # canonical slicing is a bijection
