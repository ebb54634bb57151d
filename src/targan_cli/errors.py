"""The one error type a user can cause. The CLI turns it into a one-line message and exit code."""

from __future__ import annotations

from pathlib import Path


class TarganError(Exception):
    """A problem with the user's input, files or options: reported in one line, never a traceback.

    ``path`` names the file or folder concerned; the message says what is wrong with it and,
    where it helps, what to do. ``exit_code`` is 1 for bad data or files, 2 for bad usage.
    """

    def __init__(self, message: str, path: str | Path | None = None, exit_code: int = 1):
        self.message = message
        self.path = None if path is None else Path(path)
        self.exit_code = exit_code
        super().__init__(str(self))

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path is not None else self.message


class UsageError(TarganError):
    """A bad option or a combination of options (exit code 2)."""

    def __init__(self, message: str, path: str | Path | None = None):
        super().__init__(message, path, exit_code=2)


class DiskFullError(TarganError):
    """A write failed because its disk is full (exit code 1). A folder run stops at the first one:
    every later write would fail too, after its volume had been read and translated for nothing."""


def counted(count: int, noun: str, plural: str | None = None) -> str:
    """A count and its noun in agreement, for every message the tool prints: "1 slice", "2 slices",
    "0 slices", "1,000 steps" (thousands grouped, as the docs write them); ``plural`` for nouns that
    do not take an s ("1 series", "2 series")."""
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


def listed(items: list[str]) -> str:
    """Items as a sentence lists them: "a", "a and b", "a, b and c"; "none" for none."""
    if not items:
        return "none"
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
