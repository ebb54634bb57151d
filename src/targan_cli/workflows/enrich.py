"""`targan enrich`: nnU-Net v2 raw datasets whose extra channels are synthetic modalities.

The paper's Table 2 trains nnU-Net on each modality enriched with its TarGAN translations,
e.g. [CT] -> [CT, synthetic T1w, synthetic T2w]. Here channel 0 of a case is the real image as
it is, channels 1.. its translations, all on the real image's voxel grid with its affine, in
nnU-Net v2's raw layout::

    NNUNET_RAW/Dataset{ID:03d}_{Name}/
        dataset.json                        written last
        imagesTr/<case>_{channel:04d}.nii.gz  cases with a label
        labelsTr/<case>.nii.gz              uint8, 0 background, 1 liver
        imagesTs/<case>_{channel:04d}.nii.gz  cases without one (and a DATA folder's test split)

Runs resume: a case whose files all exist is skipped (every file is written atomically, so an
existing file is complete), provided its synthetic channels are complete by the mechanism of
`targan translate` folder runs: each has a provenance sidecar (``<case>_XXXX.json``, which
nnU-Net ignores) recording the same weights and options and the file's SHA-256
(``io.provenance.output_state``). The settings that shape the files (input modality, channels,
weights) are recorded in ``.targan_enrich.json`` before the first case, so that a later run
adds cases only to a dataset made the same way.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from targan_cli import __version__
from targan_cli.config import IntensitySettings, default_modalities
from targan_cli.core.device import check_precision, pick_device
from targan_cli.data.dataset import IMAGES, SPLITS, open_data_dir
from targan_cli.errors import TarganError, UsageError, counted
from targan_cli.io.atomic import atomic_output, check_apart, local_paths, made_by_targan, mark_folder
from targan_cli.io.pipeline import check_workers, stream
from targan_cli.io.provenance import output_state, sha256_file, sidecar_path
from targan_cli.io.volume import (NIFTI_SUFFIXES, Volume, case_id, list_volumes, read_label, read_volume,
                                  write_volume)
from targan_cli.io.weights import WEIGHTS_FILE, Weights, load_weights, weights_inputs
from targan_cli.workflows.translate import (ModelStage, Prepared, RunContext, SourceChoice, Translation,
                                            current_command_line, finish_output, prepare_input, record, run_settings,
                                            write_synthetic)

FILE_ENDING = ".nii.gz"
DATASET_JSON = "dataset.json"
SETTINGS_FILE = ".targan_enrich.json"
NNUNET_RAW_ENV = "nnUNet_raw"
IMAGES_TR, LABELS_TR, IMAGES_TS = "imagesTr", "labelsTr", "imagesTs"
LABEL_VALUES = {"background": 0, "liver": 1}
# The channel names nnU-Net v2 maps to a normalisation scheme (nnunetv2/preprocessing/
# normalization/map_channel_name_to_normalization.py, compared casefolded since v2.4; older
# spellings included); every other name gets ZScoreNormalization. "CT" selects CTNormalization.
NNUNET_SCHEME_NAMES = ("ct", "nonorm", "zscore", "rescale_to_0_1", "rescale_0_1", "rgb_to_0_1")
REAL_CT_CHANNEL = "CT"
SYNTHETIC_PREFIX = "synthetic_"
TEST_SPLIT = "test"
_DATASET_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(FILE_ENDING) + r"$")
_TEMPORARY = re.compile(r"^\..*\.tmp-")  # atomic_output's temporaries, left behind by a killed run
# Label and image grids may differ by float rounding of the affine (float32 NIfTI headers).
# Geometry tolerances of nnU-Net's check_cases (np.allclose defaults).
_RTOL, _ATOL = 1e-5, 1e-8

Progress = Callable[[int], None]


@dataclass(frozen=True)
class EnrichCase:
    """One input volume and its label (None: the case goes to imagesTs)."""

    case_id: str
    image: Path
    label: Path | None


@dataclass(frozen=True)
class EnrichResult:
    """What a run did; ``training`` and ``test`` count the whole dataset's cases, not just this run's."""

    folder: Path
    channels: tuple[str, ...]  # channel names, index = channel number
    written: tuple[str, ...]  # case ids written by this run
    skipped: tuple[str, ...]  # case ids already complete
    training: int
    test: int
    failed: tuple[tuple[str, str], ...] = ()  # (case id, error) of the cases an error stopped (the run went on)


# ----------------------------------------------------------------------------- names


def _check_dataset_id(dataset_id: int) -> None:
    if isinstance(dataset_id, bool) or not isinstance(dataset_id, int) or not 1 <= dataset_id <= 999:
        raise UsageError(f"--dataset-id must be an integer from 1 to 999 (nnU-Net ids have three digits), "
                         f"got {dataset_id!r}")


def dataset_folder(root: str | Path, dataset_id: int, name: str) -> Path:
    """``root/Dataset{id:03d}_{name}``; a bad id or name is a usage error."""
    _check_dataset_id(dataset_id)
    if not _DATASET_NAME.match(name):
        raise UsageError(f"--name must hold only letters, digits and underscores, got {name!r}")
    return Path(root) / f"Dataset{dataset_id:03d}_{name}"


def default_dataset_name(source: str, single_channel: bool) -> str:
    """``Liver<SOURCE>Enriched``, or ``Liver<SOURCE>`` for the single-channel baseline."""
    letters = re.sub(r"[^A-Za-z0-9]", "", source).upper()
    return f"Liver{letters}" + ("" if single_channel else "Enriched")


def channel_names(source: str, targets: tuple[str, ...], source_is_ct: bool) -> tuple[str, ...]:
    """nnU-Net channel names: the real CT is exactly ``CT`` (CTNormalization), a real MR keeps its
    modality name, synthetic channels are ``synthetic_<modality>``; all but ``CT`` get z-scoring."""
    if source_is_ct:
        real = REAL_CT_CHANNEL
    else:
        real = f"MR_{source}" if source.casefold() in NNUNET_SCHEME_NAMES else source
    return (real, *(f"{SYNTHETIC_PREFIX}{target}" for target in targets))


def _clashing_datasets(root: Path, dataset_id: int, name: str) -> list[Path]:
    """Other datasets with this id in NNUNET_RAW and in nnU-Net's preprocessed and results folders,
    which nnU-Net searches all three of to turn an id into a name."""
    prefix = f"Dataset{dataset_id:03d}_"
    wanted = f"{prefix}{name}"
    roots = [root, *(Path(os.environ[v]) for v in ("nnUNet_preprocessed", "nnUNet_results") if os.environ.get(v))]
    return [entry for folder in roots if folder.is_dir() for entry in sorted(folder.iterdir())
            if entry.is_dir() and entry.name.startswith(prefix) and entry.name != wanted]


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class EnrichInput:
    """The cases of INPUT; a DATA folder also names their modality and its intensity settings."""

    cases: tuple[EnrichCase, ...]
    modality: str | None
    intensity: IntensitySettings | None


def find_cases(input: str | Path, labels: str | Path | None = None) -> EnrichInput:
    """The cases of INPUT: a folder of NIfTI volumes, or a DATA folder's ``<split>/<modality>``.

    In a DATA folder labels come from ``labels/``, except in the test split, whose cases go to
    imagesTs (its labels are the ground truth of the evaluation). ``labels`` (a folder of
    ``<case>.nii.gz``) takes precedence; a case without a label goes to imagesTs.
    """
    input = Path(input)
    if not input.is_dir():
        raise TarganError("not a folder" if input.exists() else "input folder not found", input)
    modality, intensity = None, None
    if (input / IMAGES).is_dir() and input.parent.name in SPLITS:
        data = open_data_dir(input.parent.parent)
        modality, split = input.name, input.parent.name
        intensity = data.spec.modalities[data.spec.modality_names.index(modality)].intensity
        cases = [EnrichCase(case.case_id, case.image, None if split == TEST_SPLIT else case.label)
                 for case in data.cases(split, modality)]
    else:
        cases = [EnrichCase(case_id(path), path, None) for path in list_volumes(input)]
    if not cases:
        raise TarganError("no NIfTI volumes (.nii.gz or .nii) in this folder", input)
    if labels is not None:
        label_files = _label_files(Path(labels))
        cases = [EnrichCase(case.case_id, case.image, label_files.get(case.case_id)) for case in cases]
    return EnrichInput(tuple(cases), modality, intensity)


def _label_files(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        raise TarganError("not a folder" if folder.exists() else "labels folder not found", folder)
    return {case_id(path): path for path in list_volumes(folder)}


# ----------------------------------------------------------------------------- output files


def _split_folder(case: EnrichCase) -> str:
    return IMAGES_TR if case.label is not None else IMAGES_TS


def _case_files(folder: Path, case: EnrichCase, channels: int) -> list[Path]:
    """Every file of a complete case: its channels, then its label for a training case."""
    images = folder / _split_folder(case)
    files = [images / f"{case.case_id}_{channel:04d}{FILE_ENDING}" for channel in range(channels)]
    if case.label is not None:
        files.append(folder / LABELS_TR / f"{case.case_id}{FILE_ENDING}")
    return files


def _files_of_case(folder: Path, case: str) -> list[Path]:
    """A case's image files in ``folder`` (``<case>_XXXX.nii.gz``)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if (match := _CHANNEL_FILE.match(p.name)) is not None and match["case"] == case)


def _other_split_files(folder: Path, case: EnrichCase) -> list[Path]:
    """Files of the same case id in the split it does not belong to now."""
    if case.label is not None:
        return _files_of_case(folder / IMAGES_TS, case.case_id)
    label = folder / LABELS_TR / f"{case.case_id}{FILE_ENDING}"
    return _files_of_case(folder / IMAGES_TR, case.case_id) + ([label] if label.exists() else [])


def _dataset_files(folder: Path) -> list[Path]:
    """The NIfTI files of the dataset's three folders."""
    return [p for sub in (IMAGES_TR, LABELS_TR, IMAGES_TS) if (folder / sub).is_dir()
            for p in sorted((folder / sub).iterdir()) if p.is_file() and p.name.endswith(NIFTI_SUFFIXES)
            and not _TEMPORARY.match(p.name)]


def _remove(paths: list[Path]) -> None:
    for path in paths:
        try:
            path.unlink(missing_ok=True)
        except OSError as error:
            raise TarganError(f"cannot remove: {error.strerror or error}", path) from None


def _remove_temporaries(folder: Path) -> None:
    """Temporaries of a killed run end in .nii.gz too, so nnU-Net would read them as cases."""
    _remove([p for sub in (IMAGES_TR, LABELS_TR, IMAGES_TS) if (folder / sub).is_dir()
             for p in (folder / sub).iterdir() if _TEMPORARY.match(p.name)])


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write atomically, and not at all when the file already holds exactly this."""
    text = json.dumps(data, indent=2) + "\n"
    try:
        if path.read_text(encoding="utf-8") == text:
            return
    except (OSError, UnicodeDecodeError):
        pass
    with atomic_output(path, overwrite=True) as temporary:
        temporary.write_text(text, encoding="utf-8")


def _read_settings(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _describe(settings: dict[str, Any]) -> str:
    names = settings.get("channel_names")
    channels = ", ".join(map(str, names.values())) if isinstance(names, dict) else repr(names)
    sha256 = settings.get("weights_sha256")
    return (f"input {settings.get('source_modality')!r}, channels {channels}, "
            f"weights {'sha256 ' + str(sha256)[:12] if sha256 else 'none'}")


def _made_otherwise(folder: Path, settings: dict[str, Any], overwrite: bool) -> bool:
    """Whether an existing dataset was made with other settings than this run's (then its cases are
    replaced, which needs ``overwrite``); writes nothing."""
    existing = _dataset_files(folder) if folder.is_dir() else []
    recorded = _read_settings(folder / SETTINGS_FILE)
    if not existing or recorded == settings:
        return False
    if recorded is None:  # its cases are never removed, --overwrite or not
        raise TarganError(f"holds case files but no {SETTINGS_FILE}, so it was not made by `targan enrich`; "
                          "choose another --dataset-id", folder)
    if not overwrite:
        raise TarganError(f"was made with other settings ({_describe(recorded)}) than this run "
                          f"({_describe(settings)}); pass --overwrite to replace its cases, or choose another "
                          "--dataset-id", folder)
    return True


def _prepare_folder(folder: Path, settings: dict[str, Any], clear: bool) -> None:
    """Create the dataset's folders and settings file; ``clear`` removes the cases of other settings."""
    if clear:
        files = _dataset_files(folder)
        _remove([*files, *map(sidecar_path, files), folder / DATASET_JSON])
    for sub in (IMAGES_TR, LABELS_TR):
        try:
            (folder / sub).mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise TarganError(f"cannot create: {error.strerror or error}", folder / sub) from None
    _remove_temporaries(folder)
    _write_json(folder / SETTINGS_FILE, settings)
    if not made_by_targan(folder):
        mark_folder(folder, "enrich", "nnU-Net dataset")


# ----------------------------------------------------------------------------- provenance


def _settings(source: str, channels: tuple[str, ...], weights_sha256: str | None) -> dict[str, Any]:
    """What shapes the files of every case: a later run may add cases only with the same settings."""
    return {
        "source_modality": source,
        "channel_names": {str(index): name for index, name in enumerate(channels)},
        "weights_sha256": weights_sha256,
    }


def _dataset_json(name: str, settings: dict[str, Any], targets: tuple[str, ...], weights: Weights | None,
                  weights_source: str | None, num_training: int) -> dict[str, Any]:
    source = settings["source_modality"]
    if weights is None:
        description = f"Liver segmentation on real {source} images only (the single-channel baseline)."
        provenance: dict[str, Any] = {}
    else:
        description = (f"Liver segmentation on real {source} images (channel 0) enriched with TarGAN translations "
                       f"to {', '.join(targets)} (channels 1-{len(targets)}), as in Table 2 of the TarGAN paper.")
        provenance = {"weights": {"source": weights_source, "folder": str(weights.folder),
                                  "sha256": settings["weights_sha256"], "preset": weights.config.preset,
                                  "provenance": weights.config.provenance}}
    return {
        "name": name,
        "description": description,
        "reference": ("Chen et al., TarGAN: Target-Aware Generative Adversarial Networks for Multi-modality "
                      f"Medical Image Translation, MICCAI 2021; written by targan-cli {__version__}"),
        "licence": ("channel 0 and the labels keep the licence of the input data (CHAOS: CC-BY-NC-SA 4.0); "
                    "synthetic channels are derived from channel 0 and carry its terms"),
        "channel_names": settings["channel_names"],
        "labels": dict(LABEL_VALUES),
        "numTraining": num_training,
        "file_ending": FILE_ENDING,
        "targan": {"source_modality": source, "synthetic_modalities": list(targets), **provenance},
    }


# ----------------------------------------------------------------------------- enrich


def _source_modality(source: str | None, layout_modality: str | None) -> str:
    """``--from``, else the DATA folder's modality; the two must agree."""
    if source is not None and layout_modality is not None and source != layout_modality:
        raise UsageError(f"--from {source} contradicts the input folder, which holds {layout_modality} volumes")
    if source is None and layout_modality is None:
        raise UsageError("pass --from with the input's modality (a folder of NIfTI files does not say which)")
    return source if source is not None else layout_modality  # type: ignore[return-value]


def _synthetic_modalities(weights: Weights, source: str, targets: list[str] | None) -> tuple[str, ...]:
    """``--to`` as given, else every modality of the weights but the input's, in the weights' order."""
    weights.config.modality_index(source)
    if not targets:
        return tuple(name for name in weights.config.modality_names if name != source)
    for target in targets:
        weights.config.modality_index(target)
    if source in targets:
        raise UsageError(f"--to {source} is the input modality: channel 0 is the real image")
    if len(set(targets)) != len(targets):
        raise UsageError(f"--to lists a modality twice: {', '.join(targets)}")
    return tuple(targets)


def _source_is_ct(source: str, weights: Weights | None, layout_intensity: IntensitySettings | None) -> bool:
    """The weights' intensity settings say, else the DATA folder's, else the default rule (a name with "ct")."""
    if weights is not None:
        return weights.config.intensity(source).kind == "ct"
    if layout_intensity is not None:
        return layout_intensity.kind == "ct"
    return default_modalities((source,))[0].intensity.kind == "ct"


def nnunet_raw_folder(output: str | Path | None) -> Path:
    """``output``, else ``$nnUNet_raw`` (where nnU-Net looks for raw datasets)."""
    if output is not None:
        return Path(output)
    if os.environ.get(NNUNET_RAW_ENV):
        return Path(os.environ[NNUNET_RAW_ENV])
    raise UsageError(f"pass -o with nnU-Net's raw folder, or set ${NNUNET_RAW_ENV}")


def enrich(
    input: str | Path,
    output: str | Path | None,
    *,
    source: str | None = None,
    weights: str | Path | None = None,
    revision: str | None = None,
    targets: list[str] | None = None,
    single_channel: bool = False,
    dataset_id: int = 501,
    name: str | None = None,
    labels: str | Path | None = None,
    device: str = "auto",
    precision: str = "fp32",
    batch_size: int = 16,
    overwrite: bool = False,
    io_workers: int | None = None,
    total_callback: Callable[[int], None] | None = None,
    progress: Progress | None = None,
) -> EnrichResult:
    """Write (or complete) an nnU-Net v2 raw dataset from INPUT in ``output`` (None: ``$nnUNet_raw``).

    ``weights`` is a weights folder or Hub repo id (None: the default source); ``single_channel``
    writes the real images only and takes no weights. ``total_callback(cases)`` is called once,
    then ``progress(1)`` after each case, written, skipped or failed. The finished dataset is checked
    with ``verify_nnunet_dataset``; any problem is an error.

    The cases stream (``io.pipeline``): ``io_workers`` threads read the next images and labels and as
    many write the finished cases while the model translates (None: the cores available; 0: one case
    after the other, the same files). An error in one case (a label off its image's grid, a blank MR
    volume) fails that case only (``EnrichResult.failed``): nothing of it is written, the others go on.
    When every case to write fails, nothing is written at all, dataset.json included.
    """
    if single_channel and (weights is not None or targets):
        raise UsageError("--single-channel writes the real images only: drop --weights and --to")
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    io_workers = check_workers(io_workers)
    _check_dataset_id(dataset_id)
    output = nnunet_raw_folder(output)
    if name is not None:
        dataset_folder(output, dataset_id, name)  # a bad name fails before the input is read
    found = find_cases(input, labels)
    source = _source_modality(source, found.modality)
    name = name if name is not None else default_dataset_name(source, single_channel)
    folder = dataset_folder(output, dataset_id, name)
    check_apart(folder, [*local_paths(input, labels), *weights_inputs(weights)])
    clashes = _clashing_datasets(output, dataset_id, name)
    if clashes:
        raise TarganError(f"dataset id {dataset_id} is taken by {clashes[0]}; nnU-Net needs unique ids: choose "
                          f"another --dataset-id", folder)

    loaded: Weights | None = None
    dtype: torch.dtype | None = None
    synthetic: tuple[str, ...] = ()
    if not single_channel:
        torch_device = pick_device(device)
        dtype = check_precision(precision, torch_device)
        loaded = load_weights(weights, revision, torch_device)
        synthetic = _synthetic_modalities(loaded, source, targets)
    channels = channel_names(source, synthetic, _source_is_ct(source, loaded, found.intensity))
    weights_sha256 = sha256_file(loaded.folder / WEIGHTS_FILE) if loaded is not None else None
    settings = _settings(source, channels, weights_sha256)
    contexts = [RunContext(loaded, weights_sha256, run_settings(weights_sha256, source, target, precision, "nifti",
                                                                False), str(torch_device), precision,
                           batch_size, current_command_line()) for target in synthetic] if loaded else []
    clear = _made_otherwise(folder, settings, overwrite)
    moves = _split_moves(folder, found.cases, overwrite)
    prepared = False

    def prepare() -> None:
        """Create or clean the dataset folder once, when the first case is ready to be written: an
        input that fails before then leaves no trace in the output."""
        nonlocal prepared
        if not prepared:
            _prepare_folder(folder, settings, clear)
            _remove(moves)
            prepared = True

    if total_callback is not None:
        total_callback(len(found.cases))
    todo, skipped = [], []
    for case in found.cases:
        files = _case_files(folder, case, len(channels))
        if not overwrite and all(path.is_file() for path in files) and all(
                output_state(path, context.run).kind == "complete" for path, context in zip(files[1:], contexts)):
            skipped.append(case.case_id)
            if progress is not None:
                progress(1)
        else:
            todo.append((case, files))

    def read_case(item: tuple[EnrichCase, list[Path]]) -> tuple[Volume, np.ndarray | None, list[Prepared]]:
        """The image and label, and the image normalized once for the model, a copy per channel
        (I/O threads)."""
        case = item[0]
        volume = read_volume(case.image)
        mask = read_label(case.label, volume).array if case.label is not None else None
        inputs: list[Prepared] = []
        for context in contexts:
            target = context.run["--to"]
            inputs.append(replace(inputs[0], target=target, normalized=inputs[0].normalized.copy()) if inputs
                          else prepare_input(volume, context.weights.config, source, target))
        return volume, mask, inputs

    def case_volumes(key: int, read: tuple) -> list[tuple[Prepared, Weights]]:
        """Every channel of a case for the model (this thread); the dataset folder is made ready, once,
        before the first case's files are written."""
        prepare()
        return [(prepared, context.weights) for prepared, context in zip(read[2], contexts)]

    def write_case(item: tuple[EnrichCase, list[Path]], done: tuple) -> None:
        volume, mask, inputs = done
        translations = [finish_output(prepared, context.weights.config) for prepared, context in zip(inputs, contexts)]
        _write_case(*item, volume, mask, translations, source, contexts)

    written, failed = [], []
    model = ModelStage(case_volumes, batch_size=batch_size, dtype=dtype)
    for outcome in stream(todo, read_case, model, write_case, workers=io_workers,
                          expected=(TarganError,)):
        if outcome.error is None:
            written.append(outcome.item[0].case_id)
        else:
            failed.append((outcome.item[0].case_id, str(outcome.error)))
        if progress is not None:
            progress(1)
    if prepared or not failed:  # else every case to write failed: the output stays as it was
        prepare()  # also when every case was complete: removes a killed run's temporaries
        training = len(_identifiers(folder / IMAGES_TR))
        _write_json(folder / DATASET_JSON, _dataset_json(name, settings, synthetic, loaded,
                                                         None if weights is None else str(weights), training))
        problems = verify_nnunet_dataset(folder)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise TarganError(f"fails nnU-Net's dataset checks: {problems[0]}{more}", folder)
    return EnrichResult(folder, channels, tuple(written), tuple(skipped), len(_identifiers(folder / IMAGES_TR)),
                        len(_identifiers(folder / IMAGES_TS)), tuple(failed))


def _split_moves(folder: Path, cases: tuple[EnrichCase, ...], overwrite: bool) -> list[Path]:
    """The files of cases already in the other split (they had a label, now have none, or the
    reverse), to remove with ``overwrite``; without, they are an error before any case is written."""
    moves = []
    for case in cases:
        leftovers = _other_split_files(folder, case)
        if leftovers and not overwrite:
            where = "with a label, in imagesTr" if case.label is None else "without a label, in imagesTs"
            now = "has none" if case.label is None else f"has {case.label}"
            raise TarganError(f"case {case.case_id!r} is already in the dataset {where}, but now {now}; pass "
                              "--overwrite to move it", leftovers[0])
        moves += leftovers
    return moves


def _write_case(case: EnrichCase, files: list[Path], volume: Volume, mask: np.ndarray | None,
                synthetic: list[Translation], source: str, contexts: list[RunContext]) -> None:
    """Write every file of a case: the real image, the synthetic channels with their sidecars, the label.
    A file that cannot be written (a full disk) removes the case's other files: the dataset holds a
    case whole or not at all."""
    choice = SourceChoice(source, f"the input folder or --from ({source})")
    try:
        write_volume(files[0], volume, overwrite=True)
        for path, translation, context in zip(files[1:], synthetic, contexts):
            write_synthetic(path, translation, record(case.image, choice, context.run["--to"], translation, context),
                            context.weights, overwrite=True)
        if mask is not None:
            write_volume(files[-1], volume.with_array(mask), label=True, overwrite=True)
    except TarganError:
        _remove([*files, *(sidecar_path(path) for path in files[1:len(contexts) + 1])])
        raise


# ----------------------------------------------------------------------------- verification


def _identifiers(folder: Path, file_ending: str = FILE_ENDING) -> list[str]:
    """Case ids as nnU-Net derives them: every file name ending in ``file_ending`` minus ``_XXXX`` + ending."""
    if not folder.is_dir():
        return []
    crop = len(file_ending) + 5
    return sorted({p.name[:-crop] for p in folder.iterdir() if p.name.endswith(file_ending)})


def _grid(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine from the header alone."""
    image = nib.load(path)
    return tuple(int(n) for n in image.shape), np.asarray(image.affine, dtype=np.float64)


def _check_images(folder: Path, sub: str, file_ending: str, channels: int,
                  label_values: set[int] | None) -> list[str]:
    """Every case of ``sub`` has channels 0..n-1 (and nothing else), one geometry, and (with
    ``label_values``) a label in labelsTr on that geometry whose values are declared."""
    problems = []
    crop = len(file_ending) + 5  # "_XXXX" + ending: how nnU-Net derives a case id from a file name
    by_case: dict[str, set[str]] = {}
    for path in sorted((folder / sub).iterdir()):
        if path.name.endswith(file_ending):
            by_case.setdefault(path.name[:-crop], set()).add(path.name)
    for case, names in sorted(by_case.items()):
        expected = [f"{case}_{channel:04d}{file_ending}" for channel in range(channels)]
        stray = sorted(n for n in names if not re.fullmatch(re.escape(case) + r"_\d{4}" + re.escape(file_ending), n))
        if stray:
            problems += [f"{sub}/{n} does not end in _XXXX{file_ending}, yet nnU-Net reads it as a case" for n in stray]
            continue
        missing = [n for n in expected if n not in names]
        extra = sorted(names - set(expected))
        if missing:
            problems.append(f"{sub}/{case}: missing channel file(s) {', '.join(missing)}")
        if extra:
            problems.append(f"{sub}/{case}: channel file(s) {', '.join(extra)} beyond the {channels} of dataset.json")
        files = [folder / sub / n for n in expected if n in names]
        label = folder / LABELS_TR / f"{case}{file_ending}" if label_values is not None else None
        if label is not None and not label.is_file():
            problems.append(f"{sub}/{case}: no label {LABELS_TR}/{label.name}")
            label = None
        problems += _check_geometry(folder, files + ([label] if label is not None else []))
        if label is not None:
            problems += _check_label_values(folder, label, label_values)
    return problems


def _check_geometry(folder: Path, files: list[Path]) -> list[str]:
    """Same shape, spacing, origin and direction (here: the whole affine) as the first file."""
    grids = []
    for path in files:
        try:
            grids.append((path, *_grid(path)))
        except Exception as error:  # nibabel raises many types for a damaged file
            return [f"{path.relative_to(folder)}: not a readable NIfTI file ({type(error).__name__})"]
    problems = []
    for path, shape, affine in grids[1:]:
        first, first_shape, first_affine = grids[0]
        if shape != first_shape:
            problems.append(f"{path.relative_to(folder)}: shape {shape} differs from {first.name}'s {first_shape}")
        elif not np.allclose(affine, first_affine, rtol=_RTOL, atol=_ATOL):
            problems.append(f"{path.relative_to(folder)}: spacing, origin or direction (affine) differs from "
                            f"{first.name}'s")
    return problems


def _check_label_values(folder: Path, label: Path, declared: set[int]) -> list[str]:
    try:
        values = np.unique(np.asanyarray(nib.load(label).dataobj))
    except Exception as error:
        return [f"{label.relative_to(folder)}: not a readable NIfTI file ({type(error).__name__})"]
    unexpected = [v for v in values.tolist() if v not in declared]
    if unexpected:
        return [f"{label.relative_to(folder)}: label value(s) {', '.join(f'{v:g}' for v in unexpected)} are not "
                f"declared in dataset.json (which has {', '.join(str(v) for v in sorted(declared))})"]
    return []


def _check_dataset_json(data: dict[str, Any]) -> list[str]:
    problems = []
    missing = [key for key in ("labels", "channel_names", "numTraining", "file_ending") if key not in data]
    if missing:
        return [f"dataset.json lacks the required key(s) {', '.join(missing)}"]
    names = data["channel_names"]
    if not isinstance(names, dict) or not names or sorted(names) != sorted(str(i) for i in range(len(names))):
        problems.append(f"dataset.json channel_names must be keyed \"0\", \"1\", ... without gaps, got {names!r}")
    labels = data["labels"]
    if not isinstance(labels, dict) or any(isinstance(v, bool) or not isinstance(v, int) for v in labels.values()):
        problems.append(f"dataset.json labels must map names to integers, got {labels!r}")
    else:
        if labels.get("background") != 0:
            problems.append("dataset.json labels must declare background as 0")
        values = sorted(v for k, v in labels.items() if k != "ignore")
        if values != list(range(len(values))):
            problems.append(f"dataset.json label values must be consecutive from 0, got {values}")
    if isinstance(data["numTraining"], bool) or not isinstance(data["numTraining"], int):
        problems.append(f"dataset.json numTraining must be an integer, got {data['numTraining']!r}")
    if not isinstance(data["file_ending"], str) or not data["file_ending"].startswith("."):
        problems.append(f"dataset.json file_ending must be like \".nii.gz\", got {data['file_ending']!r}")
    return problems


def verify_nnunet_dataset(folder: str | Path) -> list[str]:
    """The problems nnU-Net v2's ``verify_dataset_integrity`` would find in a raw dataset (empty: none).

    Checks, as nnunetv2/experiment_planning/verify_dataset_integrity.py does, without nnU-Net:
    dataset.json's required keys; imagesTr/ and labelsTr/; numTraining equal to the cases found
    (identifiers derived from file names as nnU-Net does); every case with every ``_XXXX`` channel
    and a label; shape, spacing, origin and direction the same across a case's channels and label;
    label values among the declared ones (consecutive from 0). Beyond nnU-Net: imagesTs cases are
    checked for channels and geometry too, and stray files that nnU-Net would read as cases.
    """
    folder = Path(folder)
    try:
        data = json.loads((folder / DATASET_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return ["no dataset.json"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        return [f"dataset.json is not readable JSON ({error})"]
    if not isinstance(data, dict):
        return ["dataset.json is not a JSON object"]
    problems = _check_dataset_json(data)
    if problems:
        return problems
    missing = [sub for sub in (IMAGES_TR, LABELS_TR) if not (folder / sub).is_dir()]
    if missing:
        return [f"no {sub}/ folder" for sub in missing]
    file_ending = data["file_ending"]
    channels = len(data["channel_names"])
    cases = _identifiers(folder / IMAGES_TR, file_ending)
    if len(cases) != data["numTraining"]:
        problems.append(f"dataset.json numTraining is {data['numTraining']} but imagesTr holds {counted(len(cases), 'case')}")
    declared = {v for k, v in data["labels"].items()}
    problems += _check_images(folder, IMAGES_TR, file_ending, channels, declared)
    if (folder / IMAGES_TS).is_dir():
        problems += _check_images(folder, IMAGES_TS, file_ending, channels, None)
    return problems
