"""The report of a recipe run: every stage's measurements, the headline, the provenance.

Definitions used throughout (and stated in every rendering of the report):

- bytes: size on disk of the model saved as a netshrink artifact (safetensors + manifest)
- compression rate: baseline bytes / compressed bytes
- latency: median wall time of one forward pass on one validation batch, in milliseconds
- speedup rate: baseline latency / compressed latency, both timed interleaved in one process
  (``timed``: at several threads on ONNX Runtime or OpenVINO each in its own subprocess)
- metric drop: metric before - metric after (positive means worse)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from netshrink.report.text import plain_table

if TYPE_CHECKING:
    from netshrink.measure import Measurement

SCHEMA_VERSION = 1
"""Version of the report.json layout; bumped when a field changes meaning or disappears."""

SUMMARY_FIELDS = (
    "compression_rate",
    "speedup_rate",
    "metric_before",
    "metric_after",
    "metric_drop",
    "baseline_bytes",
    "compressed_bytes",
    "latency_ms_before",
    "latency_ms_after",
    "runtime",
    "threads",
    "timed",
    "artifact",
)


@dataclass(frozen=True)
class LayerInfo:
    """What a stage left in one layer: weight sparsity, bit width, rank (None where it has none)."""

    name: str
    kind: str
    sparsity: float | None = None
    bits: int | None = None
    rank: int | None = None


@dataclass
class StageRecord:
    """One row of the report: the baseline (index None) or one recipe stage."""

    index: int | None
    name: str
    status: str  # "baseline", "applied", "rolled back" or "skipped"
    measurement: Measurement | None
    baseline_latency_ms: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    guard_metric: float | None = None
    note: str = ""
    layers: list[LayerInfo] = field(default_factory=list)

    @property
    def speedup(self) -> float | None:
        """Baseline latency / this stage's latency, timed interleaved in one run."""
        if self.measurement is None or self.baseline_latency_ms is None:
            return None
        return self.baseline_latency_ms / self.measurement.latency_ms

    @property
    def metric(self) -> float:
        """The stage's metric on the evaluation data (the runner always measures one)."""
        assert self.measurement is not None and self.measurement.metric is not None
        return self.measurement.metric

    @property
    def label(self) -> str:
        """``baseline`` or ``0 prune.channels``."""
        return self.name if self.index is None else f"{self.index} {self.name}"


@dataclass
class Environment:
    """Where the numbers were measured."""

    machine: str
    runtime: str
    threads: int
    latency_runs: int
    versions: dict[str, str]
    timed: str = "interleaved"
    """interleaved, shared pool or subprocess (see ``netshrink.measure.latency.TIMED``)."""


@dataclass
class Report:
    """Every measurement of a recipe run; ``str(report)`` is a text table."""

    baseline: StageRecord
    stages: list[StageRecord]
    recipe: dict[str, Any]
    seed: int
    metric_name: str
    environment: Environment
    artifact: str | None = None
    delivered_bytes: tuple[int, int] | None = None

    @property
    def final(self) -> StageRecord:
        """The last stage whose model was kept (the baseline when none was)."""
        kept = [s for s in self.stages if s.status == "applied"]
        return kept[-1] if kept else self.baseline

    def summary(self) -> dict[str, Any]:
        """The headline: the fields of ``--json`` (see the module docstring for definitions).

        The bytes are those the stage table shows for the baseline and the final stage, so the
        headline and the table always agree. Once the run is saved, ``artifact_bytes`` is the
        delivered artifact's size on disk, which also holds the run's provenance.
        """
        before, after = self.baseline, self.final
        assert before.measurement is not None and after.measurement is not None
        base_bytes, compressed = before.measurement.bytes, after.measurement.bytes
        return {
            "compression_rate": base_bytes / compressed,
            "speedup_rate": after.speedup,
            "metric": self.metric_name,
            "metric_before": before.metric,
            "metric_after": after.metric,
            "metric_drop": before.metric - after.metric,
            "baseline_bytes": base_bytes,
            "compressed_bytes": compressed,
            "latency_ms_before": after.baseline_latency_ms,
            "latency_ms_after": after.measurement.latency_ms,
            "runtime": self.environment.runtime,
            "threads": self.environment.threads,
            "timed": self.environment.timed,
            "machine": self.environment.machine,
            "artifact": self.artifact,
            "artifact_bytes": self.delivered_bytes[1] if self.delivered_bytes else None,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data: the ``report.json`` layout, version :data:`SCHEMA_VERSION`."""
        return {
            "schema_version": SCHEMA_VERSION,
            "summary": self.summary(),
            "stages": [_record(s) for s in (self.baseline, *self.stages)],
            "recipe": self.recipe,
            "seed": self.seed,
            "environment": asdict(self.environment),
        }

    def provenance(self) -> dict[str, Any]:
        """What the artifact manifest records: resolved recipe, seed, where measured, and each
        stage's headline numbers (kept short: the manifest's bytes count in the artifact's size;
        report.json holds everything, and the manifest already records the versions)."""
        env = self.environment
        return {
            "recipe": self.recipe,
            "seed": self.seed,
            "metric": self.metric_name,
            "measured_on": [env.machine, env.runtime, env.threads, env.latency_runs],
            "stage_columns": list(PROVENANCE_COLUMNS),
            "stages": [_short(s) for s in (self.baseline, *self.stages)],
        }

    def __str__(self) -> str:
        return plain_table(self)


def _record(s: StageRecord) -> dict[str, Any]:
    return {**asdict(s), "speedup": s.speedup}


PROVENANCE_COLUMNS = (
    "stage",
    "status",
    "params",
    "nonzero_params",
    "macs",
    "bytes",
    "latency_ms",
    "baseline_latency_ms",
    "metric",
)


def _short(s: StageRecord) -> list[Any]:
    """One stage as a row of :data:`PROVENANCE_COLUMNS` (None where it was not measured)."""
    m = s.measurement
    numbers = [
        getattr(m, k, None) if m is not None else None
        for k in ("params", "nonzero_params", "macs", "bytes", "latency_ms")
    ]
    metric = m.metric if m is not None else None
    return [s.label, s.status, *numbers, s.baseline_latency_ms, metric]
