"""Measuring the model after each stage: the runner's one door to ``netshrink.measure``.

Every stage's model is saved as an artifact in a scratch folder (its bytes are what the disk
holds), its MACs counted, its latency timed interleaved with the baseline in this process, and its
metric evaluated. Per-layer sparsity, bit width and rank are read off the modules.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netshrink.context import Batch, Evaluate
from netshrink.recipe.result import Environment, LayerInfo, Measurement

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
    import netshrink

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "netshrink": netshrink.__version__,
    }


def layer_info(model: nn.Module) -> list[LayerInfo]:
    """Sparsity, bit width and rank of every module that holds a ``weight`` tensor.

    sparsity = fraction of the weight's elements that are exactly zero (floating weights only);
    bits = the module's ``bits`` attribute, else the width of a floating weight's dtype;
    rank = the module's ``rank`` attribute (low-rank layers). Unknown values stay None.
    """
    out = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not name or not torch.is_tensor(weight):
            continue
        floating = weight.is_floating_point()
        bits = getattr(module, "bits", None)
        rank = getattr(module, "rank", None)
        out.append(
            LayerInfo(
                name=name,
                kind=type(module).__name__,
                sparsity=float((weight == 0).float().mean()) if floating else None,
                bits=int(bits) if isinstance(bits, int) else _FLOAT_BITS.get(weight.dtype),
                rank=int(rank) if isinstance(rank, int) else None,
            )
        )
    return out


class Meter:
    """Measures models against one baseline on fixed inputs, data and metric."""

    def __init__(
        self,
        baseline: nn.Module,
        example_inputs: tuple[Any, ...],
        evaluate: Evaluate,
        data: Iterable[Batch],
        scratch: Path,
        runs: int = 20,
    ) -> None:
        self.baseline = baseline
        self.example_inputs = example_inputs
        self.evaluate = evaluate
        self.data = list(data)
        self.scratch = scratch
        self.runs = runs
        self.runtime = "torch-eager"
        self.threads = torch.get_num_threads()
        self._count = 0

    def size(self, model: nn.Module) -> int:
        """Bytes on disk of ``model`` saved as an artifact (no provenance)."""
        from netshrink.artifact import artifact_bytes, save

        self._count += 1
        path = self.scratch / f"m{self._count}"
        save(model, path)
        return int(artifact_bytes(path))

    def measure(self, model: nn.Module) -> Measurement:
        """Params, non-zeros, MACs, bytes, latency (vs the baseline, interleaved) and metric."""
        from netshrink.measure import compare, count_macs

        timing = compare(self.baseline, model, self.example_inputs, runs=self.runs)
        self.runtime = str(timing.runtime)
        self.threads = int(timing.threads)
        return Measurement(
            params=sum(p.numel() for p in model.parameters()),
            nonzero_params=sum(int(torch.count_nonzero(p)) for p in model.parameters()),
            macs=int(count_macs(model, self.example_inputs)),
            bytes=self.size(model),
            latency_ms=float(timing.candidate.latency_ms),
            baseline_latency_ms=float(timing.baseline.latency_ms),
            metric=float(self.evaluate(model, self.data)),
        )

    def environment(self) -> Environment:
        """Machine, runtime, threads and versions of the measurements taken so far."""
        return Environment(machine(), self.runtime, self.threads, versions(), self.runs)
