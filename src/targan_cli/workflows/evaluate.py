"""`targan evaluate`: the paper's Table 1 (FID, S-score), paired PSNR/SSIM/MAE, Table 2 (DICE, RAVD).

Translation metrics (fid, sscore, psnr, ssim, mae) translate every test volume of each source
modality into every other modality once per model and share that translation:

- fid: Frechet distance between the real test slices of a target modality and all slices
  translated into it, both normalized and at the model's image size, pooled over sources.
- sscore: per volume, 3D Dice (%) between the source image's liver label and the liver that the
  target modality's segmenter (``targan train-segmenter``) finds on the synthetic volume.
- psnr, ssim, mae: per volume, against the paired rendering of the same case in the target
  modality (``test/<source>/paired/<target>/<case>.nii.gz``), over its body mask and inside the
  liver label, in the target's normalized model range [-1, 1] (data range 2).

Segmentation metrics (dice, ravd) compare prediction folders with a ground-truth folder by case.
Every per-volume value is kept as a ``Record``; JSON and CSV outputs carry them all.
"""

from __future__ import annotations

import csv
import json
import math
import platform
from collections.abc import Callable, Mapping, Sequence
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from targan_cli import __version__
from targan_cli.config import IntensitySettings, ModalitySpec
from targan_cli.core.device import pick_device
from targan_cli.core.inference import translate_slices
from targan_cli.core.intensity import (ORACLE_BINS, best_intensity_mapping, body_mask, body_quantiles,
                                        denormalize, match_histogram, normalize)
from targan_cli.core.metrics import FrechetDistance, bootstrap_interval, dice, paired_metrics, ravd, summarize
from targan_cli.core.slicing import PlaneFit, from_model, plane_fit, to_model
from targan_cli.data.dataset import PAIRED, Case, DataDir, open_data_dir
from targan_cli.errors import TarganError, UsageError, counted
from targan_cli.io.atomic import atomic_output, check_writable, local_paths
from targan_cli.io.features import feature_module_kind, inception_features, load_feature_module
from targan_cli.io.report import write_json as write_report
from targan_cli.io.volume import Volume, case_id, list_volumes, read_label, read_on_grid, read_volume, to_slices
from targan_cli.io.weights import Weights, load_weights, weights_inputs, weights_source
from targan_cli.workflows.segment import (Segmenter, label_slices, load_segmenter,
                                          segment_stored_slices)

TRANSLATION_METRICS = ("fid", "sscore", "psnr", "ssim", "mae")
PAIRED_METRICS = ("psnr", "ssim", "mae")
SEGMENTATION_METRICS = ("dice", "ravd")
METRICS = TRANSLATION_METRICS + SEGMENTATION_METRICS
LOWER_IS_BETTER = frozenset({"fid", "mae", "ravd"})
METRIC_LABELS = {"fid": "FID", "sscore": "S", "psnr": "PSNR", "ssim": "SSIM", "mae": "MAE",
                 "dice": "DICE", "ravd": "RAVD"}
METRIC_DIGITS = {"fid": 4, "sscore": 2, "psnr": 2, "ssim": 4, "mae": 4, "dice": 2, "ravd": 2}
PAIRED_REGIONS = ("body", "liver")
DATA_RANGE = 2.0  # paired metrics compare images in the model range [-1, 1]
BACKGROUND = -1.0
_RESIZE_CHUNK = 64  # slices resized at once: bounds memory for 512 x 512 CT volumes

Progress = Callable[[int], None]
SliceTranslator = Callable[[Case, np.ndarray, str, str], np.ndarray]


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Column:
    """One column of a results table: a metric, for a target modality and a region where they apply."""

    metric: str
    target: str | None = None
    region: str | None = None

    @property
    def label(self) -> str:
        return " ".join(part for part in (METRIC_LABELS[self.metric], self.target, self.region) if part)

    @property
    def lower_is_better(self) -> bool:
        return self.metric in LOWER_IS_BETTER

    @property
    def digits(self) -> int:
        return METRIC_DIGITS[self.metric]


@dataclass(frozen=True)
class Record:
    """One value: per volume (``case``, ``source``), or pooled over volumes (FID: both None)."""

    model: str
    metric: str
    target: str | None
    region: str | None
    case: str | None
    source: str | None
    value: float

    @property
    def column(self) -> Column:
        return Column(self.metric, self.target, self.region)


@dataclass(frozen=True)
class Summary:
    """Mean, population std and bootstrap 95 % interval of the mean (``low``, ``high``; nan below two
    values) of the finite values of one cell; nan and infinite values are counted apart (RAVD of
    an empty reference is nan, PSNR of identical images infinite). ``count`` is the n of the cell."""

    mean: float
    std: float
    count: int
    missing: int = 0
    infinite: int = 0
    low: float = math.nan
    high: float = math.nan

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        array = np.asarray(values, dtype=np.float64)
        mean, std, count = summarize(array)
        low, high = bootstrap_interval(array)
        return cls(mean, std, count, int(np.isnan(array).sum()), int(np.isinf(array).sum()), low, high)


@dataclass(frozen=True)
class EvaluationResult:
    """A results table (one row per model or prediction folder) and every value behind it."""

    title: str
    models: tuple[str, ...]
    columns: tuple[Column, ...]
    summaries: tuple[tuple[Summary | None, ...], ...]  # [model][column]; None: no value at all
    best: tuple[int | None, ...]  # per column, the row to highlight (None with one row)
    records: tuple[Record, ...]
    settings: dict[str, Any]
    versions: dict[str, str]
    notes: tuple[str, ...] = ()

    @property
    def rows(self) -> list[tuple[str, tuple[Summary | None, ...]]]:
        return list(zip(self.models, self.summaries))

    def column_count(self, index: int) -> str:
        """The n of column ``index``: values per cell ("4"; "4/3" where the rows differ)."""
        counts = (row[index].count if row[index] is not None else 0 for row in self.summaries)
        return "/".join(str(count) for count in dict.fromkeys(counts))


def _versions() -> dict[str, str]:
    import torchmetrics

    return {"targan-cli": __version__, "torch": torch.__version__, "torchmetrics": torchmetrics.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _best_rows(columns: Sequence[Column], summaries: Sequence[Sequence[Summary | None]]) -> tuple[int | None, ...]:
    if len(summaries) < 2:
        return tuple(None for _ in columns)
    best: list[int | None] = []
    for index, column in enumerate(columns):
        means = [(row[index].mean, row_index) for row_index, row in enumerate(summaries)
                 if row[index] is not None and row[index].count > 0]
        if not means:
            best.append(None)
            continue
        choose = min if column.lower_is_better else max
        best.append(choose(means, key=lambda item: item[0])[1])
    return tuple(best)


def build_result(title: str, models: Sequence[str], columns: Sequence[Column], records: Sequence[Record],
                 settings: dict[str, Any], notes: Sequence[str] = ()) -> EvaluationResult:
    """Summarize ``records`` into the table of ``models`` x ``columns``, best values marked."""
    values: dict[tuple[str, Column], list[float]] = {}
    for record in records:
        values.setdefault((record.model, record.column), []).append(record.value)
    summaries = tuple(
        tuple(Summary.of(values[model, column]) if (model, column) in values else None for column in columns)
        for model in models
    )
    return EvaluationResult(title, tuple(models), tuple(columns), summaries, _best_rows(columns, summaries),
                            tuple(records), settings, _versions(), tuple(notes))


def select_rows(result: EvaluationResult, labels: Sequence[str]) -> EvaluationResult:
    """``result``'s table restricted to the rows ``labels``, in that order: their records, the same
    columns, settings and notes (one evaluation of several models, written as separate tables)."""
    indices = [result.models.index(label) for label in labels]
    records = sorted((record for record in result.records if record.model in labels),
                     key=lambda record: labels.index(record.model))
    settings = {**result.settings, "models": [result.settings["models"][index] for index in indices]}
    return build_result(result.title, labels, result.columns, records, settings, result.notes)


def beaten_columns(result: EvaluationResult, model: str, baseline: str) -> dict[str, bool]:
    """Per column where both rows have a value: whether ``model``'s mean is better than ``baseline``'s."""
    ours, theirs = (result.summaries[result.models.index(label)] for label in (model, baseline))
    beaten = {}
    for column, mine, other in zip(result.columns, ours, theirs):
        if mine is None or other is None or mine.count == 0 or other.count == 0:
            continue
        beaten[column.label] = mine.mean < other.mean if column.lower_is_better else mine.mean > other.mean
    return beaten


def verdict(result: EvaluationResult, model: str) -> str:
    """One sentence, computed from the table: which baseline rows ``model`` beats in how many
    columns, which columns it does not (or, where it loses most, which it does), and in how many
    its 95 % interval is clear of the baseline's (from two volumes per cell on)."""
    parts = []
    for baseline in (label for label in result.models if label in BASELINE_LABELS):
        beaten = beaten_columns(result, model, baseline)
        lost = [label for label, won in beaten.items() if not won]
        columns = {column.label: index for index, column in enumerate(result.columns)}
        ours, theirs = (result.summaries[result.models.index(label)] for label in (model, baseline))
        clear = sum(1 for label, won in beaten.items() if won and not _overlap(ours[columns[label]],
                                                                                 theirs[columns[label]]))
        text = f"{baseline} in {sum(beaten.values())} of {counted(len(beaten), 'column')}"
        text += f" ({clear} with 95 % intervals apart)" if clear else ""
        won = [label for label, better in beaten.items() if better]
        if lost and len(won) >= len(lost):  # name the shorter list
            text += f", not in {', '.join(lost)}"
        elif won and lost:
            text += f", only in {', '.join(won)}"
        parts.append(text)
    if not parts:
        return f"{model}: no baseline rows to compare with."
    return f"{model} beats " + "; ".join(parts) + "."


def _overlap(first: Summary, second: Summary) -> bool:
    """Whether two cells' 95 % intervals overlap (true when either has none)."""
    if any(math.isnan(value) for value in (first.low, first.high, second.low, second.high)):
        return True
    return first.low <= second.high and second.low <= first.high


# ----------------------------------------------------------------------------- options


def parse_metrics(names: Sequence[str]) -> tuple[str, ...]:
    """``--metric`` values (repeated or comma-separated, any case) -> known metric names, in order."""
    parsed: list[str] = []
    for name in (part.strip().lower() for value in names for part in value.split(",")):
        if not name:
            continue
        if name not in METRICS:
            raise UsageError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
        if name not in parsed:
            parsed.append(name)
    if not parsed:
        raise UsageError(f"pass at least one --metric: {', '.join(METRICS)}")
    kinds = {name in SEGMENTATION_METRICS for name in parsed}
    if len(kinds) > 1:
        raise UsageError("dice and ravd compare --pred with --truth; run them apart from "
                         f"{', '.join(TRANSLATION_METRICS)}")
    return tuple(parsed)


# ----------------------------------------------------------------------------- models


@dataclass(frozen=True)
class EvaluatedModel:
    """A translation model under evaluation.

    ``translate(case, slices, source, target)`` maps a source volume's slices (Z, S, S) at the
    model size, normalized with ``modalities``' settings of ``source``, to (Z, S, S) in the
    normalized range of ``target``. ``description`` is recorded in the outputs.
    """

    label: str
    modalities: tuple[ModalitySpec, ...]
    image_size: int
    translate: SliceTranslator
    description: dict[str, Any] = field(default_factory=dict)

    @property
    def modality_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.modalities)

    def intensity(self, name: str) -> IntensitySettings:
        return self.modalities[self.modality_names.index(name)].intensity


def generator_model(weights: Weights, label: str, batch_size: int = 16) -> EvaluatedModel:
    """A weights folder's generator as an ``EvaluatedModel`` (runs on the generator's device)."""
    config = weights.config

    def translate(case: Case, slices: np.ndarray, source: str, target: str) -> np.ndarray:
        return translate_slices(weights.generator, slices, config.modality_index(target), batch_size=batch_size)

    description = {"source": label, "folder": str(weights.folder), "preset": config.preset,
                   "image_size": config.model.image_size, "provenance": config.provenance}
    return EvaluatedModel(label, config.modalities, config.model.image_size, translate, description)


# ----------------------------------------------------------------------------- trivial baselines

IDENTITY_LABEL = "identity (copy input)"
MEAN_FILL_LABEL = "body mean-fill"
HISTOGRAM_LABEL = "histogram-matched source"
BASELINE_LABELS = (IDENTITY_LABEL, MEAN_FILL_LABEL, HISTOGRAM_LABEL)


def _target_distributions(data: DataDir, modalities: Sequence[ModalitySpec]) -> dict[str, tuple[float, np.ndarray]]:
    """Per modality with training volumes: the mean body intensity and the body quantile function
    (``body_quantiles``, averaged over volumes) in the normalized range, from the train split."""
    distributions = {}
    for spec in modalities:
        means, quantiles = [], []
        for case in data.cases("train", spec.name) if spec.name in data.spec.modality_names else ():
            try:
                normalized = normalize(to_slices(read_volume(case.image))[0], spec.intensity)
            except TarganError as error:
                raise _named(error, f"{spec.name} training case {case.case_id}", case.image) from None
            mask = body_mask(normalized)
            if mask.any():
                means.append(float(normalized[mask].mean()))
                quantiles.append(body_quantiles(normalized, mask))
        if means:
            distributions[spec.name] = (float(np.mean(means)), np.mean(quantiles, axis=0))
    return distributions


def trivial_baselines(data: DataDir, modalities: Sequence[ModalitySpec],
                      image_size: int) -> tuple[list[EvaluatedModel], list[str]]:
    """The baselines a translation model must beat, on ``modalities``' intensity settings: the input
    itself; the source's body filled with the target modality's mean body intensity; the source
    histogram-matched to the target's body intensities (both from the train split). Returns them
    and a note for each one that cannot be built (no training volumes of a modality)."""
    modalities = tuple(modalities)
    distributions = _target_distributions(data, modalities)

    def identity(case: Case, slices: np.ndarray, source: str, target: str) -> np.ndarray:
        return slices

    def mean_fill(case: Case, slices: np.ndarray, source: str, target: str) -> np.ndarray:
        return np.where(body_mask(slices), np.float32(distributions[target][0]), np.float32(BACKGROUND))

    def histogram(case: Case, slices: np.ndarray, source: str, target: str) -> np.ndarray:
        return match_histogram(slices, body_mask(slices), distributions[target][1], BACKGROUND)

    baselines = [EvaluatedModel(IDENTITY_LABEL, modalities, image_size, identity,
                                {"source": IDENTITY_LABEL, "description": "copies the input"})]
    missing = [spec.name for spec in modalities if spec.name not in distributions]
    if missing:
        return baselines, [f"no training volumes of {', '.join(missing)}: the {MEAN_FILL_LABEL} and "
                           f"{HISTOGRAM_LABEL} baselines need them and are left out"]
    baselines += [
        EvaluatedModel(MEAN_FILL_LABEL, modalities, image_size, mean_fill,
                       {"source": MEAN_FILL_LABEL, "description": "the source's body mask filled with the target "
                        "modality's mean body intensity (train split)",
                        "means": {name: mean for name, (mean, _) in distributions.items()}}),
        EvaluatedModel(HISTOGRAM_LABEL, modalities, image_size, histogram,
                       {"source": HISTOGRAM_LABEL, "description": "the source's body intensities matched to the "
                        "target modality's body histogram (train split); background kept"}),
    ]
    return baselines, []


ORACLE_LABEL = "best intensity mapping (oracle)"


def paired_truth(case: Case, target: str, settings: IntensitySettings, image_size: int) -> np.ndarray:
    """``case``'s paired rendering in ``target``, normalized with ``settings``, as (Z, S, S) slices at
    the model size ``image_size``: what a translation of ``case`` is scored against."""
    truth = to_slices(read_on_grid(case.paired[target], read_volume(case.image), "paired rendering"))[0]
    return at_model_size(normalize(truth, settings), image_size)


def at_model_size(slices: np.ndarray, image_size: int) -> np.ndarray:
    """(Z, H, W) slices in [-1, 1] padded and resized to (Z, S, S), as every evaluated model sees them."""
    return _resize_slices(slices, plane_fit(slices.shape[1], slices.shape[2], image_size), to_model_size=True)


def intensity_oracle(modalities: Sequence[ModalitySpec], image_size: int) -> EvaluatedModel:
    """Not a model: ``core.intensity.best_intensity_mapping`` of each source volume, fitted on its
    paired rendering in the target (at the model size, in the source's body). What it cannot win
    against a baseline, no voxel-by-voxel translation of the input can. Needs paired renderings."""
    modalities = tuple(modalities)
    names = [spec.name for spec in modalities]

    def translate(case: Case, slices: np.ndarray, source: str, target: str) -> np.ndarray:
        if target not in case.paired:  # nothing to fit on; no paired metric is computed either
            return np.full(slices.shape, BACKGROUND, dtype=np.float32)
        truth = paired_truth(case, target, modalities[names.index(target)].intensity, image_size)
        return best_intensity_mapping(slices, truth, body_mask(slices), background=BACKGROUND)

    return EvaluatedModel(ORACLE_LABEL, modalities, image_size, translate,
                          {"source": ORACLE_LABEL, "description": f"each input intensity ({ORACLE_BINS} bins) mapped "
                           "to the mean of the paired truth's body voxels of that intensity, fitted on the volume "
                           "scored"})


# ----------------------------------------------------------------------------- translation metrics


def _resize_slices(slices: np.ndarray, fit: PlaneFit, to_model_size: bool) -> np.ndarray:
    """(Z, H, W) -> (Z, S, S) (``to_model_size``) or back, bilinear, in chunks, clipped to [-1, 1]."""
    side = (fit.size, fit.size) if to_model_size else (fit.height, fit.width)
    resized = np.empty((slices.shape[0], *side), dtype=np.float32)
    for start in range(0, slices.shape[0], _RESIZE_CHUNK):
        batch = torch.from_numpy(np.ascontiguousarray(slices[start:start + _RESIZE_CHUNK], dtype=np.float32))
        batch = batch[:, None]  # (N, 1, H, W)
        output = to_model(batch, fit, fill=BACKGROUND) if to_model_size else from_model(batch, fit)
        resized[start:start + _RESIZE_CHUNK] = output[:, 0].clamp_(-1.0, 1.0).numpy()
    return resized


def _named(error: TarganError, what: str, path: Path) -> TarganError:
    """The same error, saying which volume it concerns."""
    return TarganError(f"{what}: {error.message}", error.path or path, error.exit_code)


@dataclass
class _Needs:
    """What the requested metrics need from each volume."""

    fid: bool
    sscore: bool
    paired: tuple[str, ...]

    @property
    def per_volume(self) -> bool:
        """Whether translations are needed at the input's resolution, with the liver label."""
        return self.sscore or bool(self.paired)


def _evaluated_modalities(data: DataDir, model: EvaluatedModel, split: str) -> tuple[str, ...]:
    present = [name for name in data.spec.modality_names if data.cases(split, name)]
    names = tuple(name for name in present if name in model.modality_names)
    if len(names) < 2:
        raise TarganError(f"{model.label} knows {', '.join(model.modality_names)} and the {split} split has "
                          f"cases of {', '.join(present) or 'none'}: at least two modalities in common are needed",
                          data.root)
    return names


def _paired_records(model: EvaluatedModel, case: Case, image: Volume, target: str, synthetic: np.ndarray,
                    liver: np.ndarray | None, metrics: Sequence[str]) -> list[Record]:
    """PSNR/SSIM/MAE of one synthetic volume against its paired rendering, body and liver."""
    path = case.paired[target]
    truth_slices = to_slices(read_on_grid(path, image, "paired rendering"))[0]
    try:
        truth = normalize(truth_slices, model.intensity(target))
    except TarganError as error:
        raise _named(error, f"paired {target} rendering of case {case.case_id}", path) from None
    masks = {"body": body_mask(truth), "liver": liver}
    records = []
    for region in PAIRED_REGIONS:
        if masks[region] is None:
            continue
        values = paired_metrics(synthetic, truth, masks[region], DATA_RANGE)
        records.extend(Record(model.label, metric, target, region, case.case_id, case.modality, values[metric])
                       for metric in metrics)
    return records


def _evaluate_model(data: DataDir, model: EvaluatedModel, metrics: Sequence[str], *, split: str,
                    segmenters: Mapping[str, Segmenter], fid_features: nn.Module | None,
                    device: torch.device, batch_size: int, progress: Progress | None) -> list[Record]:
    """Every record of one model: each test volume translated once into every other modality."""
    needs = _Needs("fid" in metrics, "sscore" in metrics, tuple(m for m in metrics if m in PAIRED_METRICS))
    modalities = _evaluated_modalities(data, model, split)
    size = (model.image_size, model.image_size)
    fids = {name: FrechetDistance(fid_features, size, device) for name in modalities} if needs.fid else {}
    records: list[Record] = []
    paired_targets = _paired_targets(data, split)
    for source in modalities:
        for case in data.cases(split, source):
            image = read_volume(case.image)
            slices = to_slices(image)[0]  # (Z, H, W) stored units
            try:
                normalized = normalize(slices, model.intensity(source))
            except TarganError as error:
                raise _named(error, f"{source} case {case.case_id}", case.image) from None
            fit = plane_fit(slices.shape[1], slices.shape[2], model.image_size)
            model_slices = _resize_slices(normalized, fit, to_model_size=True)  # (Z, S, S)
            if needs.fid:
                fids[source].update(torch.from_numpy(model_slices)[:, None], real=True)
            liver = label_slices(case.label, image) if needs.per_volume and case.label is not None else None
            for target in (name for name in modalities if name != source):
                synthetic_model = model.translate(case, model_slices, source, target)  # (Z, S, S)
                if needs.fid:
                    fids[target].update(torch.from_numpy(synthetic_model)[:, None], real=False)
                if needs.per_volume:
                    synthetic = _resize_slices(synthetic_model, fit, to_model_size=False)  # (Z, H, W)
                    if needs.sscore and liver is not None:
                        stored = denormalize(synthetic, model.intensity(target))
                        try:
                            predicted = segment_stored_slices(segmenters[target], stored, batch_size=batch_size)
                        except TarganError as error:
                            raise _named(error, f"synthetic {target} of {source} case {case.case_id}",
                                         case.image) from None
                        records.append(Record(model.label, "sscore", target, None, case.case_id, source,
                                              dice(predicted, liver)))
                    if needs.paired and target in case.paired:
                        records.extend(_paired_records(model, case, image, target, synthetic, liver, needs.paired))
                    elif needs.paired and target in paired_targets:  # others have one: n/a, counted
                        records.extend(Record(model.label, metric, target, region, case.case_id, source, None)
                                       for region in PAIRED_REGIONS if region == "body" or liver is not None
                                       for metric in needs.paired)
                if progress is not None:
                    progress(1)
    for target, fid in fids.items():
        try:
            value = fid.compute()
        except TarganError as error:
            raise TarganError(f"FID of {target}: {error.message}", data.root) from None
        records.append(Record(model.label, "fid", target, None, None, None, value))
    return records


def _paired_targets(data: DataDir, split: str) -> set[str]:
    """The target modalities that some case of the split has a paired rendering in."""
    return {target for case in data.cases(split) for target in case.paired}


def _missing_pairs_notes(data: DataDir, split: str, targets: Sequence[str], metrics: Sequence[str]) -> list[str]:
    """Notes for the paired cells that are n/a: a target without any paired rendering, or cases
    without theirs where others have one (with where the first missing file belongs)."""
    paired_targets = _paired_targets(data, split)
    notes = []
    for target in targets:
        if target not in paired_targets:
            notes.append(f"no paired {target} renderings in the {split} split: its {', '.join(metrics)} cells are n/a")
            continue
        missing = [case for case in data.cases(split) if case.modality in targets and case.modality != target
                   and target not in case.paired]
        if missing:
            first = missing[0]
            where = data.root / split / first.modality / PAIRED / target / f"{first.case_id}.nii.gz"
            notes.append(f"{counted(len(missing), f'{split} case')} {'has' if len(missing) == 1 else 'have'} no paired "
                         f"{target} rendering (the first belongs at "
                         f"{where}): n/a in the {target} {', '.join(metrics)} cells")
    return notes


def _columns(metrics: Sequence[str], targets: Sequence[str]) -> list[Column]:
    """Table 1 layout: per metric, one column per target modality (and region for paired metrics)."""
    return [Column(metric, target, region)
            for metric in metrics for target in targets
            for region in (PAIRED_REGIONS if metric in PAIRED_METRICS else (None,))]


def _check_dataset(data: DataDir, metrics: Sequence[str], split: str, targets: Sequence[str]) -> None:
    """Refuse, before any work, a dataset without what the metrics need (labels, paired renderings)."""
    cases = data.cases(split)
    if not cases:
        raise TarganError(f"no {split} cases: expected {split}/<modality>/images/<case>.nii.gz", data.root)
    if "sscore" in metrics and not any(case.label is not None for case in cases):
        raise TarganError(f"sscore needs liver labels of the {split} cases ({split}/<modality>/labels/<case>.nii.gz) "
                          "and this dataset has none", data.root)
    paired = [metric for metric in metrics if metric in PAIRED_METRICS]
    if paired and not any(target in case.paired for case in cases for target in targets):
        raise TarganError(f"{', '.join(paired)} need paired ground truth "
                          f"({split}/<source>/paired/<target>/<case>.nii.gz, the same case rendered in the target "
                          "modality) and this dataset has none; phantom datasets (targan data phantom) have it",
                          data.root)


def _load_segmenters(folder: str | Path | None, targets: Sequence[str], data: DataDir,
                     device: torch.device) -> dict[str, Segmenter]:
    """The segmenter of each target modality, ``folder/<modality>/``."""
    if folder is None:
        raise UsageError("sscore needs --segmenters DIR holding one segmenter per modality (DIR/<modality>/), "
                         "made with `targan train-segmenter`")
    folder = Path(folder)
    segmenters = {}
    for target in targets:
        path = folder / target
        if not (path / "config.json").is_file():
            raise TarganError(f"no {target} segmenter; train one with `targan train-segmenter --data {data.root} "
                              f"--modality {target} --out {path}`", path)
        segmenter = load_segmenter(path, device)
        if segmenter.config.modality != target:
            raise TarganError(f"holds a {segmenter.config.modality} segmenter, not a {target} one", path)
        segmenters[target] = segmenter
    return segmenters


def _fid_features(fid_features: str | Path | None, inception_weights: str | Path | None,
                  image_size: int) -> tuple[nn.Module, str]:
    """The FID feature module (a file is tried on slices of ``image_size`` now, so that a module
    that does not fit is an error naming it) and a description of it for the outputs."""
    if fid_features is not None:
        return (load_feature_module(fid_features, (image_size, image_size)),
                f"{feature_module_kind(fid_features)}:{Path(fid_features).resolve()}")
    module = inception_features(inception_weights)
    return module, f"inception-v3:{inception_weights or 'torch hub cache'}"


def evaluate_models(data: DataDir, models: Sequence[EvaluatedModel], metrics: Sequence[str], *,
                    split: str = "test", segmenters: str | Path | None = None,
                    fid_features: nn.Module | None = None, device: torch.device = torch.device("cpu"),
                    batch_size: int = 16, settings: Mapping[str, Any] | None = None,
                    progress: Progress | None = None,
                    total_callback: Callable[[int], None] | None = None) -> EvaluationResult:
    """Translation metrics of several models on one dataset, one row per model (Table 1 layout).

    ``segmenters`` is the folder of per-modality segmenters (sscore); ``fid_features`` the FID
    feature module (fid). ``progress(1)`` advances per translated volume; ``total_callback``
    receives their number first.
    """
    metrics = parse_metrics(metrics)
    if metrics[0] in SEGMENTATION_METRICS:
        raise UsageError("dice and ravd compare --pred with --truth, not translations")
    if "fid" in metrics and fid_features is None:
        raise ValueError("fid needs a feature module")
    labels = [model.label for model in models]
    if not models or len(set(labels)) != len(labels):
        raise UsageError(f"pass each model once, got {', '.join(labels) or 'none'}")
    evaluated = {model.label: _evaluated_modalities(data, model, split) for model in models}
    targets = [name for name in data.spec.modality_names if any(name in names for names in evaluated.values())]
    _check_dataset(data, metrics, split, targets)
    loaded_segmenters = _load_segmenters(segmenters, targets, data, device) if "sscore" in metrics else {}
    if total_callback is not None:
        total_callback(sum(len(data.cases(split, source)) * (len(names) - 1)
                           for names in evaluated.values() for source in names))
    records: list[Record] = []
    for model in models:
        records.extend(_evaluate_model(data, model, metrics, split=split, segmenters=loaded_segmenters,
                                       fid_features=fid_features, device=device, batch_size=batch_size,
                                       progress=progress))
    run_settings = {
        "metrics": list(metrics), "data": str(data.root.resolve()), "split": split,
        "models": [model.description or {"source": model.label} for model in models],
        "segmenters": {name: {"folder": str(s.folder.resolve()), "test_dice": s.config.provenance.get("test_dice")}
                       for name, s in loaded_segmenters.items()},
        "paired_space": "normalized model range [-1, 1] of the target modality", "data_range": DATA_RANGE,
        "batch_size": batch_size, "device": str(device), **(settings or {}),
    }
    requested_paired = [metric for metric in metrics if metric in PAIRED_METRICS]
    notes = _missing_pairs_notes(data, split, targets, requested_paired) if requested_paired else []
    return build_result(f"Translation metrics on {data.root.name} ({split})", labels, _columns(metrics, targets),
                        records, run_settings, notes)


# ----------------------------------------------------------------------------- segmentation metrics


def _read_pair(prediction: Path, truth: Path) -> tuple[np.ndarray, np.ndarray]:
    """A predicted mask and its ground truth as 0/1 arrays, checked to share one voxel grid."""
    reference = read_label(truth)
    return read_label(prediction, reference, "prediction").array, reference.array


def evaluate_segmentations(predictions: Sequence[str | Path], truth: str | Path,
                           metrics: Sequence[str] = SEGMENTATION_METRICS, progress: Progress | None = None,
                           total_callback: Callable[[int], None] | None = None) -> EvaluationResult:
    """DICE (%) and RAVD (%) of prediction folders against a ground-truth folder (Table 2 layout).

    Files are matched by case id (name without .nii / .nii.gz); non-zero voxels are the liver.
    Every ground-truth case needs a prediction; an empty reference gives RAVD n/a, noted.
    """
    metrics = parse_metrics(metrics)
    if metrics[0] not in SEGMENTATION_METRICS:
        raise UsageError("--pred and --truth go with dice and ravd")
    if not predictions:
        raise UsageError("dice and ravd need --pred PRED_DIR (and --truth TRUTH_DIR)")
    truth = Path(truth)
    truth_files = list_volumes(truth)
    if not truth_files:
        raise TarganError("no NIfTI (.nii / .nii.gz) ground-truth files in this folder", truth)
    labels = [str(path) for path in predictions]
    if len(set(labels)) != len(labels):
        raise UsageError(f"pass each --pred folder once, got {', '.join(labels)}")
    predicted = {label: {case_id(path): path for path in list_volumes(folder)}
                 for label, folder in zip(labels, map(Path, predictions))}
    for label, folder in zip(labels, map(Path, predictions)):  # every case found before any is read
        for case in map(case_id, truth_files):
            if case not in predicted[label]:
                raise TarganError(f"no prediction for case {case!r} (expected {case}.nii.gz here)", folder)
    if total_callback is not None:
        total_callback(len(labels) * len(truth_files))
    records: list[Record] = []
    notes: list[str] = []
    for label in labels:
        for truth_file in truth_files:
            case = case_id(truth_file)
            prediction, reference = _read_pair(predicted[label][case], truth_file)
            values = {"dice": dice(prediction, reference), "ravd": ravd(prediction, reference)}
            if "ravd" in metrics and math.isnan(values["ravd"]):
                notes.append(f"{label}: RAVD n/a for case {case} (empty reference)")
            records.extend(Record(label, metric, None, None, case, None, values[metric]) for metric in metrics)
            if progress is not None:
                progress(1)
    settings = {"metrics": list(metrics), "truth": str(truth.resolve()),
                "predictions": [str(Path(p).resolve()) for p in predictions], "cases": len(truth_files)}
    return build_result(f"Liver segmentation against {truth.name}", labels, [Column(m) for m in metrics],
                        records, settings, notes)


# ----------------------------------------------------------------------------- entry point


def evaluate(
    metrics: Sequence[str],
    *,
    data: str | Path | None = None,
    weights: Sequence[str] = (),
    segmenters: str | Path | None = None,
    fid_features: str | Path | None = None,
    inception_weights: str | Path | None = None,
    predictions: Sequence[str | Path] = (),
    truth: str | Path | None = None,
    split: str = "test",
    device: str = "auto",
    batch_size: int = 16,
    baselines: bool = True,
    json_out: str | Path | None = None,
    csv_out: str | Path | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
    total_callback: Callable[[int], None] | None = None,
) -> EvaluationResult:
    """`targan evaluate`: check every option and output first, then compute, then write JSON/CSV.

    Translation metrics need ``data`` and ``weights`` (none: $TARGAN_WEIGHTS or the default
    repo) and, with ``baselines``, rows for the trivial baselines (``trivial_baselines``) follow
    the models'; dice and ravd need ``predictions`` and ``truth``.
    """
    metrics = parse_metrics(metrics)
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if json_out is not None and csv_out is not None and Path(json_out).resolve() == Path(csv_out).resolve():
        raise UsageError("--json and --csv name the same file; give each its own", json_out)
    inputs = [*local_paths(data, segmenters, fid_features, inception_weights, *predictions, truth),
              *(path for source in weights or [None] for path in weights_inputs(source))]
    for path, kind in ((json_out, "json"), (csv_out, "csv")):
        if path is not None:
            check_writable(path, overwrite, inputs=inputs, kind=kind)
    if metrics[0] in SEGMENTATION_METRICS:
        if data is not None or weights or segmenters is not None or fid_features is not None:
            raise UsageError("dice and ravd read only --pred and --truth; drop --data, --weights, "
                             "--segmenters and --fid-features")
        if truth is None:
            raise UsageError("dice and ravd need --truth TRUTH_DIR (and --pred PRED_DIR)")
        result = evaluate_segmentations(predictions, truth, metrics, progress, total_callback)
    else:
        if predictions or truth is not None:
            raise UsageError("--pred and --truth go with --metric dice / ravd")
        if data is None:
            raise UsageError(f"{', '.join(metrics)} need --data DATA (a dataset with a {split} split)")
        dataset = open_data_dir(data)
        torch_device = pick_device(device)
        if "fid" in metrics and fid_features is not None and inception_weights is not None:
            raise UsageError("pass either --fid-features or --inception-weights, not both")
        sources = list(weights) or [weights_source(None)]
        if len(set(sources)) != len(sources):
            raise UsageError(f"pass each --weights once, got {', '.join(sources)}")
        models = [generator_model(load_weights(source, None, torch_device), source, batch_size) for source in sources]
        features, features_description = (_fid_features(fid_features, inception_weights, models[0].image_size)
                                          if "fid" in metrics else (None, None))
        extra, notes = (trivial_baselines(dataset, models[0].modalities, models[0].image_size) if baselines
                        else ([], []))
        result = evaluate_models(dataset, models + extra, metrics, split=split, segmenters=segmenters,
                                 fid_features=features, device=torch_device, batch_size=batch_size,
                                 settings={"fid_features": features_description},
                                 progress=progress, total_callback=total_callback)
        result = dataclasses.replace(result, notes=(*notes, *result.notes))
    if json_out is not None:
        write_json(result, json_out, overwrite)
    if csv_out is not None:
        write_csv(result, csv_out, overwrite)
    return result


# ----------------------------------------------------------------------------- outputs


def result_to_dict(result: EvaluationResult) -> dict[str, Any]:
    """Everything needed to regenerate the table: versions, settings, summaries, every record."""
    return {
        "title": result.title,
        "versions": result.versions,
        "settings": result.settings,
        "columns": [{"label": c.label, "metric": c.metric, "target": c.target, "region": c.region,
                     "lower_is_better": c.lower_is_better} for c in result.columns],
        "rows": [{"model": model, "cells": [
            None if s is None else {"mean": s.mean, "std": s.std, "ci95": [s.low, s.high], "count": s.count,
                                    "missing": s.missing, "infinite": s.infinite}
            for s in summaries]} for model, summaries in result.rows],
        "best": list(result.best),
        "notes": list(result.notes),
        "records": [{"model": r.model, "case": r.case, "source": r.source, "target": r.target,
                     "metric": r.metric, "region": r.region, "value": r.value}
                    for r in result.records],
    }


def write_json(result: EvaluationResult, path: str | Path, overwrite: bool = False) -> Path:
    """The result as strict JSON (``result_to_dict``; nan -> null, inf -> "inf"), written atomically."""
    return write_report(result_to_dict(result), path, overwrite)


CSV_FIELDS = ("model", "case", "source", "target", "metric", "region", "value")


def write_csv(result: EvaluationResult, path: str | Path, overwrite: bool = False) -> Path:
    """Every record, one per row, after ``# versions: {...}`` and ``# settings: {...}`` comment
    lines (read with ``pandas.read_csv(path, comment="#")``); nan and inf are written as such."""
    with atomic_output(path, overwrite=overwrite, kind="csv") as temporary:
        with temporary.open("w", newline="", encoding="utf-8") as handle:
            handle.write(f"# versions: {json.dumps(result.versions)}\n")
            handle.write(f"# settings: {json.dumps(result.settings, default=str)}\n")
            writer = csv.writer(handle)
            writer.writerow(CSV_FIELDS)
            for record in result.records:
                writer.writerow(["" if value is None else value
                                 for value in (record.model, record.case, record.source, record.target,
                                               record.metric, record.region, record.value)])
    return Path(path)
