"""What `targan train` tells a user: pace and end of the run, runs too long for the device, a
generator that is not learning, the checkpoints it keeps, and a resume past a damaged checkpoint."""

import datetime

import pytest
import torch
from typer.testing import CliRunner

from targan_cli.cli import app
from targan_cli.config import preset
from targan_cli.data.phantom import write_phantom_dataset
from targan_cli.errors import TarganError
from targan_cli.workflows.train import _estimate, discriminator_wins, load_checkpoint, train

TINY = dict(preset="tiny", image_size=32, batch_size=2, device="cpu", sample_every=0)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("guidance") / "data"
    write_phantom_dataset(root, cases=1, test_cases=1, size=32, slices=4, seed=0)
    return root


def test_the_cli_prints_steps_seconds_per_step_and_an_eta(data, tmp_path):
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--preset", "tiny",
                                      "--image-size", "32", "--batch-size", "2", "--max-steps", "5",
                                      "--sample-every", "0", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if "s per step" in line)
    assert line.startswith("5 steps to run: ") and "over the first 3 steps" in line and "(ETA 20" in line
    assert "more than a day" not in result.output


def test_a_run_longer_than_a_day_is_warned_about_with_settings_that_fit():
    paper = preset("paper")
    notices = _estimate(45.0 * 3, 3, 25_000, paper, "paper", torch.device("cpu"))  # 45 s per step
    assert notices[0][1] is False and "45.00 s per step over the first 3 steps" in notices[0][0]
    assert "about 13.0 days more" in notices[0][0]
    warning, is_warning = notices[1]
    # 13 days / 16 (small at 128: a quarter of the pixels, half the widths) is under a day
    assert is_warning and "more than a day" in warning and "--preset small --image-size 128 would take about 19.5 h" in warning
    assert len(_estimate(1.0 * 3, 3, 1000, paper, "paper", torch.device("cpu"))) == 1  # 17 min: no warning
    end = datetime.datetime.now() + datetime.timedelta(seconds=45 * 25_000)
    assert f"ETA {end:%Y-%m-%d}" in notices[0][0]


def _history(gaps, adversarial):
    return [{"d_x_adv": -gap, "g_x_adv": loss} for gap, loss in zip(gaps, adversarial)]


def test_a_discriminator_that_wins_outright_is_noticed():
    rising = [0.5 + 0.2 * i for i in range(20)]
    assert "generator is not learning" in discriminator_wins(_history(rising, rising))
    assert discriminator_wins(_history(rising[:19], rising[:19])) is None  # too few logged steps
    assert discriminator_wins(_history(rising, rising[::-1])) is None  # G's adversarial loss falls: it learns
    steady = [1.0 + 0.1 * (i % 3) for i in range(20)]
    assert discriminator_wins(_history(steady, rising)) is None  # a steady gap is a contest, not a rout
    mixed = [value if i != 7 else -0.1 for i, value in enumerate(rising)]
    assert discriminator_wins(_history(mixed, rising)) is None  # fooled once: not outright


def test_a_small_gap_after_a_large_one_is_a_contest_not_a_rout():
    # The demo's settings with --lambda-u 1 (docs/demo.md, run B): the critic told the untrained
    # generator's output apart by about 2, then the gap grew from about 0.035 to 0.08 while the run learned
    early = [1.1, 1.8, 1.6, 2.0, 1.3]
    late = [0.03 + 0.003 * i for i in range(20)]
    rising = [0.1 * i for i in range(20)]
    assert discriminator_wins(_history(late, rising)) is not None  # alone, the window looks like a rout
    assert discriminator_wins(_history(early + late, [0.0] * 5 + rising)) is None
    climbing = [0.1 + 0.15 * i for i in range(20)]  # back up past half the early gap: a rout again
    assert "generator is not learning" in discriminator_wins(_history(early + climbing, [0.0] * 5 + rising))


def test_keep_bounds_the_checkpoints(data, tmp_path):
    train(data, tmp_path / "one", max_steps=4, checkpoint_every=1, **TINY)
    assert sorted(p.name for p in (tmp_path / "one" / "checkpoints").iterdir()) == ["last.pt"]
    train(data, tmp_path / "three", max_steps=4, checkpoint_every=1, keep=3, **TINY)
    names = sorted(p.name for p in (tmp_path / "three" / "checkpoints").iterdir())
    assert names == ["last.pt", "step_0000002.pt", "step_0000003.pt"]
    assert load_checkpoint(tmp_path / "three" / "checkpoints" / "step_0000003.pt")["step"] == 3
    with pytest.raises(TarganError, match="--keep must be an integer of at least 1"):
        train(data, tmp_path / "zero", max_steps=1, keep=0, **TINY)


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_resume_falls_back_past_a_damaged_last_checkpoint(data, tmp_path, damage):
    run = tmp_path / "run"
    train(data, run, max_steps=3, checkpoint_every=1, keep=2, **TINY)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(b"" if damage == "empty" else last.read_bytes()[:1000])
    notices = []
    result = train(data, run, max_steps=5, checkpoint_every=1, keep=2, resume=True,
                   progress=lambda event: notices.append(event) if event.phase == "notice" else None, **TINY)
    assert result.resumed_from == 2 and result.steps == 5
    fallback = [event.message for event in notices if "previous good checkpoint" in event.message]
    assert len(fallback) == 1 and str(run / "checkpoints" / "step_0000002.pt") in fallback[0]
    assert ("is empty" if damage == "empty" else "not a readable targan checkpoint") in fallback[0]
    assert load_checkpoint(last)["step"] == 5


def test_resume_without_an_earlier_checkpoint_says_so(data, tmp_path):
    run = tmp_path / "run"
    train(data, run, max_steps=2, **TINY)
    (run / "checkpoints" / "last.pt").write_bytes(b"")
    result = CliRunner().invoke(app, ["train", "--data", str(data), "--out", str(run), "--preset", "tiny",
                                      "--image-size", "32", "--batch-size", "2", "--max-steps", "3",
                                      "--sample-every", "0", "--device", "cpu", "--resume"])
    assert result.exit_code == 1 and result.stdout == ""
    line = result.stderr.strip()
    assert "\n" not in line and "last.pt: is empty" in line and "no earlier checkpoint to fall back to" in line
    assert "--keep N" in line and "--overwrite" in line
