"""targan-cli: target-aware multi-modality medical image translation (TarGAN) for whole volumes."""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["__version__", "load_generator"]

if TYPE_CHECKING:
    from targan_cli.io.weights import load_generator


def __getattr__(name: str):
    # Lazy so that `import targan_cli` (and `targan --help`) does not import torch.
    if name == "load_generator":
        from targan_cli.io.weights import load_generator

        return load_generator
    raise AttributeError(f"module 'targan_cli' has no attribute {name!r}")
