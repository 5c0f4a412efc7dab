"""Non-uniform layer-wise sparsity under one global budget: OWL.

Yin et al. 2024, "Outlier Weighed Layerwise Sparsity (OWL)", sec. 3-4: layers whose Wanda
scores A_ij = |W_ij| * ||X_j||_2 hold more *outliers* (scores above ``threshold`` x the layer's
mean score; the layerwise outlier distribution, LOD) are pruned less. The outlier ratios are
mapped linearly onto keep ratios spread over ``[1 - s - spread, 1 - s + spread]`` and centred so
the weighted mean sparsity is s. Here the centring weighs each group by its weights (the paper's
blocks are all alike; a model's targeted layers need not be), groups are either single layers or
whole blocks (the paper's choice), and the fractions are rounded to whole weights so that the
targeted layers lose exactly ``round(s * total)`` weights together.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from netshrink.calibrate import SumSquares, collect
from netshrink.context import Batch
from netshrink.errors import ConfigError
from netshrink.prune.sparse_layers import SparseLayer
from netshrink.prune.wanda import wanda_scores

log = logging.getLogger(__name__)


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float) -> float:
    """Share of the scores (all tensors together) above ``threshold`` x their mean (OWL's LOD)."""
    flat = torch.cat([s.flatten().double() for s in scores])
    return float((flat > threshold * flat.mean()).double().mean())


def owl_fractions(
    ratios: Mapping[str, float], sizes: Mapping[str, int], sparsity: float, spread: float
) -> dict[str, float]:
    """Each group's sparsity from its outlier ratio (see the module docstring): the group with
    most outliers gets ``sparsity - spread`` before centring, the one with fewest ``sparsity +
    spread``; then all are shifted so that the size-weighted mean is ``sparsity``. Raises
    :class:`ConfigError` when a fraction would leave [0, 1)."""
    lo, hi = min(ratios.values()), max(ratios.values())
    width = hi - lo
    keep = {g: 2 * spread * (r - lo) / width if width > 0 else 0.0 for g, r in ratios.items()}
    total = sum(sizes.values())
    centre = sum(keep[g] * sizes[g] for g in ratios) / total
    fractions = {g: sparsity - (keep[g] - centre) for g in ratios}
    bad = {g: round(f, 4) for g, f in fractions.items() if not 0 <= f < 1}
    if bad:
        raise ConfigError(
            f"OWL spread {spread} around sparsity {sparsity} gives fractions outside [0, 1): "
            f"{bad}; lower owl_spread"
        )
    return fractions


def exact_counts(
    fractions: Mapping[str, float], sizes: Mapping[str, int], sparsity: float
) -> dict[str, int]:
    """Weights to remove per layer: each ``round(fraction * size)``, then the largest remainders
    moved by one until the counts add up to exactly ``round(sparsity * total size)``."""
    want = round(sparsity * sum(sizes.values()))
    raw = {n: fractions[n] * sizes[n] for n in sizes}
    counts = {n: min(sizes[n], round(v)) for n, v in raw.items()}
    gap = want - sum(counts.values())
    step = 1 if gap > 0 else -1
    # the layers whose rounding lost (gap > 0) or gained (gap < 0) most go first
    order = sorted(sizes, key=lambda n: step * (counts[n] - raw[n]))
    i = 0
    while gap:
        name = order[i % len(order)]
        if 0 <= counts[name] + step <= sizes[name]:
            counts[name] += step
            gap -= step
        i += 1
    return counts


def owl_layer_fractions(
    model: nn.Module,
    layers: Mapping[str, SparseLayer],
    groups: Sequence[Sequence[str]],
    batches: Sequence[Batch],
    sparsity: float,
    threshold: float,
    spread: float,
    show: bool,
) -> dict[str, float]:
    """Each layer's sparsity by OWL, from one calibration pass of the dense ``model``: one
    outlier ratio per group of ``groups`` (layer names), fractions rounded so that ``layers``
    lose exactly ``round(sparsity * their weights)`` together. A layer that never ran
    keeps the uniform fraction's share."""
    stats = {name: SumSquares() for name in layers}
    collect(model, {n: [s] for n, s in stats.items()}, batches, "OWL: input norms", show=show)
    seen = [[n for n in g if stats[n].sum is not None] for g in groups]
    seen = [g for g in seen if g]
    scores = {n: wanda_scores(layers[n], stats[n].norms()) for g in seen for n in g}
    keys = [",".join(g) for g in seen]
    named = dict(zip(keys, seen, strict=True))
    ratios = {k: outlier_ratio([scores[n] for n in g], threshold) for k, g in named.items()}
    sizes = {k: sum(layers[n].weight.numel() for n in g) for k, g in named.items()}
    per_group = owl_fractions(ratios, sizes, sparsity, spread)
    fractions = {n: sparsity for n in layers}
    fractions.update({n: per_group[k] for k, g in named.items() for n in g})
    weights = {n: layer.weight.numel() for n, layer in layers.items()}
    counts = exact_counts(fractions, weights, sparsity)
    log.info("OWL outlier ratios %s", {k: round(r, 4) for k, r in ratios.items()})
    return {n: counts[n] / weights[n] for n in layers}
