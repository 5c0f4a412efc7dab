"""``prune.channels``: remove conv filters, linear neurons and attention heads for real.

The model is traced into a dependency graph (:mod:`netshrink.graph`); every group of coupled
units is ranked by a criterion (:mod:`netshrink.prune.importance`) and the lowest-ranked units
are cut out of every layer that holds them: producer rows and bias, consumer input columns,
BatchNorm/LayerNorm parameters and statistics, depthwise groups, attention heads. The result has
smaller tensors and fewer MACs, and computes exactly what the original computed on the kept
channels.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from itertools import islice
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from netshrink.artifact.modules import spec_of
from netshrink.config import TechniqueConfig
from netshrink.context import Context
from netshrink.errors import UnsupportedModuleError
from netshrink.graph import (
    FROZEN,
    DepGraph,
    Group,
    Slot,
    dependency_graph,
    prune_slot,
    sync_attention,
)
from netshrink.hf.blocks import find_attention, find_ffn
from netshrink.prune.importance import unit_scores
from netshrink.prune.schedules import Schedule, run_schedule, schedule_needs
from netshrink.registry import technique
from netshrink.targets import Targets

PRODUCERS = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Embedding)


class ChannelsConfig(TechniqueConfig):
    """Options of ``prune.channels``."""

    ratio: float = Field(
        0.5, ge=0, lt=1, description="fraction of channels (neurons, heads) removed, in [0, 1)"
    )
    criterion: Literal["l1", "l2", "random", "bn", "taylor"] = Field(
        "l1", description="importance: weight norm, random, BatchNorm scale, or Taylor (data)"
    )
    scope: Literal["layer", "global"] = Field(
        "layer", description="rank within each coupled group, or across all groups at once"
    )
    round_to: int = Field(
        1, ge=1, le=256, description="keep channel counts a multiple of this (heads excepted)"
    )
    heads: bool = Field(True, description="prune whole attention heads")
    prune_norm: bool = Field(
        False, description="also prune channels normalised by LayerNorm (changes its statistics)"
    )
    taylor_batches: int = Field(
        8, ge=1, le=10_000, description="training batches the taylor criterion sums over"
    )
    schedule: Schedule = Field(
        default_factory=Schedule, description="oneshot, iterative or gradual pruning"
    )
    targets: Targets = Field(
        default_factory=Targets, description="layers whose output channels may be removed"
    )


def _needs(cfg: ChannelsConfig) -> tuple[str, ...]:
    data = ("train_data",) if cfg.criterion == "taylor" else ()
    return ("example_inputs", *data, *schedule_needs(cfg.schedule))


@dataclass
class ChannelPlan:
    """Which units of a dependency graph to remove; :meth:`apply` does the surgery."""

    graph: DepGraph
    removed: set[int]
    units: int
    """Removable units (channels, neurons, heads not frozen by the graph) in all groups."""
    reasons: list[str]
    """Why channels had to be kept: the graph's and the criterion's notes."""

    def fraction(self) -> float:
        """Fraction of the removable units that the plan removes."""
        return len(self.removed) / self.units if self.units else 0.0

    def keep(self, slot: Slot) -> torch.Tensor:
        """Sorted positions of ``slot`` that stay."""
        roots = self.graph.roots(slot.ids)
        gone = torch.tensor(sorted(self.removed), dtype=torch.long)
        return (~torch.isin(roots, gone)).nonzero().flatten()

    def apply(self, model: nn.Module) -> None:
        """Remove the planned units from ``model``'s layers, in place."""
        for slot in self.graph.slots.values():
            keep = self.keep(slot)
            if keep.numel() < slot.ids.numel():
                prune_slot(model, slot, keep)
        sync_attention(model)


def _freeze_excluded(graph: DepGraph, model: nn.Module, cfg: ChannelsConfig) -> None:
    """Freeze units of layers the caller excluded, and of bare parameters an artifact could
    not rebuild at a new shape (a module without a spec, e.g. a Parameter on the model)."""
    selected = set(cfg.targets.select(model, default_types=PRODUCERS))
    for slot in graph.slots.values():
        bare = slot.role == "param" and spec_of(model.get_submodule(slot.module)) is None
        if bare and set(graph.roots(slot.ids).tolist()) != {FROZEN}:
            where = f"{slot.module}.{slot.attr}" if slot.module else slot.attr
            graph.warnings.append(
                f"parameter '{where}' is not in a layer an artifact can rebuild (use an "
                "nn.Embedding or a Linear); the channels it touches are kept"
            )
        excluded = (
            bare
            or (slot.role in ("out", "grouped") and slot.module not in selected)
            or (slot.role == "heads" and not (cfg.heads and f"{slot.module}.q" in selected))
            or (slot.role == "norm" and not cfg.prune_norm)
        )
        if excluded:
            graph.freeze(slot.ids)


def _floor_of(group: Group, round_to: int) -> int:
    return 1 if group.heads else min(len(group.units), round_to)


def _kept(group: Group, keep: int, round_to: int) -> int:
    """``keep`` rounded up to a multiple of ``round_to`` (never for heads), at least 1."""
    if not group.heads and round_to > 1:
        keep = math.ceil(keep / round_to) * round_to
    return max(1, min(len(group.units), keep))


def choose(
    groups: list[Group], scores: dict[int, float], ratio: float, scope: str, round_to: int
) -> set[int]:
    """Units to remove: the lowest-scored ``ratio`` of each group, or of all groups (global,
    on scores divided by their group's mean so groups of different scale compare)."""
    removed: set[int] = set()
    if scope == "layer":
        for g in groups:
            keep = _kept(g, len(g.units) - round(ratio * len(g.units)), round_to)
            order = sorted(g.units, key=lambda u: (scores[u], u))
            removed.update(order[: len(g.units) - keep])
        return removed
    ranked = []
    for i, g in enumerate(groups):
        mean = sum(scores[u] for u in g.units) / len(g.units) or 1.0
        ranked += [(scores[u] / mean, u, i) for u in g.units]
    ranked.sort()
    budget = round(ratio * len(ranked))
    cut = [0] * len(groups)
    for _, _unit, i in ranked:
        if budget == 0:
            break
        if len(groups[i].units) - cut[i] > _floor_of(groups[i], round_to):
            cut[i] += 1
            budget -= 1
    for i, g in enumerate(groups):
        keep = _kept(g, len(g.units) - cut[i], round_to)
        order = sorted(g.units, key=lambda u: (scores[u], u))
        removed.update(order[: len(g.units) - keep])
    return removed


def _keep_one_per_layer(graph: DepGraph, scores: dict[int, float], removed: set[int]) -> None:
    """Spare the best unit of any layer that would lose every channel (a group can span
    several producers, e.g. a concatenation added to another tensor)."""
    for slot in graph.slots.values():
        units = set(graph.roots(slot.ids).tolist())
        if slot.role != "in" and units and units <= removed:
            removed.discard(max(units, key=lambda u: (scores[u], u)))


def plan_channels(model: nn.Module, cfg: ChannelsConfig, ctx: Context, ratio: float) -> ChannelPlan:
    """Trace ``model``, rank its units by ``cfg.criterion`` and choose ``ratio`` of them."""
    assert ctx.example_inputs is not None
    try:
        graph = dependency_graph(model, ctx.example_inputs)
    except UnsupportedModuleError as exc:
        if find_attention(model) or find_ffn(model):
            raise UnsupportedModuleError(
                f"{exc}. For transformers use prune.heads (attention heads) and prune.ffn (FFN "
                "neurons): they find the blocks without tracing"
            ) from exc
        raise
    _freeze_excluded(graph, model, cfg)
    groups = graph.groups()
    batches = islice(ctx.train_data, cfg.taylor_batches) if ctx.train_data is not None else None
    scores, notes = unit_scores(model, graph, groups, cfg.criterion, seed=ctx.seed, batches=batches)
    removed = choose(groups, scores, ratio, cfg.scope, cfg.round_to)
    _keep_one_per_layer(graph, scores, removed)
    units = sum(len(g.units) for g in groups)
    return ChannelPlan(graph, removed, units, [*graph.warnings, *notes])


def _check_achieved(model: nn.Module, plan: ChannelPlan, asked: float) -> None:
    """Raise when the plan removes nothing of a non-zero ``asked``; warn (the stage's note)
    when it removes less than half of it, with the reasons channels were kept."""
    reasons = "; ".join(plan.reasons)
    if asked > 0 and not plan.removed:
        why = reasons or (
            "every channel feeds the model's outputs or an op the dependency graph does not "
            "understand, or belongs to a layer left out by targets"
        )
        raise UnsupportedModuleError(
            f"prune.channels: achieved 0% of the requested {asked:.0%} of channels in "
            f"{type(model).__name__}, because {why}"
        )
    for note in plan.reasons:
        warnings.warn(f"prune.channels: {note}", stacklevel=4)
    achieved = plan.fraction()
    if achieved < asked / 2:
        why = reasons or "of round_to and at least one channel kept per layer"
        warnings.warn(
            f"prune.channels: achieved {achieved:.0%} of the requested {asked:.0%} of the "
            f"removable channels, because {why}",
            stacklevel=4,
        )


@technique("prune.channels", ChannelsConfig, needs=_needs)
def channels(model: nn.Module, config: ChannelsConfig, ctx: Context) -> nn.Module:
    """Remove output channels, neurons and attention heads, with every dependent input."""

    def step(m: nn.Module, previous: float, target: float) -> None:
        # Each step removes a fraction of what is left so the total reaches ``target``.
        ratio = 1 - (1 - target) / (1 - previous)
        plan = plan_channels(m, config, ctx, ratio)
        _check_achieved(m, plan, ratio)
        plan.apply(m)

    widths = _conv_widths(model) if config.round_to == 1 else None
    # Technique.apply checks that the outputs keep their shapes on example_inputs.
    run_schedule(model, config.schedule, config.ratio, step, ctx, "prune.channels")
    if widths is not None:
        _note_unaligned(widths, _conv_widths(model))
    return model


def _conv_widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def _note_unaligned(before: dict[str, int], after: dict[str, int]) -> None:
    """Warn when pruning left convolutions of 16 or more channels at counts that are not
    multiples of 8: blocked convolution kernels run those slower (docs/prune.md, "Channel
    counts and speed": 22 / 45 channels ran 2.3x slower in ONNX Runtime than 24 / 48)."""
    odd = [
        f"{name}: {width}"
        for name, width in after.items()
        if width != before.get(name, width) and before[name] >= 16 and width % 8
    ]
    if odd:
        warnings.warn(
            f"prune.channels: {len(odd)} convolution(s) keep channel counts that are not "
            f"multiples of 8 (e.g. {odd[0]}); blocked convolution kernels (ONNX Runtime, "
            "oneDNN) can run them slower than the next multiple of 8, as much as 2.3x in "
            "docs/prune.md; round_to: 8 keeps multiples",
            stacklevel=3,
        )
