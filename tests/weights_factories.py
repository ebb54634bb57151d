"""Tiny random weights folders for tests: a real ``model.safetensors`` + ``config.json``."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path

import torch

from targan_cli.config import ModalitySpec, WeightsConfig, default_modalities, preset
from targan_cli.core.networks import Generator
from targan_cli.io.weights import save_weights

# MR outputs map back to [0, TINY_REFERENCE_HIGH].
TINY_REFERENCE_HIGH = 1000.0


def tiny_generator(num_modalities: int = 3, seed: int = 0, image_size: int = 32) -> Generator:
    """A random ``tiny``-preset generator, deterministic for ``seed``."""
    torch.manual_seed(seed)
    return Generator(preset("tiny", image_size=image_size, num_modalities=num_modalities)).eval()


def make_tiny_weights(folder: str | Path, modalities: tuple[ModalitySpec, ...] = default_modalities(),
                      seed: int = 0, image_size: int = 32) -> Path:
    """Write a weights folder with a random tiny generator; MR modalities get a reference_high."""
    modalities = tuple(
        dataclasses.replace(m, intensity=dataclasses.replace(m.intensity, reference_high=TINY_REFERENCE_HIGH))
        if m.intensity.kind == "mr" and m.intensity.reference_high is None else m
        for m in modalities
    )
    generator = tiny_generator(len(modalities), seed, image_size)
    config = WeightsConfig(model=generator.config, modalities=modalities, preset="tiny",
                           provenance={"source": "tests/weights_factories.py", "seed": seed})
    return save_weights(folder, generator, config)


def cache_hub_repo(cache_dir: str | Path, repo_id: str, weights_folder: str | Path,
                   commit: str = "0123456789abcdef0123456789abcdef01234567", ref: str = "main") -> Path:
    """Place a weights folder in a Hugging Face cache as ``hf_hub_download`` leaves it; returns the snapshot.

    The layout is huggingface_hub's: ``models--org--name/blobs/<hash>`` holds the contents,
    ``snapshots/<commit>/<file>`` are relative symlinks to the blobs, ``refs/<ref>`` holds the commit.
    """
    from huggingface_hub.file_download import repo_folder_name

    storage = Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = storage / "snapshots" / commit
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(Path(weights_folder).iterdir()):
        content = file.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / ref).write_text(commit)
    return snapshot


def use_offline_hub_cache(monkeypatch, cache_dir: str | Path) -> None:
    """Point huggingface_hub at ``cache_dir`` with HF_HUB_OFFLINE=1: no network, cache only.

    huggingface_hub reads both variables when it is imported, so its constants are patched too.
    """
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
