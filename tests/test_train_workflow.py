"""`targan train` end to end on a tiny phantom dataset: run folder, resume, Ctrl-C, DDP, CLI."""

import importlib.util
import json
import os
import shutil
import signal
import socket
import threading
import time

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from targan_cli.cli import app
from targan_cli.data.phantom import write_phantom_dataset
from targan_cli.errors import TarganError, UsageError
from targan_cli.io.weights import load_weights
from targan_cli.workflows.train import epoch_batches, load_checkpoint, train

# 8 training slices (t1w 2, t2w 2, ct 4) and a paired test case: 4 steps per epoch at batch 2.
TINY = dict(preset="tiny", image_size=32, batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom") / "data"
    write_phantom_dataset(root, cases=1, size=32, slices=4, test_cases=1)
    return root


def trainer_state(run):
    return load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["model"]


def assert_same_weights(run_a, run_b):
    a, b = trainer_state(run_a), trainer_state(run_b)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    export_a, export_b = (load_file(str(run / "export" / "model.safetensors")) for run in (run_a, run_b))
    assert all(torch.equal(export_a[name], export_b[name]) for name in export_a)


def logged_steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_a_run_writes_checkpoint_export_metrics_and_samples(data, tmp_path):
    events = []
    result = train(data, tmp_path / "run", epochs=1, log_every=2, progress=events.append, **TINY)
    run = tmp_path / "run"
    assert (result.steps, result.epochs_completed, result.interrupted, result.resumed_from) == (4, 1, False, None)
    assert result.export_dir == run / "export" and result.is_main_process

    checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")
    assert (checkpoint["step"], checkpoint["epoch"], checkpoint["batch_in_epoch"]) == (4, 1, 0)
    assert set(checkpoint["trainer"]["optimizers"]) == {"generator", "disc_x", "disc_r", "shape"}

    weights = load_weights(run / "export")
    assert weights.config.preset == "tiny" and weights.config.model.image_size == 32
    assert weights.config.provenance["steps"] == 4 and weights.config.provenance["data"] == str(data.resolve())
    assert all(m.intensity.reference_high for m in weights.config.modalities if m.intensity.kind == "mr")
    ema = trainer_state(run)
    exported = load_file(str(run / "export" / "model.safetensors"))
    assert all(torch.equal(exported[name], ema[f"ema.module.{name}"]) for name in exported)
    assert weights.generator(torch.zeros(1, 1, 32, 32), torch.tensor([2])).shape == (1, 1, 32, 32)

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    assert {"d_total", "g_total", "g_cross", "d_r_gp", "steps_per_second"} <= set(records[-1])
    assert records[-1]["g_total"] == pytest.approx(result.losses["g_total"])

    with Image.open(run / "samples" / "epoch_001.png") as image:
        assert image.width > image.height > 0  # 3 rows (one per modality), 4 columns

    if importlib.util.find_spec("tensorboard") is not None:  # the optional extra
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        scalars = EventAccumulator(str(run / "tensorboard"))
        scalars.Reload()
        assert {"g_total", "d_r_gp", "steps_per_second"} <= set(scalars.Tags()["scalars"])
        assert [event.step for event in scalars.Scalars("g_total")] == [2, 4]

    assert [e.phase for e in events[:1]] == ["prepare"] and events[-1].phase == "train"
    steps = [e for e in events if e.phase == "train"]
    assert [e.done for e in steps] == [1, 2, 3, 4] and {e.total for e in steps} == {4}
    assert [e.losses is not None for e in steps] == [False, True, False, True]


def test_an_interrupted_and_resumed_run_reaches_the_same_weights(data, tmp_path):
    options = dict(epochs=2, max_steps=5, log_every=1, sample_every=0, **TINY)  # crosses an epoch end
    train(data, tmp_path / "straight", **options)

    def interrupt_at_step_3(event):
        if event.phase == "train" and event.done == 3:
            raise KeyboardInterrupt

    run = tmp_path / "interrupted"
    result = train(data, run, checkpoint_every=2, keep=3, progress=interrupt_at_step_3, **options)
    assert result.interrupted and result.steps == 3
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 3
    assert (run / "checkpoints" / "step_0000002.pt").is_file()

    resumed = train(data, run, resume=True, checkpoint_every=2, keep=3, **options)
    assert (resumed.resumed_from, resumed.steps, resumed.interrupted) == (3, 5, False)
    assert_same_weights(tmp_path / "straight", run)
    assert logged_steps(run) == [1, 2, 3, 4, 5]

    # A crash after step 5 with the last checkpoint at step 4: resuming from it redoes step 5 and
    # drops the first step 5 from the log.
    shutil.copyfile(run / "checkpoints" / "step_0000004.pt", run / "checkpoints" / "last.pt")
    assert train(data, run, resume=True, **options).resumed_from == 4
    assert_same_weights(tmp_path / "straight", run)
    assert logged_steps(run) == [1, 2, 3, 4, 5]


def test_run_folder_rules(data, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(TarganError, match="nothing to resume"):
        train(data, run, resume=True, **TINY)
    train(data, run, epochs=1, max_steps=1, **TINY)
    with pytest.raises(TarganError, match="not empty"):
        train(data, run, epochs=1, max_steps=1, **TINY)
    with pytest.raises(UsageError, match="--resume"):
        train(data, run, resume=True, overwrite=True, **TINY)
    with pytest.raises(UsageError, match="lambda_cross"):
        train(data, run, resume=True, lambda_cross=5.0, max_steps=2, **TINY)
    with pytest.raises(UsageError, match="use_target_stream"):
        train(data, run, resume=True, target_stream=False, max_steps=2, **TINY)
    with pytest.raises(UsageError, match="official_body_mask"):
        train(data, run, resume=True, official_mask=True, max_steps=2, **TINY)

    (run / "samples").mkdir()
    (run / "samples" / "epoch_009.png").write_bytes(b"old")
    (run / "notes.txt").write_text("mine")
    result = train(data, run, epochs=1, max_steps=1, overwrite=True, sample_every=0, **TINY)
    assert result.resumed_from is None
    assert not (run / "samples").exists() and (run / "notes.txt").read_text() == "mine"


def test_resume_refuses_other_data_but_follows_the_data_when_it_moves(data, tmp_path):
    """The same number of slices is not the same data: modalities in another order, other intensity
    settings or another volume are refused; a copy of the data elsewhere resumes."""
    run = tmp_path / "run"
    train(data, run, epochs=1, max_steps=1, **TINY)

    def variant(name, change):
        copy = tmp_path / name
        shutil.copytree(data, copy, ignore=shutil.ignore_patterns(".cache"))
        change(copy)
        return copy

    def edit_spec(copy, edit):
        spec = json.loads((copy / "dataset.json").read_text())
        edit(spec)
        (copy / "dataset.json").write_text(json.dumps(spec))

    swapped = variant("swapped", lambda c: edit_spec(c, lambda s: s["modalities"].reverse()))
    with pytest.raises(UsageError, match="started with modalities t1w, t2w, ct, now ct, t2w, t1w"):
        train(swapped, run, resume=True, epochs=1, max_steps=2, **TINY)
    ct = lambda spec: next(m for m in spec["modalities"] if m["name"] == "ct")  # noqa: E731
    wider = variant("wider", lambda c: edit_spec(c, lambda s: ct(s)["intensity"].update(window_width=2000.0)))
    with pytest.raises(UsageError, match="started with ct intensity window_width = 400.0, now 2000.0"):
        train(wider, run, resume=True, epochs=1, max_steps=2, **TINY)

    def replace_a_ct_volume(copy):
        image = next((copy / "train" / "ct" / "images").iterdir())
        volume = nib.load(image)
        nib.save(nib.Nifti1Image(np.asanyarray(volume.dataobj)[::-1].copy(), volume.affine, volume.header), image)
    other = variant("other", replace_a_ct_volume)
    with pytest.raises(UsageError, match="the training data differ from this run's"):
        train(other, run, resume=True, epochs=1, max_steps=2, **TINY)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 1  # nothing ran

    moved = variant("moved", lambda c: None)
    assert train(moved, run, resume=True, epochs=1, max_steps=2, **TINY).resumed_from == 1


def test_an_unwritable_run_folder_is_refused_before_any_work(data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy, ignore=shutil.ignore_patterns(".cache"))
    (tmp_path / "afile").write_text("a file where a folder should be")
    with pytest.raises(TarganError, match="is a file: cannot create the output folder under it") as caught:
        train(copy, tmp_path / "afile" / "run", epochs=1, **TINY)
    assert caught.value.path == tmp_path / "afile"
    assert not (copy / ".cache").exists()  # refused before the slices were prepared


def test_a_modality_without_training_volumes_is_refused(data, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(data, copy, ignore=shutil.ignore_patterns(".cache"))
    shutil.rmtree(copy / "train" / "t2w")
    with pytest.raises(TarganError, match="modality t2w has no training volumes") as caught:
        train(copy, tmp_path / "run", epochs=1, **TINY)
    assert caught.value.path == copy / "train" / "t2w"
    assert not (tmp_path / "run").exists() and not (copy / ".cache").exists()


@pytest.mark.parametrize("options, message", [
    ({"batch_size": 0}, "--batch-size"),
    ({"max_steps": 0}, "--max-steps"),
    ({"seed": -1}, "--seed"),
    ({"lambda_gp": -1.0}, "lambda_gp"),
    ({"precision": "bf16"}, "GPU"),
    ({"preset": "huge"}, "unknown preset"),
    ({"image_size": 30}, "image_size 30 is not divisible by 32"),
])
def test_bad_options_are_one_line_errors(data, tmp_path, options, message):
    with pytest.raises(TarganError, match=message) as caught:
        train(data, tmp_path / "run", **{**TINY, **options})
    assert caught.value.exit_code == 2  # a bad option


def test_epoch_batches_cover_the_data_and_shard_it_evenly():
    batches = epoch_batches(10, 4, seed=0, epoch=0)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert batches == epoch_batches(10, 4, seed=0, epoch=0)
    assert batches != epoch_batches(10, 4, seed=0, epoch=1) and batches != epoch_batches(10, 4, seed=1, epoch=0)
    shards = [epoch_batches(7, 2, seed=3, epoch=2, rank=rank, world_size=2) for rank in (0, 1)]
    assert [len(s) for s in shards] == [2, 2]  # 7 slices padded to 8: the same step count on every rank
    seen = [i for shard in shards for b in shard for i in b]
    assert len(seen) == 8 and set(seen) == set(range(7))


def _train_rank(rank, data, run, port, digests):
    import os

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                      LOCAL_RANK=str(rank))
    result = train(data, run, epochs=1, max_steps=2, sample_every=0, **TINY)
    (digests / f"rank{rank}.json").write_text(json.dumps([result.steps, result.weights_digest,
                                                          result.is_main_process]))


def test_two_gloo_processes_hold_identical_weights(data, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    run, digests = tmp_path / "run", tmp_path / "digests"
    digests.mkdir()
    torch.multiprocessing.start_processes(_train_rank, args=(data, run, port, digests), nprocs=2,
                                          start_method="fork")
    rank0, rank1 = (json.loads((digests / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0[:2] == rank1[:2] and rank0[0] == 2
    assert (rank0[2], rank1[2]) == (True, False)
    checkpoint = load_checkpoint(run / "checkpoints" / "last.pt")
    assert checkpoint["step"] == 2 and checkpoint["settings"]["world_size"] == 2


def test_cli_trains_and_says_how_to_translate(data, tmp_path):
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(run), "--preset", "tiny",
                                      "--image-size", "32", "--batch-size", "2", "--max-steps", "1",
                                      "--device", "cpu", "--no-crossing-loss", "--lambda-rec", "2",
                                      "--official-mask"])
    assert result.exit_code == 0, result.output
    assert "export" in result.output and "targan translate" in result.output
    settings = load_checkpoint(run / "checkpoints" / "last.pt")["settings"]
    assert settings["train"]["use_crossing_loss"] is False and settings["train"]["lambda_rec"] == 2.0
    assert settings["train"]["official_body_mask"] is True
    again = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(run), "--preset", "tiny"])
    assert again.exit_code == 1 and "--resume" in again.output and "Traceback" not in again.output
    bad = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "x"),
                                   "--precision", "fp16", "--device", "cpu"])
    assert bad.exit_code == 2 and "GPU" in bad.output


def test_default_run_folder_is_runs_slash_the_data_name(data, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--preset", "tiny", "--image-size", "32",
                                      "--batch-size", "4", "--max-steps", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "runs" / data.name / "export" / "model.safetensors").is_file()
    assert np.isfinite(json.loads((tmp_path / "runs" / data.name / "metrics.jsonl").read_text())["g_total"])


def test_ctrl_c_checkpoints_and_the_cli_says_how_to_resume(data, tmp_path):
    """A real SIGINT during training (sent once the first step is logged) stops after that step."""
    run = tmp_path / "run"
    metrics = run / "metrics.jsonl"

    def press_ctrl_c() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if metrics.exists() and metrics.read_text().strip():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    previous_handler = signal.getsignal(signal.SIGINT)
    presser = threading.Thread(target=press_ctrl_c, daemon=True)
    presser.start()
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(run), "--preset", "tiny",
                                      "--image-size", "32", "--batch-size", "2", "--epochs", "1000",
                                      "--log-every", "1", "--sample-every", "0", "--device", "cpu"])
    presser.join()
    assert result.exit_code == 130, result.output
    assert "Resume with" in result.output and "--resume" in result.output
    size = (run / "checkpoints" / "last.pt").stat().st_size
    shown = f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.1f} kB"
    assert f"checkpoint saved to {run / 'checkpoints' / 'last.pt'} ({shown}); exported weights in {run / 'export'}" \
        in result.output
    step = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert step >= 1 and max(logged_steps(run)) == step
    assert signal.getsignal(signal.SIGINT) is previous_handler  # restored

