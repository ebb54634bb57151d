"""`targan train-segmenter` and `targan segment`: the liver segmenter behind the S-score.

The segmenter is the project's one U-Net (``ShapeController``) with logits out, trained on real
slices of one modality with Dice + BCE. A segmenter folder holds ``model.safetensors`` and
``config.json`` (``SegmenterConfig``: the modality, its intensity settings, the network's width,
depth and image size, provenance); loading checks names and shapes strictly. `targan segment` masks
one volume, or a folder of volumes streamed through ``io.pipeline``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from targan_cli import __version__
from targan_cli.config import (MAX_CHANNELS, MAX_IMAGE_SIZE, MAX_LEVELS, IntensitySettings, check_integer,
                               check_widest, read_json)
from targan_cli.core.device import pick_device
from targan_cli.core.intensity import normalize
from targan_cli.core.metrics import dice
from targan_cli.core.networks import ShapeController
from targan_cli.core.slicing import from_model, plane_fit, to_model
from targan_cli.data.dataset import Case, DataDir, load_slices, open_data_dir
from targan_cli.errors import TarganError, UsageError
from targan_cli.io.atomic import check_apart, check_writable
from targan_cli.io.dicom import check_series_option, folder_cases, read_input
from targan_cli.io.pipeline import check_workers, stream
from targan_cli.io.volume import (Volume, case_id, check_nifti_output, from_slices, is_volume_path, read_label,
                                  read_volume, to_slices, write_volume)
from targan_cli.io.weights import CONFIG_FILE, load_tensors_into, save_model_folder
from targan_cli.workflows.translate import OUTPUT_SUFFIX

SEGMENTER_FILE = "model.safetensors"
SEGMENTER_FORMAT_VERSION = 1
MAX_DEFAULT_IMAGE_SIZE = 256  # the paper's slice size: larger scans (CT 512) are downsampled to it
BACKGROUND = -1.0  # padding to a square adds air in the model range [-1, 1]
_DICE_SMOOTHING = 1.0  # keeps the soft Dice loss defined on batches without liver

Progress = Callable[..., None]


@dataclass(frozen=True)
class SegmenterConfig:
    """The ``config.json`` of a segmenter folder: enough to rebuild and apply the network."""

    modality: str
    intensity: IntensitySettings  # how the training slices were normalized
    image_size: int
    width: int = 16
    depth: int = 5
    target: str = "liver"
    provenance: dict[str, Any] = field(default_factory=dict)
    format_version: int = SEGMENTER_FORMAT_VERSION

    def __post_init__(self) -> None:
        for name, high in (("image_size", MAX_IMAGE_SIZE), ("width", MAX_CHANNELS), ("depth", MAX_LEVELS)):
            check_integer("segmenter config", name, getattr(self, name), 1, high)
        check_widest("segmenter config", "the U-Net (width)", self.width, self.depth - 1)
        if not isinstance(self.modality, str) or not isinstance(self.target, str):
            raise TarganError("segmenter config: modality and target must be text")
        if self.image_size % 2 ** (self.depth - 1):
            raise TarganError(f"segmenter config: image size {self.image_size} is not divisible by "
                              f"{2 ** (self.depth - 1)}, which a U-Net of depth {self.depth} needs")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["intensity"] = self.intensity.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Any) -> SegmenterConfig:
        if not isinstance(data, dict):
            raise TarganError(f"segmenter config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise TarganError(f"segmenter config has unknown field(s) {', '.join(unknown)}")
        version = data.get("format_version", SEGMENTER_FORMAT_VERSION)
        if version != SEGMENTER_FORMAT_VERSION:
            raise TarganError(f"segmenter format version {version!r} is not supported (this targan-cli "
                              f"reads version {SEGMENTER_FORMAT_VERSION}); upgrade targan-cli")
        fields = dict(data)
        try:
            fields["intensity"] = IntensitySettings.from_dict(fields["intensity"])
            return cls(**fields)
        except (KeyError, TypeError) as error:
            raise TarganError(f"segmenter config lacks or mistypes a field ({error})") from None


@dataclass(frozen=True)
class Segmenter:
    """A loaded segmenter: the network (eval mode, logits out), its config and its folder."""

    network: ShapeController
    config: SegmenterConfig
    folder: Path

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device


def build_network(config: SegmenterConfig) -> ShapeController:
    """The segmenter network of a config: a one-channel U-Net giving liver logits."""
    return ShapeController(config.width, config.depth, sigmoid=False)


def save_segmenter(folder: str | Path, network: ShapeController, config: SegmenterConfig,
                   overwrite: bool = False) -> Path:
    """Write a segmenter folder atomically (a temporary folder renamed into place)."""
    return save_model_folder(folder, network, config.to_dict(), tensors_file=SEGMENTER_FILE, overwrite=overwrite,
                             command="train-segmenter", kind="segmenter folder")


def load_segmenter(folder: str | Path, device: str | torch.device = "cpu") -> Segmenter:
    """Load a segmenter folder with strict name, shape and dtype checks."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TarganError("no such segmenter folder (train one with `targan train-segmenter`)", folder)
    config_path = folder / CONFIG_FILE
    try:
        config = SegmenterConfig.from_dict(read_json(config_path))
    except TarganError as error:
        raise TarganError(error.message, config_path) from None
    network = build_network(config)
    load_tensors_into(network, folder / SEGMENTER_FILE)
    return Segmenter(network.to(device).eval().requires_grad_(False), config, folder)


def segment_slices(segmenter: Segmenter, normalized: np.ndarray, *, batch_size: int = 16) -> np.ndarray:
    """Liver mask (Z, H, W) bool of normalized slices (Z, H, W) in [-1, 1] (segmenter's settings).

    Each batch is padded and resized to the segmenter's size, its logits resized back
    (bilinear) and thresholded at 0, i.e. sigmoid > 0.5.
    """
    if normalized.ndim != 3:
        raise ValueError(f"expected slices (Z, H, W), got shape {normalized.shape}")
    depth, height, width = normalized.shape
    fit = plane_fit(height, width, segmenter.config.image_size)
    mask = np.empty((depth, height, width), dtype=bool)
    with torch.inference_mode():
        for start in range(0, depth, batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(normalized[start:start + batch_size], dtype=np.float32))
            images = to_model(batch.to(segmenter.device).unsqueeze(1), fit, fill=BACKGROUND)  # (N, 1, S, S)
            logits = from_model(segmenter.network(images), fit)  # (N, 1, H, W)
            mask[start:start + batch_size] = (logits[:, 0] > 0).cpu().numpy()
    return mask


def segment_stored_slices(segmenter: Segmenter, slices: np.ndarray, *, batch_size: int = 16) -> np.ndarray:
    """Liver mask (Z, H, W) bool of canonical slices in stored units (HU, MR values), normalized
    with the segmenter's own intensity settings."""
    return segment_slices(segmenter, normalize(slices, segmenter.config.intensity), batch_size=batch_size)


def segment_volume(volume: Volume, segmenter: Segmenter, *, batch_size: int = 16) -> np.ndarray:
    """Liver mask of a volume in stored units, uint8 0/1 in the volume's own voxel order and shape."""
    slices, frame = to_slices(volume)  # (Z, H, W)
    try:
        mask = segment_stored_slices(segmenter, slices, batch_size=batch_size)
    except TarganError as error:  # e.g. a blank MR volume: name the file
        raise TarganError(error.message, error.path or volume.source, error.exit_code) from None
    return from_slices(mask.astype(np.uint8), frame)


def label_slices(path: Path, image: Volume) -> np.ndarray:
    """A label file as canonical bool slices (Z, H, W) (non-zero = target), on ``image``'s grid."""
    return to_slices(read_label(path, image))[0] != 0


# ----------------------------------------------------------------------------- segment


@dataclass(frozen=True)
class MaskReport:
    """One mask of a run: ``status`` written, or failed (``note``: the error; nothing written)."""

    output: Path
    status: str = "written"
    note: str = ""
    liver_voxels: int = 0
    liver_ml: float = 0.0


@dataclass(frozen=True)
class SegmentResult:
    """What `targan segment` wrote: per input volume, its mask file and the liver it found."""

    output: Path  # the mask file, or the folder of masks
    modality: str
    masks: tuple[MaskReport, ...]
    seconds: float
    device: str

    @property
    def failed(self) -> tuple[MaskReport, ...]:
        """The masks of a folder run that an error in their volume stopped (the run went on)."""
        return tuple(mask for mask in self.masks if mask.status == "failed")


def _check_source(config: SegmenterConfig, source: str | None) -> None:
    """Refuse an input whose stated modality (--from) is not the segmenter's."""
    if source is not None and source != config.modality:
        raise UsageError(f"this segmenter was trained on {config.modality} images, the input is {source}; "
                         f"use the segmenter of {source}")


def _check_modality(volume: Volume, config: SegmenterConfig) -> None:
    """Refuse a DICOM series of the other kind (CT, MR) than the segmenter's."""
    if volume.modality is not None and volume.modality.lower() != config.intensity.kind:
        raise UsageError(f"the DICOM series is {volume.modality} but this segmenter was trained on "
                         f"{config.modality} ({config.intensity.kind.upper()}) images", volume.source)


def segment(input: str | Path, output: str | Path, *, segmenter: str | Path, source: str | None = None,
            device: str = "auto", batch_size: int = 16, overwrite: bool = False, io_workers: int | None = None,
            series: str | None = None, total_callback: Callable[[int], None] | None = None,
            progress: Callable[[int], None] | None = None) -> SegmentResult:
    """Segment the liver of one volume (NIfTI file or DICOM series folder) into a uint8 NIfTI label
    file on the input's grid (same shape and affine), or of a folder of NIfTI files and DICOM series
    subfolders into a folder of ``<case>.nii.gz`` masks. ``series`` picks one series of a DICOM input
    that holds several (a SeriesInstanceUID or a unique prefix).

    A folder streams (``io.pipeline``): ``io_workers`` threads read the next volumes and as many write
    the finished masks while the segmenter runs (None: the cores available; 0: one volume after the
    other, the same files). An error in one volume of a folder fails its mask only
    (``SegmentResult.failed``); the others go on. ``total_callback(volumes)`` is called once, then
    ``progress(1)`` after each volume. Every output is checked before any work.
    """
    input, output = Path(input), Path(output)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    io_workers = check_workers(io_workers)
    folder_run = input.is_dir() and not is_volume_path(input)
    check_series_option(series, input, single=not folder_run)
    if folder_run:
        inputs = folder_cases(input, output)
        outputs = [output / f"{case_id(path)}{OUTPUT_SUFFIX}" for path in inputs]
        check_apart(output, [input, *inputs, segmenter])
    else:
        inputs, outputs = [input], [check_nifti_output(output, "the mask")]
    for path in outputs:
        check_writable(path, overwrite, inputs=[input, segmenter], kind="volume")
    torch_device = pick_device(device)
    loaded = load_segmenter(segmenter, torch_device)
    _check_source(loaded.config, source)
    started = time.perf_counter()

    def read(index: int) -> Volume:
        return read_input(inputs[index], series)[0]

    def process(index: int, volume: Volume) -> Volume:
        _check_modality(volume, loaded.config)
        mask = segment_volume(volume, loaded, batch_size=batch_size)
        return Volume(mask, volume.affine.copy(), volume.header, volume.modality, volume.source)

    def write(index: int, mask: Volume) -> MaskReport:
        write_volume(outputs[index], mask, label=True, overwrite=overwrite)
        voxels = int(mask.array.sum())
        return MaskReport(outputs[index], liver_voxels=voxels, liver_ml=voxels * float(np.prod(mask.spacing)) / 1000)

    if total_callback is not None:
        total_callback(len(inputs))
    masks = []
    for outcome in stream(range(len(inputs)), read, process, write, workers=io_workers if folder_run else 0,
                          expected=(TarganError,) if folder_run else ()):
        masks.append(outcome.result if outcome.error is None else
                     MaskReport(outputs[outcome.item], "failed", str(outcome.error)))
        if progress is not None:
            progress(1)
    return SegmentResult(output, loaded.config.modality, tuple(masks), time.perf_counter() - started,
                         str(torch_device))


# ----------------------------------------------------------------------------- train


@dataclass(frozen=True)
class TrainSegmenterResult:
    """A trained segmenter: where it is, what it saw, its loss per epoch and its test Dice."""

    folder: Path
    modality: str
    train_cases: int
    train_slices: int
    epoch_losses: tuple[float, ...]
    test_dice: float | None  # mean 3D Dice (%) on the labelled real test volumes; None without any
    test_cases: int
    seconds: float
    device: str
    final_loss: float = float("nan")  # LOSS_NAME of the final weights on all training slices at once


LOSS_NAME = "BCE + soft Dice loss"
"""What ``segmentation_loss`` is, in the words the CLI prints beside its value."""


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """BCE with logits plus the soft Dice loss of the batch, both on (N, 1, S, S)."""
    probabilities = torch.sigmoid(logits)
    overlap = (probabilities * labels).sum()
    soft_dice = (2 * overlap + _DICE_SMOOTHING) / (probabilities.sum() + labels.sum() + _DICE_SMOOTHING)
    return F.binary_cross_entropy_with_logits(logits, labels) + (1 - soft_dice)


def _labelled(cases: list[Case], modality: str, split: str, data: DataDir) -> list[Case]:
    labelled = [case for case in cases if case.label is not None]
    if split == "train" and not labelled:
        raise TarganError(f"no labelled {modality} training cases: the segmenter needs "
                          f"train/{modality}/labels/<case>.nii.gz", data.root)
    return labelled


def _test_dice(data: DataDir, modality: str, segmenter: Segmenter, batch_size: int) -> tuple[float | None, int]:
    """Mean 3D Dice (%) of the segmenter on the labelled real test volumes of its modality."""
    scores = []
    for case in _labelled(data.cases("test", modality), modality, "test", data):
        volume = read_volume(case.image)
        try:
            predicted = segment_stored_slices(segmenter, to_slices(volume)[0], batch_size=batch_size)
        except TarganError as error:
            raise TarganError(error.message, case.image) from None
        scores.append(dice(predicted, label_slices(case.label, volume)))
    return (float(np.mean(scores)) if scores else None), len(scores)


def default_image_size(image: Path, depth: int) -> int:
    """The larger in-plane side of a volume's slices, at most ``MAX_DEFAULT_IMAGE_SIZE``, rounded
    up to a multiple of ``2 ** (depth - 1)``: the segmenter's default size."""
    _, height, width = to_slices(read_volume(image))[0].shape
    multiple = 2 ** (depth - 1)
    return -(-min(max(height, width), MAX_DEFAULT_IMAGE_SIZE) // multiple) * multiple


def train_segmenter(
    data: str | Path,
    modality: str,
    out: str | Path,
    *,
    epochs: int = 20,
    image_size: int | None = None,
    width: int = 16,
    depth: int = 5,
    batch_size: int = 8,
    learning_rate: float = 3e-3,
    device: str = "auto",
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
    total_callback: Callable[[int], None] | None = None,
) -> TrainSegmenterResult:
    """Train a liver segmenter on the real training slices of ``modality`` and save it to ``out``.

    Only labelled cases are used (a case without a label would teach "no liver"). Adam, Dice +
    BCE, no EMA, no augmentation. ``image_size`` defaults to the in-plane size of the first
    labelled training volume, at most ``MAX_DEFAULT_IMAGE_SIZE`` (the paper's 256) and rounded
    up to what the U-Net's depth needs. ``total_callback(steps)`` is called once, then
    ``progress(1, status=...)`` after every step. Afterwards the segmenter is scored (3D Dice)
    on the labelled real test volumes of the modality, if any.
    """
    for name, value in (("--epochs", epochs), ("--batch-size", batch_size), ("--width", width), ("--depth", depth)):
        if value < 1:
            raise UsageError(f"{name} must be at least 1, got {value}")
    if not learning_rate > 0:
        raise UsageError(f"the learning rate must be positive, got {learning_rate}")
    out = check_writable(out, overwrite, inputs=[data], is_dir=True, kind="segmenter folder")
    dataset = open_data_dir(data)
    names = dataset.spec.modality_names
    if modality not in names:
        raise UsageError(f"unknown modality {modality!r}; this dataset has {', '.join(names)}")
    labelled = _labelled(dataset.cases("train", modality), modality, "train", dataset)
    if image_size is None:
        image_size = default_image_size(labelled[0].image, depth)
    try:
        SegmenterConfig(modality, dataset.spec.modalities[names.index(modality)].intensity, image_size, width, depth)
    except TarganError as error:
        raise UsageError(error.message.removeprefix("segmenter config: ")) from None
    torch_device = pick_device(device)
    started = time.perf_counter()

    slices = load_slices(dataset, "train", image_size)
    wanted = {f"{modality}/{case.case_id}" for case in labelled}
    case_wanted = np.array([case in wanted for case in slices.case_ids])
    indices = np.flatnonzero((slices.modality == names.index(modality)) & case_wanted[slices.case_index])
    config = SegmenterConfig(modality, slices.modalities[names.index(modality)].intensity, image_size, width, depth)

    torch.manual_seed(seed)
    order = torch.Generator().manual_seed(seed)
    network = build_network(config).to(torch_device).train()
    optimizer = torch.optim.Adam(network.parameters(), lr=learning_rate)
    steps_per_epoch = -(-len(indices) // batch_size)
    if total_callback is not None:
        total_callback(epochs * steps_per_epoch)
    epoch_losses = []
    for _ in range(epochs):
        total_loss = 0.0
        for batch in torch.randperm(len(indices), generator=order).split(batch_size):
            chosen = np.sort(indices[batch.numpy()])  # sorted reads from the memory-mapped cache
            images = torch.from_numpy(np.asarray(slices.images[chosen], dtype=np.float32))[:, None]
            labels = torch.from_numpy(np.asarray(slices.labels[chosen], dtype=np.float32))[:, None]
            loss = segmentation_loss(network(images.to(torch_device)), labels.to(torch_device))  # (N, 1, S, S)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step_loss = loss.item()
            total_loss += step_loss * len(chosen)
            if progress is not None:
                progress(1, status=f"batch {LOSS_NAME} {step_loss:.3f}")
        epoch_losses.append(total_loss / len(indices))

    trained = Segmenter(network.eval().requires_grad_(False), config, out)
    final_loss = _objective(network, slices, indices, batch_size, torch_device)
    test_dice, test_cases = _test_dice(dataset, modality, trained, batch_size)
    provenance = {
        "data": str(dataset.root.resolve()), "train_cases": len(labelled), "train_slices": int(len(indices)),
        "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed,
        "loss": LOSS_NAME, "final_loss": final_loss, "epoch_losses": epoch_losses, "test_dice": test_dice,
        "test_cases": test_cases,
        "targan_cli": __version__, "torch": torch.__version__,
    }
    save_segmenter(out, network, dataclasses.replace(config, provenance=provenance), overwrite=overwrite)
    return TrainSegmenterResult(out, modality, len(labelled), int(len(indices)), tuple(epoch_losses),
                                test_dice, test_cases, time.perf_counter() - started, str(torch_device), final_loss)


@torch.no_grad()
def _objective(network: torch.nn.Module, slices: Any, indices: np.ndarray, batch_size: int,
               device: torch.device) -> float:
    """``segmentation_loss`` of the final weights on all the training ``indices`` as one batch."""
    logits, labels = [], []
    for start in range(0, len(indices), batch_size):
        chosen = indices[start:start + batch_size]
        images = torch.from_numpy(np.asarray(slices.images[chosen], dtype=np.float32))[:, None]
        logits.append(network(images.to(device)).float().cpu())  # (N, 1, S, S)
        labels.append(torch.from_numpy(np.asarray(slices.labels[chosen], dtype=np.float32))[:, None])
    return float(segmentation_loss(torch.cat(logits), torch.cat(labels)))
