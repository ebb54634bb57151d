"""`targan translate`: whole volumes of one modality into another, geometry kept.

Pipeline per volume: read -> canonical slices -> normalize with the source modality's intensity
settings -> generator (batched) -> denormalize with the target's (HU rounded to integers) ->
back to the file's voxel order -> written with the input's affine and header (NIfTI), or as a
derived DICOM series on the input's grid (``io.dicom.write_dicom``), with a provenance sidecar
(``io.provenance``). Quality control (``core.qc``) translates the output back with the same
generator and compares it with the input: the cycle score, per slice and per volume. Folder runs
resume: an output whose sidecar records this run's settings is skipped.
"""

from __future__ import annotations

import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from targan_cli import __version__
from targan_cli.config import WeightsConfig
from targan_cli.core.device import check_precision, pick_device
from targan_cli.core.inference import SliceBatcher, SliceJob, classify_slices
from targan_cli.core.intensity import body_mask, denormalize, guess_kind, normalize, robust_high
from targan_cli.core.qc import (CLIP_WARNING_FRACTION, CYCLE_CHECK, CYCLE_POOR, FLAGGED_SHARE_CHECK,
                                MIN_BODY_FRACTION, Grade, ModalityVote, clipped_fraction, cycle_errors, grade,
                                modality_vote, scored_slices, units)
from targan_cli.errors import TarganError, UsageError
from targan_cli.io.atomic import check_apart, check_writable
from targan_cli.io.dicom import (SERIES_KIND, DicomSeries, check_series_folder, check_series_option, folder_cases,
                                 is_targan_series, read_input, save_dicom)
from targan_cli.io.montage import describe_window, modality_window, save_montage
from targan_cli.io.pipeline import Stage, check_workers, stream
from targan_cli.io.volume import (Volume, canonical_depth, case_id, check_nifti_output, from_slices, is_nifti_file,
                                  is_nifti_name, is_volume_path, save_volume, SliceFrame, slice_frame, to_slices)
from targan_cli.io.provenance import (RUN_KEY, OutputState, output_state, read_sidecar, sha256_file, sidecar_path,
                                      synthetic_descrip, synthetic_intent_name, write_with_sidecar)
from targan_cli.io.weights import WEIGHTS_FILE, Weights, load_weights, weights_inputs

OUTPUT_SUFFIX = ".nii.gz"
FORMATS = ("auto", "dicom", "nifti")
PREVIEW_SLICES = 4
# The model's output at most this far (in [-1, 1]) from its limits counts as clipped to the window.
_LIMIT_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Quality:
    """The QC of one translation: the cycle score per slice and per volume ([0, 1] units and the
    source's), the grade, and the modality check (None: unavailable for these weights)."""

    grade: Grade
    cycle_volume: float
    cycle_slices: np.ndarray  # (Z,) canonical slices, NaN where too little body
    span: float | None  # the source's intensity range the [0, 1] units stand for (None: per-slice scaling)
    unit: str  # "HU", "MR units" or "" (per-slice scaling)
    body_fraction: float
    vote: ModalityVote | None = None

    def to_dict(self) -> dict:
        def number(value: float) -> float | None:
            return None if np.isnan(value) else round(float(value), 5)

        return {
            "Grade": self.grade.grade,
            "Reasons": list(self.grade.reasons),
            "CycleScore": number(self.cycle_volume),
            "CycleScoreSourceUnits": None if self.span is None else number(units(self.cycle_volume, self.span)),
            "SourceUnits": self.unit or None,
            "CycleScorePerSlice": [number(value) for value in self.cycle_slices],
            "FlaggedSlices": list(self.grade.flagged),
            "BodyFraction": round(self.body_fraction, 5),
            "ModalityCheck": ("unavailable" if self.vote is None else
                              {"Predicted": self.vote.predicted, "Share": round(self.vote.share, 4),
                               "Shares": {k: round(v, 4) for k, v in self.vote.shares.items()}}),
            "Thresholds": {"CycleCheck": CYCLE_CHECK, "CyclePoor": CYCLE_POOR,
                           "FlaggedShareCheck": FLAGGED_SHARE_CHECK, "MinBodyFraction": MIN_BODY_FRACTION},
        }


@dataclass(frozen=True)
class Clipping:
    """Body voxels clipped to the intensity windows: the input's (values beyond the source window or
    the MR scale) and the output's (at the limits of the target window)."""

    input_fraction: float | None  # None: the scaling clips nothing (per-slice min-max)
    output_fraction: float
    input_window: str
    output_window: str

    def to_dict(self) -> dict:
        return {"InputWindow": self.input_window, "OutputWindow": self.output_window,
                "InputBodyFractionClipped": None if self.input_fraction is None else round(self.input_fraction, 5),
                "OutputBodyFractionClipped": round(self.output_fraction, 5)}

    def warnings(self, source: str, target: str) -> list[str]:
        lines = []
        if self.input_fraction is not None and self.input_fraction > CLIP_WARNING_FRACTION:
            lines.append(f"{self.input_fraction:.1%} of the input's body voxels lie outside the {source} "
                         f"window {self.input_window} and were clipped to it")
        if self.output_fraction > CLIP_WARNING_FRACTION:
            lines.append(f"{self.output_fraction:.1%} of the output's body voxels are clipped to the {target} "
                         f"window {self.output_window}")
        return lines


@dataclass(frozen=True)
class VolumeReport:
    """One output of a run: how its source was chosen, and, when it was translated now, its QC,
    clipping and the warnings to show; ``status`` is written, redone (with ``note``) or skipped."""

    output: Path
    source: SourceChoice
    status: str = "written"
    note: str = ""
    slices: int = 0
    quality: Quality | None = None
    clipping: Clipping | None = None
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunPlan:
    """What a run will use, told before any work: weights, revision, preset, modalities, device."""

    weights: str
    revision: str
    preset: str
    image_size: int
    source: str  # --from, or "auto"
    target: str
    device: str
    precision: str
    qc: bool
    modality_check: bool


@dataclass(frozen=True)
class TranslateResult:
    """What a run wrote and how fast: ``seconds`` covers reading, translating and writing."""

    outputs: tuple[Path, ...]
    target: str
    slices: int
    seconds: float
    device: str
    preview: Path | None = None
    sources: tuple[SourceChoice, ...] = ()  # per output, how its input's modality was chosen
    notes: tuple[str, ...] = ()  # lines for the user, e.g. files skipped in a DICOM folder
    volumes: tuple[VolumeReport, ...] = field(default=())  # per output, in order

    @property
    def slices_per_second(self) -> float:
        return self.slices / self.seconds if self.seconds > 0 else 0.0

    @property
    def failed(self) -> tuple[VolumeReport, ...]:
        """The outputs of a folder run that an error in their input stopped (the run went on)."""
        return tuple(report for report in self.volumes if report.status == "failed")


@dataclass(frozen=True)
class Translation:
    """One translated volume, the few canonical slices a preview shows, and its QC."""

    volume: Volume
    shown: list[int]  # indices of the preview slices along Z
    depth: int
    input_preview: np.ndarray  # (len(shown), H, W) stored units
    output_preview: np.ndarray  # (len(shown), H, W) target units
    clipping: Clipping
    quality: Quality | None = None


def _modalities(config: WeightsConfig) -> str:
    return ", ".join(config.modality_names)


@dataclass(frozen=True)
class SourceChoice:
    """The input's modality name, and why when ``--from`` did not give it (shown to the user)."""

    name: str
    reason: str | None = None  # None: given with --from
    doubt: str | None = None  # --from names a modality of another kind than the input looks like


def infer_source(config: WeightsConfig, volume: Volume, source: str | None, target: str,
                 predict: Callable[[list[str]], SourceChoice | None] | None = None) -> SourceChoice:
    """The input's modality: ``source`` (--from) if given; else the weights' only modality of the
    input's kind (CT or MR: the DICOM Modality tag, or for NIfTI the values: Hounsfield units are
    CT, non-negative values MR), leaving ``target`` out when that decides it; else the weights'
    only modality other than ``target``. Otherwise a usage error listing the names. A DICOM
    series of another modality (PT, US...) needs --from. ``predict(candidates)`` (the modality check),
    when given, is asked first to choose among the modalities of the input's kind (by the DICOM
    tag or the values; all when neither tells) when there are several: a CT in Hounsfield units
    is never taken for an MR modality, whatever a discriminator says.
    """
    tag = volume.modality
    if source is not None:
        config.modality_index(source)
        kind = config.intensity(source).kind
        seen = tag.lower() if tag in ("CT", "MR") else guess_kind(volume.array) if tag is None else None
        if seen is not None and seen != kind:
            evidence = f"the DICOM series is {tag}" if tag is not None else f"its values look like {seen.upper()}"
            return SourceChoice(source, doubt=f"--from {source} is {kind.upper()} in these weights but {evidence}; "
                                              "check --from (translations of the wrong modality are meaningless)")
        return SourceChoice(source)
    if tag is not None and tag not in ("CT", "MR"):
        raise UsageError(f"the DICOM series is {tag}, not CT or MR: pass --from with the modality "
                         f"to treat it as, one of {_modalities(config)}", volume.source)
    kind = tag.lower() if tag is not None else guess_kind(volume.array)
    if predict is not None:  # it chooses among the modalities of the input's kind, when that is known
        candidates = [m.name for m in config.modalities if kind is None or m.intensity.kind == kind]
        predicted = predict(candidates) if len(candidates) > 1 else None
        if predicted is not None:
            return predicted
    where = f"the DICOM series is {tag}" if tag is not None else (
        f"the values look like {kind.upper()}" if kind is not None else "")
    if kind is not None:
        names = [m.name for m in config.modalities if m.intensity.kind == kind]
        if len(names) == 1:
            return SourceChoice(names[0], f"{where}, the weights' only {kind.upper()} modality")
        if len(names) > 1:
            others = [name for name in names if name != target]
            if len(others) == 1:
                return SourceChoice(others[0], f"{where}, the weights' only {kind.upper()} modality "
                                               "other than --to")
        if not names and tag is not None:
            raise UsageError(f"{where} but these weights have no {tag} modality "
                             f"(they know {_modalities(config)})", volume.source)
        if len(names) > 1:
            raise UsageError(f"{where}, which fits several modalities of these weights: pass --from "
                             f"with one of {', '.join(names)}", volume.source)
    others = [name for name in config.modality_names if name != target]
    if len(others) == 1:
        return SourceChoice(others[0], "the weights' only modality other than --to")
    raise UsageError(f"pass --from with the input's modality, one of {_modalities(config)} "
                     "(a NIfTI file does not say which it is)", volume.source)


def _preview_indices(depth: int) -> list[int]:
    """~PREVIEW_SLICES evenly spaced slices, away from the ends (often outside the body)."""
    return sorted({int((k + 0.5) * depth / PREVIEW_SLICES) for k in range(PREVIEW_SLICES)})


def _window_text(settings, output: bool = False) -> str:
    if settings.kind == "ct":
        low, high = settings.window
        return f"{low:g}..{high:g} HU"
    if output:
        return f"0..{settings.reference_high:g} (MR reference scale)"
    if settings.scaling == "volume":
        return f"0..p{settings.percentile:g} of the body (MR)"
    return "per-slice min-max (MR)"


def _input_clipping(slices: np.ndarray, normalized: np.ndarray, body: np.ndarray, settings) -> float | None:
    """The fraction of body voxels the source's normalisation clipped (None: it clips nothing)."""
    if settings.kind == "ct":
        return clipped_fraction(slices, body, *settings.window)
    if settings.scaling == "volume":
        return clipped_fraction(normalized, body, None, 1.0)
    return None


def _modality_vote(weights: Weights, normalized: np.ndarray, body: np.ndarray,
                   batch_size: int) -> ModalityVote | None:
    """The discriminator's majority modality over the body slices (None: no discriminator)."""
    if weights.discriminator is None:
        return None
    logits = classify_slices(weights.discriminator, normalized, weights.config.model, batch_size=batch_size)
    return modality_vote(logits, weights.config.modality_names, scored_slices(body))


def predict_source(weights: Weights, volume: Volume, candidates: list[str]) -> SourceChoice | None:
    """``--from auto`` with the modality check: the candidate that the discriminator predicts for the
    largest share of the body slices when the volume is normalized as that candidate (a majority
    is needed); None without a discriminator or a majority."""
    if weights.discriminator is None:
        return None
    slices = to_slices(volume)[0]
    best: tuple[float, str] | None = None
    for name in candidates:
        try:
            normalized = normalize(slices, weights.config.intensity(name))
        except TarganError:  # e.g. no positive values for an MR scaling
            continue
        vote = _modality_vote(weights, normalized, body_mask(normalized), 16)
        if vote is not None and (best is None or vote.shares[name] > best[0]):
            best = (vote.shares[name], name)
    if best is None or best[0] <= 0.5:
        return None
    return SourceChoice(best[1], f"the modality check predicts {best[1]} on {best[0]:.0%} of the body slices")


@dataclass(eq=False)
class Prepared:
    """A volume normalized for the generator, with what its record needs from before the model
    (``prepare_input``); the model runs on ``normalized`` in place (``run_model``), then ``finish_output``
    makes the translated volume. The first and last steps are NumPy only, so that a folder run
    does them on its I/O threads while the model runs on another volume."""

    volume: Volume
    source: str
    target: str
    frame: SliceFrame
    shown: list[int]
    input_preview: np.ndarray  # (len(shown), H, W) stored units
    normalized: np.ndarray  # (Z, H, W) [-1, 1]: the input, then the generator's output
    span: float | None
    body: np.ndarray  # (Z, H, W) bool
    input_clipped: float | None
    source_normalized: np.ndarray | None = None  # the input kept for the cycle score (QC)
    quality: Quality | None = None


def prepare_input(volume: Volume, config: WeightsConfig, source: str, target: str, qc: bool = False) -> Prepared:
    """``volume`` as canonical slices normalized as ``source``, with its body mask and clipping."""
    source_settings = config.intensity(source)
    config.intensity(target)
    slices, frame = to_slices(volume)  # (Z, H, W) stored units
    shown = _preview_indices(slices.shape[0])
    try:
        normalized = normalize(slices, source_settings)
        span = (source_settings.window[1] - source_settings.window[0] if source_settings.kind == "ct" else
                robust_high(slices, source_settings) if source_settings.scaling == "volume" else None)
    except TarganError as error:  # e.g. a blank MR volume: name the file
        raise TarganError(error.message, error.path or volume.source, error.exit_code) from None
    body = body_mask(normalized)  # (Z, H, W) bool
    # Only one volume-sized float array lives while the generator runs (without QC): the slices are
    # dropped here and the output overwrites the normalized input batch by batch.
    return Prepared(volume, source, target, frame, shown, slices[shown], normalized, span, body,
                    _input_clipping(slices, normalized, body, source_settings),
                    normalized.copy() if qc else None)


def run_model(prepared: Prepared, weights: Weights, *, batch_size: int, dtype: torch.dtype | None,
              progress: Callable[[int], None] | None = None) -> None:
    """The generator on ``prepared.normalized`` (in place); with QC, the modality check and the cycle
    (the output translated back to the source, compared with the input in the body) after it: one
    volume through a ``ModelStage``."""
    stage = ModelStage(lambda key, value: [(value, weights)], batch_size=batch_size, dtype=dtype, progress=progress)
    stage.add(0, prepared)
    stage.take(flush=True)


class ModelStage(Stage):
    """The model step of a folder run (``io.pipeline.stream``): each item's ``Prepared`` volumes
    (``volumes(key, value)``: one per channel, with the weights that translate it) go through their
    generator (``core.inference.SliceBatcher``, one per generator), on CUDA in full batches that
    span volumes, the last of the run padded; the outputs are the same bits as one volume at a
    time. An item is finished when all its volumes are translated, with QC also cycled back and
    scored; its modality check runs when it is added (before the output overwrites the input).
    Holds at most the volumes whose slices a batch still needs: none on the CPU, one or two on
    CUDA. An error here stops the run (the model's errors are not the input's)."""

    def __init__(self, volumes: Callable[[int, object], list[tuple[Prepared, Weights]]], *, batch_size: int,
                 dtype: torch.dtype | None, progress: Callable[[int], None] | None = None) -> None:
        self.volumes, self.batch_size, self.dtype, self.progress = volumes, batch_size, dtype, progress
        self.batchers: dict[int, SliceBatcher] = {}
        self.values: dict[int, object] = {}
        self.left: dict[int, int] = {}  # per key, the volumes not yet finished
        self.finished: list[int] = []

    def add(self, key: int, value: object) -> None:
        volumes = self.volumes(key, value)
        self.values[key] = value
        if not volumes:
            self.finished.append(key)
            return
        self.left[key] = len(volumes)
        for prepared, weights in volumes:
            self._start(key, prepared, weights)

    def take(self, flush: bool) -> list[tuple[int, object, None]]:
        for batcher in self.batchers.values():
            batcher.run(flush)
        finished, self.finished = self.finished, []
        return [(key, self.values.pop(key), None) for key in finished]

    def _batcher(self, weights: Weights) -> SliceBatcher:
        key = id(weights.generator)
        if key not in self.batchers:
            self.batchers[key] = SliceBatcher(weights.generator, batch_size=self.batch_size, dtype=self.dtype,
                                              progress=self.progress)
        return self.batchers[key]

    def _done(self, key: int) -> None:
        self.left[key] -= 1
        if self.left[key] == 0:
            del self.left[key]
            self.finished.append(key)

    def _start(self, key: int, prepared: Prepared, weights: Weights) -> None:
        config = weights.config
        batcher = self._batcher(weights)
        if prepared.source_normalized is None:
            batcher.add(SliceJob(prepared.normalized, config.modality_index(prepared.target), prepared.normalized,
                                 lambda: self._done(key)))
            return
        vote = _modality_vote(weights, prepared.normalized, prepared.body, self.batch_size)
        cycled = np.empty_like(prepared.normalized)

        def scored() -> None:
            per_slice, volume_error = cycle_errors(prepared.source_normalized, cycled, prepared.body)
            body_fraction = float(prepared.body.mean())
            source_settings = config.intensity(prepared.source)
            unit = "HU" if source_settings.kind == "ct" else "MR units" if prepared.span is not None else ""
            prepared.quality = Quality(grade(per_slice, volume_error, body_fraction, vote, prepared.source),
                                       volume_error, per_slice, prepared.span, unit, body_fraction, vote)
            prepared.source_normalized = None
            self._done(key)

        def translated() -> None:  # back to the source, ahead of the waiting volumes
            batcher.add(SliceJob(prepared.normalized, config.modality_index(prepared.source), cycled, scored),
                        first=True)

        batcher.add(SliceJob(prepared.normalized, config.modality_index(prepared.target), prepared.normalized,
                             translated))


def finish_output(prepared: Prepared, config: WeightsConfig) -> Translation:
    """The generator's output back in the target's units, in the input's voxel order and geometry."""
    source_settings, target_settings = config.intensity(prepared.source), config.intensity(prepared.target)
    output_clipped = clipped_fraction(prepared.normalized, prepared.body, -1.0 + _LIMIT_TOLERANCE,
                                      1.0 - _LIMIT_TOLERANCE)
    output = denormalize(prepared.normalized, target_settings)  # (Z, H, W) target units
    prepared.normalized = prepared.body = None  # type: ignore[assignment]  # freed before the volume is built
    if target_settings.kind == "ct":
        np.rint(output, out=output)  # whole HU, so the file is int16 like a scanner's
    modality = "CT" if target_settings.kind == "ct" else "MR"
    volume = prepared.volume
    translated = Volume(from_slices(output, prepared.frame), volume.affine.copy(), volume.header, modality,
                        volume.source)
    clipping = Clipping(prepared.input_clipped, output_clipped, _window_text(source_settings),
                        _window_text(target_settings, output=True))
    return Translation(translated, prepared.shown, len(output), prepared.input_preview, output[prepared.shown],
                       clipping, prepared.quality)


def synthesize(volume: Volume, weights: Weights, source: str, target: str, *, batch_size: int,
               dtype: torch.dtype | None, progress: Callable[[int], None] | None = None,
               qc: bool = False) -> Translation:
    """``volume`` translated to ``target`` with what its sidecar records: the clipping and, with
    ``qc``, the cycle score (a second generator pass, back to ``source``): ``prepare_input``,
    ``run_model`` and ``finish_output`` in a row."""
    prepared = prepare_input(volume, weights.config, source, target, qc)
    run_model(prepared, weights, batch_size=batch_size, dtype=dtype, progress=progress)
    return finish_output(prepared, weights.config)


def translate_volume(volume: Volume, weights: Weights, source: str, target: str, *, batch_size: int = 16,
                     dtype: torch.dtype | None = None,
                     progress: Callable[[int], None] | None = None) -> Volume:
    """``volume`` (stored units of modality ``source``) translated to ``target``, same geometry.

    Runs on the generator's device; ``dtype`` is the autocast dtype (None: fp32); ``progress(n)``
    advances by translated slices. CT outputs are whole HU, MR outputs in [0, reference_high].
    """
    return synthesize(volume, weights, source, target, batch_size=batch_size, dtype=dtype,
                      progress=progress).volume


def _check_options(batch_size: int, num_parts: int, part_id: int) -> None:
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if num_parts < 1:
        raise UsageError(f"--num-parts must be at least 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise UsageError(f"--part-id must be within 0 to {num_parts - 1} for --num-parts {num_parts}, got {part_id}")


def _single_output(input: Path, output: Path, output_format: str) -> Path:
    """The output of one volume: a NIfTI file, or a DICOM series folder (--format dicom, or --format
    auto with a DICOM input and an output not named .nii / .nii.gz)."""
    if output_format == "dicom" or (output_format == "auto" and not is_nifti_file(input)
                                    and not is_nifti_name(output)):
        if is_nifti_name(output):
            raise UsageError("--format dicom writes a folder of DICOM files: name the output without "
                             ".nii / .nii.gz", output)
        return output
    return check_nifti_output(output, "the output of a single volume")


def _batch_output(folder: Path, input: Path, output_format: str) -> Path:
    """A case's output in the output folder: <case>.nii.gz, or a <case> DICOM series folder."""
    dicom = output_format == "dicom" or (output_format == "auto" and not is_nifti_file(input))
    return folder / case_id(input) if dicom else folder / f"{case_id(input)}{OUTPUT_SUFFIX}"


def _plan(input: Path, output: Path, num_parts: int, part_id: int, preview: Path | None,
          output_format: str, series: str | None) -> tuple[list[Path], list[Path]]:
    """(inputs, outputs): one volume to one file or DICOM folder, or this part of a folder's NIfTI
    files and DICOM series subfolders to a folder."""
    if output_format not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got {output_format!r}")
    if not input.exists():
        raise TarganError("not found", input)
    if input.is_file() or is_volume_path(input):
        if num_parts > 1:
            raise UsageError("--num-parts splits a folder of NIfTI files; the input is a single volume", input)
        check_series_option(series, input, single=True)
        return [input], [_single_output(input, output, output_format)]
    if preview is not None:
        raise UsageError("--preview shows one volume; pass a single NIfTI file or DICOM folder with it")
    check_series_option(series, input, single=False)
    selected = folder_cases(input, output)[part_id::num_parts]
    return selected, [_batch_output(output, file, output_format) for file in selected]


def weights_label(weights: Weights) -> str:
    """Where the weights came from, for a derived series' description: repo@commit, or the folder."""
    repo = weights.config.provenance.get("hub_repo")
    return f"{repo}@{_revision(weights)}" if repo else str(weights.folder)


def _revision(weights: Weights) -> str:
    """The Hub commit (or the revision asked for) of weights from the Hub; "local folder" otherwise."""
    provenance = weights.config.provenance
    if provenance.get("hub_repo"):
        return str(provenance.get("hub_commit") or provenance.get("hub_revision") or "main")
    return "local folder"


def run_settings(weights_sha256: str, source: str | None, target: str, precision: str, output_format: str,
                 qc: bool) -> dict:
    """What decides an output's content: a folder run skips outputs whose sidecar records the same."""
    return {"weights": weights_sha256, "--from": source or "auto", "--to": target, "--precision": precision,
            "--format": output_format, "--qc": qc}


@dataclass(frozen=True)
class RunContext:
    """What every output's sidecar records about the run; ``run`` (``run_settings``) decides
    whether an existing output is complete."""

    weights: Weights
    weights_sha256: str
    run: dict
    device: str
    precision: str
    batch_size: int
    command_line: str


def current_command_line() -> str:
    """This process's command line, as a shell would take it back."""
    return shlex.join(["targan", *sys.argv[1:]])


def record(source_path: Path, source: SourceChoice, target: str, translation: Translation,
           context: RunContext) -> dict:
    """The sidecar of one synthetic volume (BIDS-style keys where BIDS has them)."""
    config = context.weights.config
    return {
        "Synthetic": True,
        "Description": (f"Synthetic {target} image translated from a {source.name} image by TarGAN; "
                        "not an acquired image, do not use it for diagnosis"),
        "ImageType": ["DERIVED", "SECONDARY", "SYNTHETIC"],
        "Modality": translation.volume.modality,
        "SourceModality": source.name,
        "SourceModalityChosenBy": source.reason or "--from",
        "TargetModality": target,
        "Sources": [source_path.name],
        "SourceSHA256": sha256_file(source_path),
        "Weights": {"Source": (weights_label(context.weights) if config.provenance.get("hub_repo") else
                               str(context.weights.folder.resolve())), "Revision": _revision(context.weights),
                    "SHA256": context.weights_sha256, "Preset": config.preset or "custom",
                    "ImageSize": config.model.image_size},
        "Device": context.device,
        "Precision": context.precision,
        "BatchSize": context.batch_size,
        "ConversionSoftware": "targan-cli",
        "ConversionSoftwareVersion": __version__,
        "CommandLine": context.command_line,
        "DateTimeUTC": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "Intensity": translation.clipping.to_dict(),
        "QC": translation.quality.to_dict() if translation.quality is not None else "not run (--no-qc)",
        RUN_KEY: context.run,
    }


def _description(record: dict) -> str:
    """A DICOM series' description: what the sidecar says, in one line."""
    quality = record["QC"]
    grade_text = f"QC {quality['Grade']}, cycle score {quality['CycleScore']}" if isinstance(quality, dict) else "no QC"
    weights = record["Weights"]
    return (f"synthetic {record['TargetModality']} from {record['SourceModality']} by targan "
            f"{__version__}, weights {weights['Source']} sha256 {weights['SHA256'][:16]}, preset "
            f"{weights['Preset']}, source {record['Sources'][0]} sha256 {record['SourceSHA256'][:16]}, "
            f"{grade_text}, {record['DateTimeUTC']}")


def write_synthetic(path: Path, translation: Translation, record: dict, weights: Weights,
                    dicom: DicomSeries | None = None, overwrite: bool = False) -> None:
    """A synthetic volume and its sidecar ``record``, NIfTI (descrip and intent_name set) or a DICOM
    series (``dicom``: its source series); the sidecar is in place first (``write_with_sidecar``)."""
    target = record["TargetModality"]
    if is_nifti_name(path):
        detail = f"from {record['SourceModality']}, weights sha256 {record['Weights']['SHA256'][:12]}"

        def write(temporary: Path) -> None:
            save_volume(temporary, translation.volume, descrip=synthetic_descrip(target, __version__, detail),
                        intent_name=synthetic_intent_name(target))

        write_with_sidecar(path, write, record, overwrite=overwrite, kind="volume")
        return
    settings = weights.config.intensity(target)

    def write_series(temporary: Path) -> None:
        save_dicom(temporary, translation.volume, source=dicom, modality=translation.volume.modality or "MR",
                   description=_description(record), window=settings.window if settings.kind == "ct" else None,
                   software=f"targan-cli {__version__}")

    write_with_sidecar(path, write_series, record, overwrite=overwrite, is_dir=True, kind=SERIES_KIND,
                       ours=is_targan_series)


def _preview(path: Path, translation: Translation, source: str, target: str, config: WeightsConfig,
             overwrite: bool) -> Path:
    """Input beside output for the preview slices, each in its modality's one window (CT: the HU
    window; MR: 0 to the weights' reference level), as the caption says; an MR modality without a
    reference level is windowed per image."""

    def window(name: str) -> tuple[float, float] | None:
        settings = config.intensity(name)
        return None if settings.kind == "mr" and settings.reference_high is None else modality_window(settings)

    windows = [window(source), window(target)]
    caption = "; ".join(describe_window(name, config.intensity(name)) if shown is not None else f"{name}: per image"
                        for name, shown in zip((source, target), windows))
    rows = [[image, output] for image, output in zip(translation.input_preview, translation.output_preview)]
    flagged = set(translation.quality.grade.flagged) if translation.quality is not None else set()
    labels = [f"slice {i + 1}/{translation.depth}" + (" QC FLAGGED" if i in flagged else "") for i in translation.shown]
    return save_montage(path, rows, labels,
                        [f"input ({source})", f"output ({target})"], overwrite,
                        column_windows=windows, caption=f"Windows: {caption}")


def _check_outputs(inputs: list[Path], outputs: list[Path], overwrite: bool, folder_run: bool) -> None:
    """Refuse, before any work, outputs and sidecars that may not be written: existing ones need
    ``overwrite``, except, in a folder run, those this tool wrote (their sidecar says so), which the
    run skips or redoes (``output_state``)."""
    for path in outputs:
        ours = RUN_KEY in (read_sidecar(path) or {})
        replace = overwrite or (folder_run and ours)
        if is_nifti_name(path):
            check_writable(path, replace, inputs=inputs, kind="volume")
        else:
            check_series_folder(path, replace, inputs=inputs)
        sidecar = sidecar_path(path)
        if sidecar.exists() and not (overwrite or ours):
            raise TarganError("already exists and targan did not write it; pass --overwrite to replace it", sidecar)
        check_writable(sidecar, True, inputs=inputs, kind="json")


def translate(
    input: str | Path,
    output: str | Path,
    *,
    to: str,
    source: str | None = None,
    weights: str | Path | None = None,
    revision: str | None = None,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 16,
    preview: str | Path | None = None,
    num_parts: int = 1,
    part_id: int = 0,
    overwrite: bool = False,
    output_format: str = "auto",
    series: str | None = None,
    qc: bool | None = None,
    io_workers: int | None = None,
    command_line: str | None = None,
    announce: Callable[[RunPlan], None] | None = None,
    progress: Callable[[int], None] | None = None,
    total_callback: Callable[[int], None] | None = None,
) -> TranslateResult:
    """Translate a NIfTI file, a DICOM series folder or a DICOMDIR to a NIfTI file or a DICOM series
    folder, or a folder of NIfTI files and DICOM series subfolders (part ``part_id`` of
    ``num_parts``: the cases sorted by name ``[part_id::num_parts]``) to a folder of ``<case>.nii.gz``
    or ``<case>`` DICOM folders. ``output_format`` "auto" writes DICOM for a DICOM input (unless the
    output is named .nii / .nii.gz) and NIfTI for a NIfTI input; ``series`` picks one series of a
    DICOM input that holds several. Every output gets a ``<name>.json`` provenance sidecar.

    ``qc`` runs the cycle score (None: on for a single volume, off for a folder); ``source`` None or
    "auto" infers each input's modality. A folder run skips outputs that are complete for the same
    weights and options, and redoes those made otherwise. ``announce(plan)`` is called once before
    any volume is read; ``total_callback(slices)`` once before ``progress(n)`` starts. Every output
    is checked (existing without ``overwrite``, unwritable) before any work.

    A folder streams (``io.pipeline``): ``io_workers`` threads read and decode the next inputs and
    as many write the finished outputs while the model translates (None: the cores available; 0:
    one volume after the other, the same outputs). An error in one input of a folder fails that
    output only (``TranslateResult.failed``); the others go on.
    """
    input, output = Path(input), Path(output)
    source = None if source == "auto" else source
    preview = Path(preview) if preview is not None else None
    _check_options(batch_size, num_parts, part_id)
    io_workers = check_workers(io_workers)
    if preview is not None and preview.suffix.lower() != ".png":
        raise UsageError("the preview is a PNG: its name must end in .png", preview)
    inputs, outputs = _plan(input, output, num_parts, part_id, preview, output_format, series)
    read = [input, *inputs, *weights_inputs(weights)]
    check_apart(output, read)
    folder_run = not (input.is_file() or is_volume_path(input))
    qc = not folder_run if qc is None else qc
    _check_outputs(read, outputs, overwrite, folder_run)
    if preview is not None:
        check_writable(preview, overwrite, inputs=read, kind="png")
    torch_device = pick_device(device)
    dtype = check_precision(precision, torch_device)
    loaded = load_weights(weights, revision, torch_device)
    loaded.config.modality_index(to)
    if source is not None:
        loaded.config.modality_index(source)
    weights_sha256 = sha256_file(loaded.folder / WEIGHTS_FILE)
    run = run_settings(weights_sha256, source, to, precision, output_format, qc)
    states = [output_state(path, run) if folder_run else OutputState("missing") for path in outputs]
    context = RunContext(loaded, weights_sha256, run, str(torch_device), precision, batch_size,
                         command_line if command_line is not None else current_command_line())

    started = time.perf_counter()
    todo = [(path, target, state) for path, target, state in zip(inputs, outputs, states)
            if overwrite or state.kind != "complete"]
    if announce is not None and todo:
        announce(RunPlan(weights_label(loaded), _revision(loaded), loaded.config.preset or "custom",
                         loaded.config.model.image_size, source or "auto", to, str(torch_device), precision, qc,
                         loaded.discriminator is not None))
    # One volume is read first (a DICOM series' depth is known only once read); a folder's
    # depths come from the NIfTI headers, so that the progress total is known up front.
    first = read_input(inputs[0], series) if len(inputs) == 1 and todo else None
    total = (slice_frame(first[0].shape, first[0].affine, first[0].source).canonical_shape[0] if first is not None
             else sum(canonical_depth(path) for path, _, _ in todo))
    if total_callback is not None and todo:  # a part without files shows no (empty) progress
        total_callback(total)
    # Progress counts the input's slices: with QC each is run twice (there and back), half a slice each.
    slice_progress = (lambda n: progress(n / 2)) if qc and progress is not None else progress
    written_preview = None
    notes: list[str] = []
    reports: dict[int, VolumeReport] = {}
    for index, (path, target_path, state) in enumerate(zip(inputs, outputs, states)):
        if state.kind == "complete" and not overwrite:
            recorded = read_sidecar(target_path) or {}
            choice = SourceChoice(str(recorded.get("SourceModality", "?")))
            reports[index] = VolumeReport(target_path, choice, "skipped", "complete, same weights and options")

    # The I/O threads read, choose the source modality and normalize (prepare_input), and map the
    # model's output back (finish_output) and write; the model runs in this thread.
    def read_one(index: int) -> tuple[SourceChoice, Prepared, DicomSeries | None]:
        volume, dicom = first if first is not None else read_input(inputs[index], series)
        choice = infer_source(loaded.config, volume, source, to,
                              lambda candidates: predict_source(loaded, volume, candidates))
        return choice, prepare_input(volume, loaded.config, choice.name, to, qc), dicom

    def model_volumes(key: int, read: tuple) -> list[tuple[Prepared, Weights]]:
        choice, prepared, dicom = read
        if dicom is not None and dicom.skipped_note is not None:
            notes.append(f"{inputs[pending[key]]}: {dicom.skipped_note}")
        return [(prepared, loaded)]

    def write_one(index: int, done: tuple) -> tuple[SourceChoice, Translation]:
        choice, prepared, dicom = done
        translation = finish_output(prepared, loaded.config)
        changed = states[index].kind == "changed"
        write_synthetic(outputs[index], translation, record(inputs[index], choice, to, translation, context), loaded,
                        dicom, overwrite or changed)
        return choice, translation

    pending = [index for index in range(len(inputs)) if index not in reports]
    model = ModelStage(model_volumes, batch_size=batch_size, dtype=dtype, progress=slice_progress)
    for outcome in stream(pending, read_one, model, write_one, workers=io_workers if folder_run else 0,
                          expected=(TarganError,) if folder_run else ()):
        index, state = outcome.item, states[outcome.item]
        if outcome.error is not None:
            reports[index] = VolumeReport(outputs[index], SourceChoice("?"), "failed",
                                          str(outcome.error))
            continue
        choice, translation = outcome.result
        status, note = ("redone", state.reason) if state.kind == "changed" else ("written", "")
        reports[index] = VolumeReport(outputs[index], choice, status, note, translation.depth, translation.quality,
                                      translation.clipping, tuple(translation.clipping.warnings(choice.name, to)))
        if preview is not None:
            written_preview = _preview(preview, translation, choice.name, to, loaded.config, overwrite)
    ordered = [reports[index] for index in range(len(inputs))]
    sources = [report.source for report in ordered]
    translated = sum(report.slices for report in ordered)
    return TranslateResult(tuple(outputs), to, translated, time.perf_counter() - started, str(torch_device),
                           written_preview, tuple(sources), tuple(notes), tuple(ordered))
