"""A folder of items streamed through read -> process -> write, with reading and writing overlapped.

Reader threads decode the next items while the caller's thread processes the current one (the
model, on one device), and writer threads encode and write the finished ones. Threads, not
processes: gzip (zlib) and NumPy release the GIL, and the volumes need no pickling. Memory stays
bounded: at most ``workers`` items read ahead, one being processed and ``workers`` waiting to be
written (2 x ``workers`` + 1 volumes in flight). Outcomes come back in the items' order, so the
outputs and their order are those of the one-at-a-time loop (``workers`` 0).

An error of a kind in ``expected`` fails its item only; the others go on. A full disk
(``DiskFullError``), any other error, and Ctrl-C cancel what has not started, wait for the running
threads (a write in progress finishes its atomic rename or leaves only its temporary, which
io.atomic removes) and propagate: after a full disk every later write would fail too.
"""

from __future__ import annotations

import os
from functools import partial
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

from targan_cli.errors import DiskFullError, UsageError

Item = TypeVar("Item")
Read = TypeVar("Read")
Done = TypeVar("Done")
Written = TypeVar("Written")
_END = object()


def default_workers() -> int:
    """The cores this process may use (its CPU affinity where the system tells it), at most 8."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores))


def check_workers(workers: int | None) -> int:
    """``--io-workers``: None is ``default_workers()``; a negative number is a usage error."""
    if workers is None:
        return default_workers()
    if workers < 0:
        raise UsageError(f"--io-workers must be 0 or more, not {workers}")
    return workers


@dataclass(frozen=True)
class Outcome(Generic[Item, Written]):
    """One item's result: what ``write`` returned, or the expected error that stopped it."""

    item: Item
    result: Written | None = None
    error: BaseException | None = None


def _call(function: Callable, value: object, expected: tuple[type[BaseException], ...]) -> tuple[object, BaseException | None]:
    try:
        return function(value), None
    except DiskFullError:  # every later write would fail too: the run stops
        raise
    except expected as error:
        return None, error


def stream(items: Iterable[Item], read: Callable[[Item], Read], process: Callable[[Item, Read], Done],
           write: Callable[[Item, Done], Written], *, workers: int,
           expected: tuple[type[BaseException], ...] = ()) -> Iterator[Outcome[Item, Written]]:
    """Each item's ``Outcome`` in order: ``write(item, process(item, read(item)))``, ``read`` and
    ``write`` on ``workers`` threads each (0: all in this thread, one item after the other), ``process``
    always in the calling thread."""
    items = list(items)
    if workers == 0:
        for item in items:
            value, error = _call(read, item, expected)
            if error is None:
                value, error = _call(partial(process, item), value, expected)
            if error is None:
                value, error = _call(partial(write, item), value, expected)
            yield Outcome(item, value, error)
        return
    readers = ThreadPoolExecutor(workers, thread_name_prefix="targan-read")
    writers = ThreadPoolExecutor(workers, thread_name_prefix="targan-write")
    reads: deque[tuple[Item, Future]] = deque()
    writes: deque[tuple[Item, Future | BaseException]] = deque()
    upcoming = iter(items)
    try:
        def fill() -> None:
            while len(reads) < workers:
                item = next(upcoming, _END)
                if item is _END:
                    return
                reads.append((item, readers.submit(_call, read, item, expected)))

        def finished(block: bool) -> Iterator[Outcome[Item, Written]]:
            while writes and (block or len(writes) > workers or
                              isinstance(writes[0][1], BaseException) or writes[0][1].done()):
                item, pending = writes.popleft()
                if isinstance(pending, BaseException):
                    yield Outcome(item, None, pending)
                else:
                    value, error = pending.result()
                    yield Outcome(item, value, error)

        fill()
        while reads:
            item, future = reads.popleft()
            value, error = future.result()
            fill()
            if error is None:
                value, error = _call(partial(process, item), value, expected)
            if error is None:
                writes.append((item, writers.submit(_call, partial(write, item), value, expected)))
            else:
                writes.append((item, error))
            yield from finished(block=False)
        yield from finished(block=True)
    finally:
        # Normal end: nothing is pending. Ctrl-C or an unexpected error: drop what has not started.
        readers.shutdown(wait=True, cancel_futures=True)
        writers.shutdown(wait=True, cancel_futures=True)
