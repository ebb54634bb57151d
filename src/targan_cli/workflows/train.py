"""`targan train`: the full TarGAN objective on a DATA folder, resumable, on the CPU, one GPU or DDP.

A run folder holds::

    checkpoints/last.pt            everything needed to resume (weights_only loadable), atomic
    checkpoints/step_XXXXXXX.pt    the earlier checkpoints that --keep N keeps (N - 1 of them)
    export/                        the EMA generator as a weights folder (for `targan translate`)
    metrics.jsonl                  every loss term at each logged step, with steps/s
    samples/epoch_XXX.png          held-out slices translated to every modality (EMA generator)
    tensorboard/                   event files, when tensorboard is installed

The data order is a function of (seed, epoch) and the step's randomness (flips, targets, gradient
penalty weights) of (seed, rank, step), so a run resumed from any checkpoint reaches the same
weights as an uninterrupted one. Under torchrun (WORLD_SIZE > 1) each rank trains on its shard
with ``batch_size`` slices per step and gradients averaged; rank 0 alone writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist

from targan_cli import __version__
from targan_cli.config import ModelConfig, WeightsConfig, preset as model_preset
from targan_cli.core.device import check_precision, pick_device
from targan_cli.core.training import TarGAN, Trainer, TrainConfig, derived_generator
from targan_cli.data.dataset import DataDir, SliceDataset, SliceSet, load_slices, open_data_dir
from targan_cli.errors import TarganError, UsageError, counted
from targan_cli.io.atomic import (atomic_output, check_apart, check_writable, made_by_targan, mark_folder,
                                  write_error)
from targan_cli.io.montage import save_montage
from targan_cli.io.weights import save_weights
from targan_cli.process import handling_signals

CHECKPOINTS, LAST_CHECKPOINT, EXPORT, SAMPLES = "checkpoints", "last.pt", "export", "samples"
METRICS, TENSORBOARD = "metrics.jsonl", "tensorboard"
RUN_ENTRIES = (CHECKPOINTS, EXPORT, SAMPLES, METRICS, TENSORBOARD)
CHECKPOINT_FORMAT = 1
ESTIMATE_AFTER_STEPS = 3  # the estimate of the run's duration is printed after this many steps
LONG_RUN_SECONDS = 24 * 3600  # a longer estimate is warned about, with a preset and size that fit
STALL_WINDOW = 20  # logged steps over which a discriminator that wins outright is noticed
_ORDER_STREAM, _STEP_STREAM = 1, 2  # keep the data-order and per-step random streams apart


@dataclass(frozen=True)
class TrainProgress:
    """A progress report: ``phase`` "prepare" counts volumes preprocessed, "train" counts steps.

    ``losses`` (every term, floats) is set at logged steps only; ``epoch`` is 1-based.
    """

    phase: Literal["prepare", "train", "notice"]
    done: int
    total: int
    epoch: int = 0
    epochs: int = 0
    losses: dict[str, float] | None = None
    steps_per_second: float | None = None
    eta_seconds: float | None = None
    message: str | None = None  # phase "notice": a line for the user
    warning: bool = False  # the notice is a warning


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    export_dir: Path
    checkpoint: Path
    steps: int
    epochs_completed: int
    interrupted: bool
    resumed_from: int | None  # the step the run continued from, None for a new run
    losses: dict[str, float]  # the last logged step's terms
    modalities: tuple[str, ...]  # the exported generator's modality names, in index order
    weights_digest: str  # SHA-256 of every network's weights: equal across ranks and identical runs
    is_main_process: bool


# ----------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class _Processes:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @classmethod
    def from_env(cls) -> _Processes:
        """Rank and world size as torchrun sets them (WORLD_SIZE, RANK, LOCAL_RANK); one process otherwise."""
        try:
            world_size = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
            local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
        except ValueError:
            raise UsageError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (as torchrun sets them)") from None
        return cls(rank, world_size, local_rank)


def is_main_process() -> bool:
    """False in the ranks > 0 of a torchrun launch, which train silently."""
    return _Processes.from_env().is_main


def _start_processes(processes: _Processes, device_name: str) -> tuple[torch.device, bool]:
    """The device of this process; joins the process group under torchrun. Returns (device, owns_group)."""
    device = pick_device(device_name)
    if not processes.distributed:
        return device, False
    if device.type == "cuda":
        device = torch.device("cuda", processes.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise UsageError(f"distributed training runs on CUDA or the CPU, not {device.type}")
    if dist.is_initialized():
        return device, False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, True


# ----------------------------------------------------------------------------- options and run folder


def _check_options(epochs: int, batch_size: int, max_steps: int | None, workers: int, seed: int,
                   checkpoint_every: int | None, log_every: int, sample_every: int, keep: int = 1) -> None:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise UsageError(f"--seed must be an integer in [0, 2^32), got {seed!r}")
    for name, value, minimum in (("--epochs", epochs, 1), ("--batch-size", batch_size, 1),
                                 ("--max-steps", max_steps, 1), ("--workers", workers, 0),
                                 ("--checkpoint-every", checkpoint_every, 1), ("--log-every", log_every, 1),
                                 ("--sample-every", sample_every, 0), ("--keep", keep, 1)):
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise UsageError(f"{name} must be an integer of at least {minimum}, got {value!r}")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if workers > cores:  # refused, not silently clamped: say so, and let the user choose
        raise UsageError(f"--workers {workers} is more than the {counted(cores, 'CPU core')} this process may use; "
                         f"pass at most {cores}")


def _check_run_dir(out: Path, resume: bool, overwrite: bool, data: Path) -> Path | None:
    """The checkpoint to resume from, or None for a new run; refuses to mix runs, a run folder that
    overlaps the data, and to empty a folder that no run made."""
    if resume and overwrite:
        raise UsageError("--resume continues a run and --overwrite starts it over: pass one of them")
    check_apart(out, [data])
    if out.exists() and not out.is_dir():
        raise TarganError("the run folder exists and is not a folder", out)
    last = out / CHECKPOINTS / LAST_CHECKPOINT
    if resume:
        if not last.is_file() and not _earlier_checkpoints(out):
            raise TarganError("nothing to resume: no checkpoint here (start a new run without --resume)", last)
        check_writable(last, overwrite=True)
        return last
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise TarganError("the run folder is not empty; pass --resume to continue its run or --overwrite "
                          "to start over", out)
    check_writable(out, overwrite=True, is_dir=True, kind="run folder")  # a folder no run made is never emptied
    check_writable(last, overwrite=True)  # the run folder, or where it will be, is writable
    return None


def _clear_run_dir(out: Path) -> None:
    """Remove a previous run's outputs (only the entries a run writes)."""
    for name in RUN_ENTRIES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


# ----------------------------------------------------------------------------- data order


def epoch_batches(count: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world_size: int = 1) -> list[list[int]]:
    """The batches (slice indices) of one rank in one epoch: a function of (seed, epoch) only.

    One permutation per epoch, padded by wrapping so that it splits evenly, sharded as
    ``[rank::world_size]`` (as DistributedSampler does), cut into batches (the last may be short).
    """
    order = torch.randperm(count, generator=derived_generator(_ORDER_STREAM, seed, epoch)).tolist()
    per_rank = math.ceil(count / world_size)
    padded = (order * math.ceil(per_rank * world_size / count))[: per_rank * world_size]
    shard = padded[rank::world_size]
    return [shard[start:start + batch_size] for start in range(0, len(shard), batch_size)]


def step_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The random stream of one training step (flips, targets, gradient-penalty weights)."""
    return derived_generator(_STEP_STREAM, seed, rank, step)


# ----------------------------------------------------------------------------- checkpoints


def _rng_state(device: torch.device) -> dict[str, Any]:
    keys, position, has_gauss, cached = np.random.get_state()[1:]
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": random.getstate(),
    }


def _restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    random.setstate(state["python"])


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A run's resume state, loaded with ``weights_only=True`` (no arbitrary unpickling)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TarganError("checkpoint not found", path) from None
    except Exception as error:  # torch raises many types for a damaged or foreign file
        raise TarganError(f"not a readable targan checkpoint ({str(error).splitlines()[0][:160]})", path) from None
    if not isinstance(state, dict) or state.get("format_version") != CHECKPOINT_FORMAT:
        raise TarganError("not a targan checkpoint of a supported version", path)
    return state


def _stop_if_not_finite(tensors: dict[str, torch.Tensor], what: str, step: int, out: Path) -> None:
    """Stop a run whose losses or weights are NaN or infinite (a diverged run, e.g. a huge learning
    rate) before it saves anything: the last checkpoint and export stay as they were. One device
    sync for all ``tensors``."""
    if bool(torch.stack([torch.isfinite(tensor).all() for tensor in tensors.values()]).all()):
        return
    names = [name for name, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    raise TarganError(f"training diverged at step {step}: {what} {', '.join(names[:3])}"
                      f"{' ...' if len(names) > 3 else ''} NaN or infinite; stopped before saving it (checkpoints "
                      "and export/ hold earlier steps only); lower --lr-g / --lr-d or the loss weights", out)


def _earlier_checkpoints(out: Path) -> list[Path]:
    """The step_XXXXXXX.pt checkpoints of a run folder, newest first."""
    return sorted((out / CHECKPOINTS).glob("step_*.pt"), reverse=True)


def resume_state(out: Path) -> tuple[Path, dict[str, Any], str | None]:
    """The checkpoint to resume a run from: ``last.pt`` or, when it is empty or unreadable, the
    newest earlier checkpoint that loads (``--keep``). Returns its path, its state and a notice
    saying what was skipped (None when last.pt was good)."""
    last = out / CHECKPOINTS / LAST_CHECKPOINT
    problems: list[str] = []
    for path in [last, *_earlier_checkpoints(out)]:
        try:
            if path.is_file() and path.stat().st_size == 0:
                raise TarganError("is empty (a write cut short?)", path)
            state = load_checkpoint(path)
        except TarganError as error:
            problems.append(str(error))
            continue
        if not problems:
            return path, state, None
        return path, state, (f"{'; '.join(problems)}: resuming from the previous good checkpoint {path} "
                             f"(step {state['step']}) instead")
    raise TarganError(f"{problems[0]}; no earlier checkpoint to fall back to (keep some with --keep N); start "
                      "the run over with --overwrite")


def _keep_copy(checkpoint: Path, kept: Path) -> None:
    """Keep ``checkpoint`` as ``kept`` before a new one replaces it: a hard link (no copy of a
    file that may be gigabytes; last.pt is never missing), or a copy where links do not work."""
    kept.unlink(missing_ok=True)
    try:
        os.link(checkpoint, kept)
    except OSError:
        with atomic_output(kept, overwrite=True) as temporary:
            shutil.copyfile(checkpoint, temporary)


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_output(path, overwrite=True) as temporary:
        torch.save(state, temporary)


def _modalities_change(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> str:
    """The first difference of two runs' modalities, in words: their names and order, else the
    first intensity setting that differs (from dataset.json, or MR volumes that set the MR
    reference range)."""
    names_old, names_new = ([spec["name"] for spec in specs] for specs in (old, new))
    if names_old != names_new:
        return f"modalities {', '.join(names_old)}, now {', '.join(names_new)}"
    for before, after in zip(old, new):
        settings_old, settings_new = before["intensity"], after["intensity"]
        for field in sorted(set(settings_old) | set(settings_new)):
            if settings_old.get(field) != settings_new.get(field):
                return (f"{before['name']} intensity {field} = {settings_old.get(field)!r}, "
                        f"now {settings_new.get(field)!r}")
    return "other modalities"


# Settings added after checkpoints were first written, with the value earlier versions trained with.
_LATER_SETTINGS = {"official_body_mask": False}


def _check_resume_settings(stored: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Refuse to resume with settings that change the model, the losses, the data order or the
    data: the modalities (names, order, intensity settings) and the training slices' content.
    (Settings a checkpoint from an earlier version lacks cannot be checked.)"""
    def flat(settings: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in settings.items():
            if isinstance(value, dict):
                out.update({name: item for name, item in value.items()})
            else:
                out[key] = value
        return out

    old, new = {**_LATER_SETTINGS, **flat(stored)}, flat(current)
    first = ("modalities", "slices", "data_digest")  # the most telling difference is named
    for key in [*first, *sorted((set(old) | set(new)) - set(first))]:
        if key not in old and key in first or old.get(key) == new.get(key):
            continue
        if key == "modalities":
            raise UsageError(f"--resume: this run was started with {_modalities_change(old[key], new[key])}; "
                             "resume on the run's data", path)
        if key == "data_digest":
            raise UsageError("--resume: the training data differ from this run's (the same number of slices, "
                             "other images or labels); resume on the run's data", path)
        what = "slices in the data" if key == "slices" else key
        raise UsageError(f"--resume: this run was started with {what} = {old.get(key)!r}, now "
                         f"{new.get(key)!r}; pass the run's original options", path)


# ----------------------------------------------------------------------------- logging and samples


class _MetricsLog:
    """metrics.jsonl (one JSON object per logged step) and TensorBoard scalars when available."""

    def __init__(self, out: Path, resumed_step: int | None):
        self.path = out / METRICS
        if resumed_step is not None and self.path.exists():
            self._truncate(resumed_step)
        self.writer = None
        with contextlib.suppress(ImportError):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / TENSORBOARD), purge_step=resumed_step)

    def _truncate(self, step: int) -> None:
        """Drop lines logged after the checkpoint (a crashed run's tail), and any partial line."""
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError, TypeError, AttributeError):
                if json.loads(line).get("step", math.inf) <= step:
                    kept.append(line)
        with atomic_output(self.path, overwrite=True) as temporary:
            temporary.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        # Appended line by line (an atomic rewrite per line would be quadratic); a torn last line
        # is dropped on resume.
        try:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        except OSError as error:  # a full disk: one line naming it
            raise write_error(error, self.path) from None
        if self.writer is not None:
            for name, value in record.items():
                if name not in ("step", "epoch", "time"):
                    self.writer.add_scalar(name, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _sample_indices(slices: SliceSet) -> list[int]:
    """One slice per modality: the one showing the most of the target (the middle one if none does)."""
    area = slices.labels.reshape(len(slices), -1).sum(axis=1, dtype=np.int64)
    picks = []
    for modality in range(len(slices.modalities)):
        indices = np.flatnonzero(slices.modality == modality)
        if indices.size:
            best = int(np.argmax(area[indices]))
            picks.append(int(indices[best] if area[indices[best]] > 0 else indices[indices.size // 2]))
    return picks


class _Samples:
    """samples/epoch_XXX.png: fixed held-out slices and their translations to every modality."""

    def __init__(self, slices: SliceSet):
        self.indices = _sample_indices(slices)
        self.images = torch.from_numpy(np.stack([np.asarray(slices.images[i]) for i in self.indices]))[:, None]
        self.sources = [int(slices.modality[i]) for i in self.indices]
        self.names = [m.name for m in slices.modalities]
        self.row_labels = []
        for index in self.indices:
            case = int(slices.case_index[index])
            first_slice = int(np.argmax(slices.case_index == case))  # a case's slices are contiguous
            self.row_labels.append(f"{slices.case_ids[case]} #{index - first_slice}")

    @torch.no_grad()
    def write(self, path: Path, generator: torch.nn.Module, device: torch.device) -> None:
        images = self.images.to(device)  # (k, 1, S, S)
        count, n = images.shape[0], len(self.names)
        targets = torch.arange(n, device=device).repeat_interleave(count)  # every slice to every modality
        outputs = generator(images.repeat(n, 1, 1, 1), targets).float().cpu().numpy()[:, 0]  # (n * k, S, S)
        rows = [[self.images[k, 0].numpy()] + [outputs[t * count + k] for t in range(n)] for k in range(count)]
        columns = ["source"] + [f"to {name}" for name in self.names]
        save_montage(path, rows, self.row_labels, columns, overwrite=True,
                     column_windows=[(-1.0, 1.0)] * len(columns))


def _duration(seconds: float) -> str:
    """A duration in words: "45 s", "12 min", "3.5 h", "2.1 days"."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


# Smaller settings to suggest for a run that would take too long, largest first.
_SMALLER_SETTINGS = (("paper", 256), ("small", 256), ("small", 128), ("tiny", 128), ("tiny", 64))


def _step_cost(config: ModelConfig) -> float:
    """A step's relative cost: convolutions cost pixels x channels squared."""
    return config.image_size ** 2 * (config.base_width ** 2 + config.disc_width ** 2)


def _estimate(elapsed: float, steps_done: int, steps_left: int, config: ModelConfig, preset: str,
              device: torch.device) -> list[tuple[str, bool]]:
    """The notices after the first steps: the run's pace and end; a warning, with a preset and size
    that would fit, when the rest would take more than a day here."""
    per_step = elapsed / steps_done
    left = per_step * steps_left
    finish = datetime.datetime.now() + datetime.timedelta(seconds=left)
    notices = [(f"{counted(steps_done + steps_left, 'step')} to run: {per_step:.2f} s per step over the first "
                f"{counted(steps_done, 'step')}; about {_duration(left)} more (ETA {finish:%Y-%m-%d %H:%M})", False)]
    if left > LONG_RUN_SECONDS:
        advice = "fewer steps (--max-steps or --epochs)"
        for name, size in _SMALLER_SETTINGS:
            smaller = model_preset(name, num_modalities=config.num_modalities, image_size=size)
            estimate = left * _step_cost(smaller) / _step_cost(config)
            if _step_cost(smaller) < _step_cost(config) and estimate <= LONG_RUN_SECONDS:
                advice = f"--preset {name} --image-size {size} would take about {_duration(estimate)}"
                break
        notices.append((f"this run would take about {_duration(left)} on {device.type}, more than a day; "
                        f"use a GPU, or {advice}", True))
    return notices


def discriminator_wins(history: list[dict[str, float]], window: int = STALL_WINDOW) -> str | None:
    """A warning when the last ``window`` logged steps show the discriminator winning outright: it
    tells real from translated slices at every one of them (its critic gap, -d_x_adv, positive),
    ever more clearly (the gap's last quarter over twice its first) and about as clearly as it ever
    has in this run (at least half the largest gap logged, which is usually the untrained
    generator's), while the generator's adversarial loss rises. The generator is then not learning
    to translate. A gap that grows from 0.03 to 0.08 after the critic told the untrained
    generator's output apart by 2 is a close contest, not a rout (the gap's scale depends on the
    gradient penalty and the image size, so it is judged against the run's own)."""
    if len(history) < window or any("d_x_adv" not in h or "g_x_adv" not in h for h in history[-window:]):
        return None
    gaps = np.array([-h["d_x_adv"] for h in history if "d_x_adv" in h])  # the whole run's, for its largest
    recent = history[-window:]
    gap = gaps[-window:]  # every one of the last ``window`` entries has one (checked above)
    adversarial = np.array([h["g_x_adv"] for h in recent])
    quarter = max(1, window // 4)
    if (gap > 0).all() and gap[-quarter:].mean() > 2 * gap[:quarter].mean() and \
            gap[-quarter:].mean() >= 0.5 * gaps.max() and \
            adversarial[-quarter:].mean() > adversarial[:quarter].mean():
        return (f"the discriminator is winning outright: its real/fake gap grew from {gap[:quarter].mean():.3g} to "
                f"{gap[-quarter:].mean():.3g} over the last {len(recent)} logged steps while the generator's adversarial "
                "loss rose: the generator is not learning. Try a lower --lr-d, a higher --lambda-gp, or check the data")
    return None


def weights_digest(module: torch.nn.Module) -> str:
    """SHA-256 over a module's state (names and float32 bytes): equal iff the weights are equal."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- stopping


class _StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM asks the loop to stop after the current step and checkpoint.

    A second Ctrl-C raises KeyboardInterrupt at once. Signal handlers exist only in the main
    thread; elsewhere ``request()`` is the only way in.
    """

    def __init__(self) -> None:
        self.requested = False

    def request(self) -> None:
        self.requested = True

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def installed(self) -> contextlib.AbstractContextManager[None]:
        return handling_signals((signal.SIGINT, signal.SIGTERM), self._handle)

    def agreed(self, processes: _Processes, device: torch.device) -> bool:
        """Whether any rank was asked to stop (all ranks must stop at the same step)."""
        if not processes.distributed:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


# ----------------------------------------------------------------------------- the run


def train(
    data: str | Path,
    out: str | Path,
    *,
    epochs: int = 50,
    preset: str = "paper",
    image_size: int | None = None,
    batch_size: int = 4,
    max_steps: int | None = None,
    resume: bool = False,
    device: str = "auto",
    precision: str = "fp32",
    seed: int = 0,
    workers: int = 0,
    shape_controller: bool = True,
    target_stream: bool = True,
    crossing_loss: bool = True,
    official_mask: bool = False,
    lambda_gp: float = TrainConfig.lambda_gp,
    lambda_rcls: float = TrainConfig.lambda_rcls,
    lambda_fcls: float = TrainConfig.lambda_fcls,
    lambda_rec: float = TrainConfig.lambda_rec,
    lambda_cross: float = TrainConfig.lambda_cross,
    lambda_u: float = TrainConfig.lambda_u,
    lambda_shape: float = TrainConfig.lambda_shape,
    lr_g: float = TrainConfig.lr_g,
    lr_d: float = TrainConfig.lr_d,
    ema_decay: float = TrainConfig.ema_decay,
    checkpoint_every: int | None = None,
    log_every: int = 10,
    sample_every: int = 1,
    compile: bool = False,
    keep: int = 1,
    overwrite: bool = False,
    progress: Callable[[TrainProgress], None] | None = None,
) -> TrainResult:
    """Train TarGAN on ``data`` (a DATA folder) into the run folder ``out``; see the module docstring.

    ``batch_size`` is per process. ``max_steps`` caps the total steps (over all epochs). Ctrl-C
    stops after the current step with a checkpoint (``TrainResult.interrupted``); resuming needs
    the same model, loss, batch, seed and process-count settings. ``keep`` checkpoints stay in
    ``checkpoints/``: last.pt and the ``keep - 1`` before it (step_XXXXXXX.pt); resuming falls back
    to the newest of those when last.pt is damaged. ``progress`` also receives notices (phase
    "notice"): the run's estimated duration, a run too long for this device, a discriminator
    that wins outright, a resume that fell back.
    """
    out = Path(out)
    _check_options(epochs, batch_size, max_steps, workers, seed, checkpoint_every, log_every, sample_every, keep)
    try:
        train_config = TrainConfig(
            lambda_gp=lambda_gp, lambda_rcls=lambda_rcls, lambda_fcls=lambda_fcls, lambda_rec=lambda_rec,
            lambda_cross=lambda_cross, lambda_u=lambda_u, lambda_shape=lambda_shape, lr_g=lr_g, lr_d=lr_d,
            ema_decay=ema_decay, use_shape_controller=shape_controller, use_target_stream=target_stream,
            use_crossing_loss=crossing_loss, official_body_mask=official_mask)
    except ValueError as error:
        raise UsageError(str(error)) from None
    resume_from = _check_run_dir(out, resume, overwrite, Path(data))
    checkpoint = None
    if resume_from is not None:
        resume_from, checkpoint, notice = resume_state(out)
        if notice is not None and progress is not None and _Processes.from_env().is_main:
            progress(TrainProgress("notice", 0, 0, message=notice, warning=True))
    data_dir = open_data_dir(data)
    for name in data_dir.spec.modality_names:
        if not data_dir.cases("train", name):
            raise TarganError(f"modality {name} has no training volumes: TarGAN learns every modality it "
                              f"translates from its own images; add volumes to train/{name}/images or "
                              f"remove {name} from dataset.json", data_dir.root / "train" / name)
    try:  # --preset and --image-size are options: a bad one is a usage error (exit code 2)
        model_config = model_preset(preset, num_modalities=len(data_dir.spec.modalities),
                                    **({} if image_size is None else {"image_size": image_size}))
    except TarganError as error:
        raise UsageError(error.message) from None
    processes = _Processes.from_env()
    if checkpoint is not None:  # the settings that need no data, checked before the data are loaded
        early = {"preset": preset, "model": model_config.to_dict(), "train": train_config.to_dict(),
                 "batch_size": batch_size, "seed": seed, "world_size": processes.world_size}
        _check_resume_settings({key: value for key, value in checkpoint["settings"].items() if key in early},
                               early, resume_from)
    torch_device, owns_group = _start_processes(processes, device)
    try:
        dtype = check_precision(precision, torch_device)
        return _run(data_dir, out, processes, torch_device, dtype, model_config, train_config, preset,
                    epochs=epochs, batch_size=batch_size, max_steps=max_steps, resume_from=resume_from,
                    checkpoint=checkpoint, seed=seed, workers=workers, checkpoint_every=checkpoint_every,
                    log_every=log_every, sample_every=sample_every, compile=compile, keep=keep, overwrite=overwrite,
                    progress=progress)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _load_data(data_dir: DataDir, image_size: int, processes: _Processes,
               progress: Callable[[TrainProgress], None] | None) -> tuple[SliceSet, SliceSet]:
    """Training slices and the held-out slices for samples (test split, or train without one).

    Rank 0 builds the slice cache first; the other ranks then read it.
    """
    has_test = bool(data_dir.cases("test"))
    total = len(data_dir.cases("train")) + (len(data_dir.cases("test")) if has_test else 0)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(TrainProgress("prepare", done, total))

    def load() -> tuple[SliceSet, SliceSet]:
        main = processes.is_main
        slices = load_slices(data_dir, "train", image_size, progress=advance if main else None)
        held_out = load_slices(data_dir, "test", image_size, progress=advance if main else None) if has_test else slices
        return slices, held_out

    if processes.is_main:
        loaded = load()
        processes.barrier()
    else:
        processes.barrier()
        loaded = load()
    return loaded


def _run(data_dir: DataDir, out: Path, processes: _Processes, device: torch.device, dtype: torch.dtype | None,
         model_config: ModelConfig, train_config: TrainConfig, preset: str, *, epochs: int, batch_size: int,
         max_steps: int | None, resume_from: Path | None, checkpoint: dict[str, Any] | None, seed: int,
         workers: int, checkpoint_every: int | None, log_every: int, sample_every: int, compile: bool, keep: int,
         overwrite: bool, progress: Callable[[TrainProgress], None] | None) -> TrainResult:
    main = processes.is_main
    report = progress if main else None
    slices, held_out = _load_data(data_dir, model_config.image_size, processes, report)
    settings = {"preset": preset, "model": model_config.to_dict(), "train": train_config.to_dict(),
                "batch_size": batch_size, "seed": seed, "world_size": processes.world_size, "slices": len(slices),
                "modalities": [m.to_dict() for m in slices.modalities], "data_digest": slices.digest()}
    if checkpoint is not None:
        _check_resume_settings(checkpoint["settings"], settings, resume_from)
    if main and overwrite and checkpoint is None:
        _clear_run_dir(out)
    processes.barrier()

    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    trainer = Trainer(TarGAN(model_config, train_config), train_config, device, precision=dtype, compile=compile)
    step = epoch = batch_in_epoch = 0
    if checkpoint is not None:
        trainer.load_state_dict(checkpoint["trainer"])
        step, epoch, batch_in_epoch = checkpoint["step"], checkpoint["epoch"], checkpoint["batch_in_epoch"]
        _restore_rng(checkpoint["rng"], device)
    trainer.broadcast_state()
    resumed_from = step if checkpoint is not None else None
    del checkpoint

    batches_per_epoch = len(epoch_batches(len(slices), batch_size, seed, 0, processes.rank, processes.world_size))
    total_steps = epochs * batches_per_epoch if max_steps is None else min(max_steps, epochs * batches_per_epoch)
    weights_config = WeightsConfig(model=model_config, modalities=slices.modalities, preset=preset,
                                   target=data_dir.spec.target)
    dataset = SliceDataset(slices)
    log = _MetricsLog(out, resumed_from) if main else None
    samples = _Samples(held_out) if main and sample_every else None
    (out / CHECKPOINTS).mkdir(parents=True, exist_ok=True)
    if main and not made_by_targan(out):
        mark_folder(out, "train", "run folder")
    last_checkpoint = out / CHECKPOINTS / LAST_CHECKPOINT
    saved_step = step if resumed_from is not None else None
    # The step of the good checkpoint in last.pt (None: none there, or a damaged one resumed past).
    last_good = step if resumed_from is not None and resume_from == last_checkpoint else None
    losses: dict[str, float] = {}
    history: list[dict[str, float]] = []  # logged losses, for the stall check
    stall_warned = False

    def save() -> None:
        """last.pt and export/ (once per step); with ``keep`` > 1 the previous last.pt is kept as
        step_XXXXXXX.pt and the oldest beyond ``keep`` are removed; rank 0 writes."""
        nonlocal saved_step, last_good
        if main and saved_step != step:
            _stop_if_not_finite(trainer.model.state_dict(), "the weights", step, out)
            if keep > 1 and last_good is not None and last_checkpoint.is_file():
                _keep_copy(last_checkpoint, out / CHECKPOINTS / f"step_{last_good:07d}.pt")
            state = {"format_version": CHECKPOINT_FORMAT, "settings": settings, "trainer": trainer.state_dict(),
                     "step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "rng": _rng_state(device),
                     "data": str(data_dir.root.resolve()), "modalities": [m.to_dict() for m in slices.modalities]}
            _save_checkpoint(last_checkpoint, state)
            last_good = step
            for stale in _earlier_checkpoints(out)[keep - 1:]:
                stale.unlink()
            provenance = {"data": str(data_dir.root.resolve()), "steps": step, "epochs": epoch,
                          "seed": seed, "package_version": __version__,
                          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                          "train_config": train_config.to_dict()}
            save_weights(out / EXPORT, trainer.model.ema_generator,
                         dataclasses.replace(weights_config, provenance=provenance), overwrite=True, command="train",
                         discriminator=trainer.model.disc_x)
        saved_step = step
        processes.barrier()

    stop = _StopRequest()
    interrupted = False
    started = last_log_time = time.perf_counter()
    started_step = last_log_step = step
    try:
        with stop.installed():
            while epoch < epochs and step < total_steps and not interrupted:
                batches = epoch_batches(len(slices), batch_size, seed, epoch, processes.rank, processes.world_size)
                loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches[batch_in_epoch:],
                                                     num_workers=workers, pin_memory=device.type == "cuda")
                for batch in loader:  # the epoch's remaining batches
                    terms = trainer.train_step(batch, step_generator(seed, processes.rank, step))
                    step += 1
                    _stop_if_not_finite(terms, "the loss(es)", step, out)
                    batch_in_epoch += 1
                    now = time.perf_counter()
                    rate = (step - started_step) / (now - started) if now > started else None
                    event_losses = None
                    if main and (step % log_every == 0 or step == total_steps):
                        values = torch.stack(list(terms.values())).tolist()  # one device sync per log
                        losses = dict(zip(terms, values))
                        window_rate = (step - last_log_step) / (now - last_log_time) if now > last_log_time else 0.0
                        log.write({"step": step, "epoch": epoch + 1, "time": time.time(),
                                   "steps_per_second": window_rate, **losses})
                        last_log_time, last_log_step = now, step
                        event_losses = losses
                        history.append(losses)
                        stall = None if stall_warned else discriminator_wins(history)
                        if stall is not None and report is not None:
                            stall_warned = True
                            report(TrainProgress("notice", step, total_steps, message=stall, warning=True))
                    if report is not None and step - started_step == min(ESTIMATE_AFTER_STEPS,
                                                                          total_steps - started_step):
                        for message, warning in _estimate(now - started, step - started_step, total_steps - step,
                                                          model_config, preset, device):
                            report(TrainProgress("notice", step, total_steps, message=message, warning=warning))
                    if report is not None:
                        eta = (total_steps - step) / rate if rate else None
                        try:
                            report(TrainProgress("train", step, total_steps, epoch + 1, epochs, event_losses,
                                                 rate, eta))
                        except KeyboardInterrupt:
                            stop.request()
                    if batch_in_epoch == len(batches):  # end of an epoch: samples, then a checkpoint
                        epoch, batch_in_epoch = epoch + 1, 0
                        if samples is not None and epoch % sample_every == 0:
                            samples.write(out / SAMPLES / f"epoch_{epoch:03d}.png", trainer.model.ema_generator,
                                          device)
                        save()
                    if checkpoint_every and step % checkpoint_every == 0:
                        save()
                    if stop.agreed(processes, device):
                        interrupted = True
                        break
                    if step >= total_steps:
                        break
            save()  # inside the handlers: a Ctrl-C now does not abort the write
    finally:
        if log is not None:
            log.close()
    return TrainResult(
        run_dir=out, export_dir=out / EXPORT, checkpoint=last_checkpoint, steps=step,
        epochs_completed=epoch, interrupted=interrupted, resumed_from=resumed_from, losses=losses,
        modalities=weights_config.modality_names, weights_digest=weights_digest(trainer.model), is_main_process=main)
