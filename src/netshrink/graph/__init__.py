"""Trace a model into its layers and the channel dependencies between them.

``dependency_graph(model, example_inputs)`` returns a :class:`DepGraph`: every place a layer
tensor is indexed by channel (a :class:`Slot`), the label of each position, and the groups of
coupled units that structured pruning keeps or removes together. Shared by structured pruning,
low-rank factorization and quantization fusion.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from netshrink.graph.deps import FROZEN, DepGraph, Group, Slot
from netshrink.graph.rules import build_graph
from netshrink.graph.surgery import prune_slot, slot_weights, sync_attention
from netshrink.graph.trace import Traced, is_attention, trace


def dependency_graph(
    model: nn.Module, example_inputs: Sequence[Any] | Mapping[str, Any]
) -> DepGraph:
    """Trace ``model`` on ``example_inputs`` and build its channel dependency graph.

    Submodules that cannot be traced are kept opaque and named in ``graph.warnings``.
    """
    traced = trace(model, example_inputs)
    graph = build_graph(traced.module)
    graph.warnings[:0] = [f"{n}: {why}; left untouched" for n, why in traced.opaque.items()]
    return graph


__all__ = [
    "FROZEN",
    "DepGraph",
    "Group",
    "Slot",
    "Traced",
    "build_graph",
    "dependency_graph",
    "is_attention",
    "prune_slot",
    "slot_weights",
    "sync_attention",
    "trace",
]
