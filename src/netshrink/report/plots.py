"""The report's figures (matplotlib, Agg backend), each returned as PNG bytes with its caption.

Every caption states what the axes mean and where the numbers were measured (machine, runtime,
threads), so a figure cut out of the report still says what it shows.
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from netshrink.report.tables import human_bytes, measured_on

if TYPE_CHECKING:
    from netshrink.report.record import LayerInfo, Report, StageRecord


@dataclass(frozen=True)
class Figure:
    """One plot: a file-safe ``name``, a title, a caption stating its definition, PNG bytes."""

    name: str
    title: str
    caption: str
    png: bytes


def _png(fig: Any, caption: str) -> bytes:
    """Render ``fig`` with ``caption`` (definition, machine, runtime, threads) above its axes,
    where rotated tick labels cannot cover it."""
    fig.axes[0].set_title(textwrap.fill(caption, 110), fontsize=7, loc="left")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
    return buffer.getvalue()


def measured(report: Report) -> list[StageRecord]:
    """The baseline and every stage that has a measurement (skipped stages have none)."""
    return [r for r in (report.baseline, *report.stages) if r.measurement is not None]


def _bytes_axis(ax: Any, xs: list[float]) -> None:
    """Bytes on x in human units, on a log scale when the sizes span a factor of 10 or more."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    if max(xs) >= 10 * min(xs):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human_bytes(v)))


def _tradeoff(
    report: Report, x_of: Callable[[Any], float], xlabel: str, footer: str, bytes_axis: bool
) -> bytes:
    """Metric (y) against ``x_of`` of each measured stage, in recipe order."""
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    kept_x, kept_y = [], []
    for record in measured(report):
        m = record.measurement
        assert m is not None
        x, y = x_of(m), record.metric
        undone = record.status == "rolled back"
        ax.scatter([x], [y], s=40, facecolors="none" if undone else "C0", edgecolors="C0")
        ax.annotate(
            record.label + (" (rolled back)" if undone else ""),
            (x, y),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
        if not undone:
            kept_x.append(x)
            kept_y.append(y)
    ax.plot(kept_x, kept_y, color="C0", alpha=0.4)
    if bytes_axis:
        _bytes_axis(ax, [x_of(r.measurement) for r in measured(report)])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(report.metric_name)
    ax.grid(alpha=0.3)
    return _png(fig, footer)


def _layer_bars(layers: list[LayerInfo], column: str, footer: str) -> bytes:
    from matplotlib.figure import Figure as MplFigure

    shown = [x for x in layers if getattr(x, column) is not None]
    fig = MplFigure(figsize=(max(6.4, 0.35 * len(shown)), 4.0))
    ax = fig.subplots()
    ax.bar(range(len(shown)), [getattr(x, column) for x in shown], color="C1")
    ax.set_xticks(range(len(shown)), [x.name for x in shown], rotation=70, fontsize=7)
    ax.set_ylabel(column)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig, footer)


_LAYER_PLOTS = (
    ("sparsity", "Per-layer sparsity", "fraction of weights that are zero", lambda v: v > 0),
    ("bits", "Per-layer bit width", "bits per stored weight", lambda v: v != 32),
    ("rank", "Per-layer rank", "rank of the factorized weight", lambda v: v > 0),
)


def figures(report: Report) -> list[Figure]:
    """The trade-off plots for every run, plus per-layer bars where some layer has a value."""
    where = measured_on(report)
    metric = report.metric_name
    size_caption = (
        f"Each point is the model after one stage (hollow: rolled back by its guard); x = bytes "
        f"of the saved artifact (log scale when they span 10x), y = {metric} on the evaluation "
        f"data. {where}."
    )
    latency_caption = (
        f"Each point is the model after one stage; x = median latency of one forward pass on "
        f"one validation batch in ms, y = {metric} on the evaluation data. {where}."
    )
    out = [
        Figure(
            "metric-vs-size",
            f"{metric} vs size",
            size_caption,
            _tradeoff(report, lambda m: m.bytes, "artifact bytes", size_caption, True),
        ),
        Figure(
            "metric-vs-latency",
            f"{metric} vs latency",
            latency_caption,
            _tradeoff(report, lambda m: m.latency_ms, "latency ms", latency_caption, False),
        ),
    ]
    layers = report.final.layers
    for column, title, definition, interesting in _LAYER_PLOTS:
        values = [getattr(x, column) for x in layers if getattr(x, column) is not None]
        if any(interesting(v) for v in values):
            caption = f"{column} = {definition}, per layer of the compressed model. {where}."
            out.append(
                Figure(f"layer-{column}", title, caption, _layer_bars(layers, column, caption))
            )
    return out
