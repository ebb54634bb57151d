"""`targan translate`: whole volumes of one modality into another, geometry kept.

Pipeline per volume: read -> canonical slices -> normalize with the source modality's intensity
settings -> generator (batched) -> denormalize with the target's (HU rounded to integers) ->
back to the file's voxel order -> written with the input's affine and header (NIfTI), or as a
derived DICOM series on the input's grid (``io.dicom.write_dicom``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from targan_cli import __version__
from targan_cli.config import WeightsConfig
from targan_cli.core.device import check_precision, pick_device
from targan_cli.core.inference import generator_device, translate_slices
from targan_cli.core.intensity import denormalize, guess_kind, normalize
from targan_cli.errors import TarganError, UsageError
from targan_cli.io.atomic import check_apart, check_writable, local_paths
from targan_cli.io.dicom import DicomSeries, check_series_folder, dicom_series_folders, read_dicom, write_dicom
from targan_cli.io.montage import describe_window, modality_window, save_montage
from targan_cli.io.volume import (NIFTI_SUFFIXES, Volume, canonical_depth, case_id, check_nifti_output, from_slices,
                                  is_volume_path, list_volumes, read_volume, slice_frame, to_slices, write_volume)
from targan_cli.io.weights import Weights, load_weights

OUTPUT_SUFFIX = ".nii.gz"
FORMATS = ("auto", "dicom", "nifti")
PREVIEW_SLICES = 4


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

    @property
    def slices_per_second(self) -> float:
        return self.slices / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Translation:
    """One translated volume and the few canonical slices a preview shows."""

    volume: Volume
    shown: list[int]  # indices of the preview slices along Z
    depth: int
    input_preview: np.ndarray  # (len(shown), H, W) stored units
    output_preview: np.ndarray  # (len(shown), H, W) target units


def _modalities(config: WeightsConfig) -> str:
    return ", ".join(config.modality_names)


@dataclass(frozen=True)
class SourceChoice:
    """The input's modality name, and why when ``--from`` did not give it (shown to the user)."""

    name: str
    reason: str | None = None  # None: given with --from
    doubt: str | None = None  # --from names a modality of another kind than the input looks like


def infer_source(config: WeightsConfig, volume: Volume, source: str | None, target: str) -> SourceChoice:
    """The input's modality: ``source`` (--from) if given; else the weights' only modality of the
    input's kind (CT or MR: the DICOM Modality tag, or for NIfTI the values: Hounsfield units are
    CT, non-negative values MR), leaving ``target`` out when that decides it; else the weights'
    only modality other than ``target``. Otherwise a usage error listing the names. A DICOM
    series of another modality (PT, US...) needs --from.
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


def _translate(volume: Volume, weights: Weights, source: str, target: str, *, batch_size: int,
               dtype: torch.dtype | None, progress: Callable[[int], None] | None) -> _Translation:
    config = weights.config
    target_settings = config.intensity(target)
    slices, frame = to_slices(volume)  # (Z, H, W) stored units
    shown = _preview_indices(slices.shape[0])
    input_preview = slices[shown]
    try:
        normalized = normalize(slices, config.intensity(source))
    except TarganError as error:  # e.g. a blank MR volume: name the file
        raise TarganError(error.message, error.path or volume.source, error.exit_code) from None
    # Only one volume-sized float array lives while the generator runs: the slices are dropped
    # and the output overwrites the normalized input batch by batch.
    del slices
    translate_slices(weights.generator, normalized, config.modality_index(target), batch_size=batch_size,
                     device=generator_device(weights.generator), dtype=dtype, progress=progress,
                     out=normalized)
    output = denormalize(normalized, target_settings)  # (Z, H, W) target units
    del normalized
    if target_settings.kind == "ct":
        np.rint(output, out=output)  # whole HU, so the file is int16 like a scanner's
    modality = "CT" if target_settings.kind == "ct" else "MR"
    translated = Volume(from_slices(output, frame), volume.affine.copy(), volume.header, modality, volume.source)
    return _Translation(translated, shown, len(output), input_preview, output[shown])


def translate_volume(volume: Volume, weights: Weights, source: str, target: str, *, batch_size: int = 16,
                     dtype: torch.dtype | None = None,
                     progress: Callable[[int], None] | None = None) -> Volume:
    """``volume`` (stored units of modality ``source``) translated to ``target``, same geometry.

    Runs on the generator's device; ``dtype`` is the autocast dtype (None: fp32); ``progress(n)``
    advances by translated slices. CT outputs are whole HU, MR outputs in [0, reference_high].
    """
    return _translate(volume, weights, source, target, batch_size=batch_size, dtype=dtype,
                      progress=progress).volume


def _check_options(batch_size: int, num_parts: int, part_id: int) -> None:
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    if num_parts < 1:
        raise UsageError(f"--num-parts must be at least 1, got {num_parts}")
    if not 0 <= part_id < num_parts:
        raise UsageError(f"--part-id must be within 0 to {num_parts - 1} for --num-parts {num_parts}, got {part_id}")


def _is_nifti_name(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _is_nifti_input(path: Path) -> bool:
    return path.is_file() and _is_nifti_name(path)


def _single_output(input: Path, output: Path, output_format: str) -> Path:
    """The output of one volume: a NIfTI file, or a DICOM series folder (--format dicom, or --format
    auto with a DICOM input and an output not named .nii / .nii.gz)."""
    if output_format == "dicom" or (output_format == "auto" and not _is_nifti_input(input)
                                    and not _is_nifti_name(output)):
        if _is_nifti_name(output):
            raise UsageError("--format dicom writes a folder of DICOM files: name the output without "
                             ".nii / .nii.gz", output)
        return output
    return check_nifti_output(output, "the output of a single volume")


def _batch_output(folder: Path, input: Path, output_format: str) -> Path:
    """A case's output in the output folder: <case>.nii.gz, or a <case> DICOM series folder."""
    dicom = output_format == "dicom" or (output_format == "auto" and not _is_nifti_input(input))
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
        if series is not None and _is_nifti_input(input):
            raise UsageError("--series picks a series of a DICOM input; this is a NIfTI file", input)
        return [input], [_single_output(input, output, output_format)]
    if preview is not None:
        raise UsageError("--preview shows one volume; pass a single NIfTI file or DICOM folder with it")
    if series is not None:
        raise UsageError("--series picks a series of one DICOM input; this folder holds several cases", input)
    files = sorted([*list_volumes(input), *dicom_series_folders(input)], key=lambda path: path.name)
    if not files:
        raise TarganError("no NIfTI (.nii / .nii.gz) files or DICOM series subfolders in this folder, and no "
                          "DICOM files directly in it", input)
    seen: dict[str, Path] = {}
    for file in files:
        if case_id(file) in seen:
            raise TarganError(f"case {case_id(file)!r} is both {seen[case_id(file)].name} and {file.name}; "
                              "keep one", input)
        seen[case_id(file)] = file
    if output.exists() and not output.is_dir():
        raise TarganError("the input is a folder, so the output must be a folder, but this is a file", output)
    selected = files[part_id::num_parts]
    return selected, [_batch_output(output, file, output_format) for file in selected]


def _read(path: Path, series: str | None) -> tuple[Volume, DicomSeries | None]:
    """A NIfTI file's volume, or a DICOM input's volume with its series (for a DICOM output)."""
    if _is_nifti_input(path):
        return read_volume(path), None
    dicom = read_dicom(path, series)
    return dicom.volume, dicom


def weights_label(weights: Weights) -> str:
    """Where the weights came from, for a derived series' description: repo@commit, or the folder."""
    provenance = weights.config.provenance
    if provenance.get("hub_repo"):
        revision = provenance.get("hub_commit") or provenance.get("hub_revision") or "main"
        return f"{provenance['hub_repo']}@{revision}"
    return str(weights.folder)


def _write(path: Path, translation: _Translation, dicom: DicomSeries | None, source: str, target: str,
           weights: Weights, overwrite: bool) -> None:
    if _is_nifti_name(path):
        write_volume(path, translation.volume, overwrite=overwrite)
        return
    settings = weights.config.intensity(target)
    description = f"synthetic {target} from {source} by targan {__version__}, weights {weights_label(weights)}"
    write_dicom(path, translation.volume, source=dicom, modality=translation.volume.modality or "MR",
                description=description, window=settings.window if settings.kind == "ct" else None,
                software=f"targan-cli {__version__}", overwrite=overwrite)


def _preview(path: Path, translation: _Translation, source: str, target: str, config: WeightsConfig,
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
    return save_montage(path, rows, [f"slice {i + 1}/{translation.depth}" for i in translation.shown],
                        [f"input ({source})", f"output ({target})"], overwrite,
                        column_windows=windows, caption=f"Windows: {caption}")


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
    progress: Callable[[int], None] | None = None,
    total_callback: Callable[[int], None] | None = None,
) -> TranslateResult:
    """Translate a NIfTI file, a DICOM series folder or a DICOMDIR to a NIfTI file or a DICOM series
    folder, or a folder of NIfTI files and DICOM series subfolders (part ``part_id`` of
    ``num_parts``: the cases sorted by name ``[part_id::num_parts]``) to a folder of ``<case>.nii.gz``
    or ``<case>`` DICOM folders. ``output_format`` "auto" writes DICOM for a DICOM input (unless the
    output is named .nii / .nii.gz) and NIfTI for a NIfTI input; ``series`` picks one series of a
    DICOM input that holds several. ``total_callback(slices)`` is called once before ``progress(n)``
    starts. Every output is checked (existing without ``overwrite``, unwritable) before any work.
    """
    input, output = Path(input), Path(output)
    preview = Path(preview) if preview is not None else None
    _check_options(batch_size, num_parts, part_id)
    if preview is not None and preview.suffix.lower() != ".png":
        raise UsageError("the preview is a PNG: its name must end in .png", preview)
    inputs, outputs = _plan(input, output, num_parts, part_id, preview, output_format, series)
    read = [input, *inputs, *local_paths(weights)]
    check_apart(output, read)
    for path in outputs:
        if _is_nifti_name(path):
            check_writable(path, overwrite, inputs=read, kind="volume")
        else:
            check_series_folder(path, overwrite, inputs=read)
    if preview is not None:
        check_writable(preview, overwrite, inputs=read, kind="png")
    torch_device = pick_device(device)
    dtype = check_precision(precision, torch_device)
    loaded = load_weights(weights, revision, torch_device)
    loaded.config.modality_index(to)
    if source is not None:
        loaded.config.modality_index(source)

    started = time.perf_counter()
    # One volume is read first (a DICOM series' depth is known only once read); a folder's
    # depths come from the NIfTI headers, so that the progress total is known up front.
    first = _read(inputs[0], series) if len(inputs) == 1 else None
    total = (slice_frame(first[0].shape, first[0].affine, first[0].source).canonical_shape[0] if first is not None
             else sum(canonical_depth(path) for path in inputs))
    if total_callback is not None and inputs:  # a part without files shows no (empty) progress
        total_callback(total)
    written_preview = None
    sources: list[SourceChoice] = []
    notes: list[str] = []
    for path, target_path in zip(inputs, outputs):
        volume, dicom = first if first is not None else _read(path, series)
        if dicom is not None and dicom.skipped_note is not None:
            notes.append(f"{path}: {dicom.skipped_note}")
        choice = infer_source(loaded.config, volume, source, to)
        sources.append(choice)
        source_name = choice.name
        translation = _translate(volume, loaded, source_name, to, batch_size=batch_size, dtype=dtype,
                                 progress=progress)
        _write(target_path, translation, dicom, source_name, to, loaded, overwrite)
        if preview is not None:
            written_preview = _preview(preview, translation, source_name, to, loaded.config, overwrite)
    return TranslateResult(tuple(outputs), to, total, time.perf_counter() - started, str(torch_device),
                           written_preview, tuple(sources), tuple(notes))
