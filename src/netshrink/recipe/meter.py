"""Measuring the model after each stage: the runner's one door to ``netshrink.measure``.

Every stage's model is compared with the baseline by :func:`netshrink.measure.compare`: bytes of
its saved artifact, parameters, MACs, latency timed interleaved with the baseline in this
process, and the metric. Per-layer sparsity, bit width and rank are read off the modules.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from netshrink.measure import Measurement

from netshrink.context import Batch, Evaluate
from netshrink.report.record import Environment, LayerInfo, StageRecord
from netshrink.settings import Timing
from netshrink.version import __version__

_FLOAT_BITS = {torch.float32: 32, torch.float64: 64, torch.float16: 16, torch.bfloat16: 16}


def machine() -> str:
    """The CPU model, architecture and core count, e.g. ``Intel Xeon ... (x86_64, 2 cores)``."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({platform.machine()}, {os.cpu_count()} cores)"


def versions() -> dict[str, str]:
    """Versions of python, torch and netshrink, as recorded in reports and manifests."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "netshrink": __version__,
    }


def _int_attr(module: nn.Module, name: str) -> int | None:
    value = getattr(module, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _weight(module: nn.Module) -> torch.Tensor | None:
    """The module's floating ``weight``, else its int8 ``weight_q`` codes, else None."""
    for attr, ok in (("weight", torch.is_floating_point), ("weight_q", _is_int8)):
        t = getattr(module, attr, None)
        if torch.is_tensor(t) and ok(t):
            return t
    return None


def _is_int8(t: torch.Tensor) -> bool:
    return t.dtype == torch.int8


def layer_info(model: nn.Module) -> list[LayerInfo]:
    """Sparsity, bit width and rank of every layer: a module with a weight, ``bits`` or ``rank``.

    sparsity = fraction of the weight's elements that are exactly zero, read from a floating
    ``weight`` or from int8 ``weight_q`` codes (weights are quantized symmetrically, so a zero
    weight is a zero code; packed codes are not read); bits = the module's ``bits`` attribute,
    else the width of its floating weight's dtype; rank = the module's ``rank`` attribute.
    Values a module does not expose stay None rather than guessed.
    """
    out = []
    for name, module in model.named_modules():
        weight, bits, rank = _weight(module), _int_attr(module, "bits"), _int_attr(module, "rank")
        if not name or (weight is None and bits is None and rank is None):
            continue
        if bits is None and weight is not None:
            bits = _FLOAT_BITS.get(weight.dtype)
        sparsity = float((weight == 0).float().mean()) if weight is not None else None
        out.append(LayerInfo(name, type(module).__name__, sparsity, bits, rank))
    return out


class Meter:
    """Measures models against one baseline on fixed inputs, data, metric and :class:`Timing`."""

    def __init__(
        self,
        baseline: nn.Module,
        example_inputs: tuple[Any, ...],
        evaluate: Evaluate,
        data: Iterable[Batch],
        timing: Timing,
    ) -> None:
        self.baseline = baseline
        self.example_inputs = example_inputs
        self.evaluate = evaluate
        self.data = list(data)
        self.timing = timing
        self.last: Measurement | None = None

    def measure_baseline(self) -> StageRecord:
        """The baseline's record: measured alone, its latency its own."""
        from netshrink.measure import measure

        m = self.last = measure(
            self.baseline,
            self.example_inputs,
            evaluate=self.evaluate,
            data=self.data,
            timing=self.timing,
        )
        return StageRecord(
            None, "baseline", "baseline", m, m.latency_ms, layers=layer_info(self.baseline)
        )

    def measure(self, model: nn.Module) -> tuple[Measurement, float]:
        """``model``'s measurement and the baseline's latency, timed interleaved with it (ms)."""
        from netshrink.measure import compare

        both = compare(
            self.baseline,
            model,
            self.example_inputs,
            evaluate=self.evaluate,
            data=self.data,
            timing=self.timing,
        )
        self.last = both.candidate
        return both.candidate, both.baseline.latency_ms

    def environment(self) -> Environment:
        """Machine, runtime, threads, timed runs and versions of the measurements taken."""
        assert self.last is not None, "measure something first"
        return Environment(
            machine(), self.last.runtime, self.last.threads, self.last.runs, versions()
        )
