"""`targan demo`: the whole pipeline offline on synthetic phantoms, in minutes on a laptop CPU.

Phantoms -> a short training run of the tiny preset -> translation of a held-out case into every
other modality -> paired metrics (body and liver) of the model and of the trivial baselines
(identity, body mean-fill, histogram-matched source) -> ``report.md``, ``montage.png``, ``metrics.json``, the NIfTI translations and the run folder.
"""

from __future__ import annotations

import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from targan_cli import __version__
from targan_cli.config import WeightsConfig
from targan_cli.core.device import pick_device
from targan_cli.core.training import TrainConfig
from targan_cli.data.dataset import Case, DataDir, open_data_dir
from targan_cli.data.phantom import phantom_steps, write_phantom_dataset
from targan_cli.errors import counted, listed
from targan_cli.io.atomic import atomic_output, check_writable, made_by_targan, mark_folder
from targan_cli.io.montage import describe_window, modality_window, save_montage
from targan_cli.io.report import write_json as write_report
from targan_cli.io.volume import read_volume, to_slices, write_volume
from targan_cli.io.weights import CONFIG_FILE, WEIGHTS_FILE, Weights, load_weights, read_weights_config
from targan_cli.workflows.evaluate import (ORACLE_LABEL, EvaluationResult, beaten_columns, evaluate_models,
                                           generator_model, intensity_oracle, select_rows, trivial_baselines, verdict,
                                           write_json)
from targan_cli.workflows.train import CHECKPOINTS, LAST_CHECKPOINT, TrainProgress, train
from targan_cli.workflows.train import METRICS as METRICS_LOG
from targan_cli.workflows.translate import translate_volume

DATA, RUN, TRANSLATIONS = "data", "run", "translations"
REPORT, MONTAGE, METRICS, SUMMARY = "report.md", "montage.png", "metrics.json", "demo.json"
ORACLE = "oracle.json"  # the intensity oracle's and the baselines' metrics: what a translation can reach
PAIRED_METRICS = ("psnr", "ssim", "mae")
MODEL_LABEL = "TarGAN (demo)"
MONTAGE_SLICES = 2


@dataclass(frozen=True)
class DemoSettings:
    """How big the demo is. The default takes about 6 minutes on 2 CPU cores (docs/demo.md)."""

    cases: int = 8  # 6 left the synthetic CT's body SSIM at the baseline's with 1 CPU thread
    test_cases: int = 2
    size: int = 64
    slices: int | None = None
    image_size: int = 64
    batch_size: int = 8
    steps: int = 1000
    # A run of 1,000 steps instead of the paper's 25,000 needs faster settings (docs/demo.md measures them):
    lr_g: float = 1e-3  # 10x the paper's, for G and S
    lr_d: float = 3e-3  # 10x, the paper's D/G ratio kept
    lambda_rec: float = 10.0  # the paper's 1 leaves translations loosely tied to their inputs this early
    ema_decay: float = 0.995  # the paper's 0.999 averages over about as many steps as the whole run
    lambda_gp: float = 1.0  # the paper's 10 loses 8 columns to the body mean-fill at 1,000 steps, 1 loses 3
    seed: int = 0

    def training_options(self) -> dict[str, float]:
        """The objective's settings the demo sets, by ``train``'s names (its options with - for _),
        in the order the report writes them."""
        return {name: getattr(self, name) for name in ("lr_g", "lr_d", "lambda_rec", "lambda_gp", "ema_decay")}

    def paper_differences(self) -> list[str]:
        """The training settings that differ from the paper's, in words (for the report)."""
        paper = TrainConfig()
        differences = []
        if math.isclose(self.lr_d / self.lr_g, paper.lr_d / paper.lr_g) and self.lr_g != paper.lr_g:
            differences.append(f"learning rates {self.lr_g / paper.lr_g:g} times the paper's ({paper.lr_g:g} for "
                               f"G and S, {paper.lr_d:g} for D; their ratio kept)")
        elif (self.lr_g, self.lr_d) != (paper.lr_g, paper.lr_d):
            differences.append(f"learning rates of {self.lr_g:g} for G and S and {self.lr_d:g} for D instead of "
                               f"{paper.lr_g:g} and {paper.lr_d:g}")
        words = {"lambda_rec": "a cycle weight", "lambda_gp": "a gradient-penalty weight", "ema_decay": "an EMA decay"}
        return differences + [f"{what} of {getattr(self, name):g} instead of {getattr(paper, name):g}"
                              for name, what in words.items() if getattr(self, name) != getattr(paper, name)]


FULL = DemoSettings()
QUICK = DemoSettings(cases=2, test_cases=1, size=32, slices=6, image_size=32, batch_size=4, steps=4)


@dataclass(frozen=True)
class DemoProgress:
    """A progress event: ``stage`` (a short description), steps ``done`` out of ``total``."""

    stage: str
    done: int
    total: int | None


@dataclass(frozen=True)
class DemoResult:
    out: Path
    report: Path
    montage: Path
    metrics: Path
    run_dir: Path
    weights: Path
    translations: tuple[Path, ...]
    evaluation: EvaluationResult
    beats: dict[str, dict[str, bool]]  # baseline -> column label -> the model's mean is better there
    out_of_reach: dict[str, tuple[str, ...]]  # baseline -> columns the intensity oracle does not win either
    verdict: str  # the sentence computed from the table
    seconds: float
    device: str
    quick: bool

    @property
    def beats_every_baseline(self) -> bool:
        return all(all(columns.values()) for columns in self.beats.values())


def _translate_case(weights: Weights, case: Case, folder: Path, device_batch: int) -> dict[str, Path]:
    """The held-out case in every other modality, written beside its name; target -> path."""
    volume = read_volume(case.image)
    outputs = {}
    for target in weights.config.modality_names:
        if target == case.modality:
            continue
        synthetic = translate_volume(volume, weights, case.modality, target, batch_size=device_batch)
        path = folder / f"{case.case_id}_{case.modality}_to_{target}.nii.gz"
        write_volume(path, synthetic, overwrite=True)
        outputs[target] = path
    return outputs


def _canonical(path: Path) -> np.ndarray:
    return to_slices(read_volume(path))[0]


def montage_caption(config: WeightsConfig) -> str:
    """What the montage's grey levels mean: one window per modality, in every column."""
    windows = "; ".join(describe_window(spec.name, spec.intensity) for spec in config.modalities)
    return f"One window per modality in every column ({windows})"


def _montage(path: Path, cases: list[Case], translations: dict[str, dict[str, Path]], data: DataDir,
             config: WeightsConfig) -> Path:
    """Rows: a few slices of the held-out case in each source modality. Columns: the input, then
    for every modality the translation into it and the paired truth. Every image is shown in its
    modality's window (``modality_window``), the input's too."""
    names = data.spec.modality_names
    columns = ["input"] + [label for name in names for label in (f"synthetic {name}", f"true {name}")]
    windows = {spec.name: modality_window(spec.intensity) for spec in config.modalities}
    rows, labels, cell_windows = [], [], []
    for case in cases:
        source = _canonical(case.image)
        images = {name: (_canonical(translations[case.modality][name]) if name != case.modality else None,
                         _canonical(case.paired[name]) if name != case.modality else source)
                  for name in names}
        picks = np.unique(np.linspace(0, source.shape[0] - 1, MONTAGE_SLICES + 2)[1:-1].round().astype(int))
        for index in picks:
            row = [source[index]]
            for name in names:
                synthetic, truth = images[name]
                empty = np.full_like(source[index], windows[name][0])  # no translation into the input's modality
                row += [synthetic[index] if synthetic is not None else empty, truth[index]]
            rows.append(row)
            cell_windows.append([windows[case.modality]] + [windows[name] for name in names for _ in range(2)])
            labels.append(f"{case.modality} slice {index + 1}/{source.shape[0]}")
    return save_montage(path, rows, labels, columns, overwrite=True, cell_windows=cell_windows, tile_size=128,
                        caption=montage_caption(config))


def _cell(summary) -> str:
    """"mean [low, high]" with three decimals (the bootstrap 95 % interval of the mean), as in
    metrics.json, whose values are not rounded."""
    if summary is None or summary.count == 0:
        return "n/a"
    if math.isnan(summary.low):
        return f"{summary.mean:.3f}"
    return f"{summary.mean:.3f} [{summary.low:.3f}, {summary.high:.3f}]"


def _results_table(evaluation: EvaluationResult) -> list[str]:
    """The markdown table: a row per metric column, a column per model and baseline, then n."""
    lines = [f"| metric | {' | '.join(evaluation.models)} | n |", "|---" * (len(evaluation.models) + 2) + "|"]
    for index, column in enumerate(evaluation.columns):
        cells = [_cell(summaries[index]) for summaries in evaluation.summaries]
        lines.append(f"| {column.label} | {' | '.join(cells)} | {evaluation.column_count(index)} |")
    return lines


def _files(result: DemoResult, out: Path) -> list[str]:
    """The Files section: only what this run wrote, each named by its path under ``out``."""
    relative = lambda path: path.relative_to(out).as_posix()  # noqa: E731
    entries = [(result.montage, "for a few slices, the input, every translation and the paired truth"),
               (result.metrics, "the metrics table and every per-volume value"),
               (out / ORACLE, "the same metrics of the best intensity mapping fitted on the paired truth (an "
                              "oracle) and of the baselines: the columns no voxel-by-voxel translation wins"),
               (out / SUMMARY, "the settings, the run time and, per baseline and column, whether the model beat it"),
               (out / DATA / "dataset.json", "the phantom dataset's description (`data/`: train and test volumes)"),
               (result.run_dir / CHECKPOINTS / LAST_CHECKPOINT, "the training checkpoint (resume state)"),
               (result.run_dir / METRICS_LOG, "every logged loss term"),
               (result.weights / WEIGHTS_FILE, "the exported EMA generator, a weights folder with "
                                              f"`{relative(result.weights / CONFIG_FILE)}`")]
    lines = [f"- `{relative(path)}`: {what}" for path, what in entries]
    lines.append(f"- `{TRANSLATIONS}/`: " + ", ".join(f"`{relative(path)}`" for path in result.translations))
    return lines


def reach_sentence(result: DemoResult) -> str:
    """The sentence on the columns the model loses that no voxel-by-voxel translation wins (from the
    oracle's numbers); empty when the model loses none."""
    lost = {baseline: [column for column, won in columns.items() if not won]
            for baseline, columns in result.beats.items()}
    beyond = {baseline: [column for column in columns if column in result.out_of_reach.get(baseline, ())]
              for baseline, columns in lost.items()}
    if not any(lost.values()):
        return ""
    parts = [f"{', '.join(columns)} to the {baseline}" for baseline, columns in beyond.items() if columns]
    if not parts:
        return ("The best intensity mapping fitted on the paired truth itself (an oracle, not a model) wins "
                "every column the model loses: all of them are within reach of a translation.")
    return ("Even the best intensity mapping fitted on the paired truth itself (an oracle that sees the answer) "
            f"loses {'; '.join(parts)}: no voxel-by-voxel translation of the input wins "
            f"{'that column' if sum(map(len, beyond.values())) == 1 else 'those columns'} on these phantoms.")


def _report(result: DemoResult, settings: DemoSettings, out: Path) -> str:
    relative = lambda path: path.relative_to(out).as_posix()  # noqa: E731
    kind = ("a `--quick` smoke run: tiny data and a few steps, to check the install; the model has had no time "
            "to learn, so its numbers say only that every stage ran") if result.quick else "the default run"
    if result.beats_every_baseline:
        standing = "It beats every trivial baseline in every column."
    elif result.quick:
        standing = "A run of a few steps is not expected to beat them: run `targan demo` without --quick."
    else:
        standing = ("Where a baseline is as good or better, either the model has not learned to beat it in this "
                    "run or no translation can (the oracle below tells which); docs/demo.md shows how longer runs "
                    "fare in those columns.")
    options = " ".join(f"--{name.replace('_', '-')} {value:g}" for name, value in settings.training_options().items())
    return f"""# targan-cli demo

targan-cli {__version__}, {time.strftime('%Y-%m-%d %H:%M')}, {result.seconds:.0f} s on {result.device}
({platform.processor() or platform.machine()}); {kind}.

## What was done
1. `targan data phantom`: {counted(settings.cases, 'training case')} per modality (a different random anatomy
   for each modality, like CHAOS) and {counted(settings.test_cases, 'held-out test case')} rendered in every
   modality, {settings.size} x {settings.size} voxels in-plane, in `{DATA}/`.
2. `targan train --preset tiny --image-size {settings.image_size} --batch-size {settings.batch_size}
   --max-steps {settings.steps} {options}`: the full TarGAN objective
   for {counted(settings.steps, 'step')} on the {result.device.upper() if result.device != 'cpu' else 'CPU'},
   in `{RUN}/`; the EMA generator is in
   `{relative(result.weights)}/`. Settings that differ from the paper's, because this run has
   {counted(settings.steps, 'step')} where the paper's has about 25,000: {listed(settings.paper_differences())}.
3. `targan translate`: the first held-out case of every modality into every other modality, in
   `{TRANSLATIONS}/` (same shape and affine as each input).
4. `targan evaluate --metric psnr --metric ssim --metric mae`: every held-out case against its
   paired truth, over the body and inside the liver, in the target's normalized range [-1, 1], for
   the model and three trivial baselines: the input itself (identity), the input's body filled with
   the target modality's mean body intensity (body mean-fill), and the input's body intensities
   matched to the target modality's histogram (histogram-matched source); both from the training
   volumes.
5. The same metrics of an oracle, in `{ORACLE}`: the best intensity mapping, each input intensity
   mapped to the mean of the paired truth's body voxels of that intensity, fitted on the volume it
   is scored on. It sees the answer: a column it loses to a baseline, no voxel-by-voxel translation
   of the input wins.

## Results
Each cell is the mean over the held-out volumes and, in brackets, its bootstrap 95 % interval
(from two volumes on); n is the number of volumes per cell. Higher is better for PSNR and SSIM,
lower for MAE.

{chr(10).join(_results_table(result.evaluation))}

{' '.join(filter(None, (result.verdict, standing, reach_sentence(result))))} Every per-volume value is in
`{relative(result.metrics)}`.

![montage]({relative(result.montage)})

{montage_caption(read_weights_config(result.weights))}.

## How far this is from a real model
These are synthetic phantoms and a {settings.steps}-step run of a network with about half a million
parameters. A model for real scans is the `paper` preset (33.75 M generator parameters,
256 x 256) trained for 50 epochs on CHAOS (about 25,000 steps), which needs a GPU: see the README.
The paper reports such a model by FID and S-score, not by paired metrics: CHAOS has no paired
scans.

## Files
{chr(10).join(_files(result, out))}
"""


def demo_summary(result: DemoResult, settings: DemoSettings | None = None) -> dict:
    """demo.json (and `targan demo --json`): the settings, the run time, the verdict and, per
    baseline and column, whether the model beat it; the paths written."""
    settings = settings or (QUICK if result.quick else FULL)
    return {"seconds": result.seconds, "device": result.device, "quick": result.quick, "settings": settings.__dict__,
            "verdict": result.verdict, "beats_every_baseline": result.beats_every_baseline, "beats": result.beats,
            "out_of_reach": {baseline: list(columns) for baseline, columns in result.out_of_reach.items()},
            "files": {"report": str(result.report), "montage": str(result.montage), "metrics": str(result.metrics),
                      "weights": str(result.weights)}}


def run_demo(out: str | Path = "targan-demo", *, device: str = "auto", quick: bool = False,
             overwrite: bool = False, progress: Callable[[DemoProgress], None] | None = None) -> DemoResult:
    """Run the demo into ``out`` (refused when it exists, unless ``overwrite``)."""
    settings = QUICK if quick else FULL
    out = check_writable(out, overwrite, is_dir=True, kind="demo folder")  # --overwrite replaces only a demo
    check_writable(out / REPORT, overwrite=True)
    report = progress or (lambda event: None)
    started = time.perf_counter()
    torch_device = pick_device(device)

    total = phantom_steps(settings.cases, settings.test_cases)
    done = 0

    def phantom_progress(n: int) -> None:
        nonlocal done
        done += n
        report(DemoProgress("Writing phantoms", done, total))

    write_phantom_dataset(out / DATA, cases=settings.cases, size=settings.size, slices=settings.slices,
                          seed=settings.seed, test_cases=settings.test_cases, overwrite=True,
                          progress=phantom_progress)
    if not made_by_targan(out):
        mark_folder(out, "demo", "demo folder")
    data = open_data_dir(out / DATA)

    def train_progress(event: TrainProgress) -> None:
        if event.phase == "notice":  # the demo's run is short and its settings fixed
            return
        stage = "Training" if event.phase == "train" else "Preparing slices"
        report(DemoProgress(stage, event.done, event.total))

    trained = train(out / DATA, out / RUN, epochs=10_000, preset="tiny", image_size=settings.image_size,
                    batch_size=settings.batch_size, max_steps=settings.steps, device=str(torch_device),
                    seed=settings.seed, log_every=10, sample_every=0, overwrite=True, progress=train_progress,
                    **settings.training_options())
    weights = load_weights(trained.export_dir, device=torch_device)

    cases = [data.cases("test", name)[0] for name in data.spec.modality_names]
    (out / TRANSLATIONS).mkdir(exist_ok=True)
    translations = {}
    for index, case in enumerate(cases):
        report(DemoProgress("Translating", index, len(cases)))
        translations[case.modality] = _translate_case(weights, case, out / TRANSLATIONS, settings.batch_size)
    report(DemoProgress("Translating", len(cases), len(cases)))

    evaluated = {"done": 0, "total": None}

    def evaluation_total(value: int) -> None:
        evaluated["total"] = value
        report(DemoProgress("Evaluating", 0, value))

    def evaluation_progress(n: int) -> None:
        evaluated["done"] += n
        report(DemoProgress("Evaluating", evaluated["done"], evaluated["total"]))

    baselines, _ = trivial_baselines(data, weights.config.modalities, settings.image_size)
    oracle = intensity_oracle(weights.config.modalities, settings.image_size)
    everything = evaluate_models(data, [generator_model(weights, MODEL_LABEL, settings.batch_size), *baselines,
                                        oracle], PAIRED_METRICS, split="test", device=torch_device,
                                 batch_size=settings.batch_size, progress=evaluation_progress,
                                 total_callback=evaluation_total)
    labels = [baseline.label for baseline in baselines]
    evaluation = select_rows(everything, [MODEL_LABEL, *labels])
    # What no voxel-by-voxel translation can win: the columns the intensity oracle (fitted on the
    # paired truth itself) loses to each baseline.
    ceiling = select_rows(everything, [ORACLE_LABEL, *labels])
    out_of_reach = {baseline.label: tuple(column for column, won in
                                          beaten_columns(ceiling, ORACLE_LABEL, baseline.label).items() if not won)
                    for baseline in baselines}
    write_json(evaluation, out / METRICS, overwrite=True)
    write_json(ceiling, out / ORACLE, overwrite=True)
    montage = _montage(out / MONTAGE, cases, translations, data, weights.config)
    result = DemoResult(
        out=out, report=out / REPORT, montage=montage, metrics=out / METRICS, run_dir=trained.run_dir,
        weights=trained.export_dir,
        translations=tuple(path for outputs in translations.values() for path in outputs.values()),
        evaluation=evaluation,
        beats={baseline.label: beaten_columns(evaluation, MODEL_LABEL, baseline.label) for baseline in baselines},
        out_of_reach=out_of_reach,
        verdict=verdict(evaluation, MODEL_LABEL), seconds=time.perf_counter() - started, device=str(torch_device),
        quick=quick)
    with atomic_output(out / REPORT, overwrite=True) as temporary:
        temporary.write_text(_report(result, settings, out), encoding="utf-8")
    write_report(demo_summary(result, settings), out / SUMMARY, overwrite=True)
    return result
