"""The `targan` command: parse options, call one library function, render the result with Rich.

Heavy imports (torch and everything that needs it) happen inside the command bodies, so that
`targan --help` is instant and importing this module does not import torch.
"""

from __future__ import annotations

import functools
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
    "--weights", "-w", help="Weights folder, model.safetensors file, or Hub repo id org/name[@revision]. "
                            "Default: $TARGAN_WEIGHTS, then the built-in repo (weights/README.md).")]
RevisionOpt = Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="fp32, bf16 or fp16 (autocast; bf16/fp16 need a GPU).")]


def handles_errors(function: Callable) -> Callable:
    """Turn TarganError into one line on stderr and its exit code; Ctrl-C into exit code 130."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        from targan_cli.console import print_error

        try:
            return function(*args, **kwargs)
        except TarganError as error:
            print_error(str(error))
            raise typer.Exit(error.exit_code) from None
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
    checkpoint: Annotated[Path, typer.Argument(help="Official TarGAN generator state dict (netG_*.pkl or EMA netG_use_*.pkl).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Weights folder to write.")],
    overwrite: OverwriteOpt = False,
) -> None:
    """Convert an official TarGAN generator checkpoint into a weights folder (loaded with weights_only=True)."""
    from targan_cli.console import console
    from targan_cli.workflows.convert import convert_official

    result = convert_official(checkpoint, output, overwrite=overwrite)
    console.print(f"Wrote [bold]{result.folder}[/] ({result.parameters:,} parameters, "
                  f"modalities {', '.join(result.modalities)})")


@app.command()
@handles_errors
def info(
    weights: Annotated[str, typer.Argument(help="Weights folder, model.safetensors, or Hub repo id.")],
    revision: RevisionOpt = None,
) -> None:
    """Show a weights folder's config: modalities, preset, sizes, parameter count, provenance."""
    from targan_cli.console import console, key_value_table
    from targan_cli.workflows.convert import describe_weights

    console.print(key_value_table(f"Weights {weights}", describe_weights(weights, revision)))


@app.command()
@handles_errors
def translate(
    input: Annotated[Path, typer.Argument(help="A NIfTI file, a DICOM series folder, or a folder of NIfTI files.")],
    output: Annotated[Path, typer.Argument(help="The output NIfTI file (.nii.gz), or a folder for a folder input.")],
    to: Annotated[str, typer.Option("--to", help="Target modality, a name from the weights (e.g. ct, t1w, t2w).")],
    source: Annotated[Optional[str], typer.Option(
        "--from", help="The input's modality. Default: from the DICOM Modality tag, or the weights' "
                       "only modality other than --to.")] = None,
    weights: WeightsOpt = None,
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "fp32",
    batch_size: Annotated[int, typer.Option("--batch-size", help="Slices per generator batch.")] = 16,
    preview: Annotated[Optional[Path], typer.Option(
        "--preview", help="Also write a PNG of 4 slices, input beside output (single volumes).")] = None,
    num_parts: Annotated[int, typer.Option("--num-parts", help="Split a folder input into this many parts.")] = 1,
    part_id: Annotated[int, typer.Option("--part-id", help="The part to run: files[part_id::num_parts].")] = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """Translate whole volumes into another modality; the output keeps the input's geometry."""
    from targan_cli.console import console, progress_bar
    from targan_cli.workflows.translate import translate as translate_volumes

    with progress_bar("Translating", total=None, unit="slices") as advance:
        result = translate_volumes(
            input, output, to=to, source=source, weights=weights, revision=revision, device=device,
            precision=precision, batch_size=batch_size, preview=preview, num_parts=num_parts,
            part_id=part_id, overwrite=overwrite, progress=advance,
            total_callback=lambda total: advance(0, total=total))
    written = str(result.outputs[0]) if len(result.outputs) == 1 else f"{len(result.outputs)} volumes to {output}"
    console.print(f"Wrote [bold]{written}[/] ({result.target}): {result.slices} slices in "
                  f"{result.seconds:.1f} s, {result.slices_per_second:.1f} slices/s on {result.device}")
    if result.preview is not None:
        console.print(f"Preview [bold]{result.preview}[/]")


def main() -> None:
    app()
