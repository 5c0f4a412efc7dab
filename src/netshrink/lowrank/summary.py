"""What ``lowrank.svd`` did to each layer, kept on the returned model for reports to read."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

REPORT_ATTR = "lowrank_report"


@dataclass(frozen=True)
class LayerRecord:
    """One selected layer.

    ``params_before``/``params_after`` count weights and bias. ``energy_kept`` is the fraction
    of Σσ² (of the whitened weight when activation-aware) that the kept rank holds.
    ``skipped`` says why a layer was left as it was; then ``variant`` and ``rank`` are None.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    params_before: int
    params_after: int
    variant: str | None = None
    rank: int | None = None
    max_rank: int | None = None
    energy_kept: float | None = None
    skipped: str | None = None


@dataclass(frozen=True)
class LowRankReport:
    """Every selected layer's record, and how the ranks were chosen (e.g. ``budget=0.5``)."""

    selection: str
    activation_aware: bool
    layers: tuple[LayerRecord, ...]

    @property
    def params_before(self) -> int:
        """Weights and biases of the selected layers before factorization."""
        return sum(r.params_before for r in self.layers)

    @property
    def params_after(self) -> int:
        """Weights and biases of the same layers after (skipped layers count unchanged)."""
        return sum(r.params_after for r in self.layers)

    @property
    def factorized(self) -> tuple[LayerRecord, ...]:
        """Records of the layers that were replaced."""
        return tuple(r for r in self.layers if r.skipped is None)

    @property
    def skipped(self) -> tuple[LayerRecord, ...]:
        """Records of the layers left as they were."""
        return tuple(r for r in self.layers if r.skipped is not None)

    def __str__(self) -> str:
        aware = "activation-aware" if self.activation_aware else "plain"
        head = (
            f"lowrank.svd ({self.selection}, {aware}): {len(self.factorized)} of "
            f"{len(self.layers)} layers factorized, params {self.params_before:,} -> "
            f"{self.params_after:,} (energy = fraction of squared singular values kept)"
        )
        rows = [f"{'layer':<32} {'shape':<18} {'variant':<8} {'rank':>9} {'params':>21} energy"]
        for r in self.layers:
            shape = "x".join(map(str, r.shape))
            if r.skipped is None:
                rank = f"{r.rank}/{r.max_rank}"
                params = f"{r.params_before:,} -> {r.params_after:,}"
                rows.append(
                    f"{r.name:<32} {shape:<18} {r.variant:<8} {rank:>9} {params:>21} "
                    f"{r.energy_kept:.4f}"
                )
            else:
                rows.append(f"{r.name:<32} {shape:<18} skipped: {r.skipped}")
        return "\n".join([head, *rows])


def report_of(model: nn.Module) -> LowRankReport | None:
    """The :class:`LowRankReport` that ``lowrank.svd`` attached to ``model``, if any."""
    report = getattr(model, REPORT_ATTR, None)
    return report if isinstance(report, LowRankReport) else None
