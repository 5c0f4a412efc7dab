"""What pruning left behind: per-layer sparsity and the kernel each sparse layer runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from netshrink.prune.sparse_layers import SparseConv2d, SparseLinear


@dataclass
class LayerSparsity:
    """One layer: its fraction of zero weights, the kernel it runs, the timings behind it."""

    name: str
    kind: str
    sparsity: float
    kernel: str
    dense_ms: float | None = None
    csr_ms: float | None = None


@dataclass
class SparsityReport:
    """Per-layer sparsity (fraction of weights that are zero) and kernel choice."""

    layers: list[LayerSparsity] = field(default_factory=list)

    @property
    def dense_layers(self) -> list[str]:
        """Names of the sparse layers that run the dense kernel (CSR was not faster)."""
        return [row.name for row in self.layers if row.kernel == "dense"]

    def __str__(self) -> str:
        head = (
            f"{'layer':<28} {'type':<13} {'sparsity':>8} {'kernel':>6} {'dense ms':>9} "
            f"{'csr ms':>8}"
        )
        lines = [head, "-" * len(head)]
        for r in self.layers:
            dense = "-" if r.dense_ms is None else f"{r.dense_ms:.3f}"
            csr = "-" if r.csr_ms is None else f"{r.csr_ms:.3f}"
            lines.append(
                f"{r.name:<28} {r.kind:<13} {r.sparsity:>8.3f} {r.kernel:>6} {dense:>9} {csr:>8}"
            )
        lines.append(
            "sparsity = fraction of weights that are zero; kernel chosen by timing dense vs CSR "
            "(median ms) on this machine; '-' = not timed (sparsity below 0.5 or a spatial conv)"
        )
        return "\n".join(lines)


def sparsity_report(model: nn.Module) -> SparsityReport:
    """Report every SparseLinear / SparseConv2d of ``model``."""
    report = SparsityReport()
    for name, m in model.named_modules():
        if isinstance(m, SparseLinear | SparseConv2d):
            report.layers.append(
                LayerSparsity(
                    name,
                    type(m).__name__,
                    m.sparsity(),
                    m.kernel,
                    m.timing.get("dense_ms"),
                    m.timing.get("csr_ms"),
                )
            )
    return report
