"""The report's tables as rows of strings, shared by the terminal, Markdown, HTML and text views."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

DEFINITIONS = (
    ("bytes", "size on disk of the model saved as a netshrink artifact"),
    ("compression rate", "baseline bytes / compressed bytes"),
    ("latency", "median time of one forward pass on one validation batch, after warm-up"),
    ("speedup rate", "baseline latency / compressed latency, timed interleaved in one process"),
    ("metric drop", "metric before - metric after (positive: worse)"),
    ("MACs", "multiply-accumulates of one forward pass (torch.utils.flop_counter)"),
)

if TYPE_CHECKING:
    from netshrink.report.record import Report, StageRecord

STAGE_HEADERS = (
    "stage",
    "status",
    "params",
    "non-zero",
    "MACs",
    "bytes",
    "compression",
    "latency ms",
    "speedup",
    "metric",
    "drop",
    "seconds",
)
"""Columns of the per-stage table; ``metric`` is shown under the metric's own name."""


def stage_headers(report: Report) -> list[str]:
    """:data:`STAGE_HEADERS` with ``metric`` replaced by the report's metric name."""
    return [report.metric_name if h == "metric" else h for h in STAGE_HEADERS]


def plural(n: int, word: str) -> str:
    """``1 thread``, ``2 threads``: a count and a noun in the number it takes."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def human_bytes(n: float) -> str:
    """``n`` bytes as B, KiB or MiB with three significant figures."""
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def human_count(n: float) -> str:
    """A count with a k/M/G suffix."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def rate(x: float) -> str:
    """A ratio as ``12.3x``."""
    return f"{x:.3g}x" if x < 100 else f"{x:.0f}x"


def measured_on_phrases(report: Report) -> list[str]:
    """The phrases of :func:`measured_on`, for printing that breaks lines only between them."""
    env = report.environment
    return [
        f"Measured on {env.machine}",
        f"runtime {env.runtime}",
        plural(env.threads, "thread"),
        f"median of {plural(env.latency_runs, 'timed run')}",
    ]


def measured_on(report: Report) -> str:
    """The line every figure and table carries: machine, runtime, threads, timed runs."""
    return ", ".join(measured_on_phrases(report))


def headline(report: Report) -> list[tuple[str, str]]:
    """(label, value) pairs of the headline."""
    s = report.summary()
    return [
        (
            "compression rate",
            f"{rate(s['compression_rate'])}  "
            f"({human_bytes(s['baseline_bytes'])} -> {human_bytes(s['compressed_bytes'])})",
        ),
        (
            "speedup rate",
            f"{rate(s['speedup_rate'])}  "
            f"({s['latency_ms_before']:.3g} ms -> {s['latency_ms_after']:.3g} ms)",
        ),
        (f"{s['metric']} before / after", f"{s['metric_before']:.4f} / {s['metric_after']:.4f}"),
        (f"{s['metric']} drop", f"{s['metric_drop']:+.4f}"),
        *(
            [
                (
                    "artifact on disk",
                    f"{human_bytes(s['artifact_bytes'])}  (with the run's provenance)",
                )
            ]
            if s["artifact_bytes"] is not None
            else []
        ),
    ]


def stage_row(record: StageRecord, baseline: StageRecord) -> list[str]:
    """One row of the per-stage table (blank measurements for a skipped stage)."""
    m, b = record.measurement, baseline.measurement
    assert b is not None
    if m is None or record.speedup is None:
        return [record.label, record.status, *([""] * (len(STAGE_HEADERS) - 2))]
    return [
        record.label,
        record.status,
        human_count(m.params or 0),
        human_count(m.nonzero_params or 0),
        human_count(m.macs or 0),
        human_bytes(m.bytes),
        rate(b.bytes / m.bytes),
        f"{m.latency_ms:.3g}",
        rate(record.speedup),
        f"{record.metric:.4f}",
        f"{baseline.metric - record.metric:+.4f}",
        f"{record.seconds:.1f}",
    ]


def stage_rows(report: Report) -> list[list[str]]:
    """The per-stage table: the baseline first, then every stage in order."""
    return [stage_row(r, report.baseline) for r in (report.baseline, *report.stages)]


def notes(report: Report) -> list[str]:
    """Notes of stages a guard rolled back or skipped."""
    return [f"{r.label}: {r.note}" for r in report.stages if r.note]


def layer_rows(report: Report) -> tuple[list[str], list[list[Any]]]:
    """Per-layer table of the final model: only the columns some layer has a value for."""
    layers = report.final.layers
    columns = [c for c in ("sparsity", "bits", "rank") if any(getattr(x, c) for x in layers)]
    rows = []
    for layer in layers:
        values = [getattr(layer, c) for c in columns]
        cells = [
            f"{v:.3f}" if isinstance(v, float) else ("" if v is None else str(v)) for v in values
        ]
        rows.append([layer.name, layer.kind, *cells])
    return ["layer", "type", *columns], rows
