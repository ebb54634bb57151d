"""Provenance of synthetic volumes (io/provenance.py), `targan info` on volumes, and folder runs
that resume (translate and enrich share io.provenance.output_state)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from targan_cli import __version__
from targan_cli.cli import app
from targan_cli.config import default_modalities
from targan_cli.core.intensity import body_mask, normalize
from targan_cli.errors import TarganError
from targan_cli.io.provenance import output_state, sidecar_path, write_with_sidecar
from targan_cli.io.volume import read_volume, to_slices
from targan_cli.workflows import translate as translate_module
from targan_cli.workflows.enrich import enrich
from targan_cli.workflows.translate import translate
from volume_factories import anatomy, canonical_affine, write_nifti
from weights_factories import make_tiny_weights

SHAPE = (5, 24, 20)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny")


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("weights") / "other", seed=1)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _ct(path: Path, array: np.ndarray | None = None) -> Path:
    return write_nifti(path, anatomy(SHAPE) if array is None else array, canonical_affine(SHAPE))


def _invoke(*args: str):
    return CliRunner().invoke(app, [*args, "--device", "cpu"] if args[0] == "translate" else list(args))


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text)


# ----------------------------------------------------------------------------- the sidecar and descrip


def test_a_synthetic_volume_says_what_it_is_and_how_it_was_made(tmp_path: Path, weights: Path) -> None:
    source = _ct(tmp_path / "ct.nii.gz")
    output = tmp_path / "out" / "t2w.nii.gz"
    translate(source, output, to="t2w", source="ct", weights=weights, device="cpu", batch_size=3,
              command_line="targan translate ct.nii.gz ...")
    header = nib.load(output).header
    assert header["descrip"].tobytes().decode().startswith(f"synthetic t2w (targan {__version__})")
    assert header["intent_name"].tobytes().rstrip(b"\0") == b"synthetic t2w"
    sidecar = json.loads((tmp_path / "out" / "t2w.json").read_text())
    assert sidecar["Synthetic"] is True and "SYNTHETIC" in sidecar["ImageType"]
    assert (sidecar["SourceModality"], sidecar["TargetModality"], sidecar["Modality"]) == ("ct", "t2w", "MR")
    assert sidecar["Sources"] == ["ct.nii.gz"] and sidecar["SourceSHA256"] == _sha256(source)
    assert sidecar["Weights"]["SHA256"] == _sha256(weights / "model.safetensors")
    assert sidecar["Weights"]["Source"] == str(weights.resolve())
    assert (sidecar["Weights"]["Preset"], sidecar["Weights"]["ImageSize"]) == ("tiny", 32)
    assert (sidecar["Device"], sidecar["Precision"], sidecar["BatchSize"]) == ("cpu", "fp32", 3)
    assert sidecar["ConversionSoftwareVersion"] == __version__
    assert sidecar["CommandLine"] == "targan translate ct.nii.gz ..."
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", sidecar["DateTimeUTC"])
    assert sidecar["Intensity"]["InputWindow"] == "-160..240 HU"
    assert sidecar["QC"]["Grade"] in ("ok", "check", "poor") and len(sidecar["QC"]["CycleScorePerSlice"]) == 5
    assert sidecar["OutputSHA256"] == _sha256(output)


def test_clipping_is_the_fraction_of_body_voxels_outside_the_window(tmp_path: Path, weights: Path) -> None:
    canonical = anatomy(SHAPE)
    body = canonical > -500
    canonical[:, 10:14, 8:12] = np.where(body[:, 10:14, 8:12], 700.0, canonical[:, 10:14, 8:12])  # bone
    source = _ct(tmp_path / "ct.nii.gz", canonical)
    result = _invoke("translate", str(source), "--from", "ct", "--to", "t1w", "-o", str(tmp_path / "t1w.nii.gz"),
                     "-w", str(weights))
    assert result.exit_code == 0, result.output
    sidecar = json.loads((tmp_path / "t1w.json").read_text())
    stored = to_slices(read_volume(source))[0]
    ct = next(m.intensity for m in default_modalities() if m.name == "ct")
    mask = body_mask(normalize(stored, ct))
    expected = float(((stored[mask] <= -160) | (stored[mask] >= 240)).mean())  # computed here, independently
    assert expected > 0.01
    assert sidecar["Intensity"]["InputBodyFractionClipped"] == pytest.approx(expected, abs=1e-5)
    assert f"warning: {tmp_path / 't1w.nii.gz'}: {expected:.1%} of the input's body voxels lie outside the ct " \
           "window -160..240 HU" in _one_line(result.output)


def test_translate_says_which_weights_before_work_and_info_shows_provenance(tmp_path: Path, weights: Path) -> None:
    source = _ct(tmp_path / "ct.nii.gz")
    result = _invoke("translate", str(source), "--from", "ct", "--to", "t2w", "-o", str(tmp_path / "t2w.nii.gz"),
                     "-w", str(weights))
    assert result.exit_code == 0, result.output
    first = result.output.splitlines()[0]
    assert first == (f"Weights {weights} (revision local folder), preset tiny 32x32: ct -> t2w on cpu (fp32), QC on "
                     "(modality check unavailable)")
    assert re.search(r"t2w\.nii\.gz\s+│\s+written\s+│\s+ct\s+│\s+(ok|check|poor)\s+│", result.output)
    shown = _one_line(_invoke("info", str(tmp_path / "t2w.nii.gz")).output)
    assert "Synthetic volume" in shown and "SourceSHA256" in shown and _sha256(source)[:20] in shown
    plain = _invoke("info", str(source))
    assert plain.exit_code == 0 and plain.output.strip() == f"{source}: no provenance"


def test_dicom_outputs_get_a_sidecar_beside_the_series(tmp_path: Path, weights: Path) -> None:
    source = _ct(tmp_path / "ct.nii.gz")
    translate(source, tmp_path / "series", to="t2w", source="ct", weights=weights, device="cpu",
              output_format="dicom")
    sidecar = json.loads((tmp_path / "series.json").read_text())
    assert sidecar["Synthetic"] is True and sidecar["TargetModality"] == "t2w"
    assert output_state(tmp_path / "series", sidecar["TarganRun"]).kind == "complete"


def test_someone_elses_sidecar_name_is_not_replaced_without_overwrite(tmp_path: Path, weights: Path) -> None:
    source = _ct(tmp_path / "ct.nii.gz")
    (tmp_path / "t2w.json").write_text('{"RepetitionTime": 2.0}')
    with pytest.raises(TarganError, match="targan did not write it; pass --overwrite"):
        translate(source, tmp_path / "t2w.nii.gz", to="t2w", source="ct", weights=weights, device="cpu")
    assert not (tmp_path / "t2w.nii.gz").exists()
    assert json.loads((tmp_path / "t2w.json").read_text()) == {"RepetitionTime": 2.0}


def test_sidecar_names_drop_the_nifti_suffix() -> None:
    assert sidecar_path("a/b.nii.gz") == Path("a/b.json")
    assert sidecar_path("a/b.NII") == Path("a/b.json")
    assert sidecar_path("a/series") == Path("a/series.json")


# ----------------------------------------------------------------------------- folder runs that resume


def _cases(folder: Path, names: tuple[str, ...] = ("a", "b", "c")) -> Path:
    folder.mkdir(parents=True)
    for seed, name in enumerate(names):  # different voxels, so that different outputs differ
        _ct(folder / f"{name}.nii.gz", anatomy(SHAPE, seed=seed))
    return folder


def _stamps(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_a_folder_run_skips_complete_outputs_and_redoes_changed_ones(tmp_path: Path, weights: Path,
                                                                      other_weights: Path) -> None:
    cases = _cases(tmp_path / "cases")
    out = tmp_path / "out"
    first = translate(cases, out, to="t2w", source="ct", weights=weights, device="cpu")
    assert [r.status for r in first.volumes] == ["written"] * 3
    assert all(r.quality is None for r in first.volumes)  # a folder's default: no QC
    before = _stamps(out)
    again = translate(cases, out, to="t2w", source="ct", weights=weights, device="cpu")
    assert [r.status for r in again.volumes] == ["skipped"] * 3 and again.slices == 0
    assert _stamps(out) == before  # nothing rewritten
    changed = translate(cases, out, to="t2w", source="ct", weights=other_weights, device="cpu")
    assert [(r.status, r.note) for r in changed.volumes] == [("redone", "made with other weights")] * 3
    assert json.loads((out / "a.json").read_text())["Weights"]["SHA256"] == _sha256(other_weights / "model.safetensors")
    options = translate(cases, out, to="t2w", source="ct", weights=other_weights, device="cpu", qc=True)
    assert {r.note for r in options.volumes} == {"made with other --qc"}
    forced = translate(cases, out, to="t2w", source="ct", weights=other_weights, device="cpu", qc=True,
                       overwrite=True)
    assert [r.status for r in forced.volumes] == ["written"] * 3


def test_an_interrupted_folder_run_resumes_where_it_stopped(tmp_path: Path, weights: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    cases = _cases(tmp_path / "cases")
    out = tmp_path / "out"
    written: list[Path] = []
    real_write = translate_module.write_synthetic

    def write_then_stop(path: Path, *args, **kwargs) -> None:
        if written:
            raise KeyboardInterrupt  # Ctrl-C while the second case is written
        real_write(path, *args, **kwargs)
        written.append(path)

    monkeypatch.setattr(translate_module, "write_synthetic", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        translate(cases, out, to="t2w", source="ct", weights=weights, device="cpu")
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.nii.gz"]
    # kill -9 between the sidecar and the volume: a sidecar whose volume never arrived, and a
    # volume replaced after its sidecar was written (the hashes no longer match)
    (out / "b.json").write_text((out / "a.json").read_text())
    resumed = translate(cases, out, to="t2w", source="ct", weights=weights, device="cpu")
    assert [r.status for r in resumed.volumes] == ["skipped", "written", "written"]
    (out / "c.nii.gz").write_bytes((out / "a.nii.gz").read_bytes())
    again = translate(cases, out, to="t2w", source="ct", weights=weights, device="cpu")
    assert [r.status for r in again.volumes] == ["skipped", "skipped", "redone"]
    assert "SHA-256 differs" in again.volumes[2].note


def test_a_killed_run_resumes_with_nothing_half_written(tmp_path: Path, weights: Path) -> None:
    """kill -9 in the middle of a real folder run: the rerun finishes every case, and every output
    on disk is a complete, readable volume with its sidecar."""
    import os
    import signal
    import subprocess
    import sys
    import time

    cases = _cases(tmp_path / "cases", tuple("abcdefgh"))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "targan_cli", "translate", str(cases), "--from", "ct", "--to", "t2w", "-o",
               str(out), "-w", str(weights), "--device", "cpu", "--batch-size", "1"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(Path(translate_module.__file__).parents[2])})
    deadline = time.monotonic() + 120
    while not (out / "b.nii.gz").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    resumed = translate(cases, out, to="t2w", source="ct", weights=weights, device="cpu")
    assert {r.status for r in resumed.volumes} <= {"skipped", "written", "redone"}
    assert "skipped" in {r.status for r in resumed.volumes}
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{c}.{e}" for c in "abcdefgh" for e in ("json", "nii.gz"))
    for case in "abcdefgh":
        assert nib.load(out / f"{case}.nii.gz").shape == nib.load(cases / f"{case}.nii.gz").shape
        assert json.loads((out / f"{case}.json").read_text())["OutputSHA256"] == _sha256(out / f"{case}.nii.gz")


def test_enrich_resumes_by_the_same_sidecars(tmp_path: Path, weights: Path) -> None:
    images = _cases(tmp_path / "in", ("a", "b"))
    first = enrich(images, tmp_path / "raw", source="ct", weights=weights, targets=["t1w"], device="cpu")
    assert sorted(first.written) == ["a", "b"]
    channel = first.folder / "imagesTs" / "a_0001.nii.gz"
    sidecar = json.loads(sidecar_path(channel).read_text())
    assert sidecar["Synthetic"] is True and sidecar["TargetModality"] == "t1w"
    assert enrich(images, tmp_path / "raw", source="ct", weights=weights, targets=["t1w"], device="cpu").skipped == (
        "a", "b")
    channel.write_bytes((first.folder / "imagesTs" / "b_0001.nii.gz").read_bytes())  # not what a_0001.json records
    again = enrich(images, tmp_path / "raw", source="ct", weights=weights, targets=["t1w"], device="cpu")
    assert again.written == ("a",) and again.skipped == ("b",)
    assert json.loads(sidecar_path(channel).read_text())["OutputSHA256"] == _sha256(channel)


def test_the_sidecar_is_in_place_before_its_volume(tmp_path: Path, weights: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between the two renames: the sidecar exists, the volume does not (never the reverse),
    and the next folder run redoes that case."""
    import os

    cases = _cases(tmp_path / "cases", ("a",))
    out = tmp_path / "out"
    real_replace = os.replace

    def killed_before_the_volume(source, target) -> None:
        if Path(target).name == "a.nii.gz":
            raise KeyboardInterrupt
        real_replace(source, target)

    real_link = os.link

    def killed_before_linking_the_volume(source, target, **options) -> None:  # the move without --overwrite
        if Path(target).name == "a.nii.gz":
            raise KeyboardInterrupt
        real_link(source, target, **options)

    monkeypatch.setattr(os, "replace", killed_before_the_volume)
    monkeypatch.setattr(os, "link", killed_before_linking_the_volume)
    with pytest.raises(KeyboardInterrupt):
        translate(cases, out, to="t2w", source="ct", weights=weights, device="cpu")
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == ["a.json"]
    resumed = translate(cases, out, to="t2w", source="ct", weights=weights, device="cpu")
    assert [r.status for r in resumed.volumes] == ["written"]
    assert json.loads((out / "a.json").read_text())["OutputSHA256"] == _sha256(out / "a.nii.gz")


def test_an_output_that_appears_meanwhile_keeps_its_own_sidecar(tmp_path: Path) -> None:
    """Another writer places the volume while this one works: without --overwrite this writer
    leaves both the volume and the sidecar beside it as they are."""
    output = tmp_path / "a.nii.gz"
    sidecar_path(output).write_text('{"theirs": true}\n')

    def write_while_another_places_it(temporary: Path) -> None:
        temporary.write_bytes(b"ours")
        output.write_bytes(b"theirs")

    with pytest.raises(TarganError, match="already exists"):
        write_with_sidecar(output, write_while_another_places_it, {"ours": True})
    assert output.read_bytes() == b"theirs"
    assert json.loads(sidecar_path(output).read_text()) == {"theirs": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "a.nii.gz"]
