"""Importance of each prunable unit (channel, neuron, head): low scores are removed first.

A unit's score sums over every slot it appears in (producer rows, consumer columns, depthwise
groups), as in group-level importance (Fang et al., DepGraph, CVPR 2023, sec. 3.3):

- ``l1`` / ``l2``: norm of all the unit's weights (Li et al. 2017, "Pruning Filters for
  Efficient ConvNets", sec. 3.1).
- ``bn``: |gamma| of the BatchNorm that normalises the unit (Liu et al. 2017, "Network
  Slimming", sec. 3); groups without BatchNorm fall back to ``l1``.
- ``taylor``: (sum over the unit's weights of w * dL/dw)^2, summed over training batches
  (Molchanov et al. 2019, "Importance Estimation for Neural Network Pruning", sec. 3).
- ``random``: a seeded uniform draw, the baseline every criterion should beat.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from netshrink.batches import run
from netshrink.context import Batch
from netshrink.graph import DepGraph, Group, slot_weights

WEIGHTED = ("out", "in", "dw", "grouped", "param")


def _sum_per_unit(
    model: nn.Module, graph: DepGraph, group: Group, reduce: str, grad: bool = False
) -> dict[int, float]:
    """Sum, per unit, of a per-position statistic of the group's weighted slots.

    ``reduce``: ``l1`` (sum |w|), ``l2`` (sum w^2), ``bn`` (|gamma| of BatchNorm slots only),
    ``taylor`` (sum w * dL/dw; needs gradients).
    """
    totals: dict[int, float] = dict.fromkeys(group.units, 0.0)
    roles = ("through",) if reduce == "bn" else WEIGHTED
    for slot in group.slots:
        if slot.role not in roles:
            continue
        taylor = reduce == "taylor"
        w = slot_weights(model, slot, bias=taylor)
        if w is None:
            continue
        if taylor:
            g = slot_weights(model, slot, grad=True, bias=True)
            assert g is not None
            per_pos = (w * g).sum(1)
        elif reduce == "l2":
            per_pos = w.pow(2).sum(1)
        else:
            per_pos = w.abs().sum(1)
        for unit, value in zip(graph.roots(slot.ids).tolist(), per_pos.tolist(), strict=True):
            if unit in totals:
                totals[unit] += value
    return totals


def taylor_scores(
    model: nn.Module, graph: DepGraph, groups: list[Group], batches: Iterable[Batch]
) -> dict[int, float]:
    """First-order Taylor score of every unit, accumulated over ``batches`` (cross-entropy)."""
    was_training = model.training
    model.eval()  # BatchNorm statistics must not move while scoring
    scores: dict[int, float] = {u: 0.0 for g in groups for u in g.units}
    for inputs, targets in batches:
        model.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(run(model, inputs), targets).backward()
        for group in groups:
            for unit, value in _sum_per_unit(model, graph, group, "taylor").items():
                scores[unit] += value**2
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return scores


def unit_scores(
    model: nn.Module,
    graph: DepGraph,
    groups: list[Group],
    criterion: str,
    *,
    seed: int = 0,
    batches: Iterable[Batch] | None = None,
) -> tuple[dict[int, float], list[str]]:
    """Score every unit of ``groups`` by ``criterion``; return scores and notes (fallbacks)."""
    notes: list[str] = []
    if criterion == "random":
        gen = torch.Generator().manual_seed(seed)
        units = [u for g in groups for u in g.units]
        return dict(zip(units, torch.rand(len(units), generator=gen).tolist(), strict=True)), notes
    if criterion == "taylor":
        assert batches is not None
        return taylor_scores(model, graph, groups, batches), notes
    scores: dict[int, float] = {}
    with torch.no_grad():
        for group in groups:
            has_bn = criterion == "bn" and any(s.role == "through" for s in group.slots)
            if criterion == "bn" and not has_bn:
                names = sorted({s.module for s in group.slots if s.role == "out"})
                notes.append(f"no BatchNorm after {', '.join(names)}: scored by l1 instead of bn")
            reduce = "l1" if criterion == "bn" and not has_bn else criterion
            totals = _sum_per_unit(model, graph, group, reduce)
            if reduce == "l2":
                totals = {u: v**0.5 for u, v in totals.items()}
            scores.update(totals)
    return scores, notes
