"""Process-wide state a command changes for a block and puts back afterwards: signal handlers,
and the loggers of libraries that print to stderr on their own."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any


@contextlib.contextmanager
def handling_signals(signums: Iterable[int], handler: Callable[[int, Any], None]) -> Iterator[None]:
    """``handler`` for the signals ``signums`` during the block, the previous handlers after it.
    Python runs signal handlers in the main thread only: elsewhere nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, handler) for signum in signums}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def quiet_logger(name: str) -> Iterator[None]:
    """Silence the logger ``name`` during the block: nibabel logs its header fixes, torch.export.load
    a whole traceback before it raises, lines that would break a command's one-line error."""
    logger = logging.getLogger(name)
    disabled, logger.disabled = logger.disabled, True
    try:
        yield
    finally:
        logger.disabled = disabled
