"""Frozen configuration dataclasses, stored as JSON next to the weights and in datasets.

``ModelConfig`` is enough to rebuild every network; ``WeightsConfig`` is what ``config.json`` of
a weights folder holds; ``DatasetSpec`` is a dataset's ``dataset.json``. All of them round-trip
through plain dicts (``to_dict`` / ``from_dict``) and refuse unknown keys, so a typo in a
hand-edited file is an error, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from targan_cli.errors import TarganError

FORMAT_VERSION = 1
DEFAULT_MODALITIES = ("t1w", "t2w", "ct")  # the official order: t1 = 0, t2 = 1, ct = 2


def _checked_fields(cls, data: Any, where: str) -> dict[str, Any]:
    """``data`` as keyword arguments for ``cls``: a JSON object with no unknown or missing fields."""
    if not isinstance(data, dict):
        raise TarganError(f"{where} must be a JSON object, got {type(data).__name__}")
    fields = dataclasses.fields(cls)
    unknown = sorted(set(data) - {f.name for f in fields})
    if unknown:
        raise TarganError(f"{where} has unknown field(s) {', '.join(unknown)}")
    missing = [f.name for f in fields if f.name not in data
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise TarganError(f"{where} lacks the field(s) {', '.join(missing)}")
    return dict(data)


# Bounds of what a config may ask for: a config.json is untrusted input, and a network built from
# absurd numbers would exhaust the memory before any check of its tensors. About 4x the paper's.
MAX_MODALITIES = 32
MAX_IMAGE_SIZE = 2048
MAX_LEVELS = 12
MAX_CHANNELS = 4096  # of a network's widest layer (the paper's: 2048, in the discriminators)
MAX_INTENSITY = 1e6  # |HU| or MR units of any intensity setting


def check_integer(where: str, name: str, value: Any, low: int, high: int) -> int:
    """``value`` if it is an integer (not a bool) in [low, high]; else a one-line error naming it."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise TarganError(f"{where}: {name} must be an integer from {low} to {high}, got {value!r}")
    return value


def check_number(where: str, name: str, value: Any, low: float, high: float, *, above_low: bool = False) -> float:
    """``value`` if it is a finite number (not a bool) in [low, high] (above ``low`` if ``above_low``)."""
    if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
            or not low <= value <= high or above_low and value == low):
        bounds = f"({low:g}, {high:g}]" if above_low else f"[{low:g}, {high:g}]"
        raise TarganError(f"{where}: {name} must be a finite number in {bounds}, got {value!r}")
    return value


def check_widest(where: str, name: str, width: int, levels: int) -> None:
    """Refuse a network whose widest layer, ``width * 2 ** levels`` channels, passes MAX_CHANNELS."""
    if width * 2 ** levels > MAX_CHANNELS:
        raise TarganError(f"{where}: {name} reaches {width * 2 ** levels} channels, more than {MAX_CHANNELS}")


def _from_dict(cls, data: Any, where: str):
    try:
        return cls(**_checked_fields(cls, data, where))
    except TypeError as error:  # e.g. a list where a number belongs
        raise TarganError(f"{where}: {error}") from None


@dataclass(frozen=True)
class ModelConfig:
    """Every width and depth of the generator, the discriminators and the shape controller.

    The defaults are the official ("paper") network at 256 x 256 with three modalities.
    """

    num_modalities: int = 3
    image_size: int = 256
    base_width: int = 64  # first encoder block of G; doubles per level
    encoder_depth: int = 2  # down blocks in Encoder_x / Encoder_r
    shared_depth: int = 3  # shared middle block: shared_depth - 1 down blocks + the bottom block
    disc_width: int = 64  # first discriminator conv; doubles per level
    disc_depth: int = 6  # strided 4x4 convs in each discriminator
    shape_width: int = 16  # first shape-controller block; doubles per level
    shape_depth: int = 5  # blocks on the shape controller's contracting path

    def __post_init__(self) -> None:
        for name, low, high in (("num_modalities", 2, MAX_MODALITIES), ("image_size", 1, MAX_IMAGE_SIZE),
                                ("base_width", 1, MAX_CHANNELS), ("encoder_depth", 1, MAX_LEVELS),
                                ("shared_depth", 1, MAX_LEVELS), ("disc_width", 1, MAX_CHANNELS),
                                ("disc_depth", 1, MAX_LEVELS), ("shape_width", 1, MAX_CHANNELS),
                                ("shape_depth", 1, MAX_LEVELS)):
            check_integer("model config", name, getattr(self, name), low, high)
        check_widest("model config", "the generator (base_width)", self.base_width, self.generator_levels - 1)
        check_widest("model config", "the discriminator (disc_width)", self.disc_width, self.disc_depth - 1)
        check_widest("model config", "the shape controller (shape_width)", self.shape_width, self.shape_depth - 1)
        for name, levels in (("generator", self.generator_levels),
                             ("discriminator", self.disc_depth),
                             ("shape controller", self.shape_depth - 1)):
            if self.image_size % (2 ** levels):
                raise TarganError(
                    f"model config: image_size {self.image_size} is not divisible by "
                    f"{2 ** levels}, which the {name} needs"
                )

    @property
    def generator_levels(self) -> int:
        """How many times the generator halves the image (encoder plus shared block)."""
        return self.encoder_depth + self.shared_depth

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data, "model config")


PRESETS: dict[str, ModelConfig] = {
    "paper": ModelConfig(),
    "small": ModelConfig(image_size=128, base_width=32, disc_width=32, shape_width=8),
    "tiny": ModelConfig(image_size=64, base_width=8, disc_width=8, disc_depth=4,
                        shape_width=4, shape_depth=4),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset, with fields such as ``image_size`` or ``num_modalities`` replaced."""
    if name not in PRESETS:
        raise TarganError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name], **overrides)


@dataclass(frozen=True)
class IntensitySettings:
    """How one modality's stored values map to the model's [-1, 1] and back.

    ``kind="ct"``: Hounsfield units clipped to [level - width/2, level + width/2], scaled linearly.
    ``kind="mr"`` with ``scaling="volume"``: values divided by a robust per-volume maximum (the
    ``percentile`` of the body voxels), clipped to [0, 1], then scaled to [-1, 1]; the inverse
    multiplies by ``reference_high``, the typical robust maximum of the training volumes.
    ``kind="mr"`` with ``scaling="official_slice"``: the official TarGAN preprocessing (values
    below ``noise_floor`` set to 0, per-slice min-max), kept for converted official checkpoints.
    """

    kind: Literal["ct", "mr"]
    window_level: float = 40.0
    window_width: float = 400.0
    scaling: Literal["volume", "official_slice"] = "volume"
    percentile: float = 99.5
    noise_floor: float = 0.0
    reference_high: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or self.kind not in ("ct", "mr"):
            raise TarganError(f"intensity kind must be 'ct' or 'mr', got {self.kind!r}")
        if not isinstance(self.scaling, str) or self.scaling not in ("volume", "official_slice"):
            raise TarganError(f"intensity scaling must be 'volume' or 'official_slice', got {self.scaling!r}")
        where = "intensity settings"
        check_number(where, "window_level", self.window_level, -MAX_INTENSITY, MAX_INTENSITY)
        check_number(where, "window_width (CT)", self.window_width, 0.0, MAX_INTENSITY, above_low=True)
        check_number(where, "percentile (MR)", self.percentile, 50.0, 100.0)
        check_number(where, "noise_floor", self.noise_floor, -MAX_INTENSITY, MAX_INTENSITY)
        if self.reference_high is not None:
            check_number(where, "reference_high (MR)", self.reference_high, 0.0, MAX_INTENSITY, above_low=True)

    @property
    def window(self) -> tuple[float, float]:
        """The CT window as (low, high) in HU."""
        half = self.window_width / 2.0
        return self.window_level - half, self.window_level + half

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IntensitySettings:
        return _from_dict(cls, data, "intensity settings")


@dataclass(frozen=True)
class ModalitySpec:
    """A modality's name (free text, e.g. ``ct``, ``t1w``) and its intensity settings."""

    name: str
    intensity: IntensitySettings

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "intensity": self.intensity.to_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModalitySpec:
        fields = _checked_fields(cls, data, "modality")
        name = fields["name"]
        if (not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith(".")
                or not name.isprintable()):
            raise TarganError(f"modality name must be a plain non-empty name, got {name!r}")
        return cls(name=name, intensity=IntensitySettings.from_dict(fields["intensity"]))


def default_modalities(names: tuple[str, ...] = DEFAULT_MODALITIES) -> tuple[ModalitySpec, ...]:
    """Modality specs with default intensity settings; a name containing ``ct`` is a CT."""
    return tuple(
        ModalitySpec(name, IntensitySettings(kind="ct" if "ct" in name.lower() else "mr"))
        for name in names
    )


def official_modalities() -> tuple[ModalitySpec, ...]:
    """The official TarGAN modalities and preprocessing, for converted official checkpoints.

    MR: values below 50 set to 0, then per-slice min-max; outputs are mapped back to relative
    units [0, 1000]. CT: the official code clips to each DICOM file's own window; the abdomen
    window (level 40, width 400 HU) stands in for it here.
    """
    mr = IntensitySettings(kind="mr", scaling="official_slice", noise_floor=50.0, reference_high=1000.0)
    return (ModalitySpec("t1w", mr), ModalitySpec("t2w", mr),
            ModalitySpec("ct", IntensitySettings(kind="ct", window_level=40.0, window_width=400.0)))


def _check_modalities(modalities: tuple[ModalitySpec, ...], where: str) -> None:
    names = [m.name for m in modalities]
    if len(set(names)) != len(names):
        raise TarganError(f"{where}: modality names must be unique, got {names}")
    if len(names) < 2:
        raise TarganError(f"{where}: at least two modalities are needed, got {names}")


@dataclass(frozen=True)
class WeightsConfig:
    """The ``config.json`` of a weights folder: enough to rebuild, run and trace the generator."""

    model: ModelConfig
    modalities: tuple[ModalitySpec, ...]
    preset: str | None = None
    target: str = "liver"
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check_modalities(self.modalities, "weights config")
        if not (self.preset is None or isinstance(self.preset, str)) or not isinstance(self.target, str):
            raise TarganError("weights config: preset and target must be text")
        if len(self.modalities) != self.model.num_modalities:
            raise TarganError(
                f"weights config lists {len(self.modalities)} modalities but the model has "
                f"{self.model.num_modalities}"
            )

    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modalities)

    def modality_index(self, name: str) -> int:
        """Index of a modality by name; an unknown name lists the valid ones."""
        names = self.modality_names
        if name not in names:
            raise TarganError(f"unknown modality {name!r}; these weights know {', '.join(names)}",
                              exit_code=2)
        return names.index(name)

    def intensity(self, name: str) -> IntensitySettings:
        return self.modalities[self.modality_index(name)].intensity

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "preset": self.preset,
            "target": self.target,
            "model": self.model.to_dict(),
            "modalities": [m.to_dict() for m in self.modalities],
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WeightsConfig:
        fields = _checked_fields(cls, data, "weights config")
        version = fields.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise TarganError(
                f"weights format version {version!r} is not supported "
                f"(this targan-cli reads version {FORMAT_VERSION}); upgrade targan-cli"
            )
        if not isinstance(fields["modalities"], list):
            raise TarganError("weights config: modalities must be a list")
        provenance = fields.get("provenance") or {}
        if not isinstance(provenance, dict):
            raise TarganError("weights config: provenance must be a JSON object")
        return cls(
            model=ModelConfig.from_dict(fields["model"]),
            modalities=tuple(ModalitySpec.from_dict(m) for m in fields["modalities"]),
            preset=fields.get("preset"),
            target=fields.get("target", "liver"),
            provenance=dict(provenance),
            format_version=version,
        )


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset's ``dataset.json``: ordered modalities with their intensity settings, the target."""

    modalities: tuple[ModalitySpec, ...] = field(default_factory=default_modalities)
    target: str = "liver"
    name: str = "dataset"
    description: str = ""

    def __post_init__(self) -> None:
        _check_modalities(self.modalities, "dataset.json")

    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modalities)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "target": self.target,
            "modalities": [m.to_dict() for m in self.modalities],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetSpec:
        fields = _checked_fields(cls, data, "dataset.json")
        modalities = fields.pop("modalities", None)
        if not isinstance(modalities, list):
            raise TarganError("dataset.json: modalities must be a list")
        return cls(modalities=tuple(ModalitySpec.from_dict(m) for m in modalities), **fields)


def read_json(path: str | Path) -> dict[str, Any]:
    """Read a JSON object from a file; a missing or malformed file is a one-line TarganError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TarganError("file not found", path) from None
    except OSError as error:
        raise TarganError(f"cannot read: {error.strerror or error}", path) from None
    except UnicodeDecodeError as error:
        raise TarganError(f"cannot read: {error}", path) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise TarganError(f"not valid JSON ({error.msg} at line {error.lineno})", path) from None
    if not isinstance(data, dict):
        raise TarganError("expected a JSON object", path)
    return data
