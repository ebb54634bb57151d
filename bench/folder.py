"""Slices/s of ``targan translate`` on a folder: the file path, the model, one-at-a-time and streaming.

Generates (once, cached in ``--workdir``) a folder of CT-like int16 ``.nii.gz`` volumes, side x side
x depth (depths spread over ``--depth MIN MAX``), and random weights of ``--preset``. Then, in one
process, each figure measured ``--rounds`` times (interleaved) and the median reported:
- (a) the file path alone: the real folder run (read, reorient, normalize, resize in, resize out,
  denormalize, write with sidecar) with the generator replaced by the identity and torch on one
  thread, one volume after the other (``--io-workers 0``, one core) and streaming with
  ``--io-workers`` threads;
- (b) the model alone: ``translate_slices`` on the normalized slices of the first
  ``--model-volumes`` volumes, decoded beforehand;
- (c) the one-at-a-time run (``--io-workers 0``), the path before streaming;
- (d) the streaming run (``--io-workers N``);
and the ratios d/c and the overlap efficiency d / min(a, b); then the peak RSS of (c) and (d), each
run once more in a fresh process (``ru_maxrss``: in the benchmark's own process, the heap that
tuned malloc keeps from earlier runs would be counted). ``--levels`` also times zlib's and ISA-L's gzip
levels on one translated output (size against time). ``--compare-src DIR`` times the file path
alone, one volume at a time on one thread, of this tree and of another checkout's ``src/`` (an
older commit: ``git worktree add /tmp/old 54cf249``), each in a fresh subprocess, alternating,
``--rounds`` times, and prints the medians and their ratio. ``--file-path-only`` runs (a) alone,
one at a time and with ``--io-workers`` threads alternating, ``--rounds`` times.
``--device cuda --precision bf16`` runs the model there; ``--span on|off`` forces batches that span volumes (``core.inference.spans_volumes``;
default ``auto``: on CUDA only), so a GPU session can time (d) both ways.

    .venv/bin/python bench/folder.py --preset small --volumes 16 --rounds 3
    .venv/bin/python bench/folder.py --small          # 4 volumes of depth 80-100, 2 rounds
    .venv/bin/python bench/folder.py --small --compare-src /tmp/old/src
    .venv/bin/python bench/folder.py --volumes 16 --rounds 9 --file-path-only
    python bench/folder.py --device cuda --precision bf16 --span off   # then --span on
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the CLI sets it, before torch loads OpenMP

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from targan_cli.config import PRESETS, WeightsConfig, official_modalities, preset  # noqa: E402
import targan_cli.core.inference as inference  # noqa: E402
from targan_cli.core.device import configure_process  # noqa: E402
from targan_cli.core.inference import translate_slices  # noqa: E402
from targan_cli.core.intensity import normalize  # noqa: E402
from targan_cli.core.networks import Generator  # noqa: E402
from targan_cli.io.pipeline import default_workers  # noqa: E402
from targan_cli.io.volume import GZIP_LEVEL, list_volumes, read_volume, save_nifti, to_slices  # noqa: E402
from targan_cli.io.weights import load_weights, save_weights  # noqa: E402
from targan_cli.workflows.translate import translate  # noqa: E402

MIB = 1024**2


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--volumes", type=int, default=16)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--depth", type=int, nargs=2, default=(80, 120), metavar=("MIN", "MAX"))
    parser.add_argument("--small", action="store_true", help="a quick run: 4 volumes of depth 80-100, 2 rounds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--io-workers", type=int, default=default_workers(), help="threads of the streaming runs")
    parser.add_argument("--model-volumes", type=int, default=2, help="volumes the model alone (b) translates")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--span", default="auto", choices=("auto", "on", "off"),
                        help="batches that span volumes: auto (on CUDA only), on, off")
    parser.add_argument("--levels", action="store_true", help="also time gzip levels 1, 3, 6, 9 of one output")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/targan-bench-folder"))
    parser.add_argument("--file-path-only", action="store_true",
                        help="only (a): the file path one at a time and with --io-workers threads, alternating")
    parser.add_argument("--compare-src", type=Path, help="only time the file path of this tree against that of "
                                                          "another checkout's src/ folder")
    args = parser.parse_args()
    if args.small:
        args.volumes, args.depth, args.rounds = 4, (80, 100), 2
    return args


def ct_volume(side: int, depth: int, seed: int) -> np.ndarray:
    """An int16 HU volume (side, side, depth): air around an elliptic body of soft tissue and bone."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[-1:1:side * 1j, -1:1:side * 1j]
    body = (rows / 0.7) ** 2 + (cols / 0.9) ** 2 <= 1
    bone = (rows / 0.15) ** 2 + ((cols - 0.1) / 0.15) ** 2 <= 1
    volume = np.full((side, side, depth), -1000, dtype=np.int16)
    for index in range(depth):
        plane = rng.normal(40, 20, (side, side)).astype(np.int16)
        plane[bone] += 700
        volume[:, :, index] = np.where(body, plane, -1000)
    return volume


def write_inputs(args: argparse.Namespace) -> tuple[Path, Path]:
    """The folder of volumes and random weights, reused when this shape was generated before."""
    folder = args.workdir / f"cases-{args.volumes}x{args.side}-{args.depth[0]}-{args.depth[1]}"
    if not folder.exists():
        temporary = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
        depths = np.linspace(args.depth[0], args.depth[1], args.volumes).round().astype(int)
        for index, depth in enumerate(depths):
            nib.save(nib.Nifti1Image(ct_volume(args.side, int(depth), index), np.diag([0.7, 0.7, 2.5, 1.0])),
                     temporary / f"case{index:03d}.nii.gz")
        temporary.rename(folder)
    weights = args.workdir / f"weights-{args.preset}"
    if not weights.exists():
        torch.manual_seed(0)
        generator = Generator(preset(args.preset))
        config = WeightsConfig(model=generator.config, modalities=official_modalities(), preset=args.preset,
                               provenance={"source": "bench/folder.py", "weights": "random"})
        save_weights(weights, generator, config)
    return folder, weights


def identity(self: Generator, x: torch.Tensor, target: torch.Tensor, area: torch.Tensor | None = None):
    return x


def folder_run(folder: Path, weights: Path, output: Path, workers: int, batch_size: int,
               model: bool = True, device: str = "cpu", precision: str = "fp32") -> float:
    """Slices/s of one real folder run. Without ``model``: the file path alone, the identity
    generator, and torch on one thread, so that one volume at a time is one core and ``workers``
    threads show what each adds (with torch's own threads the resizing of the one-at-a-time run
    would already use every core)."""
    shutil.rmtree(output, ignore_errors=True)
    forward, threads = Generator.forward, torch.get_num_threads()
    if not model:
        Generator.forward = identity
        torch.set_num_threads(1)
    try:
        result = translate(folder, output, to="t2w", source="ct", weights=weights, device=device,
                           precision=precision, batch_size=batch_size, io_workers=workers,
                           command_line="bench/folder.py")
    finally:
        Generator.forward = forward
        torch.set_num_threads(threads)
    return result.slices / result.seconds


def model_alone(folder: Path, weights: Path, volumes: int, batch_size: int, device: str = "cpu",
                precision: str = "fp32") -> float:
    """Slices/s of ``translate_slices`` on slices normalized beforehand."""
    loaded = load_weights(weights, None, torch.device(device))
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    settings = loaded.config.intensity("ct")
    slices = np.concatenate([normalize(to_slices(read_volume(path))[0], settings)
                             for path in list_volumes(folder)[:volumes]])
    target = loaded.config.modality_index("t2w")
    started = time.perf_counter()
    translate_slices(loaded.generator, slices, target, batch_size=batch_size, dtype=dtype)  # returns on the host
    return len(slices) / (time.perf_counter() - started)


def gzip_levels(output_folder: Path) -> None:
    """Size and time of one translated output written at each gzip level: zlib's through nibabel's
    own save, ISA-L's through targan's (``save_nifti``)."""
    path = sorted(output_folder.glob("*.nii.gz"))[0]
    image = nib.load(path)
    image = nib.Nifti1Image(np.asarray(image.dataobj), image.affine, image.header)
    raw = image.get_fdata(dtype=np.float32).nbytes
    default = nib.openers.Opener.default_compresslevel
    print(f"gzip levels on {path.name} ({raw / MIB:.0f} MiB raw, {image.get_data_dtype()}); nibabel's default "
          f"{default}, targan's ISA-L level {GZIP_LEVEL}:")
    target = output_folder / "level.nii.gz"

    def zlib(level: int) -> None:
        nib.openers.Opener.default_compresslevel = level
        nib.save(image, target)

    writers = [(f"zlib level {level}", partial(zlib, level)) for level in (1, 6, 9)]
    writers += [(f"ISA-L level {level}", partial(save_nifti, image, target, level)) for level in (0, 1, 2, 3)]
    for label, write in writers:
        times = []
        for _ in range(3):
            started = time.perf_counter()
            write()
            times.append(time.perf_counter() - started)
        size = target.stat().st_size
        print(f"  {label:14s} {size / MIB:7.1f} MiB ({size / raw:.3f} of raw), {statistics.median(times):.2f} s to "
              "write (median of 3)")
    nib.openers.Opener.default_compresslevel = default
    target.unlink()


# One folder run of whichever targan_cli PYTHONPATH names (an older tree lacks --io-workers and
# io.pipeline): "file" the file path alone on one thread (the identity generator), "model" the
# whole run with the generator on every core; with --io-workers WORKERS (default 0, one volume at a
# time) where the tree has it. Prints slices/s and the process's peak RSS in bytes.
FOLDER_RUN_ONCE = """
import inspect, os, resource, shutil, sys, time
from pathlib import Path
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch
from targan_cli.core.device import configure_process
from targan_cli.core.networks import Generator
from targan_cli.workflows.translate import translate
configure_process()
folder, weights, output, what = sys.argv[1:5]
workers = int(sys.argv[5]) if len(sys.argv) > 5 else 0
device = sys.argv[6] if len(sys.argv) > 6 else "cpu"
if what == "file":
    torch.set_num_threads(1)
    Generator.forward = lambda self, x, target, area=None: x
options = {"io_workers": workers} if "io_workers" in inspect.signature(translate).parameters else {}
shutil.rmtree(output, ignore_errors=True)
started = time.perf_counter()
result = translate(folder, output, to="t2w", source="ct", weights=weights, device=device, batch_size=16, **options)
rate = result.slices / (time.perf_counter() - started)
# The peak of this process's own memory: VmHWM, where Linux has it. ru_maxrss would also count the
# parent's peak, which Linux carries over into the child's at exec.
status = Path("/proc/self/status")
peak = ([int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith("VmHWM:")]
        if status.exists() else [])
print(rate, peak[0] if peak else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def fresh_peak(folder: Path, weights: Path, output: Path, workers: int, device: str = "cpu") -> int:
    """Peak RSS (bytes) of one whole folder run with ``workers`` in a fresh process: in this one,
    the heap that tuned malloc keeps from the earlier runs would be counted too. The child reports
    its own high-water mark (VmHWM): its ``ru_maxrss`` would include this process's peak, which
    Linux carries into a child's at exec (measured: both runs read 2269 MiB, this process's peak)."""
    command = [sys.executable, "-c", FOLDER_RUN_ONCE, str(folder), str(weights), str(output), "model", str(workers),
               device]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


def compare_trees(args: argparse.Namespace, folder: Path, weights: Path) -> None:
    """This tree against another tree's, in alternating fresh subprocesses: the file path alone
    (``--rounds`` times), then the whole one-at-a-time run with the model (once each)."""
    trees = {"this tree": Path(__file__).resolve().parents[1] / "src", "other tree": args.compare_src.resolve()}
    for what, rounds, label in (("file", args.rounds, "file path alone, one thread"),
                                ("model", 1, "whole run, one volume at a time")):
        rates: dict[str, list[float]] = {name: [] for name in trees}
        for _ in range(rounds):
            for name, source in trees.items():
                command = [sys.executable, "-c", FOLDER_RUN_ONCE, str(folder), str(weights), str(args.workdir / "out"),
                           what]
                done = subprocess.run(command, env=dict(os.environ, PYTHONPATH=str(source)), capture_output=True,
                                      text=True, check=True)
                rates[name].append(float(done.stdout.split()[0]))
            print(f"{label}: " + ", ".join(f"{name} {values[-1]:.1f}" for name, values in rates.items()), flush=True)
        for name, source in trees.items():
            print(f"{label}, {name} ({source}): {statistics.median(rates[name]):.1f} slices/s "
                  f"(runs {', '.join(f'{v:.1f}' for v in rates[name])})")
        ratio = statistics.median(rates["this tree"]) / statistics.median(rates["other tree"])
        print(f"{label}: this / other {ratio:.2f}x", flush=True)


def main() -> None:
    args = parse_args()
    configure_process()
    folder, weights = write_inputs(args)
    if args.compare_src:
        compare_trees(args, folder, weights)
        return
    total = sum(nib.load(path).shape[2] for path in list_volumes(folder))
    workers = args.io_workers
    print(f"{args.volumes} volumes {args.side} x {args.side} x {args.depth[0]}-{args.depth[1]} ({total} slices), "
          f"preset {args.preset}, batch {args.batch_size}, --io-workers {workers}, {os.cpu_count()} cores, "
          f"device {args.device} {args.precision}, batches spanning volumes {args.span}, "
          f"load average {os.getloadavg()[0]:.2f}")
    if args.span != "auto":
        inference.spans_volumes = lambda device: args.span == "on"
    once = partial(folder_run, folder, weights, args.workdir / "out", batch_size=args.batch_size, device=args.device,
                   precision=args.precision)
    runs = {"a1": lambda: once(0, model=False), f"a{workers}": lambda: once(workers, model=False),
            "b": lambda: model_alone(folder, weights, args.model_volumes, args.batch_size, args.device,
                                     args.precision),
            "c": lambda: once(0), "d": lambda: once(workers)}
    if args.file_path_only:
        runs = {name: runs[name] for name in ("a1", f"a{workers}")}
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for round_index in range(args.rounds):
        for name, run in runs.items():
            rates[name].append(run())
        print(f"round {round_index + 1}: " + ", ".join(f"{name} {values[-1]:.1f}" for name, values in rates.items()),
              flush=True)
    median = {name: statistics.median(values) for name, values in rates.items()}
    labels = {"a1": "(a) file path alone, one at a time", f"a{workers}": f"(a) file path alone, {workers} workers",
              "b": "(b) model alone", "c": "(c) one at a time (--io-workers 0)",
              "d": f"(d) streaming (--io-workers {workers})"}
    for name, label in labels.items():
        if name in rates:
            print(f"{label:40s} {median[name]:7.1f} slices/s (runs {', '.join(f'{v:.1f}' for v in rates[name])})")
    # Each round's runs follow one another under the same conditions (load, heap, page cache), so
    # the median of the rounds' own ratios is the paired figure; the ratio of medians mixes rounds.
    paired = statistics.median(two / one for one, two in zip(rates["a1"], rates[f"a{workers}"]))
    scaling = (f"file path {workers} workers / one: {median[f'a{workers}'] / median['a1']:.2f}x as the ratio of the "
               f"medians, {paired:.2f}x as the median of each round's ratio (target >= 1.7)")
    if args.file_path_only:
        print(scaling)
        return
    print(f"(d)/(c) {median['d'] / median['c']:.2f}x (target >= 1.25); overlap efficiency (d)/min((a), (b)) "
          f"{median['d'] / min(median[f'a{workers}'], median['b']):.3f} with (a) at {workers} workers, "
          f"{median['d'] / min(median['a1'], median['b']):.3f} with (a) one at a time (target >= 0.9); {scaling}")
    peaks = {label: fresh_peak(folder, weights, args.workdir / "out", count, args.device) for label, count in
             (("(c) one at a time", 0), (f"(d) streaming, {workers} workers", workers))}
    print("peak RSS of the whole run in a fresh process: " +
          ", ".join(f"{label} {peak / MIB:.0f} MiB" for label, peak in peaks.items()))
    if args.levels:
        folder_run(folder, weights, args.workdir / "out", workers, args.batch_size, model=False)
        gzip_levels(args.workdir / "out")


if __name__ == "__main__":
    main()
