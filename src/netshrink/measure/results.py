"""Measurement results that print themselves as tables, each row carrying its definition."""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class Measurement:
    """What one model measured. ``None`` means not measurable for this model (an ONNX file)."""

    params: int | None
    nonzero_params: int | None
    macs: int | None
    bytes: int
    latency_ms: float
    latency_p90_ms: float
    runtime: str
    threads: int
    batch_size: int
    runs: int
    peak_memory_bytes: int | None
    metric: float | None = None
    metric_name: str | None = None
    bytes_of: str = "netshrink artifact"
    timed: str = "interleaved"
    """How the models measured together were timed: one of ``measure.latency.TIMED``."""

    def rows(self) -> list[tuple[str, Any]]:
        """(label with definition and unit, value) pairs, in table order."""
        return [
            ("parameters (weight elements)", self.params),
            ("non-zero parameters (weight elements != 0)", self.nonzero_params),
            (f"MACs (multiply-accumulates per forward, batch {self.batch_size})", self.macs),
            (f"size on disk (bytes of the saved {self.bytes_of})", self.bytes),
            (f"latency median (ms per forward, batch {self.batch_size})", self.latency_ms),
            ("latency p90 (ms, 90th percentile)", self.latency_p90_ms),
            ("peak memory (bytes of tensors alive at once, eager)", self.peak_memory_bytes),
            (f"{self.metric_name or 'metric'} (higher is better)", self.metric),
        ]

    def settings(self) -> str:
        """How the latency was taken: runtime, threads, timed runs, interleaved or isolated."""
        return (
            f"runtime {self.runtime}, threads {self.threads}, median of {self.runs} timed runs, "
            f"{self.timed}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-serialisable."""
        return asdict(self)

    def __str__(self) -> str:
        table = Table(title=f"measurement ({self.settings()})", box=box.SIMPLE_HEAD)
        table.add_column("quantity (definition, unit)")
        table.add_column("value", justify="right")
        for label, value in self.rows():
            table.add_row(label, fmt(value))
        return render(table)


@dataclass(frozen=True)
class Comparison:
    """A baseline and a candidate measured in one process, same runtime, threads and input."""

    baseline: Measurement
    candidate: Measurement

    @property
    def compression_rate(self) -> float:
        """Baseline bytes on disk / candidate bytes on disk."""
        return self.baseline.bytes / self.candidate.bytes

    @property
    def speedup_rate(self) -> float:
        """Baseline median latency / candidate median latency, timed interleaved."""
        return self.baseline.latency_ms / self.candidate.latency_ms

    @property
    def metric_drop(self) -> float | None:
        """Baseline metric - candidate metric (positive: the candidate lost), or None."""
        if self.baseline.metric is None or self.candidate.metric is None:
            return None
        return self.baseline.metric - self.candidate.metric

    def headline(self) -> str:
        """One line: compression rate, speedup rate, metric drop."""
        drop = self.metric_drop
        name = self.baseline.metric_name or "metric"
        lost = f", {name} drop {drop:+.4f}" if drop is not None else ""
        return (
            f"compression rate {self.compression_rate:.2f}x (bytes on disk), speedup rate "
            f"{self.speedup_rate:.2f}x (median latency){lost}"
        )

    def to_dict(self) -> dict[str, Any]:
        """Both measurements and the three rates, JSON-serialisable."""
        return {
            "baseline": self.baseline.to_dict(),
            "candidate": self.candidate.to_dict(),
            "compression_rate": self.compression_rate,
            "speedup_rate": self.speedup_rate,
            "metric_drop": self.metric_drop,
        }

    def __str__(self) -> str:
        table = Table(
            title=f"comparison ({self.baseline.settings()}, interleaved)",
            caption=self.headline(),
            box=box.SIMPLE_HEAD,
        )
        for name, justify in [("quantity (definition, unit)", "left"), ("baseline", "right")]:
            table.add_column(name, justify=justify)  # type: ignore[arg-type]
        table.add_column("candidate", justify="right")
        table.add_column("baseline / candidate", justify="right")
        rows = list(zip(self.baseline.rows(), self.candidate.rows(), strict=True))
        for i, ((label, before), (_, after)) in enumerate(rows):
            # The metric's change is its drop (in the caption), not a ratio.
            rate = ratio(before, after) if i < len(rows) - 1 else ""
            table.add_row(label, fmt(before), fmt(after), rate)
        return render(table)


def fmt(value: Any) -> str:
    """A table cell: integers with thousands separators, floats to 4 significant digits."""
    if value is None:
        return "not measured"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.4g}"


def ratio(before: Any, after: Any) -> str:
    """``before / after`` as ``1.23x``, or empty when either is missing or zero."""
    if not before or not after:
        return ""
    return f"{before / after:.2f}x"


def render(table: Table) -> str:
    """A rich table as plain text (no colour codes), 110 columns wide."""
    console = Console(file=io.StringIO(), width=110, color_system=None, force_terminal=False)
    console.print(table)
    return console.file.getvalue().rstrip() + "\n"  # type: ignore[attr-defined]
