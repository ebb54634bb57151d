"""Weights folders: ``model.safetensors`` (the EMA generator), ``config.json`` and, from training
exports, ``discriminator.safetensors`` (D_x, whose classification head is the modality check of
translate's QC; older folders lack it and the check is then unavailable).

Sources are a local folder, a local ``model.safetensors`` (with ``config.json`` beside it), or a
Hugging Face Hub repo id ``org/name`` with an optional ``@revision``, downloaded with
``hf_hub_download`` into the standard cache (``HF_HUB_OFFLINE=1`` works once it is there).
Loading checks names, shapes and dtypes strictly: a folder whose tensors do not match its config
is refused with a message that names the mismatch. Nothing here unpickles.
"""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from targan_cli.config import WeightsConfig, read_json
from targan_cli.core.networks import Discriminator, Generator
from targan_cli.errors import TarganError, counted
from targan_cli.io.atomic import atomic_output, local_paths

WEIGHTS_FILE = "model.safetensors"
DISCRIMINATOR_FILE = "discriminator.safetensors"
CONFIG_FILE = "config.json"
WEIGHTS_ENV = "TARGAN_WEIGHTS"
# The Hub repo the tool uses when neither --weights nor TARGAN_WEIGHTS is given (weights/README.md).
DEFAULT_REPO = "targan-cli/targan-chaos"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Weights:
    """A loaded weights folder: the generator (eval mode), its config and where it came from, and the
    discriminator D_x when the folder has one (its classification head predicts a slice's modality)."""

    generator: Generator
    config: WeightsConfig
    folder: Path
    discriminator: Discriminator | None = None


def save_model_folder(folder: str | Path, module: torch.nn.Module, config: dict[str, Any], *,
                      tensors_file: str = WEIGHTS_FILE, overwrite: bool = False, command: str = "save_weights",
                      kind: str = "weights folder", extra: dict[str, torch.nn.Module] | None = None) -> Path:
    """Write ``module``'s tensors (float32, CPU) as safetensors and ``config`` as ``config.json``
    into ``folder`` atomically (a temporary folder renamed into place), and each module of
    ``extra`` as its own safetensors file. Weights and segmenter folders are both written this way,
    marked as made by ``command``, a folder of ``kind`` (``io.atomic``)."""
    with atomic_output(folder, overwrite=overwrite, is_dir=True, kind=kind, command=command) as temporary:
        for name, part in {tensors_file: module, **(extra or {})}.items():
            tensors = {key: tensor.detach().to("cpu", torch.float32).contiguous()
                       for key, tensor in part.state_dict().items()}
            save_file(tensors, str(temporary / name), metadata={"format": "pt"})
        (temporary / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(folder)


def save_weights(folder: str | Path, generator: Generator, config: WeightsConfig,
                 overwrite: bool = False, command: str = "save_weights",
                 discriminator: Discriminator | None = None) -> Path:
    """Write a weights folder atomically (a temporary folder renamed into place); with
    ``discriminator`` (D_x) its modality classifier too."""
    if generator.config != config.model:
        raise ValueError("the generator was not built from config.model")
    extra = {DISCRIMINATOR_FILE: discriminator} if discriminator is not None else None
    return save_model_folder(folder, generator, config.to_dict(), overwrite=overwrite, command=command, extra=extra)


def read_weights_config(folder: str | Path) -> WeightsConfig:
    """The ``config.json`` of a weights folder, validated."""
    path = Path(folder) / CONFIG_FILE
    data = read_json(path)
    try:
        return WeightsConfig.from_dict(data)
    except TarganError as error:
        raise TarganError(error.message, path) from None


def _hub_repo(text: str) -> str | None:
    """The repo id when ``text`` has the form of a Hub repo (org/name, optionally @revision), else None."""
    repo_id = text.split("@", 1)[0]
    return repo_id if _REPO_ID.match(repo_id) and not text.startswith((".", "/", "~")) else None


def _split_revision(source: str, revision: str | None) -> tuple[str, str | None]:
    if "@" in source:
        source, at_revision = source.split("@", 1)
        if not at_revision:
            raise TarganError(f"{source}@ names no revision: add a branch, tag or commit after @, or drop the @",
                              exit_code=2)
        if revision is not None and revision != at_revision:
            raise TarganError(f"two revisions given: @{at_revision} and --revision {revision}", exit_code=2)
        revision = at_revision
    return source, revision


def _hub_host_resolves() -> bool:
    """Whether the Hub's host name resolves. Without DNS (no network, an air-gapped cluster node)
    huggingface_hub would retry for about half a minute, printing a warning per attempt, before
    falling back to the cache; the cache alone is read at once instead."""
    from huggingface_hub import constants

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    try:
        socket.getaddrinfo(host, 443)
    except (OSError, UnicodeError):
        return False
    return True


# The default repo holds no weights yet: the two ways forward, with their exact commands.
UNPUBLISHED = (
    f"no pretrained weights are published yet (weights/README.md; {DEFAULT_REPO!r} is reserved for them). "
    "Two ways forward: `targan demo` (offline, minutes; synthetic phantoms) writes weights to try with "
    "--weights targan-demo/run/export; or train CHAOS weights: `targan data import-chaos CHAOS_Train_Sets/ "
    "chaos/` then `targan train --data chaos/ --epochs 50 --out runs/chaos` (a GPU; docs/train.md) and "
    "pass --weights runs/chaos/export")


def _download(repo_id: str, revision: str | None) -> tuple[Path, str | None]:
    """Fetch config.json and model.safetensors of a Hub repo (from the cache alone when the Hub
    cannot be resolved); returns the snapshot folder and commit."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    cache_only = constants.HF_HUB_OFFLINE or not _hub_host_resolves()
    try:
        paths = [Path(hf_hub_download(repo_id, name, revision=revision, local_files_only=cache_only))
                 for name in (CONFIG_FILE, WEIGHTS_FILE)]
    except LocalEntryNotFoundError:
        if repo_id == DEFAULT_REPO:  # not in the cache, and nothing published to fetch
            raise TarganError(UNPUBLISHED) from None
        raise TarganError(
            f"weights {repo_id!r} are neither in the local Hugging Face cache nor reachable "
            "(offline?). Train your own with `targan train --data DATA` and pass "
            "--weights RUN/export, or set TARGAN_WEIGHTS to a weights folder"
        ) from None
    except (HfHubHTTPError, OSError, ValueError) as error:
        if repo_id == DEFAULT_REPO and getattr(getattr(error, "response", None), "status_code", None) in (401, 404):
            raise TarganError(UNPUBLISHED) from None  # the Hub answers: no such repo yet
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TarganError(
            f"cannot download weights {repo_id!r}"
            f"{'@' + revision if revision else ''}: {first_line[:200]}. Check the repo id and "
            "revision, or pass --weights with a local weights folder"
        ) from None
    try:  # optional: older weights have no discriminator (the modality check is then unavailable)
        hf_hub_download(repo_id, DISCRIMINATOR_FILE, revision=revision, local_files_only=cache_only)
    except (EntryNotFoundError, HfHubHTTPError, OSError, ValueError):
        pass
    snapshot = paths[0].parent
    # The cache lays files out as .../snapshots/<commit hash>/<file>.
    commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else None
    return snapshot, commit


def weights_source(source: str | Path | None) -> str | Path:
    """Where a command reads its weights from: ``source`` (--weights), else $TARGAN_WEIGHTS, else the
    built-in repo. A local folder among these is one of the command's inputs (io.atomic.check_apart)."""
    return source if source is not None else os.environ.get(WEIGHTS_ENV) or DEFAULT_REPO


def weights_inputs(source: str | Path | None) -> list[Path]:
    """What a command reads its weights from, for ``io.atomic.check_apart``: a local weights folder
    or file, or, for a Hub repo id, that repo's folder in the Hugging Face cache (an output there
    would sit among the cached snapshots, and replacing it with --overwrite would delete them)."""
    source = weights_source(source)
    local = local_paths(source)
    if local or not isinstance(source, str):
        return local
    repo_id = _hub_repo(source)
    if repo_id is None:
        return []
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return [Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")]


def resolve_weights(source: str | Path | None = None, revision: str | None = None) -> tuple[Path, dict]:
    """A weights source -> (local folder, provenance additions). See the module docstring."""
    from_environment = source is None and bool(os.environ.get(WEIGHTS_ENV))
    source = weights_source(source)
    try:
        return _resolve(str(source), revision)
    except TarganError as error:
        if not from_environment:
            raise
        raise TarganError(f"{error.message} (from ${WEIGHTS_ENV}; pass --weights or change the variable)",
                          error.path, error.exit_code) from None


def _resolve(text: str, revision: str | None) -> tuple[Path, dict]:
    path = Path(text).expanduser()
    if path.exists():
        if revision is not None:
            raise TarganError("--revision applies to Hub repo ids, not to local weights", path, exit_code=2)
        folder = path.parent if path.is_file() else path
        if path.is_file() and path.name != WEIGHTS_FILE:
            raise TarganError(f"expected a weights folder or a {WEIGHTS_FILE} file", path)
        return folder, {}
    repo_id, revision = _split_revision(text, revision)
    if _hub_repo(text) is None:
        raise TarganError("no such weights folder or file (and not a Hub repo id like org/name)", path)
    folder, commit = _download(repo_id, revision)
    return folder, {"hub_repo": repo_id, "hub_revision": revision, "hub_commit": commit}


def check_state_dict(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse missing or unexpected names, wrong shapes, non-float dtypes and NaN or infinite
    values, naming the first."""
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    problems = []
    if missing:
        problems.append(f"{counted(len(missing), 'missing tensor')} ({', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''})")
    if extra:
        problems.append(f"{counted(len(extra), 'unexpected tensor')} ({', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''})")
    for name in sorted(set(tensors) & set(expected)):
        if tensors[name].shape != expected[name].shape:
            problems.append(f"{name} has shape {tuple(tensors[name].shape)}, the config needs "
                            f"{tuple(expected[name].shape)}")
            break
        if not tensors[name].is_floating_point():
            problems.append(f"{name} has dtype {tensors[name].dtype}, expected a floating-point tensor")
            break
        if not torch.isfinite(tensors[name]).all():
            problems.append(f"{name} holds NaN or infinite values")
            break
    if problems:
        raise TarganError("tensors do not match config.json: " + "; ".join(problems), path)


def load_tensors_into(module: torch.nn.Module, path: Path) -> None:
    """Load a safetensors file into ``module`` with strict name, shape and dtype checks."""
    if not path.is_file():
        raise TarganError(f"no {path.name} in the folder", path.parent)
    try:
        tensors = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise TarganError(f"not a valid safetensors file ({str(error).splitlines()[0][:160]})", path) from None
    check_state_dict(tensors, module.state_dict(), path)
    module.load_state_dict({name: tensor.float() for name, tensor in tensors.items()}, strict=True)


def load_weights(source: str | Path | None = None, revision: str | None = None,
                 device: str | torch.device = "cpu") -> Weights:
    """Load a weights folder (local or Hub) with strict name, shape and dtype checks."""
    folder, provenance = resolve_weights(source, revision)
    config = read_weights_config(folder)
    if provenance:
        config = replace(config, provenance={**config.provenance, **provenance})
    generator = Generator(config.model)
    load_tensors_into(generator, folder / WEIGHTS_FILE)
    discriminator = None
    if (folder / DISCRIMINATOR_FILE).is_file():
        discriminator = Discriminator(config.model)
        load_tensors_into(discriminator, folder / DISCRIMINATOR_FILE)
        discriminator = discriminator.to(device).eval().requires_grad_(False)
    return Weights(generator.to(device).eval().requires_grad_(False), config, folder, discriminator)


def load_generator(source: str | Path | None = None, revision: str | None = None,
                   device: str | torch.device = "cpu") -> Generator:
    """The EMA generator of a weights folder or Hub repo, in eval mode: ``G(x, target)``.

    ``x`` is (N, 1, H, W) in [-1, 1]; ``target`` holds modality indices in the order of the
    weights' ``config.json`` (``load_weights`` returns that config too).
    """
    return load_weights(source, revision, device).generator
