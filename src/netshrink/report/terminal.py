"""The report as rich tables for the terminal, narrowed to the columns that fit its width."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from netshrink.report.tables import (
    STAGE_HEADERS,
    headline,
    measured_on_phrases,
    notes,
    stage_headers,
    stage_rows,
)

if TYPE_CHECKING:
    from netshrink.report.record import Report

PRIORITY = (
    "stage",
    "status",
    "compression",
    "speedup",
    "metric",
    "drop",
    "bytes",
    "latency ms",
    "params",
    "MACs",
    "non-zero",
    "seconds",
)
"""Columns of :data:`STAGE_HEADERS` in the order a narrow terminal keeps them: whether the stage
was kept, then size, speed and quality against the baseline; the rest stay in report.md and
report.html. At 80 columns the demo shows the first eight."""


def _stage_table(report: Report, columns: Sequence[int]) -> Table:
    """The per-stage table with only ``columns`` (indices into :data:`STAGE_HEADERS`)."""
    headers = stage_headers(report)
    table = Table(title="stages", box=None, pad_edge=False, header_style="bold underline")
    for c in columns:
        table.add_column(headers[c], no_wrap=True)
    for i, row in enumerate(stage_rows(report)):
        undone = i and report.stages[i - 1].status != "applied"
        table.add_row(*(row[c] for c in columns), style="dim" if undone else "")
    return table


def _wanted(report: Report) -> list[int]:
    """:data:`PRIORITY` as column indices; ``status`` only when some stage was not applied
    (the baseline row is labelled already)."""
    applied = all(r.status == "applied" for r in report.stages)
    return [STAGE_HEADERS.index(h) for h in PRIORITY if not (applied and h == "status")]


def fitting_columns(report: Report, console: Console) -> list[int]:
    """Indices of the stage-table columns to show: the longest prefix of :data:`PRIORITY` that
    fits the console's width (the stage name always), in the table's own order."""
    unbounded = console.options.update(max_width=10_000)
    chosen: list[int] = []
    for column in _wanted(report):
        trial = sorted([*chosen, column])
        width = Measurement.get(console, unbounded, _stage_table(report, trial)).maximum
        if chosen and width > console.width:
            break
        chosen = trial
    return chosen


def say(console: Console, *phrases: str, style: str | None = None) -> None:
    """Print ``phrases`` joined by commas, breaking lines only between phrases (never inside
    one), indenting continuation lines; a line keeps room for the comma that ends it."""
    lines = [phrases[0]]
    for phrase in phrases[1:]:
        if len(f"{lines[-1]}, {phrase}") >= console.width:
            lines[-1] += ","
            lines.append(f"  {phrase}")
        else:
            lines[-1] += f", {phrase}"
    console.print("\n".join(lines), soft_wrap=True, style=style)


if TYPE_CHECKING:
    from netshrink.report.record import Report


def print_report(report: Report, console: Console, stages: bool = True) -> None:
    """Print the headline and, when ``stages``, the per-stage table (the columns that fit the
    console), notes and where it was measured."""
    head = Table(show_header=False, box=None, pad_edge=False)
    head.add_column(no_wrap=True)
    head.add_column(no_wrap=True)
    for label, value in headline(report):
        head.add_row(f"[bold]{label}[/bold]", value)
    console.print(head)
    if not stages:
        return
    columns = fitting_columns(report, console)
    console.print(_stage_table(report, columns))
    left_out = [stage_headers(report)[c] for c in _wanted(report) if c not in columns]
    if left_out:
        shown = f"not shown here: {', '.join(left_out)} (in report.md and report.html)"
        console.print(shown, style="dim")
    for note in notes(report):
        console.print(f"[yellow]{escape(note)}[/yellow]")
    say(console, *measured_on_phrases(report), style="dim")
