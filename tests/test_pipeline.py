"""io/pipeline.py and the streaming folder runs of translate, enrich and segment: order, per-item
errors, Ctrl-C, and outputs identical to the one-at-a-time path (real NIfTI files, tiny weights)."""

from __future__ import annotations

import gzip
import json
import random
import threading
import time
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import targan_cli.core.inference as inference_module
import targan_cli.workflows.enrich as enrich_module
import targan_cli.workflows.translate as translate_module
from targan_cli.cli import app
from targan_cli.config import IntensitySettings
from targan_cli.errors import TarganError
from targan_cli.io.pipeline import Stage, _Pool, stream
from targan_cli.workflows.enrich import enrich, verify_nnunet_dataset
from targan_cli.workflows.segment import SegmenterConfig, build_network, save_segmenter, segment
from targan_cli.workflows.translate import translate
from volume_factories import anatomy, canonical_affine, oriented, write_dicom_series, write_nifti
from weights_factories import make_tiny_weights

SHAPE = (5, 24, 20)  # canonical (Z, H, W)


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny")


def _pipeline_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("targan-io")]


def _slow(value: int) -> int:
    time.sleep(random.Random(value).uniform(0, 0.01))
    return value


# ----------------------------------------------------------------------------- the pipeline


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_outcomes_come_in_order_and_an_expected_error_fails_only_its_item(workers: int) -> None:
    written: list[int] = []

    def process(item: int, value: int) -> int:
        if item == 4:
            raise TarganError("item 4 is bad")
        return value * 10

    def write(item: int, value: int) -> int:
        _slow(item + 100)
        written.append(item)
        return value + 1

    outcomes = list(stream(range(9), _slow, process, write, workers=workers, expected=(TarganError,)))
    assert [outcome.item for outcome in outcomes] == list(range(9))
    assert [outcome.result for outcome in outcomes] == [item * 10 + 1 if item != 4 else None for item in range(9)]
    assert [str(outcome.error) for outcome in outcomes if outcome.error is not None] == ["item 4 is bad"]
    assert sorted(written) == [0, 1, 2, 3, 5, 6, 7, 8]
    assert not _pipeline_threads()


class _Pairs(Stage):
    """A stage that finishes items two at a time, the later one first (as a model whose batches span
    volumes may), and everything it holds on flush."""

    def __init__(self) -> None:
        self.held: list[tuple[int, int]] = []

    def add(self, key: int, value: int) -> None:
        self.held.append((key, value))

    def take(self, flush: bool) -> list[tuple[int, int, None]]:
        if len(self.held) < 2 and not flush:
            return []
        finished, self.held = self.held, []
        return [(key, value * 10, None) for key, value in reversed(finished)]


@pytest.mark.parametrize("workers", [0, 1, 3])
def test_a_stage_that_holds_and_reorders_items_gives_outcomes_in_order(workers: int) -> None:
    """Item 3's read fails while the stage holds item 2: its error comes after item 2's outcome."""
    def read(item: int) -> int:
        if item == 3:
            raise TarganError("item 3 is unreadable")
        return _slow(item)

    outcomes = list(stream(range(8), read, _Pairs(), lambda item, value: value + 1, workers=workers,
                           expected=(TarganError,)))
    assert [outcome.item for outcome in outcomes] == list(range(8))
    assert [outcome.result for outcome in outcomes] == [item * 10 + 1 if item != 3 else None for item in range(8)]
    assert [str(outcome.error) for outcome in outcomes if outcome.error is not None] == ["item 3 is unreadable"]
    assert not _pipeline_threads()


def test_memory_stays_bounded_by_the_workers() -> None:
    in_flight: list[int] = []
    peak = [0]
    lock = threading.Lock()

    def read(item: int) -> int:
        with lock:
            in_flight.append(item)
            peak[0] = max(peak[0], len(in_flight))
        return _slow(item)

    def write(item: int, value: int) -> None:
        _slow(item + 50)
        with lock:
            in_flight.remove(item)

    list(stream(range(30), read, lambda item, value: value, write, workers=2))
    assert 2 <= peak[0] <= 2 * 2 + 1  # read ahead, being processed, waiting to be written


@pytest.mark.parametrize("workers", [1, 3])
def test_reads_and_writes_share_the_workers(workers: int) -> None:
    """At most ``workers`` file steps (reads and writes together) run at once, as many as the
    cores they are sized for, and a read and a write do run side by side."""
    running: list[str] = []
    peak, mixed = [0], [False]
    lock = threading.Lock()

    def step(kind: str, item: int) -> int:
        with lock:
            running.append(kind)
            peak[0] = max(peak[0], len(running))
            mixed[0] |= len(set(running)) == 2
        _slow(item + (50 if kind == "write" else 0))
        with lock:
            running.remove(kind)
        return item

    list(stream(range(40), partial(step, "read"), lambda item, value: value,
                lambda item, value: step("write", item), workers=workers))
    assert peak[0] == workers
    assert mixed[0] == (workers > 1)


def test_the_pool_writes_before_it_reads_and_cancels_what_has_not_started() -> None:
    pool = _Pool(1)
    release, ran = threading.Event(), []
    try:
        busy = pool.submit(pool.READ, release.wait)
        queued = [pool.submit(pool.READ, ran.append, "read"), pool.submit(pool.WRITE, ran.append, "write")]
        release.set()
        for future in (busy, *queued):
            future.result(timeout=5)
        assert ran == ["write", "read"]  # a finished volume leaves memory before the next one is decoded

        release.clear()
        busy = pool.submit(pool.WRITE, release.wait)
        while not busy.running():
            time.sleep(0.001)
        waiting = pool.submit(pool.READ, ran.append, "late")
        stopper = threading.Thread(target=pool.shutdown)
        stopper.start()
        deadline = time.monotonic() + 5
        while not waiting.cancelled() and time.monotonic() < deadline:
            time.sleep(0.001)
    finally:
        release.set()
        pool.shutdown()
    stopper.join(timeout=5)
    assert busy.result() is True and waiting.cancelled() and "late" not in ran
    assert not _pipeline_threads()


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_an_interrupt_or_unexpected_error_stops_the_workers(error: type[BaseException]) -> None:
    written: list[int] = []

    def process(item: int, value: int) -> int:
        if item == 3:
            raise error()
        return value

    with pytest.raises(error):
        for _ in stream(range(20), _slow, process, lambda item, value: written.append(item), workers=2,
                        expected=(TarganError,)):
            pass
    assert 3 not in written and max(written) < 3  # nothing after the interrupt is written
    assert not _pipeline_threads()  # no orphans


# ----------------------------------------------------------------------------- translate folders


def _folder(folder: Path, count: int = 4) -> Path:
    folder.mkdir()
    canonical = anatomy((SHAPE[0] + 1, *SHAPE[1:]))
    for index in range(count):
        array, affine = oriented(canonical[index % 2:] + index, ("RAS", "LPS", "ASL")[index % 3])
        write_nifti(folder / f"case{index}.nii.gz", array, affine)
    return folder


def _without_times(sidecar: Path) -> dict:
    record = json.loads(sidecar.read_text())
    del record["DateTimeUTC"]
    return record


def test_streaming_writes_the_same_outputs_as_one_at_a_time(tmp_path: Path, weights: Path) -> None:
    cases = _folder(tmp_path / "cases")
    results = {workers: translate(cases, tmp_path / f"out{workers}", to="t2w", source="ct", weights=weights,
                                  device="cpu", io_workers=workers, command_line="targan translate")
               for workers in (0, 2)}
    assert [r.output.name for r in results[2].volumes] == [r.output.name for r in results[0].volumes] == [
        f"case{index}.nii.gz" for index in range(4)]
    assert results[2].slices == results[0].slices
    for index in range(4):
        sequential, streamed = tmp_path / "out0" / f"case{index}.nii.gz", tmp_path / "out2" / f"case{index}.nii.gz"
        assert gzip.decompress(streamed.read_bytes()) == gzip.decompress(sequential.read_bytes())
        assert _without_times(streamed.with_name(f"case{index}.json")) == _without_times(
            sequential.with_name(f"case{index}.json"))


@pytest.mark.parametrize("qc", [False, True])
def test_batches_spanning_volumes_give_the_same_outputs_as_one_at_a_time(tmp_path: Path, weights: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        qc: bool) -> None:
    """Batches as on CUDA (full, spanning volumes) on the CPU: the streamed run puts 22 slices (4
    volumes of 5 or 6) through 2 batches of 16 (with QC, the cycles too), the one-at-a-time run
    pads every volume's batch; the files and sidecars (QC scores included) are the same bytes."""
    monkeypatch.setattr(inference_module, "spans_volumes", lambda device: True)
    cases = _folder(tmp_path / "cases")
    sizes: dict[int, list[int]] = {0: [], 2: []}
    current: list[list[int]] = []  # the batch sizes of the run going on
    real_load = translate_module.load_weights

    def load(*args, **kwargs):  # a hook on the generator the run loads, counting its batches
        loaded = real_load(*args, **kwargs)
        loaded.generator.register_forward_hook(lambda module, inputs, output: current[-1].append(len(inputs[0])))
        return loaded

    monkeypatch.setattr(translate_module, "load_weights", load)
    for workers in (0, 2):
        current.append(sizes[workers])
        translate(cases, tmp_path / f"out{workers}", to="t2w", source="ct", weights=weights, device="cpu",
                  io_workers=workers, qc=qc, command_line="targan translate")
    passes = 2 if qc else 1
    assert set(sizes[0]) == set(sizes[2]) == {16}
    assert len(sizes[0]) == 4 * passes and len(sizes[2]) < len(sizes[0])  # volumes shared batches
    for index in range(4):
        sequential, streamed = tmp_path / "out0" / f"case{index}.nii.gz", tmp_path / "out2" / f"case{index}.nii.gz"
        assert gzip.decompress(streamed.read_bytes()) == gzip.decompress(sequential.read_bytes())
        assert _without_times(streamed.with_name(f"case{index}.json")) == _without_times(
            sequential.with_name(f"case{index}.json"))
    if qc:
        assert "QC" in _without_times(tmp_path / "out2" / "case0.json")


def test_a_volume_that_fails_is_reported_and_the_others_are_written(tmp_path: Path, weights: Path) -> None:
    cases = _folder(tmp_path / "cases", 3)
    write_nifti(cases / "case1.nii.gz", np.full((20, 24, 5), 7, np.int16), canonical_affine(SHAPE))  # blank MR
    for workers in (0, 2):
        result = translate(cases, tmp_path / f"out{workers}", to="ct", source="t1w", weights=weights, device="cpu",
                           io_workers=workers)
        assert [report.status for report in result.volumes] == ["written", "failed", "written"]
        assert "blank" in result.failed[0].note
        assert sorted(p.name for p in (tmp_path / f"out{workers}").iterdir()) == [
            "case0.json", "case0.nii.gz", "case2.json", "case2.nii.gz"]
    outcome = CliRunner().invoke(app, ["translate", str(cases), "--to", "ct", "--from", "t1w", "-o",
                                       str(tmp_path / "cli"), "--weights", str(weights), "--device", "cpu",
                                       "--io-workers", "2"])
    assert outcome.exit_code == 1
    assert "failed" in outcome.output and "1 volume of 3 failed" in " ".join(outcome.output.split())
    assert "Wrote 2 volumes" in outcome.output
    assert (tmp_path / "cli" / "case2.nii.gz").exists() and not (tmp_path / "cli" / "case1.nii.gz").exists()


def test_ctrl_c_in_a_folder_run_leaves_complete_outputs_only(tmp_path: Path, weights: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    cases = _folder(tmp_path / "cases", 5)
    real = translate_module.ModelStage.add
    calls = [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:  # the model is given case2
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(translate_module.ModelStage, "add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        translate(cases, tmp_path / "out", to="t2w", source="ct", weights=weights, device="cpu", io_workers=2)
    # case0 was written; case1's write was handed to the pool, which either had started it
    # (it finishes) or not (it is cancelled): complete outputs only, no temporaries, no locks.
    written = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert written in (["case0.json", "case0.nii.gz"], ["case0.json", "case0.nii.gz", "case1.json", "case1.nii.gz"])
    for name in written:
        if name.endswith(".nii.gz"):
            assert nib.load(tmp_path / "out" / name).get_fdata().shape == nib.load(cases / name).shape
    assert not _pipeline_threads()


def test_negative_io_workers_are_refused(tmp_path: Path, weights: Path) -> None:
    cases = _folder(tmp_path / "cases", 1)
    outcome = CliRunner().invoke(app, ["translate", str(cases), "--to", "t2w", "--from", "ct", "-o",
                                       str(tmp_path / "out"), "--weights", str(weights), "--io-workers", "-1"])
    assert outcome.exit_code == 2
    assert "--io-workers must be 0 or more, not -1" in outcome.output
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- enrich


def _labelled_folder(root: Path, count: int) -> tuple[Path, Path]:
    """``_folder``'s volumes in root/images and their liver labels (on each volume's grid) in root/labels."""
    root.mkdir()
    images = _folder(root / "images", count)
    (root / "labels").mkdir()
    for path in sorted(images.iterdir()):
        image = nib.load(path)
        write_nifti(root / "labels" / path.name, (np.asanyarray(image.dataobj) > 60).astype(np.uint8), image.affine)
    return images, root / "labels"


def _contents(folder: Path) -> dict[str, object]:
    """Every file below ``folder`` by relative name: NIfTI files decompressed, sidecars less their time."""
    contents: dict[str, object] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if path.name.endswith(".nii.gz"):
            contents[name] = gzip.decompress(path.read_bytes())
        elif "DateTimeUTC" in path.read_text():
            contents[name] = _without_times(path)
        else:
            contents[name] = path.read_bytes()
    return contents


@pytest.mark.parametrize("span", [False, True])
def test_enrich_streaming_writes_the_same_dataset_as_one_at_a_time(tmp_path: Path, weights: Path,
                                                                   monkeypatch: pytest.MonkeyPatch, span: bool) -> None:
    """With ``span`` as on CUDA: the cases' channels in full batches that span cases."""
    monkeypatch.setattr(inference_module, "spans_volumes", lambda device: span)
    images, labels = _labelled_folder(tmp_path / "in", 3)
    results = {workers: enrich(images, tmp_path / f"raw{workers}", source="ct", weights=weights, labels=labels,
                               device="cpu", io_workers=workers) for workers in (0, 2)}
    assert results[0].written == results[2].written == ("case0", "case1", "case2")
    sequential, streamed = _contents(results[0].folder), _contents(results[2].folder)
    assert len([name for name in streamed if name.startswith("imagesTr/")]) == 3 * 5  # 3 channels, 2 sidecars
    assert streamed == sequential
    assert verify_nnunet_dataset(results[2].folder) == []


def test_enrich_reports_a_bad_case_and_writes_the_others(tmp_path: Path, weights: Path) -> None:
    images, labels = _labelled_folder(tmp_path / "in", 3)
    array = np.asanyarray(nib.load(labels / "case1.nii.gz").dataobj)
    write_nifti(labels / "case1.nii.gz", array[:-1], canonical_affine(SHAPE))  # off its image's grid
    for workers in (0, 2):
        result = enrich(images, tmp_path / f"raw{workers}", source="ct", weights=weights, targets=["t2w"],
                        labels=labels, device="cpu", io_workers=workers)
        assert result.written == ("case0", "case2") and result.training == 2
        [(case, error)] = result.failed
        assert case == "case1" and "labels/case1.nii.gz" in error and "grid" in error
        assert not list(result.folder.rglob("case1*"))
        assert verify_nnunet_dataset(result.folder) == []
    outcome = CliRunner().invoke(app, ["enrich", str(images), "--from", "ct", "--to", "t2w", "--labels", str(labels),
                                       "-o", str(tmp_path / "cli"), "--weights", str(weights), "--device", "cpu",
                                       "--io-workers", "2"])
    assert outcome.exit_code == 1
    assert "case case1 failed" in outcome.stdout and "2 cases written" in outcome.stdout
    assert "1 case of 3 failed: " in outcome.stderr and "the others were written" in outcome.stderr


def test_ctrl_c_in_enrich_leaves_complete_cases_only(tmp_path: Path, weights: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    images, labels = _labelled_folder(tmp_path / "in", 4)
    real = enrich_module.ModelStage.add
    calls = [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 2:  # the model is given the second case
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(enrich_module.ModelStage, "add", interrupted)
    with pytest.raises(KeyboardInterrupt):
        enrich(images, tmp_path / "raw", source="ct", weights=weights, labels=labels, device="cpu", io_workers=2)
    folder = tmp_path / "raw" / "Dataset501_LiverCTEnriched"
    # case0's write was handed to the pool, which either had started it (it finishes) or not (it is
    # cancelled): a whole case or none, no temporaries, no locks, no dataset.json.
    marks = [".targan.json", ".targan_enrich.json"]
    case0 = ["imagesTr/case0_0000.nii.gz", "imagesTr/case0_0001.json", "imagesTr/case0_0001.nii.gz",
             "imagesTr/case0_0002.json", "imagesTr/case0_0002.nii.gz", "labelsTr/case0.nii.gz"]
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) in (marks, marks + case0)
    assert not _pipeline_threads()


# ----------------------------------------------------------------------------- segment


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = SegmenterConfig("ct", IntensitySettings(kind="ct"), image_size=32, width=4, depth=3)
    torch.manual_seed(0)
    return save_segmenter(tmp_path_factory.mktemp("segmenter") / "ct", build_network(config), config)


def _volumes_and_series(folder: Path) -> Path:
    """_folder's volumes, a DICOM series subfolder (one volume) and a file that is not NIfTI."""
    _folder(folder, 2)
    write_dicom_series(folder / "series", (anatomy(SHAPE, seed=1) + 1024).astype(np.uint16), intercept=-1024)
    (folder / "broken.nii.gz").write_bytes(b"not a NIfTI file")
    return folder


def test_segment_a_folder_streams_the_masks_of_one_volume_runs(tmp_path: Path, segmenter: Path) -> None:
    cases = _volumes_and_series(tmp_path / "cases")
    names = ["broken.nii.gz", "case0.nii.gz", "case1.nii.gz", "series.nii.gz"]
    for workers in (0, 2):
        result = segment(cases, tmp_path / f"masks{workers}", segmenter=segmenter, device="cpu", io_workers=workers)
        assert [mask.output.name for mask in result.masks] == names
        assert [mask.status for mask in result.masks] == ["failed", "written", "written", "written"]
        assert "broken.nii.gz" in result.failed[0].note
        assert sorted(p.name for p in (tmp_path / f"masks{workers}").iterdir()) == names[1:]
    for name, source in zip(names[1:], ("case0.nii.gz", "case1.nii.gz", "series")):
        single = segment(cases / source, tmp_path / "one" / name, segmenter=segmenter, device="cpu")
        assert single.masks[0].liver_voxels == int(np.asanyarray(nib.load(single.output).dataobj).sum())
        expected = gzip.decompress(single.output.read_bytes())
        assert gzip.decompress((tmp_path / "masks0" / name).read_bytes()) == expected
        assert gzip.decompress((tmp_path / "masks2" / name).read_bytes()) == expected
    assert sorted(nib.load(tmp_path / "one" / "series.nii.gz").shape) == sorted(SHAPE)  # the series: one volume


def test_segment_folder_cli_reports_the_bad_volume_and_refuses_overwrites(tmp_path: Path, segmenter: Path) -> None:
    cases = _volumes_and_series(tmp_path / "cases")
    arguments = ["segment", str(cases), "-o", str(tmp_path / "masks"), "--segmenter", str(segmenter), "--device",
                 "cpu", "--io-workers", "2"]
    outcome = CliRunner().invoke(app, arguments)
    assert outcome.exit_code == 1
    assert "Wrote 3 masks" in outcome.stdout and "failed" in outcome.stdout
    assert "1 volume of 4 failed: " in outcome.stderr and "broken.nii.gz" in outcome.stderr
    before = (tmp_path / "masks" / "case0.nii.gz").read_bytes()
    again = CliRunner().invoke(app, arguments)
    assert again.exit_code == 1 and "already exists" in again.stderr  # refused before any work
    assert (tmp_path / "masks" / "case0.nii.gz").read_bytes() == before
    for overlapping in (cases / "masks", tmp_path):  # inside the input, holding the input
        refused = CliRunner().invoke(app, [*arguments[:3], str(overlapping), *arguments[4:]])
        assert refused.exit_code == 1 and str(cases) in refused.stderr
    assert not (cases / "masks").exists() and not (tmp_path / "case0.nii.gz").exists()
