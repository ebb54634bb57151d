"""`targan convert` and `targan info`: official checkpoints in, weights folders described."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from targan_cli import __version__
from targan_cli.config import WeightsConfig, official_modalities, preset
from targan_cli.io.atomic import check_writable
from targan_cli.io.official import convert_official_state_dict, load_official_state_dict
from targan_cli.io.provenance import describe_provenance, sidecar_path
from targan_cli.io.volume import is_volume_path, read_volume
from targan_cli.io.weights import check_state_dict, load_weights, save_weights


@dataclass(frozen=True)
class ConvertResult:
    folder: Path
    parameters: int
    modalities: tuple[str, ...]


def convert_official(checkpoint: str | Path, output: str | Path, overwrite: bool = False) -> ConvertResult:
    """Official ``netG*.pkl`` -> weights folder with the official preprocessing as intensity settings."""
    from targan_cli.core.networks import Generator, parameter_count

    checkpoint = Path(checkpoint)
    check_writable(output, overwrite, inputs=[checkpoint], is_dir=True, kind="weights folder")
    model_config = preset("paper")
    state = convert_official_state_dict(load_official_state_dict(checkpoint), model_config, checkpoint)
    generator = Generator(model_config)
    check_state_dict(state, generator.state_dict(), checkpoint)
    generator.load_state_dict({name: tensor.float() for name, tensor in state.items()}, strict=True)
    config = WeightsConfig(
        model=model_config,
        modalities=official_modalities(),
        preset="paper",
        provenance={"source": "official TarGAN checkpoint (github 2165998/TarGAN)",
                    "converted_from": checkpoint.name, "package_version": __version__},
    )
    save_weights(output, generator, config, overwrite=overwrite, command="convert")
    return ConvertResult(Path(output), parameter_count(generator), config.modality_names)


def describe_weights(source: str, revision: str | None = None) -> dict[str, str]:
    """The rows `targan info` shows."""
    from targan_cli.core.networks import parameter_count

    weights = load_weights(source, revision)
    config: WeightsConfig = weights.config
    rows = {
        "folder": str(weights.folder),
        "format version": str(config.format_version),
        "preset": config.preset or "custom",
        "modalities": ", ".join(config.modality_names),
        "target": config.target,
        "image size": f"{config.model.image_size} x {config.model.image_size}",
        "parameters": f"{parameter_count(weights.generator):,}",
    }
    for field in dataclasses.fields(config.model):
        rows[f"model.{field.name}"] = str(getattr(config.model, field.name))
    for modality in config.modalities:
        settings = modality.intensity
        if settings.kind == "ct":
            text = f"CT, window level {settings.window_level:g} / width {settings.window_width:g} HU"
        elif settings.scaling == "official_slice":
            text = f"MR, official per-slice min-max (noise floor {settings.noise_floor:g})"
        else:
            text = f"MR, volume p{settings.percentile:g} scaling, reference {settings.reference_high}"
        rows[f"intensity {modality.name}"] = text
    for key, value in config.provenance.items():
        rows[f"provenance.{key}"] = str(value)
    return rows


def describe_volume(path: str | Path) -> tuple[str, dict[str, str]] | None:
    """For a volume (NIfTI file or DICOM folder): a title and the rows of its provenance sidecar
    (empty: no provenance; a synthetic NIfTI descrip without a sidecar is shown as such). None when
    ``path`` is not a volume."""
    path = Path(path)
    if not is_volume_path(path):
        return None
    rows = describe_provenance(path)
    if rows is not None:
        return f"Synthetic volume {path} ({sidecar_path(path).name})", rows
    header = read_volume(path).header
    descrip = bytes(header["descrip"]).split(b"\0")[0].decode("ascii", "replace") if header is not None else ""
    if descrip.startswith("synthetic "):
        return f"Volume {path}", {"descrip": descrip, "sidecar": f"missing ({sidecar_path(path).name} not found)"}
    return str(path), {}
