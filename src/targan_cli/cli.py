"""The `targan` command: parse options, call one library function, render the result with Rich.

Heavy imports (torch and everything that needs it) happen inside the command bodies, so that
`targan --help` is instant and importing this module does not import torch.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from targan_cli import __version__
from targan_cli.errors import TarganError

app = typer.Typer(
    name="targan",
    help="Target-aware multi-modality medical image translation (TarGAN) for whole CT and MR volumes.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
data_app = typer.Typer(help="Create and import datasets (phantoms, CHAOS).", no_args_is_help=True)
app.add_typer(data_app, name="data")

# Options shared by several commands, defined once.
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace existing outputs.")]
WeightsOpt = Annotated[Optional[str], typer.Option(
    "--weights", "-w", help="Weights folder, model.safetensors file, or Hub repo id org/name\\[@revision]. "
                            "Default: $TARGAN_WEIGHTS, then the built-in repo (weights/README.md).")]
RevisionOpt = Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="fp32, bf16 or fp16 (autocast; bf16/fp16 need a GPU).")]
IoWorkersOpt = Annotated[Optional[int], typer.Option(
    "--io-workers", help="Threads that read and write a folder's volumes while the model runs "
                         "(default: the cores available, at most 8; 0: one volume after the other).")]
SeriesOpt = Annotated[Optional[str], typer.Option(
    "--series", help="The SeriesInstanceUID (or a unique prefix) of the series to use, when the DICOM input "
                     "holds several.")]
JsonOpt = Annotated[Optional[Path], typer.Option(
    "--json", help="Also write the summary as JSON to this file; '-' prints the JSON on stdout instead of the table.")]
STDOUT = Path("-")


def _check_json(path: Path | None, overwrite: bool, inputs: list[str | Path] = ()) -> None:
    """Refuse, before any work, a --json file that may not be written (over an input, over a file
    of another kind)."""
    if path is not None and path != STDOUT:
        from targan_cli.io.atomic import check_writable, local_paths

        check_writable(path, overwrite, inputs=local_paths(*inputs), kind="json")


def _write_json(data: object, path: Path | None, overwrite: bool) -> None:
    """``data`` as JSON: on stdout for '-', else to the file, atomically (strict JSON: nan is null)."""
    from targan_cli.console import console, strong
    from targan_cli.io.report import json_text, write_json

    if path == STDOUT:
        console.out(json_text(data), end="", highlight=False)
    elif path is not None:
        write_json(data, path, overwrite)
        console.print(f"Wrote {strong(path)}")


def _exit_if_failed(errors: list[str], total: int, noun: str, output: Path) -> None:
    """Exit with code 1 after a folder run in which ``errors`` (one per failed input, shown above)
    stopped some of its ``total`` inputs; the line itself tells the first. (A full disk does not
    come here: it stops the run with its own line.)"""
    from targan_cli.console import counted

    if errors:
        which = f": {errors[0]}" if len(errors) == 1 else f" (see above), the first: {errors[0]}"
        others = "; the others were written" if len(errors) < total else ""
        raise TarganError(f"{counted(len(errors), noun)} of {total} failed{which}{others}", output)


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (``timeout``, ``kill``, a batch scheduler, a closed terminal), raised like
    Ctrl-C so that every ``finally`` and temporary-file cleanup runs before the process exits."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


# While a command runs, these raise ``Terminated`` (SIGHUP does not exist on Windows).
TERMINATION_SIGNALS = (signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else []))


def handles_errors(function: Callable) -> Callable:
    """Set up the process for fast CPU math, then run the command; turn TarganError into one line
    on stderr and its exit code, running out of memory into one line and exit code 1, Ctrl-C into
    exit code 130, SIGTERM and SIGHUP into 128 + the signal's number, each after the command's
    temporary outputs are removed. An OS error no command turned into a TarganError (a file or
    folder it may not read) is one line naming the path. Path options are not checked by Click
    (``readable=False``): a usage box would not name the problem as the commands do."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        # Idle OpenMP threads sleep instead of spinning: with spinning, a second busy process on
        # the same cores made training steps 20-100x slower here. Set before torch loads OpenMP.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        from targan_cli.console import print_error
        from targan_cli.core.device import configure_process
        from targan_cli.process import handling_signals

        configure_process()  # before torch starts its threads
        try:
            with handling_signals(TERMINATION_SIGNALS, _raise_terminated):
                return function(*args, **kwargs)
        except TarganError as error:
            print_error(str(error))
            raise typer.Exit(error.exit_code) from None
        except MemoryError as error:
            detail = f" ({error})" if str(error) else ""
            print_error(f"out of memory{detail}; use smaller inputs, a smaller --batch-size or a machine "
                        "with more memory")
            raise typer.Exit(1) from None
        except OSError as error:  # a path the command could not read or search (permissions), named
            where = f"{error.filename}: " if error.filename else ""
            print_error(f"{where}{error.strerror or error}")
            raise typer.Exit(1) from None
        except Terminated as stop:
            print_error(f"terminated by {signal.Signals(stop.signum).name}")
            raise typer.Exit(128 + stop.signum) from None
        except KeyboardInterrupt:
            print_error("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"targan-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Target-aware multi-modality medical image translation (TarGAN) for whole CT and MR volumes."""


@app.command()
@handles_errors
def convert(
    checkpoint: Annotated[Path, typer.Argument(readable=False, help="Official TarGAN generator state dict (netG_*.pkl or EMA netG_use_*.pkl).")],
    output: Annotated[Path, typer.Option("--output", "-o", readable=False, help="Weights folder to write.")],
    overwrite: OverwriteOpt = False,
) -> None:
    """Convert an official TarGAN generator checkpoint into a weights folder (loaded with weights_only=True)."""
    from targan_cli.console import console, strong
    from targan_cli.workflows.convert import convert_official

    result = convert_official(checkpoint, output, overwrite=overwrite)
    console.print(f"Wrote {strong(result.folder)} ({result.parameters:,} parameters, "
                  f"modalities {', '.join(result.modalities)})")


@app.command()
@handles_errors
def info(
    weights: Annotated[str, typer.Argument(
        help="Weights folder, model.safetensors, or Hub repo id; or a volume (NIfTI file, DICOM folder).")],
    revision: RevisionOpt = None,
    json_out: JsonOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Show a weights folder's config: modalities, preset, sizes, parameter count, provenance; or, for a
    volume (NIfTI file, DICOM folder), how it was made when targan made it."""
    from targan_cli.console import console, key_value_table, print_table
    from targan_cli.workflows.convert import describe_volume, describe_weights

    _check_json(json_out, overwrite, inputs=[weights])
    volume = describe_volume(weights)
    if volume is not None:
        title, rows = volume
        if json_out != STDOUT:
            console.print(key_value_table(title, rows) if rows else f"{title}: no provenance", highlight=False)
        _write_json(rows, json_out, overwrite)
        return
    rows = describe_weights(weights, revision)
    if json_out != STDOUT:
        print_table(key_value_table(f"Weights {weights}", rows))
    _write_json(rows, json_out, overwrite)


@app.command()
@handles_errors
def translate(
    input: Annotated[Path, typer.Argument(readable=False,
        help="A NIfTI file, a DICOM series folder or DICOMDIR, or a folder of NIfTI files and DICOM series folders.")],
    to: Annotated[str, typer.Option("--to", help="Target modality, a name from the weights (e.g. ct, t1w, t2w).")],
    output: Annotated[Path, typer.Option(
        "--output", "-o", readable=False, help="The output NIfTI file (.nii.gz) or DICOM series folder, or a folder for a folder input.")],
    source: Annotated[Optional[str], typer.Option(
        "--from", help="The input's modality, or auto (the default): the modality check of the weights' "
                       "discriminator when they have one, else the DICOM Modality tag, or the weights' only "
                       "modality other than --to.")] = None,
    weights: WeightsOpt = None,
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Slices per generator batch.")] = 16,
    preview: Annotated[Optional[Path], typer.Option(
        "--preview", readable=False, help="Also write a PNG of 4 slices, input beside output (single volumes).")] = None,
    num_parts: Annotated[int, typer.Option("--num-parts", help="Split a folder input into this many parts.")] = 1,
    part_id: Annotated[int, typer.Option(
        "--part-id", help="The part to run: the sorted files \\[part_id::num_parts].")] = 0,
    overwrite: OverwriteOpt = False,
    output_format: Annotated[str, typer.Option(
        "--format", help="Output format: dicom, nifti, or auto (DICOM for a DICOM input unless -o ends in "
                         ".nii / .nii.gz; NIfTI for a NIfTI input).")] = "auto",
    series: SeriesOpt = None,
    qc: Annotated[Optional[bool], typer.Option(
        "--qc/--no-qc", help="Quality control: translate back and score the cycle (one extra pass). Default: "
                             "on for a single volume, off for a folder.")] = None,
    io_workers: IoWorkersOpt = None,
) -> None:
    """Translate whole volumes into another modality; the output keeps the input's geometry."""
    from rich.markup import escape

    from targan_cli.console import console, counted, print_warning, progress_bar, strong, translate_table
    from targan_cli.workflows.translate import translate as translate_volumes

    def announce(plan) -> None:
        console.print(f"Weights {escape(plan.weights)} (revision {escape(plan.revision)}), preset {escape(plan.preset)} "
                      f"{plan.image_size}x{plan.image_size}: {escape(plan.source)} -> {escape(plan.target)} on "
                      f"{plan.device} ({plan.precision}), QC {'on' if plan.qc else 'off'}"
                      f"{'' if plan.modality_check or not plan.qc else ' (modality check unavailable)'}",
                      highlight=False)

    with progress_bar("Translating", total=None, unit="slices") as advance:
        result = translate_volumes(
            input, output, to=to, source=source, weights=weights, revision=revision, device=device,
            precision=precision, batch_size=batch_size, preview=preview, num_parts=num_parts,
            part_id=part_id, overwrite=overwrite, output_format=output_format, series=series, qc=qc,
            io_workers=io_workers, announce=announce, progress=advance, total_callback=lambda total: advance(0, total=total))
    for note in result.notes:
        console.print(escape(note), highlight=False)
    if not result.outputs:
        console.print(f"Part {part_id} of {num_parts} holds none of the files of {strong(input)}: nothing to translate")
        return
    written = (str(result.outputs[0]) if len(result.outputs) == 1 else
               f"{counted(len(result.outputs) - len(result.failed), 'volume')} to {output}")
    sources = ", ".join(dict.fromkeys(choice.name for choice in result.sources))
    console.print(f"Wrote {strong(written)} ({escape(sources)} → {escape(result.target)}): {counted(result.slices, 'slice')} "
                  f"in {result.seconds:.1f} s, {result.slices_per_second:.1f} slices/s on {result.device}")
    for choice in dict.fromkeys(choice for choice in result.sources if choice.doubt is not None):
        print_warning(choice.doubt)
    for choice in dict.fromkeys(choice for choice in result.sources if choice.reason is not None):
        console.print(f"--from {escape(choice.name)} was inferred: {escape(choice.reason)}; pass --from to choose",
                      highlight=False)
    if result.preview is not None:
        console.print(f"Preview {strong(result.preview)}")
    console.print(translate_table(result.volumes))
    for report in result.volumes:
        for line in report.warnings:
            print_warning(f"{report.output}: {line}")
        if report.quality is not None and report.quality.grade.grade != "ok":
            print_warning(f"{report.output}: QC {report.quality.grade.grade}: {'; '.join(report.quality.grade.reasons)}")
    _exit_if_failed([report.note for report in result.failed], len(result.volumes), "volume", output)


@app.command()
@handles_errors
def enrich(
    input: Annotated[Path, typer.Argument(
        readable=False, help="Folder of NIfTI volumes of one modality, or a DATA folder's <split>/<modality> (labels found there).")],
    source: Annotated[Optional[str], typer.Option(
        "--from", help="The input's modality (default: the DATA folder's modality folder name).")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", readable=False, help="nnU-Net's raw folder (default: $nnUNet_raw).")] = None,
    weights: WeightsOpt = None,
    revision: RevisionOpt = None,
    dataset_id: Annotated[int, typer.Option("--dataset-id", help="nnU-Net dataset id, 1 to 999.")] = 501,
    name: Annotated[Optional[str], typer.Option(
        "--name", help="Dataset name (letters, digits, _). Default: Liver<FROM>Enriched, or Liver<FROM>.")] = None,
    labels: Annotated[Optional[Path], typer.Option(
        "--labels", readable=False, help="Folder of <case>.nii.gz liver masks; cases without one go to imagesTs.")] = None,
    targets: Annotated[Optional[list[str]], typer.Option(
        "--to", help="A synthetic modality to add (repeat; default: every other modality of the weights).")] = None,
    single_channel: Annotated[bool, typer.Option(
        "--single-channel", help="The baseline: real images only, no synthetic channels, no weights.")] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Slices per generator batch.")] = 16,
    overwrite: OverwriteOpt = False,
    io_workers: IoWorkersOpt = None,
) -> None:
    """Write an nnU-Net v2 raw dataset: the real image as channel 0, its translations as channels 1.. (resumable)."""
    from rich.markup import escape

    from targan_cli.console import console, counted, progress_bar, strong
    from targan_cli.workflows.enrich import enrich as enrich_dataset

    with progress_bar("Enriching", total=None, unit="cases") as advance:
        result = enrich_dataset(
            input, output, source=source, weights=weights, revision=revision, targets=targets,
            single_channel=single_channel, dataset_id=dataset_id, name=name, labels=labels, device=device,
            precision=precision, batch_size=batch_size, overwrite=overwrite, io_workers=io_workers, progress=advance,
            total_callback=lambda total: advance(0, total=total))
    for case, error in result.failed:
        console.print(f"case {escape(case)} failed: {escape(error)}", highlight=False)
    if result.written or result.skipped:
        console.print(f"Wrote {strong(result.folder)}: channels {', '.join(result.channels)}; "
                      f"{counted(len(result.written), 'case')} written, {len(result.skipped)} already complete; "
                      f"{counted(result.training, 'training case')}, {result.test} in imagesTs")
    _exit_if_failed([error for _, error in result.failed], len(result.written) + len(result.failed), "case",
                    result.folder)


@app.command()
@handles_errors
def train(
    data: Annotated[Path, typer.Option("--data", readable=False, help="DATA folder (from `targan data phantom` or `targan data import-chaos`).")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", readable=False, help="Run folder. Default: runs/<data folder name>.")] = None,
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training slices.")] = 50,
    preset: Annotated[str, typer.Option("--preset", help="Network size: paper (official), small or tiny.")] = "paper",
    image_size: Annotated[Optional[int], typer.Option("--image-size", help="Slice size. Default: the preset's (paper 256).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Slices per step (per process under torchrun).")] = 4,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", help="Stop after this many steps in all.")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from checkpoints/last.pt.")] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the weights, data order and augmentation.")] = 0,
    workers: Annotated[int, typer.Option("--workers", help="Data-loading worker processes.")] = 0,
    shape_controller: Annotated[bool, typer.Option("--shape-controller/--no-shape-controller", help="Ablation: without S.", rich_help_panel="Ablations")] = True,
    target_stream: Annotated[bool, typer.Option("--target-stream/--no-target-stream", help="Ablation: without T (and C).", rich_help_panel="Ablations")] = True,
    crossing_loss: Annotated[bool, typer.Option("--crossing-loss/--no-crossing-loss", help="Ablation: without C.", rich_help_panel="Ablations")] = True,
    official_mask: Annotated[bool, typer.Option("--official-mask", help="Shape loss against the official body mask: every pixel above the background (no speckle removal, no hole filling).")] = False,
    lambda_gp: Annotated[float, typer.Option(help="Weight of the gradient penalty.", rich_help_panel="Loss weights")] = 10.0,
    lambda_rcls: Annotated[float, typer.Option(help="Weight of D's classification of real slices.", rich_help_panel="Loss weights")] = 1.0,
    lambda_fcls: Annotated[float, typer.Option(help="Weight of G's classification loss (translations as their target).", rich_help_panel="Loss weights")] = 1.0,
    lambda_rec: Annotated[float, typer.Option(help="Weight of the cycle reconstruction loss.", rich_help_panel="Loss weights")] = 1.0,
    lambda_cross: Annotated[float, typer.Option(help="Weight of the crossing loss.", rich_help_panel="Loss weights")] = 50.0,
    lambda_u: Annotated[float, typer.Option(help="Weight of the untraceable constraint (D classifies fakes by their source).", rich_help_panel="Loss weights")] = 0.01,
    lambda_shape: Annotated[float, typer.Option(help="Weight of the shape-controller loss.", rich_help_panel="Loss weights")] = 1.0,
    lr_g: Annotated[float, typer.Option("--lr-g", help="Adam learning rate of G and S.", rich_help_panel="Loss weights")] = 1e-4,
    lr_d: Annotated[float, typer.Option("--lr-d", help="Adam learning rate of D_x and D_r.", rich_help_panel="Loss weights")] = 3e-4,
    ema_decay: Annotated[float, typer.Option("--ema-decay", help="Decay of the generator's moving average (the exported, "
                                             "EMA generator); lower it for runs of a few hundred steps.",
                                             rich_help_panel="Loss weights")] = 0.999,
    checkpoint_every: Annotated[Optional[int], typer.Option("--checkpoint-every", help="Also checkpoint every N steps. Default: each epoch.")] = None,
    keep: Annotated[int, typer.Option("--keep", help="Checkpoints to keep: last.pt and the N - 1 before it (step_N.pt); "
                                                     "--resume falls back to those when last.pt is damaged.")] = 1,
    log_every: Annotated[int, typer.Option("--log-every", help="Log the losses every N steps.")] = 10,
    sample_every: Annotated[int, typer.Option("--sample-every", help="Write samples/epoch_N.png every N epochs (0: never).")] = 1,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the generator and shape controller.")] = False,
    overwrite: OverwriteOpt = False,
) -> None:
    """Train TarGAN on a DATA folder (resumable; one GPU, the CPU, or DDP under torchrun); export the EMA generator."""
    import shlex
    import sys

    from rich.markup import escape

    from targan_cli.console import console, counted, file_size, format_value, print_warning, progress_bar, strong
    from targan_cli.workflows.train import TrainProgress, is_main_process
    from targan_cli.workflows.train import train as run_training

    run_dir = out if out is not None else Path("runs") / data.resolve().name
    options = dict(
        epochs=epochs, preset=preset, image_size=image_size, batch_size=batch_size, max_steps=max_steps,
        resume=resume, device=device, precision=precision, seed=seed, workers=workers,
        shape_controller=shape_controller, target_stream=target_stream, crossing_loss=crossing_loss,
        official_mask=official_mask, lambda_gp=lambda_gp, lambda_rcls=lambda_rcls, lambda_fcls=lambda_fcls, lambda_rec=lambda_rec,
        lambda_cross=lambda_cross, lambda_u=lambda_u, lambda_shape=lambda_shape, lr_g=lr_g, lr_d=lr_d, ema_decay=ema_decay,
        checkpoint_every=checkpoint_every, log_every=log_every, sample_every=sample_every, compile=compile,
        keep=keep, overwrite=overwrite)
    if not is_main_process():  # ranks > 0 of a torchrun launch: rank 0 reports
        run_training(data, run_dir, **options)
        return
    with progress_bar("Preparing slices", total=None) as advance:
        def report(event: TrainProgress) -> None:
            if event.phase == "notice":
                if event.warning:
                    print_warning(event.message)
                else:
                    console.print(escape(event.message), highlight=False)
                return
            fields: dict = {"total": event.total, "completed": event.done}
            if event.phase == "train":
                fields["description"] = f"Epoch {event.epoch}/{event.epochs}"
                if event.losses:
                    fields["status"] = (f"D {format_value(event.losses['d_total'])}  "
                                        f"G {format_value(event.losses['g_total'])}  "
                                        f"{event.steps_per_second or 0:.2f} steps/s")
            advance(0, **fields)

        result = run_training(data, run_dir, progress=report, **options)
    if result.interrupted:
        command = ["targan", *[arg for arg in sys.argv[1:] if arg not in ("--overwrite", "--resume")], "--resume"]
        print_warning(f"stopped at step {result.steps}; checkpoint saved to {result.checkpoint} "
                      f"({file_size(result.checkpoint.stat().st_size)}); exported weights in {result.export_dir}")
        console.print(f"Resume with: {strong(shlex.join(command))}")
        raise typer.Exit(130)
    console.print(f"Trained {counted(result.steps, 'step')} ({counted(result.epochs_completed, 'epoch')}) in "
                  f"{strong(result.run_dir)}")
    console.print(f"EMA generator exported to {strong(result.export_dir)}")
    example = shlex.join(["targan", "translate", "INPUT.nii.gz", "-o", "OUTPUT.nii.gz", "--from",
                          result.modalities[0], "--to", result.modalities[-1], "--weights", str(result.export_dir)])
    console.print(f"Translate with: {strong(example)} (modalities: {escape(', '.join(result.modalities))})")


@app.command()
@handles_errors
def evaluate(
    metric: Annotated[list[str], typer.Option(
        "--metric", "-m", help="fid, sscore, psnr, ssim, mae (with --data, --weights) or dice, ravd (with --pred, "
                               "--truth); repeat or separate with commas.")],
    data: Annotated[Optional[Path], typer.Option("--data", readable=False, help="DATA folder whose test split is translated.")] = None,
    weights: Annotated[Optional[list[str]], typer.Option(
        "--weights", "-w", help="Weights folder or Hub repo id; repeat to compare models side by side. "
                                "Default: $TARGAN_WEIGHTS, then the built-in repo.")] = None,
    segmenters: Annotated[Optional[Path], typer.Option(
        "--segmenters", readable=False, help="sscore: folder with one segmenter per modality, DIR/<modality>/ "
                             "(targan train-segmenter).")] = None,
    fid_features: Annotated[Optional[Path], typer.Option(
        "--fid-features", readable=False, help="fid: module mapping (N, 1, H, W) slices in [-1, 1] to (N, D) features: "
                               "a torch.export program FILE.pt2 (dynamic batch) or a TorchScript file. "
                               "Default: Inception-v3 (needs torch-fidelity).")] = None,
    inception_weights: Annotated[Optional[Path], typer.Option(
        "--inception-weights", readable=False, help="fid: local Inception-v3 FID weights file (offline use).")] = None,
    pred: Annotated[Optional[list[Path]], typer.Option(
        "--pred", readable=False, help="dice, ravd: folder of predicted masks <case>.nii.gz; repeat to compare.")] = None,
    truth: Annotated[Optional[Path], typer.Option("--truth", readable=False, help="dice, ravd: folder of ground-truth masks.")] = None,
    split: Annotated[str, typer.Option("--split", help="Dataset split to evaluate: test or train.")] = "test",
    baselines: Annotated[bool, typer.Option(
        "--baselines/--no-baselines", help="With translation metrics, also score the trivial baselines (identity, "
                                           "body mean-fill, histogram-matched source) and say which the models beat.")] = True,
    json_out: Annotated[Optional[Path], typer.Option(
        "--json", readable=False, help="Write every value and the settings as JSON; '-' prints it on stdout instead of the table.")] = None,
    csv_out: Annotated[Optional[Path], typer.Option("--csv", readable=False, help="Write every per-volume value as CSV.")] = None,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Slices per generator batch.")] = 16,
    overwrite: OverwriteOpt = False,
) -> None:
    """Evaluate translations (the paper's Table 1: FID, S-score; paired PSNR/SSIM/MAE) or segmentations (Table 2)."""
    from rich.markup import escape

    from targan_cli.console import console, evaluation_table, print_table, progress_bar, strong
    from targan_cli.workflows.evaluate import evaluate as run_evaluation
    from targan_cli.workflows.evaluate import BASELINE_LABELS, result_to_dict, verdict

    to_stdout = json_out == STDOUT
    with progress_bar("Evaluating", total=None, unit="volumes", quiet=to_stdout) as advance:
        result = run_evaluation(
            metric, data=data, weights=weights or (), segmenters=segmenters, fid_features=fid_features,
            inception_weights=inception_weights, predictions=pred or (), truth=truth, split=split, device=device,
            batch_size=batch_size, baselines=baselines, json_out=None if to_stdout else json_out, csv_out=csv_out,
            overwrite=overwrite,
            progress=advance, total_callback=lambda total: advance(0, total=total))
    if to_stdout:
        _write_json(result_to_dict(result), STDOUT, overwrite)
        return
    print_table(evaluation_table(result))
    if any(label in BASELINE_LABELS for label in result.models):
        for model in (label for label in result.models if label not in BASELINE_LABELS):
            console.print(escape(verdict(result, model)), highlight=False)
    for note in result.notes:
        console.print(f"note: {escape(note)}", highlight=False)
    for path in (json_out, csv_out):
        if path is not None:
            console.print(f"Wrote {strong(path)}")


@app.command("train-segmenter")
@handles_errors
def train_segmenter(
    data: Annotated[Path, typer.Option("--data", readable=False, help="DATA folder; the labelled training cases of --modality are used.")],
    modality: Annotated[str, typer.Option("--modality", help="The modality to segment, a name from the dataset.")],
    out: Annotated[Path, typer.Option("--out", "-o", readable=False, help="Segmenter folder to write (e.g. segmenters/<modality>).")],
    epochs: Annotated[int, typer.Option("--epochs", help="Passes over the training slices.")] = 20,
    image_size: Annotated[Optional[int], typer.Option(
        "--image-size", help="Slice size the U-Net works at. Default: the training volumes' in-plane "
                             "size, at most 256.")] = None,
    width: Annotated[int, typer.Option("--width", help="Channels of the first U-Net block; doubles per level.")] = 16,
    depth: Annotated[int, typer.Option("--depth", help="U-Net levels.")] = 5,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Slices per step.")] = 8,
    learning_rate: Annotated[float, typer.Option("--lr", help="Adam learning rate.")] = 3e-3,
    device: DeviceOpt = "auto",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the weights and data order.")] = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Train a 2D U-Net liver segmenter on real slices of one modality (for the S-score)."""
    from targan_cli.console import console, counted, progress_bar, strong
    from targan_cli.workflows.segment import LOSS_NAME
    from targan_cli.workflows.segment import train_segmenter as run_training

    with progress_bar(f"Training the {modality} segmenter", total=None, unit="steps") as advance:
        result = run_training(data, modality, out, epochs=epochs, image_size=image_size, width=width, depth=depth,
                              batch_size=batch_size, learning_rate=learning_rate, device=device, seed=seed,
                              overwrite=overwrite, progress=advance,
                              total_callback=lambda total: advance(0, total=total))
    console.print(f"Wrote {strong(result.folder)} ({result.modality}: {counted(result.train_cases, 'case')}, "
                  f"{counted(result.train_slices, 'slice')}, {result.seconds:.1f} s on {result.device})")
    console.print(f"{LOSS_NAME} (the optimised objective) of the final weights on the "
                  f"{counted(result.train_slices, 'training slice')}: {result.final_loss:.4f}")
    if result.test_dice is not None:
        console.print(f"Dice on {counted(result.test_cases, 'real test volume')}: {result.test_dice:.2f} %")


@app.command()
@handles_errors
def segment(
    input: Annotated[Path, typer.Argument(readable=False,
        help="A NIfTI file or a DICOM series folder, or a folder of NIfTI files and DICOM series folders.")],
    output: Annotated[Path, typer.Option("--output", "-o", readable=False,
        help="The liver mask to write (.nii.gz, uint8), or a folder of <case>.nii.gz masks for a folder input.")],
    segmenter: Annotated[Path, typer.Option("--segmenter", readable=False, help="Segmenter folder (targan train-segmenter).")],
    source: Annotated[Optional[str], typer.Option(
        "--from", help="The input's modality; must be the segmenter's. Default: trust the segmenter.")] = None,
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Slices per batch.")] = 16,
    overwrite: OverwriteOpt = False,
    io_workers: IoWorkersOpt = None,
    series: SeriesOpt = None,
) -> None:
    """Segment the liver of a volume (or a folder of volumes) with a trained segmenter; a mask keeps its volume's geometry."""
    from targan_cli.console import console, counted, format_value, metric_table, print_table, progress_bar, strong
    from targan_cli.workflows.segment import segment as run_segment

    with progress_bar("Segmenting", total=None, unit="volumes") as advance:
        result = run_segment(input, output, segmenter=segmenter, source=source, device=device, batch_size=batch_size,
                             overwrite=overwrite, io_workers=io_workers, series=series, progress=advance,
                             total_callback=lambda total: advance(0, total=total))
    timing = f"{result.seconds:.1f} s on {result.device}"
    if result.masks[0].output == result.output:  # one volume
        mask = result.masks[0]
        console.print(f"Wrote {strong(result.output)} ({result.modality} liver: {mask.liver_voxels:,} voxels, "
                      f"{mask.liver_ml:.1f} mL, {timing})")
        return
    print_table(metric_table("Masks", ["done", "liver voxels", "liver mL"], [
        (mask.output.name, [f"failed ({mask.note})", "-", "-"] if mask.status == "failed" else
         [mask.status, f"{mask.liver_voxels:,}", format_value(mask.liver_ml, 1)]) for mask in result.masks]))
    written = f"{counted(len(result.masks) - len(result.failed), 'mask')} to {output}"
    console.print(f"Wrote {strong(written)} ({result.modality} liver, {timing})")
    _exit_if_failed([mask.note for mask in result.failed], len(result.masks), "volume", output)


@app.command()
@handles_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", readable=False, help="Folder for everything the demo writes.")] = Path("targan-demo"),
    device: DeviceOpt = "auto",
    quick: Annotated[bool, typer.Option("--quick", help="A seconds-long smoke run (tiny data, a few steps).")] = False,
    json_out: JsonOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Run the whole pipeline offline on synthetic phantoms: data, training, translation, evaluation, report."""
    from rich.markup import escape

    from targan_cli.console import console, evaluation_table, print_table, progress_bar, strong
    from targan_cli.workflows.demo import DemoProgress, demo_summary, reach_sentence, run_demo

    _check_json(json_out, overwrite)
    with progress_bar("Demo", total=None, quiet=json_out == STDOUT) as advance:
        def report(event: DemoProgress) -> None:
            advance(0, description=event.stage, total=event.total, completed=event.done)

        result = run_demo(out, device=device, quick=quick, overwrite=overwrite, progress=report)
    if json_out == STDOUT:
        _write_json(demo_summary(result), STDOUT, overwrite)
        return
    print_table(evaluation_table(result.evaluation))
    if quick:
        console.print("A --quick smoke run: the install works; the model had no time to learn.")
    console.print(escape(result.verdict), highlight=False)
    reach = reach_sentence(result)
    if reach:
        console.print(escape(reach), highlight=False)
    console.print(f"Report   {strong(result.report)}")
    console.print(f"Montage  {strong(result.montage)}")
    console.print(f"Metrics  {strong(result.metrics)}")
    console.print(f"Weights  {strong(result.weights)}  ({result.seconds:.0f} s on {result.device})")
    _write_json(demo_summary(result), json_out, overwrite)


@data_app.command("phantom")
@handles_errors
def data_phantom(
    out: Annotated[Path, typer.Argument(readable=False, help="Folder to write the phantom dataset into.")],
    cases: Annotated[int, typer.Option(help="Training cases per modality (each a different anatomy).")] = 6,
    test_cases: Annotated[int, typer.Option(help="Test cases, rendered in every modality (paired/).")] = 2,
    size: Annotated[int, typer.Option(help="In-plane size in voxels (field of view about 380 mm).")] = 64,
    slices: Annotated[Optional[int], typer.Option(help="Slices per volume (default: from the modality's slice thickness).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed writes the same data.")] = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Write synthetic abdominal phantoms (CT, T1w, T2w, liver labels) in the DATA layout."""
    from targan_cli.console import console, counted, progress_bar, strong
    from targan_cli.data.phantom import phantom_steps, write_phantom_dataset

    with progress_bar("phantoms", phantom_steps(cases, test_cases), "volumes") as advance:
        summary = write_phantom_dataset(out, cases=cases, size=size, slices=slices, seed=seed,
                                        test_cases=test_cases, overwrite=overwrite, progress=advance)
    console.print(f"Wrote {strong(summary.root)}: {counted(summary.files, 'NIfTI file')}, modalities "
                  f"{', '.join(summary.modalities)}, {counted(len(summary.test_cases), 'paired test case')}")


@data_app.command("import-chaos")
@handles_errors
def data_import_chaos(
    chaos_dir: Annotated[Path, typer.Argument(readable=False, help="The unzipped CHAOS 2019 training archive (holding Train_Sets, or Train_Sets itself).")],
    out: Annotated[Path, typer.Argument(readable=False, help="Folder to write the dataset into (DATA layout).")],
    test_fraction: Annotated[float, typer.Option(help="Fraction of patients per modality kept for testing.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the split by patient.")] = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Import CHAOS 2019 (CT, T1 in-phase, T2-SPIR, liver masks) into the DATA layout, split by patient."""
    from targan_cli.console import console, counted, progress_bar, strong
    from targan_cli.data.chaos import find_chaos_series, import_chaos

    with progress_bar("CHAOS", len(find_chaos_series(chaos_dir)), "series") as advance:
        summary = import_chaos(chaos_dir, out, test_fraction=test_fraction, seed=seed,
                               overwrite=overwrite, progress=advance)
    console.print(f"Wrote {strong(summary.out)}: {counted(summary.volumes, 'volume')}, {counted(summary.slices, 'slice')}")
    console.print("The CHAOS data are licensed CC-BY-NC-SA 4.0.")


def main() -> None:
    app()
