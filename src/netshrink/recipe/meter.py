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
from netshrink.cpu import SATURATING_INT8
from netshrink.layers import CompressedLayer
from netshrink.report.record import Environment, LayerInfo, StageRecord
from netshrink.settings import Timing
from netshrink.version import __version__

_FLOAT_BITS = {torch.float32: 32, torch.float64: 64, torch.float16: 16, torch.bfloat16: 16}


def machine() -> str:
    """The CPU model, architecture and core count, e.g. ``Intel Xeon ... (x86_64, 2 cores)``.

    On an x86 CPU without VNNI it adds ``int8 without VNNI``: there int8 GEMMs run on AVX2
    kernels that are no faster than fp32, which explains an int8 model's speedup below 1x.
    """
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    int8 = ", int8 without VNNI" if SATURATING_INT8 else ""
    return f"{name} ({platform.machine()}, {os.cpu_count()} cores{int8})"


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


def _weight_and_bits(module: nn.Module) -> tuple[torch.Tensor | None, int | None]:
    """The float weight of a layer and the bits one stored weight element takes, if known.

    A compressed layer answers through its contract (``weight``, ``weight_bits()``); any other
    module through a floating ``weight`` tensor of its own.
    """
    if isinstance(module, CompressedLayer):
        with torch.no_grad():
            return module.weight.detach(), module.weight_bits()
    t = module._parameters.get("weight")
    if t is not None and torch.is_floating_point(t):
        return t.detach(), _FLOAT_BITS.get(t.dtype)
    return None, None


def layer_info(model: nn.Module) -> list[LayerInfo]:
    """Sparsity, bit width and rank of every layer: a module with a weight or a ``rank``.

    sparsity = fraction of the (decoded) weight's elements that are exactly zero; bits = bits
    of one stored weight element (a compressed layer's ``weight_bits()``, else the width of
    its floating weight's dtype); rank = the module's ``rank`` attribute (low-rank layers).
    The parts of a compressed layer (a low-rank layer's two factors) are not listed apart.
    """
    out = []
    inside: str | None = None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue
        if isinstance(module, CompressedLayer):
            inside = f"{name}."
        weight, bits = _weight_and_bits(module)
        rank = _int_attr(module, "rank")
        if not name or (weight is None and rank is None):
            continue
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
        last = self.last
        return Environment(
            machine(), last.runtime, last.threads, last.runs, versions(), timed=last.timed
        )
