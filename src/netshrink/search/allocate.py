"""Per-layer allocation: one setting per layer that fits a budget with the least predicted loss.

Each layer has options (keep; a sparsity; a bit width; a sparsity and a bit width; a rank
ratio), each with a predicted cost (stored bytes, or MACs) and a predicted loss read off the
sensitivity curves (metric drop, plus a small weight on the relative output error so ties
between equally accurate settings go to the more faithful one; pruning and quantizing the
same layer is taken to cost the sum of both losses). The greedy walk starts from every layer
kept and repeatedly takes the step with the least added loss per unit of cost saved, along each
layer's lower convex hull of (cost, loss), until the budget is met: AIMET's greedy
compression-ratio selection (Qualcomm AIMET docs, "Greedy Compression Ratio Selection") and the
knapsack view of HAWQ-V3's mixed-precision bit allocation (Yao et al., 2021, §3.3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from netshrink.search.analysis import Sensitivity

ERROR_WEIGHT = 0.1
"""Weight of the relative output error in the predicted loss (metric drop weighs 1)."""


@dataclass(frozen=True)
class Option:
    """One setting of one layer: sparsity, weight bits, rank ratio (None = untouched)."""

    layer: str
    cost: float
    loss: float
    sparsity: float | None = None
    bits: int | None = None
    ratio: float | None = None

    def label(self) -> str:
        """Short text like ``s=0.9,b=8`` or ``keep``."""
        parts = []
        if self.sparsity is not None:
            parts.append(f"s={self.sparsity:g}")
        if self.bits is not None:
            parts.append(f"b={self.bits}")
        if self.ratio is not None:
            parts.append(f"r={self.ratio:g}")
        return ",".join(parts) or "keep"


def point_loss(sens: Sensitivity, point: dict[str, Any]) -> float:
    """Predicted loss of one probe: metric drop (clamped at 0) + ERROR_WEIGHT x output error."""
    drop = 0.0
    if sens.baseline_metric is not None and point["metric"] is not None:
        drop = max(0.0, sens.baseline_metric - point["metric"])
    return drop + ERROR_WEIGHT * point["error"]


def layer_options(sens: Sensitivity, layer: str, resource: str) -> list[Option]:
    """Every option of ``layer`` with its cost in ``resource`` ("bytes" or "macs") and loss."""
    info = sens.layers[layer]
    full = float(info[resource])

    def cost(stored: float) -> float:
        # Bytes follow the stored size; MACs shrink only with the rank ratio (a sparse or
        # low-bit weight still runs a dense kernel here).
        return float(stored) if resource == "bytes" else full

    options = [Option(layer, full, 0.0)]
    loss: dict[tuple[str, float], float] = {}
    for p in sens.points:
        if p["layer"] != layer:
            continue
        loss[p["family"], p["value"]] = point_loss(sens, p)
        if p["family"] == "prune":
            options.append(Option(layer, cost(p["bytes"]), loss["prune", p["value"]], p["value"]))
        elif p["family"] == "quant":
            options.append(
                Option(layer, cost(p["bytes"]), loss["quant", p["value"]], bits=int(p["value"]))
            )
        elif p["bytes"] < info["bytes"]:  # lowrank; a layer too small to factorize is skipped
            macs = full * _lowrank_share(sens, layer, p["value"])
            options.append(
                Option(
                    layer,
                    p["bytes"] if resource == "bytes" else macs,
                    loss["lowrank", p["value"]],
                    ratio=p["value"],
                )
            )
    for c in sens.combined:
        if c["layer"] == layer:
            both = loss[c["family"], c["value"]] + loss["quant", c["bits"]]
            first = {"sparsity" if c["family"] == "prune" else "ratio": c["value"]}
            share = _lowrank_share(sens, layer, c["value"]) if c["family"] == "lowrank" else 1.0
            spent = c["bytes"] if resource == "bytes" else full * share
            options.append(Option(layer, spent, both, bits=int(c["bits"]), **first))
    return options


def _lowrank_share(sens: Sensitivity, layer: str, ratio: float) -> float:
    """Fraction of the layer's weights (hence MACs) its factors at ``ratio`` hold."""
    point = next(p for p in sens.curve(layer, "lowrank") if p["value"] == ratio)
    return point["bytes"] / sens.layers[layer]["bytes"]


def hull(options: list[Option]) -> list[Option]:
    """The lower convex hull of (cost, loss), from the most to the least costly option.

    Dominated options (costlier and no more accurate than another) go first; then options
    above the line between their neighbours, so the walk's loss per cost saved only grows.
    """
    front: list[Option] = []
    for o in sorted(options, key=lambda o: (o.cost, o.loss)):
        if not front or o.loss < front[-1].loss:
            front.append(o)
    walk: list[Option] = []
    for o in reversed(front):
        while len(walk) >= 2 and _slope(walk[-2], walk[-1]) >= _slope(walk[-2], o):
            walk.pop()
        walk.append(o)
    return walk


def _slope(a: Option, b: Option) -> float:
    return (b.loss - a.loss) / max(a.cost - b.cost, 1e-12)


def allocate(
    sens: Sensitivity, budget: float, resource: str = "bytes"
) -> tuple[dict[str, Option], bool]:
    """Greedy per-layer choice with total predicted cost <= ``budget``; return it and whether met.

    ``budget`` is in ``resource`` units, over the analyzed layers only. When even the cheapest
    option of every layer exceeds it, that cheapest allocation is returned with ``False``.
    """
    walks = {name: hull(layer_options(sens, name, resource)) for name in sens.layers}
    pos = dict.fromkeys(walks, 0)
    total = sum(w[0].cost for w in walks.values())
    while total > budget:
        steps = [
            (_slope(w[pos[n]], w[pos[n] + 1]), n) for n, w in walks.items() if pos[n] + 1 < len(w)
        ]
        if not steps:
            break
        _, name = min(steps)
        w = walks[name]
        total -= w[pos[name]].cost - w[pos[name] + 1].cost
        pos[name] += 1
    return {n: walks[n][pos[n]] for n in walks}, total <= budget


def predicted(choice: dict[str, Option]) -> tuple[float, float]:
    """Total predicted cost and loss of an allocation."""
    return sum(o.cost for o in choice.values()), sum(o.loss for o in choice.values())
