"""The command line: version, instant help (no torch import), convert and info, one-line errors."""

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from targan_cli import __version__
from targan_cli.cli import app
from test_official import official_state_dict

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"targan-cli {__version__}"


def test_python_dash_m_is_the_same_app():
    result = subprocess.run([sys.executable, "-m", "targan_cli", "--version"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"targan-cli {__version__}"


def test_importing_the_cli_and_help_do_not_import_torch():
    code = ("import sys; import targan_cli.cli as cli; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(cli.app, ['--help']); assert r.exit_code == 0, r.output; "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("official") / "netG_use_50.pkl"
    torch.save(official_state_dict(), path)
    return path


def test_convert_then_info(official_checkpoint, tmp_path):
    out = tmp_path / "weights"
    result = runner.invoke(app, ["convert", str(official_checkpoint), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "33,750,656 parameters" in result.stdout
    assert sorted(p.name for p in out.iterdir()) == [".targan.json", "config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert [m["name"] for m in config["modalities"]] == ["t1w", "t2w", "ct"]
    assert config["modalities"][0]["intensity"]["scaling"] == "official_slice"
    assert config["modalities"][2]["intensity"]["kind"] == "ct"
    assert config["preset"] == "paper"

    from targan_cli import load_generator
    generator = load_generator(out)
    assert not generator.training
    state = official_state_dict()
    assert torch.equal(generator.state_dict()["decoder_x.head.weight"], state["out_img.weight"])

    result = runner.invoke(app, ["info", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "t1w, t2w, ct" in result.stdout and "33,750,656" in result.stdout
    assert "official TarGAN checkpoint" in result.stdout

    again = runner.invoke(app, ["convert", str(official_checkpoint), "-o", str(out)])
    assert again.exit_code == 1
    assert "already exists; pass --overwrite" in again.stderr
    assert "Traceback" not in again.output


def test_convert_errors_are_one_line_and_leave_no_output(tmp_path):
    out = tmp_path / "weights"
    missing = runner.invoke(app, ["convert", str(tmp_path / "nope.pkl"), "-o", str(out)])
    assert missing.exit_code == 1 and "nope.pkl: file not found" in missing.stderr
    wrong = tmp_path / "wrong.pkl"
    state = {k: v for k, v in list(official_state_dict().items())[:4]}
    state["img_encoder.encoder.0.conv.0.weight"] = torch.zeros(3, 3)
    torch.save(state, wrong)
    result = runner.invoke(app, ["convert", str(wrong), "-o", str(out)])
    assert result.exit_code == 1
    assert "wrong.pkl" in result.stderr and "missing tensor" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists() and list(tmp_path.iterdir()) == [wrong]


def test_info_on_a_missing_folder():
    result = runner.invoke(app, ["info", "./no/such/folder"])
    assert result.exit_code == 1 and "no such weights folder" in result.stderr


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_termination_signals_remove_temporary_outputs(tmp_path, name, code):
    """`timeout`, `kill`, a batch scheduler or a closed terminal: the partial output goes, exit 128 + N."""
    script = f"""
import os, signal, time
from targan_cli.cli import handles_errors
from targan_cli.io.atomic import atomic_output

@handles_errors
def command():
    with atomic_output({str(tmp_path / "out.nii.gz")!r}) as temporary:
        temporary.write_bytes(b"partial")
        os.kill(os.getpid(), signal.{name})
        time.sleep(30)

try:
    command()
except SystemExit as stop:
    raise
except BaseException as error:  # typer.Exit is a click exception, not SystemExit
    raise SystemExit(getattr(error, "exit_code", 99))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == code, result.stderr
    assert result.stderr.strip() == f"error: terminated by {name}"
    assert list(tmp_path.iterdir()) == []


def test_running_out_of_memory_is_one_line(capsys):
    """numpy's MemoryError for a huge allocation ends the command with one line, not a traceback."""
    from targan_cli.cli import handles_errors

    @handles_errors
    def command():
        import numpy as np
        return np.ones((1 << 40,), dtype=np.float64)  # 8 TiB: refused at once

    import typer
    with pytest.raises(typer.Exit) as caught:
        command()
    assert caught.value.exit_code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: out of memory (") and "--batch-size" in lines[0]
