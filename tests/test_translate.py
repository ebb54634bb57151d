"""workflows/translate.py, io/montage.py and `targan translate`: real NIfTI / DICOM files, tiny weights."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from targan_cli.cli import app
from targan_cli.config import default_modalities
from targan_cli.errors import TarganError, UsageError
from targan_cli.io.montage import render_montage, save_montage, window_to_uint8
from targan_cli.io.volume import read_volume, to_slices
from targan_cli.io.weights import load_weights
from targan_cli.workflows.translate import translate, translate_volume
from volume_factories import anatomy, canonical_affine, oriented, rotation, write_dicom_series, write_nifti
from weights_factories import TINY_REFERENCE_HIGH, make_tiny_weights, use_offline_hub_cache

SHAPE = (5, 24, 20)  # canonical (Z, H, W)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny")


@pytest.fixture(scope="module")
def ct_canonical() -> np.ndarray:
    return anatomy(SHAPE)  # HU-like: body 40..200, air -1000


def _ct_file(folder: Path, canonical: np.ndarray, axcodes: str = "RAS", name: str = "ct.nii.gz",
             affine: np.ndarray | None = None) -> Path:
    array, file_affine = oriented(canonical, axcodes, affine)
    return write_nifti(folder / name, array, file_affine)


def _canonical_output(path: Path) -> np.ndarray:
    return to_slices(read_volume(path))[0]


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


# ----------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("axcodes, rotated", [("RAS", False), ("LPS", False), ("ASL", False),
                                              ("PIR", False), ("RAS", True)])
def test_output_geometry_equals_the_input(tmp_path: Path, weights: Path, ct_canonical: np.ndarray,
                                          axcodes: str, rotated: bool) -> None:
    affine = rotation(20, axis=2) @ rotation(-10, axis=0) @ canonical_affine(SHAPE) if rotated else None
    source = _ct_file(tmp_path, ct_canonical, axcodes, affine=affine)
    result = translate(source, tmp_path / "t2w.nii.gz", to="t2w", source="ct", weights=weights, device="cpu")
    assert result.outputs == (tmp_path / "t2w.nii.gz",)
    before, after = nib.load(source), nib.load(result.outputs[0])
    assert after.shape == before.shape
    assert np.array_equal(after.affine, before.affine)
    assert nib.aff2axcodes(after.affine) == nib.aff2axcodes(before.affine)
    if not rotated:
        assert nib.aff2axcodes(after.affine) == tuple(axcodes)
    assert int(after.header["sform_code"]) == int(before.header["sform_code"]) == 2
    values = np.asarray(after.dataobj)
    assert values.dtype == np.float32  # MR output: relative units, not rounded
    assert 0.0 <= values.min() and values.max() <= TINY_REFERENCE_HIGH and values.std() > 0


def test_the_same_anatomy_in_two_voxel_orders_gives_the_same_result(tmp_path: Path, weights: Path,
                                                                    ct_canonical: np.ndarray) -> None:
    outputs = []
    for axcodes in ("RAS", "LPS", "ASL"):
        source = _ct_file(tmp_path, ct_canonical, axcodes, name=f"{axcodes}.nii.gz")
        outputs.append(translate(source, tmp_path / f"out-{axcodes}.nii.gz", to="t1w", source="ct",
                                 weights=weights, device="cpu").outputs[0])
    reference = _canonical_output(outputs[0])
    assert reference.shape == SHAPE
    for output in outputs[1:]:
        np.testing.assert_array_equal(_canonical_output(output), reference)
    # Physical space: the same voxel of each file maps to the same world point and value.
    for output in outputs[1:]:
        image = nib.load(output)
        world = nib.affines.apply_affine(image.affine, np.array([[1, 2, 3]]))
        voxel = np.rint(nib.affines.apply_affine(np.linalg.inv(nib.load(outputs[0]).affine), world)).astype(int)[0]
        assert np.asarray(image.dataobj)[1, 2, 3] == np.asarray(nib.load(outputs[0]).dataobj)[tuple(voxel)]


def test_ct_output_is_whole_hu_stored_as_int16(tmp_path: Path, weights: Path, ct_canonical: np.ndarray) -> None:
    mr = np.clip(ct_canonical, 0, None).astype(np.float32) * 3.5  # body positive, background 0
    source = _ct_file(tmp_path, mr, name="t2w.nii.gz")
    output = translate(source, tmp_path / "ct.nii.gz", to="ct", source="t2w", weights=weights,
                       device="cpu").outputs[0]
    image = nib.load(output)
    assert image.get_data_dtype() == np.int16
    values = np.asarray(image.dataobj)
    low, high = default_modalities()[2].intensity.window
    assert low <= values.min() and values.max() <= high and values.std() > 0


def test_translate_volume_matches_the_file_workflow(tmp_path: Path, weights: Path, ct_canonical: np.ndarray) -> None:
    source = _ct_file(tmp_path, ct_canonical, "LPS")
    output = translate(source, tmp_path / "out.nii.gz", to="t2w", source="ct", weights=weights,
                       device="cpu").outputs[0]
    volume = translate_volume(read_volume(source), load_weights(weights), "ct", "t2w")
    assert volume.modality == "MR"
    assert np.array_equal(volume.affine, read_volume(source).affine)
    np.testing.assert_array_equal(volume.array, np.asarray(nib.load(output).dataobj))


def test_batch_size_does_not_change_the_volume(tmp_path: Path, weights: Path, ct_canonical: np.ndarray) -> None:
    source = _ct_file(tmp_path, ct_canonical)
    results = [np.asarray(nib.load(translate(source, tmp_path / f"b{size}.nii.gz", to="t1w", source="ct",
                                             weights=weights, device="cpu", batch_size=size).outputs[0]).dataobj)
               for size in (1, 16)]
    np.testing.assert_allclose(results[0], results[1], atol=1e-4 * TINY_REFERENCE_HIGH)


def test_progress_reports_the_total_first_then_every_slice(tmp_path: Path, weights: Path,
                                                           ct_canonical: np.ndarray) -> None:
    events: list[tuple[str, int]] = []
    source = _ct_file(tmp_path, ct_canonical, "ASL")
    result = translate(source, tmp_path / "out.nii.gz", to="t1w", source="ct", weights=weights, device="cpu",
                       batch_size=2, progress=lambda n: events.append(("advance", n)),
                       total_callback=lambda n: events.append(("total", n)))
    # The total is the input's slices; the QC's cycle is a second pass, so each pass counts half.
    assert events == [("total", 5), *[("advance", 1), ("advance", 1), ("advance", 0.5)] * 2]
    assert sum(n for kind, n in events if kind == "advance") == 5
    assert result.slices == 5 and result.device == "cpu" and result.target == "t1w"
    assert result.seconds > 0 and result.slices_per_second == pytest.approx(5 / result.seconds)


# ----------------------------------------------------------------------------- source modality


def test_dicom_ct_series_infers_the_source_from_the_modality_tag(tmp_path: Path, weights: Path,
                                                                  ct_canonical: np.ndarray) -> None:
    series = tmp_path / "series"
    write_dicom_series(series, ((ct_canonical + 1024) * 2).astype(np.uint16), slope=0.5, intercept=-1024,
                       modality="CT")
    inferred = translate(series, tmp_path / "inferred.nii.gz", to="t2w", weights=weights, device="cpu").outputs[0]
    explicit = translate(series, tmp_path / "explicit.nii.gz", to="t2w", source="ct", weights=weights,
                         device="cpu").outputs[0]
    image = nib.load(inferred)
    dicom = read_volume(series)
    assert image.shape == dicom.shape
    np.testing.assert_allclose(image.affine, dicom.affine, atol=1e-5)
    assert np.array_equal(np.asarray(image.dataobj), np.asarray(nib.load(explicit).dataobj))
    np.testing.assert_array_equal(to_slices(dicom)[0], ct_canonical)  # HU after slope and intercept
    # The rescaled HU reach the model: the same anatomy as a NIfTI file gives the same result.
    nifti = write_nifti(tmp_path / "same.nii.gz", dicom.array, dicom.affine)
    from_nifti = translate(nifti, tmp_path / "from-nifti.nii.gz", to="t2w", source="ct", weights=weights,
                           device="cpu").outputs[0]
    np.testing.assert_allclose(np.asarray(image.dataobj), np.asarray(nib.load(from_nifti).dataobj), rtol=1e-5)


def test_dicom_mr_series_with_several_mr_modalities_needs_from(tmp_path: Path, weights: Path,
                                                              ct_canonical: np.ndarray) -> None:
    series = tmp_path / "mr"
    write_dicom_series(series, np.clip(ct_canonical, 0, None).astype(np.uint16), modality="MR")
    with pytest.raises(UsageError, match="the DICOM series is MR.*pass --from with one of t1w, t2w"):
        translate(series, tmp_path / "out.nii.gz", to="ct", weights=weights, device="cpu")
    assert not (tmp_path / "out.nii.gz").exists()


def test_dicom_ct_series_without_a_ct_modality_in_the_weights(tmp_path: Path, ct_canonical: np.ndarray) -> None:
    mr_only = make_tiny_weights(tmp_path / "mr-only", default_modalities(("t1w", "t2w")))
    series = tmp_path / "series"
    write_dicom_series(series, (ct_canonical + 1024).astype(np.uint16), intercept=-1024)
    with pytest.raises(UsageError, match="is CT but these weights have no CT modality .they know t1w, t2w"):
        translate(series, tmp_path / "out.nii.gz", to="t2w", weights=mr_only, device="cpu")


def test_nifti_without_from_is_taken_as_ct_from_hounsfield_units(tmp_path: Path, weights: Path,
                                                                  ct_canonical: np.ndarray) -> None:
    source = _ct_file(tmp_path, ct_canonical)
    inferred = translate(source, tmp_path / "a.nii.gz", to="t2w", weights=weights, device="cpu").outputs[0]
    explicit = translate(source, tmp_path / "b.nii.gz", to="t2w", source="ct", weights=weights,
                         device="cpu").outputs[0]
    assert np.array_equal(np.asarray(nib.load(inferred).dataobj), np.asarray(nib.load(explicit).dataobj))


def test_nifti_mr_without_from_leaves_the_target_out(tmp_path: Path, weights: Path,
                                                     ct_canonical: np.ndarray) -> None:
    mr = _ct_file(tmp_path, np.clip(ct_canonical + 200, 0, None), name="mr.nii.gz")
    inferred = translate(mr, tmp_path / "a.nii.gz", to="t2w", weights=weights, device="cpu").outputs[0]
    explicit = translate(mr, tmp_path / "b.nii.gz", to="t2w", source="t1w", weights=weights,
                         device="cpu").outputs[0]
    assert np.array_equal(np.asarray(nib.load(inferred).dataobj), np.asarray(nib.load(explicit).dataobj))
    with pytest.raises(UsageError, match="values look like MR, which fits several modalities of these "
                                         "weights: pass --from with one of t1w, t2w"):
        translate(mr, tmp_path / "c.nii.gz", to="ct", weights=weights, device="cpu")


def test_a_dicom_series_of_another_modality_needs_from(tmp_path: Path, weights: Path,
                                                       ct_canonical: np.ndarray) -> None:
    series = tmp_path / "pet"
    write_dicom_series(series, np.clip(ct_canonical, 0, None).astype(np.uint16), modality="PT")
    with pytest.raises(UsageError, match="the DICOM series is PT, not CT or MR: pass --from with the modality "
                                         "to treat it as, one of t1w, t2w, ct"):
        translate(series, tmp_path / "out.nii.gz", to="t1w", weights=weights, device="cpu")
    result = translate(series, tmp_path / "out.nii.gz", to="t1w", source="t2w", weights=weights, device="cpu")
    assert [(choice.name, choice.reason) for choice in result.sources] == [("t2w", None)]


def test_the_result_says_how_the_source_was_chosen(tmp_path: Path, weights: Path, ct_canonical: np.ndarray) -> None:
    source = _ct_file(tmp_path, ct_canonical)
    mr = _ct_file(tmp_path, np.clip(ct_canonical + 200, 0, None), name="mr.nii.gz")
    guessed = translate(source, tmp_path / "a.nii.gz", to="t2w", weights=weights, device="cpu").sources
    assert [(c.name, c.reason) for c in guessed] == [("ct", "the values look like CT, the weights' only CT modality")]
    left_out = translate(mr, tmp_path / "b.nii.gz", to="t2w", weights=weights, device="cpu").sources
    assert [(c.name, c.reason) for c in left_out] == [
        ("t1w", "the values look like MR, the weights' only MR modality other than --to")]
    result = CliRunner().invoke(app, ["translate", str(mr), "-o", str(tmp_path / "c.nii.gz"), "--to", "t2w",
                                      "--weights", str(weights), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    output = _one_line(result.output)
    assert "(t1w → t2w)" in output
    assert ("--from t1w was inferred: the values look like MR, the weights' only MR modality other than --to; "
            "pass --from to choose") in output


def test_nifti_without_from_needs_it_when_the_values_do_not_tell(tmp_path: Path, weights: Path,
                                                                 ct_canonical: np.ndarray) -> None:
    scaled = _ct_file(tmp_path, np.clip(ct_canonical / 1000.0, -1, 1).astype(np.float32))
    with pytest.raises(UsageError, match="pass --from with the input's modality, one of t1w, t2w, ct"):
        translate(scaled, tmp_path / "out.nii.gz", to="t2w", weights=weights, device="cpu")


def test_nifti_without_from_takes_the_only_other_modality(tmp_path: Path, ct_canonical: np.ndarray) -> None:
    two = make_tiny_weights(tmp_path / "two", default_modalities(("t2w", "ct")))
    source = _ct_file(tmp_path, ct_canonical)
    inferred = translate(source, tmp_path / "a.nii.gz", to="t2w", weights=two, device="cpu").outputs[0]
    explicit = translate(source, tmp_path / "b.nii.gz", to="t2w", source="ct", weights=two, device="cpu").outputs[0]
    assert np.array_equal(np.asarray(nib.load(inferred).dataobj), np.asarray(nib.load(explicit).dataobj))


def test_reconstruction_to_the_same_modality_is_allowed(tmp_path: Path, weights: Path,
                                                        ct_canonical: np.ndarray) -> None:
    source = _ct_file(tmp_path, ct_canonical)
    output = translate(source, tmp_path / "ct-again.nii.gz", to="ct", source="ct", weights=weights,
                       device="cpu").outputs[0]
    assert nib.load(output).get_data_dtype() == np.int16


@pytest.mark.parametrize("option", ["to", "source"])
def test_an_unknown_modality_lists_the_valid_ones(tmp_path: Path, weights: Path, ct_canonical: np.ndarray,
                                                  option: str) -> None:
    source = _ct_file(tmp_path, ct_canonical)
    kwargs = {"to": "t2w", "source": "ct", option: "flair"}
    with pytest.raises(TarganError, match="unknown modality 'flair'; these weights know t1w, t2w, ct") as caught:
        translate(source, tmp_path / "out.nii.gz", weights=weights, device="cpu", **kwargs)
    assert caught.value.exit_code == 2


def test_a_blank_mr_volume_is_refused_with_the_file_named(tmp_path: Path, weights: Path) -> None:
    source = write_nifti(tmp_path / "blank.nii.gz", np.full((20, 24, 5), 7, np.int16), canonical_affine(SHAPE))
    with pytest.raises(TarganError, match="blank") as caught:
        translate(source, tmp_path / "out.nii.gz", to="ct", source="t1w", weights=weights, device="cpu")
    assert caught.value.path == source
    assert list(tmp_path.iterdir()) == [source]  # no partial or temporary output


def test_a_failure_before_writing_leaves_no_new_output_folder(tmp_path: Path, weights: Path) -> None:
    source = write_nifti(tmp_path / "blank.nii.gz", np.full((20, 24, 5), 7, np.int16), canonical_affine(SHAPE))
    with pytest.raises(TarganError, match="blank"):
        translate(source, tmp_path / "new" / "deeper" / "out.nii.gz", to="ct", source="t1w", weights=weights,
                  device="cpu")
    assert list(tmp_path.iterdir()) == [source]


def test_missing_output_folders_are_created_when_the_output_is_written(tmp_path: Path, weights: Path,
                                                                       ct_canonical: np.ndarray) -> None:
    output = tmp_path / "new" / "deeper" / "out.nii.gz"
    source = _ct_file(tmp_path, ct_canonical)
    translate(source, output, to="t2w", source="ct", weights=weights, device="cpu")
    assert nib.load(output).shape == nib.load(source).shape


# ----------------------------------------------------------------------------- folders and parts


def _case_folder(folder: Path, canonical: np.ndarray, cases: tuple[str, ...] = ("a", "b", "c")) -> Path:
    folder.mkdir()
    for index, case in enumerate(cases):
        _ct_file(folder, canonical[index % 2:], ("RAS", "LPS", "ASL")[index % 3], name=f"{case}.nii.gz")
    return folder


@pytest.mark.parametrize("num_parts, part_id, expected", [(1, 0, ["a", "b", "c"]), (2, 0, ["a", "c"]),
                                                          (2, 1, ["b"]), (4, 3, [])])
def test_a_folder_is_split_into_deterministic_parts(tmp_path: Path, weights: Path, ct_canonical: np.ndarray,
                                                    num_parts: int, part_id: int, expected: list[str]) -> None:
    cases = _case_folder(tmp_path / "cases", ct_canonical)
    totals: list[int] = []
    advanced: list[int] = []
    result = translate(cases, tmp_path / "out", to="t2w", source="ct", weights=weights, device="cpu",
                       num_parts=num_parts, part_id=part_id, progress=advanced.append, total_callback=totals.append)
    assert result.outputs == tuple(tmp_path / "out" / f"{case}.nii.gz" for case in expected)
    written = sorted(p.name for p in (tmp_path / "out").iterdir()) if expected else []
    assert written == sorted(name for case in expected for name in (f"{case}.json", f"{case}.nii.gz"))
    depths = {"a": 5, "b": 4, "c": 5}
    total = sum(depths[case] for case in expected)
    assert totals == ([total] if expected else [])  # a part without files reports no total
    assert sum(advanced) == total == result.slices
    for case in expected:
        assert nib.load(tmp_path / "out" / f"{case}.nii.gz").shape == nib.load(cases / f"{case}.nii.gz").shape


def test_a_folder_refuses_existing_outputs_per_file(tmp_path: Path, weights: Path, ct_canonical: np.ndarray) -> None:
    cases = _case_folder(tmp_path / "cases", ct_canonical)
    (tmp_path / "out").mkdir()
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)), tmp_path / "out" / "b.nii.gz")  # an old result
    with pytest.raises(TarganError, match="already exists; pass --overwrite") as caught:
        translate(cases, tmp_path / "out", to="t2w", source="ct", weights=weights, device="cpu")
    assert caught.value.path == tmp_path / "out" / "b.nii.gz"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.nii.gz"]  # checked before any work
    translate(cases, tmp_path / "out", to="t2w", source="ct", weights=weights, device="cpu", overwrite=True)
    assert nib.load(tmp_path / "out" / "b.nii.gz").shape == nib.load(cases / "b.nii.gz").shape


def test_a_damaged_case_in_a_folder_fails_before_anything_is_written(tmp_path: Path, weights: Path,
                                                                    ct_canonical: np.ndarray) -> None:
    cases = _case_folder(tmp_path / "cases", ct_canonical)
    (cases / "b.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(TarganError) as caught:
        translate(cases, tmp_path / "out", to="t2w", source="ct", weights=weights, device="cpu")
    assert caught.value.path == cases / "b.nii.gz"
    assert not (tmp_path / "out").exists()  # not even an empty output folder


def test_an_empty_folder_is_refused(tmp_path: Path, weights: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(TarganError, match="no NIfTI"):
        translate(tmp_path / "empty", tmp_path / "out", to="t2w", weights=weights, device="cpu")


@pytest.mark.parametrize("num_parts, part_id, message", [(0, 0, "--num-parts must be at least 1"),
                                                         (2, 2, "--part-id must be within 0 to 1"),
                                                         (2, -1, "--part-id must be within 0 to 1")])
def test_bad_parts_are_usage_errors(tmp_path: Path, weights: Path, ct_canonical: np.ndarray,
                                    num_parts: int, part_id: int, message: str) -> None:
    cases = _case_folder(tmp_path / "cases", ct_canonical)
    with pytest.raises(UsageError, match=message):
        translate(cases, tmp_path / "out", to="t2w", weights=weights, num_parts=num_parts, part_id=part_id)


def test_parts_of_a_single_volume_are_refused(tmp_path: Path, weights: Path, ct_canonical: np.ndarray) -> None:
    with pytest.raises(UsageError, match="--num-parts splits a folder"):
        translate(_ct_file(tmp_path, ct_canonical), tmp_path / "o.nii.gz", to="t2w", weights=weights, num_parts=2)


# ----------------------------------------------------------------------------- outputs


def test_an_existing_output_is_refused_without_overwrite(tmp_path: Path, weights: Path,
                                                          ct_canonical: np.ndarray) -> None:
    source = _ct_file(tmp_path, ct_canonical)
    output = tmp_path / "out.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)), output)  # an old result
    old = output.read_bytes()
    with pytest.raises(TarganError, match="already exists; pass --overwrite"):
        translate(source, output, to="t2w", source="ct", weights=weights, device="cpu")
    assert output.read_bytes() == old
    translate(source, output, to="t2w", source="ct", weights=weights, device="cpu", overwrite=True)
    assert nib.load(output).shape == nib.load(source).shape


def test_the_input_is_never_an_output_even_with_overwrite(tmp_path: Path, weights: Path,
                                                          ct_canonical: np.ndarray) -> None:
    source = _ct_file(tmp_path, ct_canonical)
    before = source.read_bytes()
    (tmp_path / "link.nii.gz").symlink_to(source)
    for output in (source, tmp_path / "." / "ct.nii.gz", tmp_path / "link.nii.gz"):
        with pytest.raises(TarganError, match=r"is also an input \(.*ct\.nii\.gz\): write the output under "
                                              "another name") as caught:
            translate(source, output, to="t2w", source="ct", weights=weights, device="cpu", overwrite=True)
        assert caught.value.path == output
    cases = _case_folder(tmp_path / "cases", ct_canonical)
    folder_before = {p.name: p.read_bytes() for p in cases.iterdir()}
    with pytest.raises(TarganError, match="is also an input"):
        translate(cases, cases, to="t2w", source="ct", weights=weights, device="cpu", overwrite=True)
    assert source.read_bytes() == before
    assert {p.name: p.read_bytes() for p in cases.iterdir()} == folder_before


def test_an_output_named_only_by_its_suffix_is_refused(tmp_path: Path, weights: Path,
                                                       ct_canonical: np.ndarray) -> None:
    source = _ct_file(tmp_path, ct_canonical)
    with pytest.raises(UsageError, match="name it NAME.nii.gz or NAME.nii"):
        translate(source, tmp_path / "sub" / ".nii.gz", to="t2w", source="ct", weights=weights, device="cpu")
    assert not (tmp_path / "sub").exists()


def test_an_output_under_a_file_is_refused(tmp_path: Path, weights: Path, ct_canonical: np.ndarray) -> None:
    source = _ct_file(tmp_path, ct_canonical)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a folder")
    with pytest.raises(TarganError, match="cannot create the output folder") as caught:
        translate(source, blocker / "out.nii.gz", to="t2w", source="ct", weights=weights, device="cpu")
    assert caught.value.path == blocker


def test_a_folder_input_needs_a_folder_output(tmp_path: Path, weights: Path, ct_canonical: np.ndarray) -> None:
    cases = _case_folder(tmp_path / "cases", ct_canonical)
    (tmp_path / "out.nii.gz").write_bytes(b"")
    with pytest.raises(TarganError, match="the output must be a folder"):
        translate(cases, tmp_path / "out.nii.gz", to="t2w", weights=weights)


def test_a_single_volume_needs_a_nifti_output_name(tmp_path: Path, weights: Path, ct_canonical: np.ndarray) -> None:
    with pytest.raises(UsageError, match="name it NAME.nii.gz or NAME.nii"):
        translate(_ct_file(tmp_path, ct_canonical), tmp_path / "out.png", to="t2w", weights=weights)


def test_a_missing_input_is_refused(tmp_path: Path, weights: Path) -> None:
    with pytest.raises(TarganError, match="not found") as caught:
        translate(tmp_path / "missing.nii.gz", tmp_path / "out.nii.gz", to="t2w", weights=weights)
    assert caught.value.path == tmp_path / "missing.nii.gz"


# ----------------------------------------------------------------------------- preview montage


def test_preview_shows_input_beside_output(tmp_path: Path, weights: Path, ct_canonical: np.ndarray) -> None:
    source = _ct_file(tmp_path, ct_canonical, "LPS")
    result = translate(source, tmp_path / "out.nii.gz", to="t2w", source="ct", weights=weights, device="cpu",
                       preview=tmp_path / "qc.png")
    assert result.preview == tmp_path / "qc.png"
    with Image.open(result.preview) as image:
        assert image.format == "PNG" and image.mode == "L"
        width, height = image.size
        pixels = np.asarray(image)
    step = 192 + 6  # tile and margin
    assert 0 < width - 2 * step < 150 and 0 < height - 4 * step < 50  # labels, then 4 rows x 2 columns
    input_tiles, output_tiles = pixels[-4 * step:, -2 * step:-step], pixels[-4 * step:, -step:]
    assert input_tiles.std() > 0 and output_tiles.std() > 0 and not np.array_equal(input_tiles, output_tiles)


def test_preview_of_a_folder_is_refused(tmp_path: Path, weights: Path, ct_canonical: np.ndarray) -> None:
    cases = _case_folder(tmp_path / "cases", ct_canonical)
    with pytest.raises(UsageError, match="--preview shows one volume"):
        translate(cases, tmp_path / "out", to="t2w", weights=weights, preview=tmp_path / "qc.png")


def test_preview_must_be_a_png(tmp_path: Path, weights: Path, ct_canonical: np.ndarray) -> None:
    with pytest.raises(UsageError, match="must end in .png"):
        translate(_ct_file(tmp_path, ct_canonical), tmp_path / "o.nii.gz", to="t2w", weights=weights,
                  preview=tmp_path / "qc.jpg")


def test_window_to_uint8_uses_a_fixed_window_or_the_image_range() -> None:
    image = np.array([[-1000.0, -160.0], [40.0, 240.0]])
    assert window_to_uint8(image, (-160.0, 240.0)).tolist() == [[0, 0], [128, 255]]
    assert window_to_uint8(np.full((3, 3), 5.0)).tolist() == [[0] * 3] * 3  # blank: black, no NaN
    ramp = np.arange(100, dtype=float).reshape(10, 10)
    automatic = window_to_uint8(ramp)
    assert automatic.min() == 0 and automatic.max() == 255


def test_montage_layout_keeps_aspect_ratio_and_labels(tmp_path: Path) -> None:
    wide = np.ones((10, 40))
    wide[:, 0] = 0
    canvas = render_montage([[wide, wide]], ["row"], ["a", "b"], tile_size=80)
    pixels = np.asarray(canvas)
    assert canvas.size[0] >= 2 * 80 and canvas.size[1] >= 80
    # The 4:1 image fills a tile's width and a quarter of its height, centred.
    last_tile = pixels[-86:-6, -86:-6]  # tiles are followed by a 6-pixel margin
    bright_rows = np.flatnonzero(last_tile.max(axis=1) == 255)
    assert bright_rows.min() == pytest.approx(30, abs=1) and bright_rows.max() == pytest.approx(49, abs=1)
    assert pixels[: canvas.size[1] - 86].max() > 128  # the column labels are drawn above the tiles


def test_save_montage_is_atomic_and_refuses_existing_files(tmp_path: Path) -> None:
    path = save_montage(tmp_path / "grid.png", [[np.eye(8)]], ["r"], ["c"], tile_size=32)
    with Image.open(path) as image:
        assert image.format == "PNG"
    with pytest.raises(TarganError, match="already exists"):
        save_montage(path, [[np.eye(8)]], ["r"], ["c"])
    with pytest.raises(ValueError, match="row 0 has 1 images, expected 2"):
        save_montage(tmp_path / "bad.png", [[np.eye(8)]], ["r"], ["c", "d"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid.png"]


# ----------------------------------------------------------------------------- CLI


def test_cli_translates_and_reports_speed(tmp_path: Path, weights: Path, ct_canonical: np.ndarray) -> None:
    source = _ct_file(tmp_path, ct_canonical)
    result = CliRunner().invoke(app, ["translate", str(source), "-o", str(tmp_path / "out.nii.gz"), "--to", "t2w",
                                      "--from", "ct", "--weights", str(weights), "--device", "cpu",
                                      "--preview", str(tmp_path / "qc.png")])
    assert result.exit_code == 0, result.output
    output = _one_line(result.output)
    assert re.search(r"Wrote \S*out\.nii\.gz \(ct → t2w\): 5 slices in [\d.]+ s, [\d.]+ slices/s on cpu", output)
    assert "Preview" in output and (tmp_path / "qc.png").is_file()
    assert nib.load(tmp_path / "out.nii.gz").shape == nib.load(source).shape


@pytest.mark.parametrize("arguments, code, message", [
    (["--to", "flair"], 2, "error: unknown modality 'flair'; these weights know t1w, t2w, ct"),
    (["--to", "t2w", "--batch-size", "0"], 2, "error: --batch-size must be at least 1, got 0"),
    (["--to", "t2w", "--precision", "fp16", "--device", "cpu"], 2, "error: --precision fp16 needs a GPU"),
    (["--to", "t2w", "--from", "ct", "--revision", "main"], 2, "--revision applies to Hub repo ids"),
])
def test_cli_usage_errors_are_one_line(tmp_path: Path, weights: Path, ct_canonical: np.ndarray,
                                       arguments: list[str], code: int, message: str) -> None:
    source = _ct_file(tmp_path, ct_canonical)
    result = CliRunner().invoke(app, ["translate", str(source), "-o", str(tmp_path / "out.nii.gz"),
                                      "--weights", str(weights), *arguments])
    assert result.exit_code == code
    assert message in _one_line(result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""  # refused before any work: not even an empty progress bar
    assert "Traceback" not in result.output
    assert not (tmp_path / "out.nii.gz").exists()


def test_cli_refuses_an_existing_output(tmp_path: Path, weights: Path, ct_canonical: np.ndarray) -> None:
    source = _ct_file(tmp_path, ct_canonical)
    (tmp_path / "out.nii.gz").write_bytes(b"old")
    result = CliRunner().invoke(app, ["translate", str(source), "-o", str(tmp_path / "out.nii.gz"), "--to", "t2w",
                                      "--from", "ct", "--weights", str(weights)])
    assert result.exit_code == 1
    assert "out.nii.gz: already exists; pass --overwrite to replace it" in _one_line(result.stderr)


def test_cli_shows_paths_with_square_brackets_as_they_are(tmp_path: Path, weights: Path,
                                                          ct_canonical: np.ndarray) -> None:
    """Rich reads [..] as markup: a path must be printed verbatim, in errors and in reports."""
    missing = CliRunner().invoke(app, ["translate", str(tmp_path / "scan[old].nii.gz"), "-o",
                                       str(tmp_path / "y.nii.gz"), "--to", "t2w", "--weights", str(weights)])
    assert missing.exit_code == 1 and "scan[old].nii.gz: not found" in _one_line(missing.stderr)
    source = _ct_file(tmp_path, ct_canonical, name="ct[red].nii.gz")
    output = tmp_path / "out[" / "x][/bold].nii.gz"  # ".../out[/x][/bold].nii.gz": closing tags
    result = CliRunner().invoke(app, ["translate", str(source), "-o", str(output), "--to", "t2w", "--from", "ct",
                                      "--weights", str(weights), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "out[/x][/bold].nii.gz" in _one_line(result.output) and output.is_file()
    again = CliRunner().invoke(app, ["translate", str(source), "-o", str(output), "--to", "t2w", "--from", "ct",
                                     "--weights", str(weights)])
    assert again.exit_code == 1 and "out[/x][/bold].nii.gz: already exists" in _one_line(again.stderr)


def test_cli_lines_are_not_wrapped_in_a_pipe(tmp_path: Path, weights: Path, ct_canonical: np.ndarray) -> None:
    """A path or a command to copy stays one line in a log file, whatever the width."""
    source = _ct_file(tmp_path, ct_canonical)
    output = tmp_path / ("a-rather-long-folder-name-for-the-outputs-of-a-translation-run" * 2) / "case_0001.nii.gz"
    result = CliRunner().invoke(app, ["translate", str(source), "-o", str(output), "--to", "t2w",
                                      "--weights", str(weights), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any(line.startswith(f"Wrote {output} (ct → t2w): 5 slices in ") for line in lines), result.stdout
    assert any(line.startswith("--from ct was inferred: ") and line.endswith("pass --from to choose") for line in lines)


def test_cli_a_part_without_files_says_so(tmp_path: Path, weights: Path, ct_canonical: np.ndarray) -> None:
    cases = _case_folder(tmp_path / "cases", ct_canonical)
    result = CliRunner().invoke(app, ["translate", str(cases), "-o", str(tmp_path / "out"), "--from", "ct", "--to",
                                      "t2w", "--weights", str(weights), "--num-parts", "5", "--part-id", "4"])
    assert result.exit_code == 0, result.output
    assert _one_line(result.stdout) == f"Part 4 of 5 holds none of the files of {cases}: nothing to translate"
    assert not (tmp_path / "out").exists()


def test_cli_offline_without_cached_weights_says_what_to_do(tmp_path: Path, ct_canonical: np.ndarray,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    use_offline_hub_cache(monkeypatch, tmp_path / "empty-cache")
    monkeypatch.delenv("TARGAN_WEIGHTS", raising=False)
    source = _ct_file(tmp_path, ct_canonical)
    result = CliRunner().invoke(app, ["translate", str(source), "-o", str(tmp_path / "out.nii.gz"), "--to", "t2w"])
    assert result.exit_code == 1
    message = _one_line(result.stderr)
    assert "targan-cli/targan-chaos" in message and "targan train" in message and "--weights" in message
    assert len(result.stderr.strip().splitlines()) == 1


def test_without_weights_the_way_forward_is_given(tmp_path: Path) -> None:
    """No --weights and nothing published: not a network problem; the demo and the training recipe,
    with their commands, and where to read more (weights/README.md)."""
    from targan_cli.io.weights import DEFAULT_REPO

    volume = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(np.full((8, 8, 3), 100.0, dtype=np.float32), np.eye(4)), volume)
    result = CliRunner().invoke(app, ["translate", str(volume), "--to", "ct", "-o", str(tmp_path / "out.nii.gz")])
    assert result.exit_code == 1
    message = result.stderr
    assert "no pretrained weights are published yet" in message and "weights/README.md" in message
    assert "`targan demo`" in message and "--weights targan-demo/run/export" in message
    assert "`targan train --data chaos/ --epochs 50 --out runs/chaos`" in message and DEFAULT_REPO in message
    assert "reach" not in message and "offline?" not in message and message.count("\n") == 1
    assert result.stdout == "" and not (tmp_path / "out.nii.gz").exists()
