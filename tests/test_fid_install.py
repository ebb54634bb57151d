"""The install line that `evaluate --metric fid` advises adds torch-fidelity and keeps torch.

It runs the advised command in a throwaway virtual environment that sees this environment's
packages (a .pth file): torch's version there must not change, nothing named torch or nvidia may
land in the new environment, and torch-fidelity must be installed. It needs the package
registries (PyPI), which this project's machines and CI reach.
"""

import json
import shlex
import subprocess
import sysconfig
import venv
from pathlib import Path

import torch

from targan_cli.io.features import fid_install_command

PROBE = ("import json, torch, importlib.metadata as m; print(json.dumps({'torch': torch.__version__, "
         "'file': torch.__file__, 'fidelity': m.version('torch-fidelity')}))")


def test_the_line_pins_torchvision_to_the_installed_torch() -> None:
    assert fid_install_command("2.13.0+cpu").endswith(
        "'torchvision==0.28.*' --extra-index-url https://download.pytorch.org/whl/cpu")
    assert fid_install_command("2.4.1").endswith("'torchvision==0.19.*'")
    assert "--no-deps" in fid_install_command("2.4.1+cu121") and fid_install_command("2.4.1+cu121").endswith("cu121")


def test_the_advised_install_keeps_torch(tmp_path: Path) -> None:
    environment = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(environment)
    python = environment / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, numpy, ... of this venv
    command = shlex.split(fid_install_command())
    assert command[:3] == ["pip", "install", "--no-deps"]
    subprocess.run([python, "-m", *command, "--quiet"], check=True, timeout=600)
    probe = json.loads(subprocess.check_output([python, "-c", PROBE], text=True))
    assert probe["torch"] == torch.__version__
    assert Path(probe["file"]).resolve() == Path(torch.__file__).resolve()  # still this environment's torch
    assert probe["fidelity"] == command[3].split("==")[1]
    installed = {path.name.lower() for path in site.iterdir()}
    assert not [name for name in installed if name == "torch" or name.startswith(("torch-", "nvidia"))]
