"""The report as rich tables for the terminal."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from netshrink.report.tables import STAGE_HEADERS, headline, measured_on, notes, stage_rows

if TYPE_CHECKING:
    from netshrink.report.record import Report


def print_report(report: Report, console: Console, stages: bool = True) -> None:
    """Print the headline and, when ``stages``, the per-stage table, notes and where measured."""
    head = Table(show_header=False, box=None, pad_edge=False)
    for label, value in headline(report):
        head.add_row(f"[bold]{label}[/bold]", value)
    console.print(head)
    if not stages:
        return
    table = Table(*STAGE_HEADERS, title="stages")
    for i, row in enumerate(stage_rows(report)):
        table.add_row(*row, style="dim" if i and report.stages[i - 1].status != "applied" else "")
    console.print(table)
    for note in notes(report):
        console.print(f"[yellow]{note}[/yellow]")
    console.print(measured_on(report), style="dim")
