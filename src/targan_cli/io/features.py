"""FID feature modules from files: a torch.export program or TorchScript module
(``--fid-features``), or Inception-v3.

Both map single-channel slices ``(N, 1, H, W)`` in the model range [-1, 1] to ``(N, D)``
features for ``core.metrics.FrechetDistance``. Every problem with a file is a TarganError that
names it and says what to put where.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

from targan_cli.core.metrics import feature_dimension, first_line
from targan_cli.errors import TarganError
from targan_cli.process import quiet_logger

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
"""torch-fidelity's Inception-v3 FID weights (converted from the TensorFlow FID graph)."""

TORCH_FIDELITY_VERSION = "0.4.0"
"""The torch-fidelity release the Inception-v3 FID features are tested with."""


EXPORTED_SUFFIX = ".pt2"
"""Feature files with this suffix are torch.export programs; any other is read as TorchScript."""


class _ExportedFeatures(nn.Module):
    """A torch.export program's module, which refuses train() and eval(): its graph was fixed at
    export. Both only set the flag here, so that FID code can call eval() on any feature module."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def train(self, mode: bool = True) -> _ExportedFeatures:
        self.training = mode
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)


def _load_exported(path: Path) -> nn.Module:
    try:
        with quiet_logger("torch.export"):  # it logs a whole traceback before raising
            program = torch.export.load(str(path))
        return _ExportedFeatures(program.module())
    except Exception as error:  # noqa: BLE001 - torch.export.load raises many kinds for a bad archive
        raise TarganError(f"not a torch.export program (save one with torch.export.save("
                          f"torch.export.export(module, ...), FILE{EXPORTED_SUFFIX})): {first_line(error)}",
                          path) from None


def _load_torchscript(path: Path) -> nn.Module:
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError, OSError) as error:
        raise TarganError(f"not a TorchScript module (save one with torch.jit.script(...).save, or a "
                          f"torch.export program as FILE{EXPORTED_SUFFIX}): {first_line(error)}", path) from None
    return module.eval()


def load_feature_module(path: str | Path, image_size: tuple[int, int] | None = None) -> nn.Module:
    """An FID feature module from a file (``--fid-features FILE``), on the CPU, for inference.

    ``FILE.pt2`` is a torch.export program (``torch.export.save``; export it with a dynamic batch
    dimension, since the last batch is smaller); any other file a TorchScript module
    (``torch.jit.script(module).save(path)``, which torch marks as deprecated). The module must
    take ``(N, 1, H, W)`` float32 slices in [-1, 1] (the model's intensity range) and return
    ``(N, D)`` features. With ``image_size`` the module is also run on two blank slices of that
    size, so a module that does not fit fails here, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise TarganError("FID feature module file not found", path)
    exported = feature_module_kind(path) == "torch.export"
    module = _load_exported(path) if exported else _load_torchscript(path)
    if image_size is not None:
        try:
            feature_dimension(module, image_size, torch.device("cpu"))
        except TarganError as error:
            hint = " (export it with a dynamic batch dimension)" if exported else ""
            raise TarganError(error.message + hint, path) from None
    return module


def feature_module_kind(path: str | Path) -> str:
    """How ``load_feature_module`` reads ``path``: ``torch.export`` or ``torchscript``."""
    return "torch.export" if Path(path).suffix == EXPORTED_SUFFIX else "torchscript"


def fid_install_command(torch_version: str = torch.__version__) -> str:
    """The pip command that adds torch-fidelity and torchvision and leaves the installed torch as it
    is: ``--no-deps``, the torchvision release built for this torch (torch 2.N pairs with
    torchvision 0.(N + 15)) and, for a torch from PyTorch's own index (a local version such as
    ``+cpu`` or ``+cu121``), that index, whose torchvision build matches it. Their other needs
    (numpy, scipy, Pillow, tqdm) come with targan-cli."""
    release, _, variant = torch_version.partition("+")
    major, minor = (int(part) for part in release.split(".")[:2])
    index = f" --extra-index-url https://download.pytorch.org/whl/{variant}" if variant else ""
    return (f"pip install --no-deps torch-fidelity=={TORCH_FIDELITY_VERSION} "
            f"'torchvision=={major - 2}.{minor + 15}.*'{index}")


def inception_weights_cache_path() -> Path:
    """Where torch hub (and so torch-fidelity) keeps the Inception-v3 FID weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILE


class _InceptionSliceFeatures(nn.Module):
    """Inception-v3 pool features (2048) of single-channel slices in [-1, 1].

    The FID network wants RGB uint8 images: slices are mapped to [0, 255], rounded and repeated
    to three channels; the network resizes them to 299 x 299 itself.
    """

    num_features = 2048

    def __init__(self, inception: nn.Module) -> None:
        super().__init__()
        self.inception = inception

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = ((images.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
        return self.inception(pixels.expand(-1, 3, -1, -1))  # (N, 3, H, W) -> (N, 2048)


def inception_features(weights_path: str | Path | None = None) -> nn.Module:
    """The standard Inception-v3 FID feature module (torch-fidelity's weights) for ``FrechetDistance``.

    Needs torch-fidelity (not a default dependency; it also needs torchvision). Without
    ``weights_path`` the weights are taken from the torch hub cache (``inception_weights_cache_path``)
    and downloaded there, silently, when missing. Resizing follows the original TensorFlow FID
    (no antialiasing), so values compare with published Inception FIDs.
    """
    hint = (f"put {INCEPTION_WEIGHTS_FILE} at {inception_weights_cache_path()} "
            "or pass --inception-weights FILE")
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    except ImportError as error:
        raise TarganError(f"Inception-v3 FID features need torch-fidelity and torchvision "
                          f"({first_line(error)}). Install them and keep your torch {torch.__version__}: "
                          f"`{fid_install_command()}` (a plain `pip install torch-fidelity` would replace "
                          "torch). The Inception-v3 weights (about 92 MB) download on first use to "
                          f"{inception_weights_cache_path()}; offline, copy {INCEPTION_WEIGHTS_FILE} "
                          "there or pass --inception-weights FILE. Or pass --fid-features FILE") from None
    if weights_path is None:
        weights_path = inception_weights_cache_path()
        if not weights_path.is_file():
            try:
                weights_path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(URL_INCEPTION_V3, str(weights_path), progress=False)
            except (OSError, RuntimeError, ValueError) as error:
                raise TarganError(f"cannot download the Inception-v3 FID weights ({first_line(error)}); "
                                  f"{hint}", weights_path) from None
    weights_path = Path(weights_path)
    if not weights_path.is_file():
        raise TarganError(f"Inception-v3 FID weights not found; {hint}", weights_path)
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                       feature_extractor_weights_path=str(weights_path), antialias=False)
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as error:
        raise TarganError(f"not the Inception-v3 FID weights {INCEPTION_WEIGHTS_FILE} "
                          f"({first_line(error)})", weights_path) from None
    return _InceptionSliceFeatures(inception)
