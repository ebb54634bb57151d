"""Everything the tool prints: the Rich console, progress bars, tables and the one-line errors."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from targan_cli.errors import counted  # noqa: F401 - the CLI's one plural helper (messages share it)

# Printed lines are never hard-wrapped (soft_wrap): a path or a command to copy stays one line in
# a pipe, a log file or a narrow terminal. Progress stays on stdout: stderr holds the one-line
# error alone, which scripts and the guarantees rely on.
console = Console(soft_wrap=True)
error_console = Console(stderr=True)


def printable(text: str) -> str:
    """``text`` with control characters (a newline or escape sequence in a file or modality name)
    written as escapes, ``\\n``: one message stays one line and cannot move the cursor."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def strong(value: Any) -> str:
    """``value`` in bold, its text shown as it is: a path may hold square brackets, which Rich
    would otherwise read as markup (and drop, or fail on)."""
    return f"[bold]{escape(printable(str(value)))}[/]"


def print_error(message: str) -> None:
    """One line on stderr, no traceback; ``message`` is plain text, not markup."""
    error_console.print(f"[bold red]error:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)


def print_warning(message: str) -> None:
    error_console.print(f"[yellow]warning:[/] {escape(printable(message))}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def progress_bar(description: str, total: int | None, unit: str = "",
                 quiet: bool = False) -> Iterator[Callable[..., None]]:
    """A Rich progress bar; yields ``advance(n=1, **fields)`` for library callbacks.

    Keyword fields (e.g. ``status="loss 0.31"``) replace the text shown after the bar. The bar
    appears at the first call, so that a command refusing its input before any work prints its
    one-line error alone, without an empty bar before it. When stdout is not a terminal (a pipe,
    a log file), there is no bar: each stage ends with one plain line, ``stage: done/total unit``.
    ``quiet`` shows nothing (stdout carries JSON alone).
    """
    if quiet:
        yield lambda n=1, **fields: None
        return
    if not console.is_terminal:
        with _plain_progress(description, total, unit) as advance:
            yield advance
        return
    columns = [SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(),
               MofNCompleteColumn(), TextColumn(unit), TimeElapsedColumn(), TextColumn("eta"),
               TimeRemainingColumn(), TextColumn("{task.fields[status]}")]
    progress = Progress(*columns, console=console, transient=False)
    task: TaskID | None = None

    def advance(n: int = 1, **fields: Any) -> None:
        nonlocal task
        if task is None:
            progress.start()
            task = progress.add_task(description, total=total, status="")
        progress.update(task, advance=n, **fields)

    try:
        yield advance
    finally:
        if task is not None:
            progress.stop()


@contextlib.contextmanager
def _plain_progress(description: str, total: int | None, unit: str) -> Iterator[Callable[..., None]]:
    """``progress_bar`` for a pipe or a file: a plain, full line as each stage ends (no control
    codes, nothing redrawn), and nothing at all before the first progress."""
    state: dict[str, Any] = {"description": description, "total": total, "completed": 0, "status": "",
                             "started": False}

    def line() -> None:
        completed = f"{state['completed']:g}"  # a whole count, also when advanced by halves
        done = f"{completed}/{state['total']}" if state["total"] is not None else completed
        status = f" ({state['status']})" if state["status"] else ""
        console.print(escape(f"{state['description']}: {done}{' ' + unit if unit else ''}{status}"), highlight=False)

    def advance(n: int = 1, **fields: Any) -> None:
        if state["started"] and "description" in fields and fields["description"] != state["description"]:
            line()  # the stage before ends
            state["completed"] = 0
        state["started"] = True
        state["completed"] += n
        state.update(fields)

    try:
        yield advance
    finally:
        if state["started"]:
            line()


def print_table(table: Table) -> None:
    """A table on stdout; in a pipe or a file at its full width, never cut to a terminal's."""
    if console.is_terminal:
        console.print(table)
        return
    # A console as wide as the table wants (Rich caps a print's width at its console's).
    Console(file=console.file, width=100_000, soft_wrap=True).print(table)


def file_size(size: int) -> str:
    """A file size in words: "512 bytes", "1.6 GB" (decimal units, as `ls -h --si` and file managers)."""
    if size < 1000:
        return counted(size, "byte")
    exponent = min(int(math.log(size, 1000)), 4)  # 1: kB ... 4: TB
    return f"{size / 1000 ** exponent:.1f} {('kB', 'MB', 'GB', 'TB')[exponent - 1]}"


def key_value_table(title: str, rows: Mapping[str, Any]) -> Table:
    table = Table(title=escape(title), show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    for key, value in rows.items():
        table.add_row(escape(key), escape(str(value)))
    return table


def format_value(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}g}" if abs(value) < 1e-2 and value != 0 else f"{value:.{digits}f}".rstrip("0").rstrip(".")


def metric_table(title: str, columns: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]],
                 best: Sequence[int | None] = ()) -> Table:
    """A paper-style table: one row per label, one column per metric; ``best[c]`` is the row index
    to highlight in column ``c`` (or None)."""
    table = Table(title=escape(title), title_justify="left")
    table.add_column("", style="bold")
    for column in columns:
        table.add_column(escape(column), justify="right")
    for row_index, (label, cells) in enumerate(rows):
        styled = [f"[bold green]{escape(cell)}[/]" if column < len(best) and best[column] == row_index else escape(cell)
                  for column, cell in enumerate(cells)]
        table.add_row(escape(label), *styled)
    return table


def summary_cell(summary: Any | None, digits: int = 4) -> str:
    """A table cell for values summarized over volumes (``workflows.evaluate.Summary``).

    "mean ± std [low, high]" with ``digits`` decimals, so that a column lines up (the std and the
    bootstrap 95 % interval of the mean from two values on), then how many values were n/a (nan,
    e.g. RAVD of an empty reference) or infinite (PSNR of identical images); "inf" when all were
    infinite.
    """
    if summary is None or summary.count == 0:
        return "inf" if summary is not None and summary.infinite and not summary.missing else "n/a"

    def fixed(value: float) -> str:
        return f"{value:.{digits}f}" if value == 0 or abs(value) >= 10 ** -digits else format_value(value, digits)

    text = fixed(summary.mean)
    if summary.count > 1:
        text += f" ± {fixed(summary.std)} [{fixed(summary.low)}, {fixed(summary.high)}]"
    extras = [f"{count} {what}" for count, what in ((summary.missing, "n/a"), (summary.infinite, "inf")) if count]
    return f"{text} ({', '.join(extras)})" if extras else text


def evaluation_table(result: Any, max_columns: int = 6) -> Table:
    """The table of a ``workflows.evaluate.EvaluationResult``, best cells marked: one row per model
    (the paper's layout), or, past ``max_columns`` metric columns, one row per metric column.
    Every metric column carries its n (volumes, or values, per cell) and a cell's bracket is the
    bootstrap 95 % interval of its mean."""
    cells = [[summary_cell(summary, column.digits) for summary, column in zip(summaries, result.columns)]
             for _, summaries in result.rows]
    counts = [result.column_count(index) for index in range(len(result.columns))]
    labels = [column.label for column in result.columns]
    if len(labels) <= max_columns:
        return metric_table(result.title, [f"{label} (n={count})" for label, count in zip(labels, counts)],
                            list(zip(result.models, cells)), result.best)
    table = Table(title=escape(result.title), title_justify="left")
    table.add_column("", style="bold")
    for model in result.models:
        table.add_column(escape(model), justify="right")
    table.add_column("n", justify="right")
    for index, label in enumerate(labels):
        table.add_row(escape(label), *[f"[bold green]{escape(row[index])}[/]" if result.best[index] == model
                                       else escape(row[index]) for model, row in enumerate(cells)],
                      counts[index])
    return table


def translate_table(volumes: Sequence[Any]) -> Table:
    """One row per output of a translate run (``workflows.translate.VolumeReport``): what was done,
    the source, the QC grade (ok / check / poor, "-" without QC) and the cycle score."""
    table = Table(title="Outputs", title_justify="left")
    for column, justify in (("output", "left"), ("done", "left"), ("from", "left"), ("QC", "left"),
                            ("cycle score", "right"), ("flagged slices", "right")):
        table.add_column(column, justify=justify)
    colours = {"ok": "green", "check": "yellow", "poor": "bold red"}
    for report in volumes:
        quality = report.quality
        grade = quality.grade.grade if quality is not None else "-"
        score = format_value(quality.cycle_volume, 3) if quality is not None else "-"
        if quality is not None and quality.span is not None and not math.isnan(quality.cycle_volume):
            score += f" ({quality.cycle_volume * quality.span:.1f} {quality.unit})"
        flagged = str(len(quality.grade.flagged)) if quality is not None else "-"
        done = report.status + (f" ({report.note})" if report.note else "")
        table.add_row(escape(report.output.name), escape(done), escape(report.source.name),
                      f"[{colours[grade]}]{grade}[/]" if grade in colours else grade, score, flagged)
    return table
