"""Device and precision choices shared by training and inference."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform

import torch

from targan_cli.errors import UsageError, counted

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# glibc mallopt parameters (malloc.h) and the value given to both: freed blocks up to this size
# stay in the process for reuse instead of going back to the kernel.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
KEEP_FREED_BYTES = 1 << 30
ARENAS = 1  # every thread allocates from the main heap (see tune_cpu_allocator)


@functools.cache
def tune_cpu_allocator() -> bool:
    """Make glibc malloc keep freed memory for reuse; True where applied (once per process).

    By default glibc serves every block above 32 MiB with a fresh mmap and returns it with munmap
    when freed, so each training step or batch maps, zero-fills and unmaps gigabytes of
    activations, gradients and optimizer temporaries: much of the CPU time went to the kernel.
    Raising the mmap and trim thresholds keeps those pages in the heap; the peak memory is the
    same, it is just not handed back between steps. Threads other than the main one allocate from
    arenas of their own, whose heaps are at most 64 MiB, so a volume-sized block (a 512 x 512 x
    100 float32 volume is 100 MiB) on translate's I/O threads was still mapped,
    zero-filled and unmapped every time whatever the threshold: one arena for all threads keeps
    those pages too (measured: two volumes prepared side by side on two threads took 0.43 s, more
    than one after the other (0.26 s), and take 0.20 s with one arena; a training step is
    unchanged: tiny preset 0.33 against 0.34 s, paper preset at 64 x 64 4.3 against 4.3-4.6 s).
    A no-op (False) off glibc.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = [mallopt(parameter, value) for parameter, value in ((M_MMAP_THRESHOLD, KEEP_FREED_BYTES),
                                                                  (M_TRIM_THRESHOLD, KEEP_FREED_BYTES),
                                                                  (M_ARENA_MAX, ARENAS))]
    return all(applied)


def configure_process(tune_allocator: bool = True) -> None:
    """Process-wide CPU settings for speed; call before the first torch computation.

    Flushes denormal floats to zero: GAN weights and gradients drift into the denormal range,
    where CPU arithmetic is an order of magnitude slower (measured here: a tiny training step took
    6 s instead of 0.5 s); values below 1e-38 make no difference to the result. The setting is per
    thread, and torch's worker threads copy it only when they start, so it must come before torch
    starts its thread pool: the CLI calls this first thing in every command. Also keeps freed
    memory in the process (``tune_cpu_allocator``), unless ``tune_allocator`` is False (the
    benchmarks time glibc's defaults first, then tune).
    """
    torch.set_flush_denormal(True)
    if tune_allocator:
        tune_cpu_allocator()


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` takes cuda, then mps, then cpu; an explicit device must exist.

    On CUDA, cuDNN then times its convolution algorithms once per input shape and keeps the
    fastest: training and translation repeat the same few shapes.
    """
    device = _named_device(name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def _named_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: no CUDA device is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: only {counted(torch.cuda.device_count(), 'CUDA device')} here")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"--device {name}: MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    return device


def check_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` (None for fp32); half precisions need a GPU."""
    if precision not in PRECISIONS:
        raise UsageError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is not None and device.type == "cpu":
        raise UsageError(f"--precision {precision} needs a GPU (autocast on the CPU is slower "
                         "than fp32 here); use --precision fp32")
    return dtype


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``; a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def memory_format(device: torch.device) -> torch.memory_format:
    """channels_last on GPUs, where convolutions are fastest in it."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format
