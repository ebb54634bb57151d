"""Volumes: NIfTI and DICOM reading with geometry, NIfTI writing, canonical slices."""

from __future__ import annotations

import gzip
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from volume_factories import (
    anatomy,
    canonical_affine,
    oriented,
    rotation,
    write_nifti,
)

from targan_cli.errors import TarganError
from targan_cli.io.volume import (
    Volume,
    case_id,
    from_slices,
    is_volume_path,
    list_volumes,
    read_volume,
    to_slices,
    write_volume,
)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _shear_affine() -> np.ndarray:
    affine = rotation(20, 2) @ rotation(-7, 0) @ np.diag([0.9, 1.3, 3.0, 1.0])
    affine[0, 1] += 0.05  # a shear: only the sform can hold it
    affine[:3, 3] = (-12.25, 33.5, 101.0)
    return affine.astype(np.float32).astype(np.float64)  # what a NIfTI header can store


# ----------------------------------------------------------------------------- NIfTI round trips


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip_keeps_array_affine_and_codes(tmp_path: Path, suffix: str) -> None:
    array = anatomy((4, 6, 5))
    affine = _shear_affine()
    source = write_nifti(tmp_path / f"in{suffix}", array, affine, qform_code=1, sform_code=3)
    volume = read_volume(source)
    assert volume.shape == (4, 6, 5) and volume.array.dtype == np.int16
    assert np.array_equal(volume.affine, affine)
    assert volume.modality is None and volume.source == source

    out = write_volume(tmp_path / f"out{suffix}", volume)
    again = read_volume(out)
    assert np.array_equal(again.array, array) and again.array.dtype == np.int16
    assert np.array_equal(again.affine, affine)  # exact, not approximately
    assert int(again.header["qform_code"]) == 1 and int(again.header["sform_code"]) == 3


def test_qform_only_nifti_round_trips_exactly(tmp_path: Path) -> None:
    affine = (rotation(30, 1) @ np.diag([1.5, 0.75, 2.0, 1.0]))
    affine[:3, 3] = (1.0, -2.0, 3.5)
    source = write_nifti(tmp_path / "q.nii.gz", anatomy((3, 4, 5)), affine, qform_code=1, sform_code=0)
    volume = read_volume(source)
    again = read_volume(write_volume(tmp_path / "out.nii.gz", volume))
    assert np.array_equal(again.affine, volume.affine)
    assert int(again.header["qform_code"]) == 1 and int(again.header["sform_code"]) == 0


def test_scaled_nifti_reads_in_stored_units(tmp_path: Path) -> None:
    image = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4))
    image.header.set_slope_inter(2.0, -1024.0)
    nib.save(image, tmp_path / "scaled.nii")
    volume = read_volume(tmp_path / "scaled.nii")
    assert np.array_equal(volume.array, np.arange(24).reshape(2, 3, 4) * 2.0 - 1024)


@pytest.mark.parametrize(
    ("values", "label", "dtype"),
    [
        (np.array([-1024.0, 0.0, 3071.0]), False, np.int16),  # rounded HU stored as float
        (np.array([0.5, 1.25, 2.0]), False, np.float32),
        (np.array([0.0, 40000.0, 1.0]), False, np.float32),  # integral but beyond int16
        (np.array([0, 1, 1], dtype=np.int64), True, np.uint8),
        (np.array([False, True, True]), True, np.uint8),
    ],
)
def test_write_chooses_the_on_disk_type(tmp_path: Path, values: np.ndarray, label: bool, dtype: type) -> None:
    array = np.resize(values, (3, 2, 2))
    volume = Volume(array, np.eye(4))
    out = write_volume(tmp_path / "v.nii.gz", volume, label=label)
    image = nib.load(out)
    assert image.get_data_dtype() == np.dtype(dtype)
    assert np.array_equal(np.asanyarray(image.dataobj), array.astype(np.float64))


def test_write_without_header_uses_scanner_codes_and_keeps_the_affine(tmp_path: Path) -> None:
    affine = canonical_affine((3, 4, 5)) @ rotation(10, 0)
    out = write_volume(tmp_path / "v.nii", Volume(anatomy((3, 4, 5)), affine))
    header = nib.load(out).header
    assert int(header["qform_code"]) == 1 and int(header["sform_code"]) == 1
    assert np.allclose(read_volume(out).affine, affine, atol=1e-5)
    assert header.get_xyzt_units()[0] == "mm"


def test_write_refuses_existing_file_and_non_nifti_names(tmp_path: Path) -> None:
    volume = Volume(anatomy((2, 3, 4)), np.eye(4))
    out = write_volume(tmp_path / "v.nii.gz", volume)
    with pytest.raises(TarganError, match="already exists"):
        write_volume(out, volume)
    write_volume(out, volume.with_array(volume.array + 1), overwrite=True)
    assert np.array_equal(read_volume(out).array, volume.array + 1)
    for name in ("v.mha", ".nii.gz"):  # another format; a suffix without a name
        with pytest.raises(TarganError, match=r"name it NAME\.nii\.gz or NAME\.nii"):
            write_volume(tmp_path / name, volume)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nii.gz"]  # no temporary left behind


def test_write_refuses_values_a_label_cannot_hold(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        write_volume(tmp_path / "l.nii.gz", Volume(np.full((2, 2, 2), 300), np.eye(4)), label=True)
    with pytest.raises(ValueError, match="NaN"):
        write_volume(tmp_path / "n.nii.gz", Volume(np.full((2, 2, 2), np.nan), np.eye(4)))


_AFFINE_ENTRY = st.floats(-3.0, 3.0, allow_nan=False, width=32)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.tuples(*[st.integers(1, 6)] * 3),
    matrix=st.lists(_AFFINE_ENTRY, min_size=12, max_size=12),
    dtype=st.sampled_from([np.int16, np.uint8, np.float32, np.float64]),
    suffix=st.sampled_from([".nii", ".nii.gz"]),
    seed=st.integers(0, 2**16),
)
def test_write_read_round_trip_of_random_volumes(shape, matrix, dtype, suffix, seed) -> None:
    affine = np.eye(4)
    affine[:3, :] = np.reshape(matrix, (3, 4))
    affine[:3, :3] += np.diag([4.0, 4.0, 4.0])  # keep it invertible
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.integer):
        array = rng.integers(0, 200, size=shape).astype(dtype)
    else:
        array = rng.normal(size=shape).astype(np.float32).astype(dtype)  # float32-representable
    with tempfile.TemporaryDirectory() as folder:
        source = write_nifti(Path(folder) / f"in{suffix}", array, affine)
        volume = read_volume(source)
        again = read_volume(write_volume(Path(folder) / f"out{suffix}", volume))
    assert np.array_equal(again.affine, volume.affine)
    assert np.array_equal(again.array, array)
    assert again.shape == shape


def test_a_qform_that_differs_from_the_sform_is_kept_as_it_is(tmp_path: Path) -> None:
    """Tools that read the qform (ITK, SimpleITK) must place the output where they place the input."""
    sform = np.diag([0.7, 0.7, 2.5, 1.0])
    qform = np.diag([1.5, 0.7, 2.5, 1.0])
    qform[:3, 3] = 100.0
    image = nib.Nifti1Image(anatomy((4, 5, 6)), sform)
    image.header.set_qform(qform, code=1)
    image.header.set_sform(sform, code=2)
    nib.save(image, tmp_path / "qs.nii.gz")
    volume = read_volume(tmp_path / "qs.nii.gz")
    header = nib.load(write_volume(tmp_path / "out.nii.gz", volume.with_array(volume.array + 1))).header
    for name in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x", "qoffset_y",
                 "qoffset_z", "srow_x", "srow_y", "srow_z", "pixdim"):
        assert np.array_equal(header[name], image.header[name]), name
    np.testing.assert_allclose(header.get_qform(), qform, atol=1e-6)


def test_a_file_without_qform_and_sform_codes_stays_without(tmp_path: Path) -> None:
    """Codes 0 and 0: every reader falls back to its own default geometry; the output must give the
    same one, not a made-up scanner frame."""
    header = nib.Nifti1Header()
    header.set_data_shape((4, 5, 6))
    header.set_zooms((0.7, 0.7, 2.5))
    nib.save(nib.Nifti1Image(anatomy((4, 5, 6)), None, header), tmp_path / "bare.nii.gz")
    volume = read_volume(tmp_path / "bare.nii.gz")
    out = nib.load(write_volume(tmp_path / "out.nii.gz", volume)).header
    assert (int(out["qform_code"]), int(out["sform_code"])) == (0, 0)
    assert np.array_equal(out.get_zooms(), (0.7, 0.7, 2.5)) or np.allclose(out.get_zooms(), (0.7, 0.7, 2.5))
    np.testing.assert_array_equal(read_volume(tmp_path / "out.nii.gz").affine, volume.affine)


def test_nifti2_and_a_trailing_unit_dimension_are_kept(tmp_path: Path) -> None:
    affine = canonical_affine((4, 5, 6))
    nib.save(nib.Nifti2Image(anatomy((4, 5, 6))[..., None], affine), tmp_path / "n2.nii")
    volume = read_volume(tmp_path / "n2.nii")
    assert volume.shape == (4, 5, 6)
    out = nib.load(write_volume(tmp_path / "out.nii", volume))
    assert isinstance(out, nib.Nifti2Image) and out.shape == (4, 5, 6, 1)
    np.testing.assert_array_equal(out.affine, volume.affine)


def test_values_beyond_float32_are_refused(tmp_path: Path) -> None:
    huge = write_nifti(tmp_path / "huge.nii.gz", anatomy((3, 4, 5)).astype(np.float64) * 1e300, np.eye(4))
    with pytest.raises(TarganError, match=r"values up to .*e\+30\d in magnitude, beyond float32's range") as error:
        read_volume(huge)
    assert error.value.path == huge
    image = nib.Nifti1Image(anatomy((3, 4, 5)), np.eye(4))
    image.header.set_slope_inter(1e36, 0.0)  # int16 data scaled out of float32's range
    nib.save(image, tmp_path / "slope.nii.gz")
    with pytest.raises(TarganError, match="check its scaling"):
        read_volume(tmp_path / "slope.nii.gz")


def test_nibabel_header_fixups_print_nothing(tmp_path: Path) -> None:
    header = nib.Nifti1Header()
    header.set_data_shape((3, 4, 5))
    path = tmp_path / "zero.nii"
    nib.save(nib.Nifti1Image(anatomy((3, 4, 5)), None, header), path)
    raw = bytearray(path.read_bytes())
    raw[80:92] = bytes(12)  # pixdim[1:4] = 0 on disk: nibabel fixes it on load, and logs it
    path.write_bytes(bytes(raw))
    # In a fresh process: nibabel's log handler holds the sys.stderr of the moment it was imported.
    code = f"from targan_cli.io.volume import read_volume; print(read_volume({str(path)!r}).shape)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (result.stdout.strip(), result.stderr) == ("(3, 4, 5)", "")


# ----------------------------------------------------------------------------- NIfTI errors


def test_4d_with_one_volume_is_squeezed_and_more_are_refused(tmp_path: Path) -> None:
    one = write_nifti(tmp_path / "one.nii.gz", np.ones((3, 4, 5, 1), np.int16), np.eye(4))
    assert read_volume(one).shape == (3, 4, 5)
    many = write_nifti(tmp_path / "many.nii.gz", np.ones((3, 4, 5, 2), np.int16), np.eye(4))
    with pytest.raises(TarganError, match="holds 2 volumes") as error:
        read_volume(many)
    assert error.value.path == many


def test_2d_image_is_refused(tmp_path: Path) -> None:
    flat = write_nifti(tmp_path / "flat.nii", np.ones((4, 5), np.int16), np.eye(4))
    with pytest.raises(TarganError, match="is 2D"):
        read_volume(flat)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.nii.gz", b"", "empty file"),
        ("text.nii.gz", b"patient notes, not an image\n" * 20, "not a readable NIfTI"),
        ("text.nii", b"patient notes, not an image\n" * 20, "not a readable NIfTI"),
    ],
)
def test_files_that_are_not_nifti_are_refused(tmp_path: Path, name: str, content: bytes,
                                              message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TarganError, match=message) as error:
        read_volume(path)
    assert error.value.path == path


def test_gzip_outputs_are_standard_deterministic_and_read_back_exactly(tmp_path: Path) -> None:
    """A written .nii.gz (deflated by ISA-L) is a plain gzip stream: Python's gzip module inflates it
    to the very bytes of the uncompressed .nii, its header names no file and no time (equal images,
    equal files), and a .nii.gz deflated by zlib (nibabel's own save) reads back to the same voxels."""
    rng = np.random.default_rng(3)
    volume = Volume(rng.normal(300, 80, (40, 30, 12)).astype(np.float32), np.diag([0.8, 0.8, 2.5, 1.0]))
    first, second, plain = (write_volume(tmp_path / name, volume) for name in ("a.nii.gz", "b.nii.gz", "c.nii"))
    compressed = first.read_bytes()
    assert compressed[:3] == b"\x1f\x8b\x08" and compressed[3] & 0x08 == 0  # gzip, deflate, no file name
    assert int.from_bytes(compressed[4:8], "little") == 0  # no time
    assert compressed == second.read_bytes()
    assert gzip.decompress(compressed) == plain.read_bytes()
    by_zlib = tmp_path / "zlib.nii.gz"
    nib.save(nib.load(plain), by_zlib)
    for path in (first, by_zlib):
        assert np.array_equal(read_volume(path).array, volume.array)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_write_refuses_non_finite_values_and_leaves_no_file(tmp_path: Path, bad: float) -> None:
    array = np.zeros((6, 5, 4), np.float32)
    array[5, 4, 3] = bad  # the last voxel: not found by looking at the first ones only
    with pytest.raises(ValueError, match="NaN or infinite"):
        write_volume(tmp_path / "bad.nii.gz", Volume(array, np.eye(4)))
    assert list(tmp_path.iterdir()) == []


def test_a_fraction_in_the_last_million_voxels_keeps_a_volume_float(tmp_path: Path) -> None:
    """The whole-number check looks at every chunk: one fraction at the very end of 1.5 million
    whole values keeps the file float32 (int16 would round it)."""
    array = np.full((120, 125, 100), 7.0, np.float32)
    array[-1, -1, -1] = 7.5
    path = write_volume(tmp_path / "fraction.nii.gz", Volume(array, np.eye(4)))
    assert nib.load(path).get_data_dtype() == np.float32
    assert read_volume(path).array[-1, -1, -1] == 7.5
    array[-1, -1, -1] = 8.0
    assert nib.load(write_volume(tmp_path / "whole.nii.gz", Volume(array, np.eye(4)))).get_data_dtype() == np.int16


def test_truncated_gzip_is_refused(tmp_path: Path) -> None:
    full = write_nifti(tmp_path / "full.nii.gz", anatomy((8, 16, 16), seed=3), np.eye(4))
    data = full.read_bytes()
    truncated = tmp_path / "cut.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(TarganError, match="damaged or truncated"):
        read_volume(truncated)


def test_corrupt_gzip_stream_is_refused(tmp_path: Path) -> None:
    good = write_nifti(tmp_path / "ok.nii.gz", anatomy((8, 16, 16), seed=4), np.eye(4))
    data = bytearray(good.read_bytes())
    data[200:260] = bytes(60)  # zero a stretch inside the deflate stream
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(bytes(data))
    with pytest.raises(TarganError):
        read_volume(bad)


def test_truncated_uncompressed_file_is_refused(tmp_path: Path) -> None:
    data = write_nifti(tmp_path / "ok.nii", anatomy((4, 6, 6)), np.eye(4)).read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[:-10])
    with pytest.raises(TarganError, match="truncated"):
        read_volume(tmp_path / "cut.nii")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_enormous_declared_dims_in_a_tiny_file_are_refused_before_loading(tmp_path: Path,
                                                                          suffix: str) -> None:
    header = nib.Nifti1Header()
    header.set_data_dtype(np.float32)
    header.set_data_shape((4000, 4000, 4000))  # 256 GB of voxels
    path = tmp_path / f"huge{suffix}"
    raw = header.binaryblock + b"\0" * 4 + b"\0" * 64
    path.write_bytes(gzip.compress(raw) if suffix == ".nii.gz" else raw)
    with pytest.raises(TarganError, match=r"declares \(4000, 4000, 4000\) voxels"):
        read_volume(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels_are_refused(tmp_path: Path, bad: float) -> None:
    array = np.zeros((3, 3, 3), np.float32)
    array[1, 2, 0] = bad
    path = write_nifti(tmp_path / "nan.nii.gz", array, np.eye(4))
    with pytest.raises(TarganError, match="1 voxel"):
        read_volume(path)


def test_missing_path_and_unknown_format_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TarganError, match="not found"):
        read_volume(tmp_path / "nothing.nii.gz")
    other = tmp_path / "scan.mha"
    other.write_bytes(b"x")
    with pytest.raises(TarganError, match="not a volume"):
        read_volume(other)


# ----------------------------------------------------------------------------- paths


def test_list_volumes_case_ids_and_volume_paths(tmp_path: Path) -> None:
    for name in ("b.nii.gz", "a.nii", ".a.tmp-1.nii.gz", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dicom").mkdir()
    (tmp_path / "dicom" / "1.dcm").write_bytes(b"x")
    files = list_volumes(tmp_path)
    assert [f.name for f in files] == ["a.nii", "b.nii.gz"]
    assert [case_id(f) for f in files] == ["a", "b"]
    assert case_id(tmp_path / "dicom") == "dicom" and case_id("x/patient.1.nii.gz") == "patient.1"
    assert is_volume_path(tmp_path / "a.nii") and not is_volume_path(tmp_path / "dicom")  # DICOM by content only
    assert not is_volume_path(tmp_path / "notes.txt") and not is_volume_path(tmp_path)
    (tmp_path / "a.nii.gz").write_bytes(b"x")
    with pytest.raises(TarganError, match="case 'a' has two files"):
        list_volumes(tmp_path)
    with pytest.raises(TarganError, match="folder not found"):
        list_volumes(tmp_path / "missing")


def test_volume_properties_and_with_array() -> None:
    affine = canonical_affine((2, 3, 4), spacing=(2.5, 0.8, 0.7))
    volume = Volume(anatomy((2, 3, 4)), affine, modality="CT")
    assert volume.shape == (2, 3, 4)
    assert np.allclose(volume.spacing, (2.5, 0.8, 0.7))
    other = volume.with_array(np.zeros((2, 3, 4), np.float32))
    assert other.modality == "CT" and np.array_equal(other.affine, affine) and other.array.sum() == 0
    with pytest.raises(ValueError, match="differs"):
        volume.with_array(np.zeros((2, 3, 5)))
    with pytest.raises(ValueError, match="3D"):
        Volume(np.zeros((2, 3)), np.eye(4))


# ----------------------------------------------------------------------------- orientation


def test_ras_volume_maps_to_the_display_convention() -> None:
    # Hand-built, independent of nibabel: a[x, y, z] with x -> patient right, y -> anterior.
    array = anatomy((6, 5, 4)).astype(np.float32)
    slices, _ = to_slices(Volume(array, np.diag([0.7, 0.8, 2.5, 1.0])))
    expected = array[::-1, ::-1, :].transpose(2, 1, 0)  # columns right -> left, rows anterior -> posterior
    assert np.array_equal(slices, expected)


@pytest.mark.parametrize("axcodes", ["SPL", "RAS", "LPS", "ASL", "PIR", "LAI"])
def test_every_voxel_order_gives_the_same_canonical_slices(axcodes: str) -> None:
    canonical = anatomy()
    array, affine = oriented(canonical, axcodes)
    volume = Volume(array, affine)
    slices, frame = to_slices(volume)
    assert slices.dtype == np.float32 and np.array_equal(slices, canonical)
    assert frame.canonical_shape == canonical.shape
    back = from_slices(slices, frame)
    assert back.shape == array.shape and np.array_equal(back, array)


@pytest.mark.parametrize(("degrees", "axis"), [(12, 2), (-25, 0), (30, 1)])
def test_oblique_volumes_use_their_nearest_axes(degrees: float, axis: int) -> None:
    canonical = anatomy()
    array, affine = oriented(canonical, "LPS")
    slices, frame = to_slices(Volume(array, rotation(degrees, axis) @ affine))
    assert np.array_equal(slices, canonical)
    assert np.array_equal(from_slices(slices, frame), array)


def test_from_slices_refuses_the_wrong_shape() -> None:
    _, frame = to_slices(Volume(*oriented(anatomy(), "RAS")))
    with pytest.raises(ValueError, match="do not fit"):
        from_slices(np.zeros((5, 10, 12), np.float32), frame)


def test_degenerate_affine_is_a_targan_error() -> None:
    with pytest.raises(TarganError, match="no usable orientation"):
        to_slices(Volume(anatomy(), np.diag([1.0, 0.0, 1.0, 1.0])))
