"""Parameter names of the official TarGAN networks (github 2165998/TarGAN) and ours.

The official code saves ``netG.state_dict()`` (and the EMA copy ``netG_use``) with ``torch.save``;
``load_official_state_dict`` reads such a file with ``weights_only=True`` (tensors only, no code
runs). The official network is this project's ``paper`` preset with the modalities of
``config.official_modalities()`` (official indices t1 = 0, t2 = 1, ct = 2). The discriminators
(``netDi``, ``netDt``) and the shape controller (``netH``) map too, for the tests that hold the
training step to the official one.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch

from targan_cli.config import ModelConfig
from targan_cli.errors import TarganError


_STREAMS = {"img": "x", "target": "r"}
_PATTERNS = (
    (re.compile(r"^(img|target)_encoder\.encoder\.(\d+)\.conv\.(.+)$"),
     lambda m, last: f"encoder_{_STREAMS[m[1]]}.blocks.{m[2]}.convs.{m[3]}"),
    (re.compile(r"^share_net\.encoder\.(\d+)\.conv\.(.+)$"),
     lambda m, last: f"shared.downs.{m[1]}.convs.{m[2]}"),
    (re.compile(r"^share_net\.bottom\.conv\.(.+)$"), lambda m, last: f"shared.bottom.convs.{m[1]}"),
    (re.compile(r"^share_net\.bottom\.up\.up\.(.+)$"), lambda m, last: f"shared.bottom.up.{m[1]}"),
    (re.compile(r"^share_net\.decoder\.(\d+)\.conv\.(.+)$"), lambda m, last: f"shared.ups.{m[1]}.convs.{m[2]}"),
    (re.compile(r"^share_net\.decoder\.(\d+)\.up\.up\.(.+)$"), lambda m, last: f"shared.ups.{m[1]}.up.{m[2]}"),
    (re.compile(r"^(img|target)_decoder\.decoder\.(\d+)\.conv\.(.+)$"),
     lambda m, last: (f"decoder_{_STREAMS[m[1]]}.final.{m[3]}" if int(m[2]) == last
                      else f"decoder_{_STREAMS[m[1]]}.ups.{m[2]}.convs.{m[3]}")),
    (re.compile(r"^(img|target)_decoder\.decoder\.(\d+)\.up\.up\.(.+)$"),
     lambda m, last: f"decoder_{_STREAMS[m[1]]}.ups.{m[2]}.up.{m[3]}"),
    (re.compile(r"^out_img\.weight$"), lambda m, last: "decoder_x.head.weight"),
    (re.compile(r"^out_tumor\.weight$"), lambda m, last: "decoder_r.head.weight"),
)

_DISCRIMINATOR_PATTERNS = (
    (re.compile(r"^main\.(\d+)\.(weight|bias)$"), lambda m, last: f"main.{m[1]}.{m[2]}"),
    (re.compile(r"^conv1\.weight$"), lambda m, last: "src.weight"),
    (re.compile(r"^conv2\.weight$"), lambda m, last: "cls.weight"),
)
# ShapeUNet: Conv1..Conv5 down, Up5/Up_conv5 (the deepest) .. Up2/Up_conv2 up, Conv_1x1; ``last``
# is the shape controller's depth.
_SHAPE_PATTERNS = (
    (re.compile(r"^Conv(\d+)\.conv\.(.+)$"), lambda m, last: f"downs.{int(m[1]) - 1}.{m[2]}"),
    (re.compile(r"^Up(\d+)\.(weight|bias)$"), lambda m, last: f"upsamplers.{last - int(m[1])}.{m[2]}"),
    (re.compile(r"^Up_conv(\d+)\.conv\.(.+)$"), lambda m, last: f"ups.{last - int(m[1])}.{m[2]}"),
    (re.compile(r"^Conv_1x1\.(weight|bias)$"), lambda m, last: f"head.{m[1]}"),
)


def official_to_ours(name: str, config: ModelConfig, network: str = "generator") -> str:
    """Our parameter name for an official one of ``network`` ("generator", "discriminator" or
    "shape"); KeyError when the official name is unknown."""
    patterns, last = {
        "generator": (_PATTERNS, config.encoder_depth - 1),  # the official decoder's last block: ``final``
        "discriminator": (_DISCRIMINATOR_PATTERNS, 0),
        "shape": (_SHAPE_PATTERNS, config.shape_depth),
    }[network]
    for pattern, rename in patterns:
        match = pattern.match(name)
        if match:
            return rename(match, last)
    raise KeyError(name)


def convert_official_state_dict(state: dict[str, torch.Tensor], config: ModelConfig,
                                source: Path | None = None, network: str = "generator") -> dict[str, torch.Tensor]:
    """Rename an official state dict of ``network`` to ours; unknown names are a TarganError."""
    converted, unknown = {}, []
    for name, tensor in state.items():
        try:
            converted[official_to_ours(name.removeprefix("module."), config, network)] = tensor
        except KeyError:
            unknown.append(name)
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise TarganError(f"not an official TarGAN {network}: unknown parameter(s) {shown}", source)
    return converted


def _load_failure(error: Exception) -> str:
    """The specific line of a ``torch.load`` failure (weights-only refusals wrap it in boilerplate)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    specific = [line for line in lines if not line.startswith(boilerplate)]
    return (specific or lines or [type(error).__name__])[0]


def load_official_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read an official ``netG_*.pkl`` with ``torch.load(weights_only=True)``: tensors only."""
    path = Path(path)
    if not path.is_file():
        raise TarganError("file not found" if not path.exists() else "not a file", path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error below says it all
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and weights-only refusals all mean "not a state dict"
        raise TarganError(f"not a PyTorch state dict of plain tensors; torch.load(weights_only=True) refused it "
                          f"without running any of its code ({_load_failure(error)[:200]})", path) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise TarganError("not a generator state dict (expected a mapping of names to tensors)", path)
    return state
