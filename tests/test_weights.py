"""io/weights.py: local and Hub sources (an offline Hugging Face cache), strict loading, round trips."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import targan_cli
from targan_cli.errors import TarganError
from targan_cli.io.atomic import MARKER
from targan_cli.io.weights import (CONFIG_FILE, WEIGHTS_ENV, WEIGHTS_FILE, load_weights, read_weights_config,
                                   resolve_weights, save_model_folder, save_weights)
from weights_factories import cache_hub_repo, make_tiny_weights, tiny_generator, use_offline_hub_cache

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"
REPO = "tiny-org/tiny-targan"


@pytest.fixture(scope="module")
def weights_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_weights(tmp_path_factory.mktemp("weights") / "tiny")


@pytest.fixture()
def editable_weights(weights_folder: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny weights that a test may damage."""
    return Path(shutil.copytree(weights_folder, tmp_path / "weights"))


@pytest.fixture()
def hub_cache(weights_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hf-cache"
    cache_hub_repo(cache, REPO, weights_folder, commit=COMMIT)
    use_offline_hub_cache(monkeypatch, cache)
    return cache


def _probe(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 1, 32, 32, generator=generator) * 2 - 1  # (N, 1, H, W) in [-1, 1]
    return images, torch.tensor([0, 2])


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors copied out of the file (load_file maps it; rewriting a mapped file crashes)."""
    return {name: tensor.clone() for name, tensor in load_file(str(folder / WEIGHTS_FILE)).items()}


def _rewrite_tensors(folder: Path, change) -> None:
    tensors = _read_tensors(folder)
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS_FILE))


# ----------------------------------------------------------------------------- round trip


def test_save_then_load_gives_the_same_outputs(tmp_path: Path) -> None:
    generator = tiny_generator(seed=3)
    folder = make_tiny_weights(tmp_path / "weights", seed=3)
    weights = load_weights(folder)
    images, targets = _probe()
    with torch.inference_mode():
        assert torch.equal(weights.generator(images, targets), generator(images, targets))
    assert not weights.generator.training
    assert not any(p.requires_grad for p in weights.generator.parameters())
    assert weights.folder == folder
    assert weights.config.modality_names == ("t1w", "t2w", "ct")
    assert weights.config.intensity("t2w").reference_high is not None
    assert weights.config.provenance == {"source": "tests/weights_factories.py", "seed": 3}


def test_different_seeds_give_different_generators(weights_folder: Path, tmp_path: Path) -> None:
    other = load_weights(make_tiny_weights(tmp_path / "other", seed=1)).generator
    images, targets = _probe()
    with torch.inference_mode():
        assert not torch.allclose(load_weights(weights_folder).generator(images, targets), other(images, targets))


def test_save_refuses_a_generator_that_does_not_match_the_config(weights_folder: Path, tmp_path: Path) -> None:
    config = read_weights_config(weights_folder)
    with pytest.raises(ValueError, match="config.model"):
        save_weights(tmp_path / "out", tiny_generator(image_size=64), config)


def test_save_refuses_an_existing_folder_without_overwrite(weights_folder: Path) -> None:
    config = read_weights_config(weights_folder)
    with pytest.raises(TarganError, match="already exists"):
        save_weights(weights_folder, tiny_generator(), config)


def test_save_model_folder_writes_float32_tensors_and_config_atomically(tmp_path: Path) -> None:
    module = torch.nn.Linear(3, 2).double()
    folder = save_model_folder(tmp_path / "model", module, {"width": 3}, tensors_file="net.safetensors")
    assert sorted(p.name for p in folder.iterdir()) == [MARKER, CONFIG_FILE, "net.safetensors"]
    assert json.loads((folder / CONFIG_FILE).read_text()) == {"width": 3}
    tensors = load_file(str(folder / "net.safetensors"))
    assert set(tensors) == {"weight", "bias"} and all(t.dtype == torch.float32 for t in tensors.values())
    torch.testing.assert_close(tensors["weight"], module.weight.float())

    with pytest.raises(TarganError, match="already exists"):
        save_model_folder(folder, module, {"width": 4}, tensors_file="net.safetensors")
    with pytest.raises(TypeError):  # a config that is not JSON: nothing replaced, nothing left over
        save_model_folder(folder, module, {"width": object()}, tensors_file="net.safetensors", overwrite=True)
    assert json.loads((folder / CONFIG_FILE).read_text()) == {"width": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    save_model_folder(folder, module, {"width": 4}, tensors_file="net.safetensors", overwrite=True)
    assert json.loads((folder / CONFIG_FILE).read_text()) == {"width": 4}


def test_package_level_load_generator(weights_folder: Path) -> None:
    generator = targan_cli.load_generator(weights_folder)
    images, targets = _probe()
    with torch.inference_mode():
        assert generator(images, targets).shape == (2, 1, 32, 32)


# ----------------------------------------------------------------------------- local sources


def test_a_model_safetensors_path_loads_its_folder(weights_folder: Path) -> None:
    assert load_weights(weights_folder / WEIGHTS_FILE).folder == weights_folder


def test_another_file_is_not_a_weights_source(weights_folder: Path) -> None:
    with pytest.raises(TarganError, match=f"expected a weights folder or a {WEIGHTS_FILE} file"):
        resolve_weights(weights_folder / CONFIG_FILE)


def test_revision_with_a_local_folder_is_a_usage_error(weights_folder: Path) -> None:
    with pytest.raises(TarganError, match="--revision applies to Hub repo ids") as caught:
        resolve_weights(weights_folder, revision="main")
    assert caught.value.exit_code == 2


def test_the_environment_variable_is_the_default_source(weights_folder: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WEIGHTS_ENV, str(weights_folder))
    assert resolve_weights() == (weights_folder, {})


def test_a_missing_local_path_is_not_taken_for_a_repo_id(tmp_path: Path) -> None:
    with pytest.raises(TarganError, match="no such weights folder") as caught:
        resolve_weights(f"{tmp_path}/missing")
    assert caught.value.path == tmp_path / "missing"


# ----------------------------------------------------------------------------- Hub (offline cache)


def test_hub_repo_id_loads_from_the_cache(hub_cache: Path, weights_folder: Path) -> None:
    weights = load_weights(REPO)
    assert weights.folder == hub_cache / "models--tiny-org--tiny-targan" / "snapshots" / COMMIT
    assert weights.config.provenance["hub_repo"] == REPO
    assert weights.config.provenance["hub_commit"] == COMMIT
    assert weights.config.provenance["hub_revision"] is None
    images, targets = _probe()
    with torch.inference_mode():
        assert torch.equal(weights.generator(images, targets), load_weights(weights_folder).generator(images, targets))


@pytest.mark.parametrize("source, revision", [(f"{REPO}@{COMMIT}", None), (REPO, COMMIT)])
def test_hub_repo_at_a_commit(hub_cache: Path, source: str, revision: str | None) -> None:
    weights = load_weights(source, revision)
    assert weights.config.provenance["hub_commit"] == COMMIT
    assert weights.config.provenance["hub_revision"] == COMMIT


def test_two_different_revisions_are_refused(hub_cache: Path) -> None:
    with pytest.raises(TarganError, match="two revisions given") as caught:
        load_weights(f"{REPO}@{COMMIT}", revision="main")
    assert caught.value.exit_code == 2


def test_an_uncached_repo_offline_says_how_to_get_weights(hub_cache: Path) -> None:
    with pytest.raises(TarganError) as caught:
        load_weights("someone/not-cached")
    message = str(caught.value)
    assert "'someone/not-cached'" in message
    assert "targan train" in message and "--weights" in message
    assert "\n" not in message


def test_without_dns_the_cache_is_read_at_once(weights_folder: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """HF_HUB_OFFLINE unset, but the Hub's name does not resolve (.invalid never does): cached
    weights load, an uncached repo is the one-line error, and huggingface_hub's retries (a warning
    per attempt, about half a minute) never start."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache_hub_repo(cache, REPO, weights_folder, commit=COMMIT)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.targan-test.invalid")
    assert load_weights(REPO).config.provenance["hub_commit"] == COMMIT
    with pytest.raises(TarganError, match="neither in the local Hugging Face cache nor reachable"):
        load_weights("someone/not-cached")
    assert not [record for record in caplog.records if "Retry" in record.getMessage()]


def test_an_empty_revision_and_a_bad_environment_variable_are_named(hub_cache: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(TarganError, match="org/name@ names no revision") as caught:
        load_weights("org/name@")
    assert caught.value.exit_code == 2
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / "nope"))
    with pytest.raises(TarganError, match=r"no such weights folder or file .* \(from \$TARGAN_WEIGHTS; pass "
                                          r"--weights or change the variable\)") as caught:
        load_weights()
    assert caught.value.path == tmp_path / "nope"


def test_an_uncached_commit_of_a_cached_repo_is_refused(hub_cache: Path) -> None:
    with pytest.raises(TarganError, match="targan train"):
        load_weights(f"{REPO}@{'f' * 40}")


def test_the_default_repo_is_used_without_a_source(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    with pytest.raises(TarganError, match="targan-cli/targan-chaos"):
        load_weights()


# ----------------------------------------------------------------------------- strict loading


def test_missing_tensors_are_refused(editable_weights: Path) -> None:
    _rewrite_tensors(editable_weights, lambda tensors: tensors.pop("decoder_x.head.weight"))
    with pytest.raises(TarganError, match=r"1 missing tensor \(decoder_x.head.weight\)") as caught:
        load_weights(editable_weights)
    assert caught.value.path == editable_weights / WEIGHTS_FILE


def test_unexpected_tensors_are_refused(editable_weights: Path) -> None:
    _rewrite_tensors(editable_weights, lambda tensors: tensors.update(extra=torch.zeros(3)))
    with pytest.raises(TarganError, match=r"1 unexpected tensor \(extra\)"):
        load_weights(editable_weights)


def test_a_tensor_of_the_wrong_shape_is_refused(editable_weights: Path) -> None:
    wrong = {"decoder_x.head.weight": torch.zeros(1, 2, 1, 1)}
    _rewrite_tensors(editable_weights, lambda tensors: tensors.update(wrong))
    with pytest.raises(TarganError, match=r"decoder_x.head.weight has shape \(1, 2, 1, 1\)"):
        load_weights(editable_weights)


def test_an_integer_tensor_is_refused(editable_weights: Path) -> None:
    def to_int(tensors: dict[str, torch.Tensor]) -> None:
        tensors["decoder_x.head.weight"] = tensors["decoder_x.head.weight"].to(torch.int32)

    _rewrite_tensors(editable_weights, to_int)
    with pytest.raises(TarganError, match="decoder_x.head.weight has dtype torch.int32"):
        load_weights(editable_weights)


def test_a_pickle_named_model_safetensors_is_refused(editable_weights: Path) -> None:
    torch.save(_read_tensors(editable_weights), editable_weights / WEIGHTS_FILE)
    with pytest.raises(TarganError, match="not a valid safetensors file") as caught:
        load_weights(editable_weights)
    assert caught.value.path == editable_weights / WEIGHTS_FILE


def test_a_config_that_does_not_match_the_tensors_is_refused(editable_weights: Path) -> None:
    config = json.loads((editable_weights / CONFIG_FILE).read_text())
    config["model"]["base_width"] = 16
    (editable_weights / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(TarganError, match="tensors do not match config.json: .* has shape"):
        load_weights(editable_weights)


def test_bad_json_is_refused(editable_weights: Path) -> None:
    (editable_weights / CONFIG_FILE).write_text('{"model": ')
    with pytest.raises(TarganError, match="not valid JSON") as caught:
        load_weights(editable_weights)
    assert caught.value.path == editable_weights / CONFIG_FILE


def test_an_unknown_config_field_is_refused_with_the_file_named(editable_weights: Path) -> None:
    config = json.loads((editable_weights / CONFIG_FILE).read_text())
    config["learning_rate"] = 1e-4
    (editable_weights / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(TarganError, match="unknown field.*learning_rate") as caught:
        load_weights(editable_weights)
    assert caught.value.path == editable_weights / CONFIG_FILE


def test_a_folder_without_model_safetensors_is_refused(editable_weights: Path) -> None:
    (editable_weights / WEIGHTS_FILE).unlink()
    with pytest.raises(TarganError, match=f"no {WEIGHTS_FILE} in the folder"):
        load_weights(editable_weights)
