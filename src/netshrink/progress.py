"""Progress bars (rich) that stay silent when asked to, or when output is not a terminal."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

_enabled = True


def set_enabled(flag: bool) -> None:
    """Turn every progress bar on or off (``--quiet`` and ``--json`` turn them off)."""
    global _enabled
    _enabled = flag


def track(
    items: Iterable[T], desc: str, total: int | None = None, show: bool = True
) -> Iterator[T]:
    """Yield ``items`` while drawing a progress bar titled ``desc`` on stderr."""
    console = Console(stderr=True)
    if not (show and _enabled and console.is_terminal):
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(desc, total=total)
        for item in items:
            yield item
            bar.advance(task)


__all__ = ["set_enabled", "track"]
