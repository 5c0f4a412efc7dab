"""The report's figures (matplotlib, Agg backend), each returned as PNG bytes with its caption.

The caption (what the axes mean, where the numbers were measured: machine, runtime, threads) is
text beside the image in report.md and report.html, shown once; the image itself carries axis
labels with units, so a figure cut out of the report still reads. Text never overlaps: byte
axes get at most five ticks at round sizes, point labels move to a free spot, layer names go on
the y axis of horizontal bars.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
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


def _png(fig: Any) -> bytes:
    """Render ``fig`` as PNG bytes, trimmed to its content."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")  # type: ignore[attr-defined]
    return buffer.getvalue()


def measured(report: Report) -> list[StageRecord]:
    """The baseline and every stage that has a measurement (skipped stages have none)."""
    return [r for r in (report.baseline, *report.stages) if r.measurement is not None]


def _byte_ticks(low: float, high: float, most: int = 5) -> list[float]:
    """At most ``most`` round sizes (1, 2, 5 x B/KiB/MiB/GiB) spanning ``low``..``high``."""
    ticks = [
        k * unit
        for unit in (1, 2**10, 2**20, 2**30)
        for k in (1, 2, 5, 10, 20, 50, 100, 200, 500)
        if low <= k * unit <= high
    ]
    step = -(-len(ticks) // most)
    return ticks[::step] if ticks else [low, high]


def _bytes_axis(ax: Any, xs: list[float]) -> None:
    """Bytes on x in human units at round sizes, on a log scale when they span 10x or more."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

    if max(xs) >= 10 * min(xs):
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_locator(FixedLocator(_byte_ticks(*ax.get_xlim())))
    else:
        ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: human_bytes(v)))


_LABEL_SPOTS = (
    (5, 5, "left"),
    (5, -12, "left"),
    (-5, 5, "right"),
    (-5, -12, "right"),
    (5, 17, "left"),
    (5, -24, "left"),
    (5, 29, "left"),
    (5, -36, "left"),
)
"""Where a point's label may go, in points from the point (dx, dy, alignment), tried in order:
right above, right below, left above, left below, then further up and down."""


def _label_points(fig: Any, ax: Any, points: list[tuple[float, float, str]]) -> None:
    """Label each point at the first spot of :data:`_LABEL_SPOTS` where its text overlaps no
    label placed before it (measured on the rendered figure), else at the first spot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()

    def annotate(x: float, y: float, text: str, spot: tuple[int, int, str]) -> Any:
        dx, dy, align = spot
        return ax.annotate(
            text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=align, fontsize=8
        )

    placed: list[Any] = []
    for x, y, text in points:
        for spot in _LABEL_SPOTS:
            label = annotate(x, y, text, spot)
            if not any(label.get_window_extent(renderer).overlaps(box) for box in placed):
                break
            label.remove()
        else:  # every spot is taken: overlap at the first rather than drop the label
            label = annotate(x, y, text, _LABEL_SPOTS[0])
        placed.append(label.get_window_extent(renderer))


def _tradeoff(report: Report, x_of: Callable[[Any], float], xlabel: str, bytes_axis: bool) -> bytes:
    """Metric (y) against ``x_of`` of each measured stage, in recipe order."""
    from matplotlib.figure import Figure as MplFigure

    fig = MplFigure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    kept_x, kept_y, labels = [], [], []
    for record in measured(report):
        m = record.measurement
        assert m is not None
        x, y = x_of(m), record.metric
        undone = record.status == "rolled back"
        ax.scatter([x], [y], s=40, facecolors="none" if undone else "C0", edgecolors="C0")
        labels.append((x, y, record.label + (" (rolled back)" if undone else "")))
        if not undone:
            kept_x.append(x)
            kept_y.append(y)
    ax.plot(kept_x, kept_y, color="C0", alpha=0.4)
    ax.margins(0.15)  # room for the point labels inside the axes
    if bytes_axis:
        _bytes_axis(ax, [x_of(r.measurement) for r in measured(report)])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{report.metric_name} (evaluation data)")
    ax.grid(alpha=0.3)
    _label_points(fig, ax, labels)
    return _png(fig)


def _layer_bars(layers: list[LayerInfo], column: str, label: str) -> bytes:
    """Horizontal bars, one per layer (top to bottom in model order), names on the y axis."""
    from matplotlib.figure import Figure as MplFigure

    shown = [x for x in layers if getattr(x, column) is not None]
    fig = MplFigure(figsize=(6.4, 0.8 + 0.22 * len(shown)))
    ax = fig.subplots()
    ax.barh(range(len(shown)), [getattr(x, column) for x in shown], color="C1")
    ax.set_yticks(range(len(shown)), [x.name for x in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(label)
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def _says_something_sparsity(values: Sequence[float]) -> bool:
    """Pruning shows; int8 rounding does not: some layer at least 5% zeros, and the layers
    differ by at least a point (a uniform value is one number, the layer table has it)."""
    return max(values) >= 0.05 and max(values) - min(values) >= 0.01


_LAYER_PLOTS: tuple[tuple[str, str, str, Callable[[Sequence[Any]], bool]], ...] = (
    (
        "sparsity",
        "Per-layer sparsity",
        "fraction of weights that are zero",
        _says_something_sparsity,
    ),
    ("bits", "Per-layer bit width", "bits per stored weight", lambda vs: len(set(vs)) > 1),
    ("rank", "Per-layer rank", "rank of the factorized weight", lambda vs: max(vs) > 0),
)
"""(column, title, definition, whether a chart of these values says something)."""


def figures(report: Report) -> list[Figure]:
    """The trade-off plots for every run, plus per-layer bars where they say something (the
    predicates of :data:`_LAYER_PLOTS`; the layer table has every value either way)."""
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
            _tradeoff(report, lambda m: m.bytes, "artifact bytes on disk", True),
        ),
        Figure(
            "metric-vs-latency",
            f"{metric} vs latency",
            latency_caption,
            _tradeoff(report, lambda m: m.latency_ms, "median latency, ms", False),
        ),
    ]
    layers = report.final.layers
    for column, title, definition, says_something in _LAYER_PLOTS:
        values = [getattr(x, column) for x in layers if getattr(x, column) is not None]
        if values and says_something(values):
            caption = f"{column} = {definition}, per layer of the compressed model. {where}."
            png = _layer_bars(layers, column, f"{column} ({definition})")
            out.append(Figure(f"layer-{column}", title, caption, png))
    return out
