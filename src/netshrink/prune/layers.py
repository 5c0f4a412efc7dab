"""``prune.layers``: drop whole transformer layers in one shot.

Deep transformers are redundant in depth: many layers change their hidden states little, and
removing them costs less than their share of the compute (Men et al. 2024, "ShortGPT: Layers in
Large Language Models are More Redundant Than You Expect"). Each stack of layers (see
:func:`netshrink.hf.depth.layer_stacks`) loses ``count`` layers (or ``ratio`` of them), chosen by

- ``importance``: the lowest Block Influence, ``BI_i = 1 - E_t[cos(x_i,t, x_i+1,t)]``, the mean
  cosine between a layer's input and output hidden state at every token of the calibration data
  (ShortGPT, sec. 3.1, eq. 1): a layer that barely turns its input matters least;
- ``spread``: the layers left evenly spread over the stack, first and last kept.

The layers are dropped with the ``hf.drop_layers`` edit, which keeps the config in sync and is
replayed by ``ns.load``. A stage's ``finetune:`` then recovers what was lost.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import islice
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from netshrink.calibrate import Latest, Reducer, collect
from netshrink.config import TechniqueConfig
from netshrink.context import Batch, Context
from netshrink.errors import ConfigError, UnsupportedModuleError
from netshrink.hf.depth import drop_layers, is_transformer, layer_stacks
from netshrink.registry import technique

DEFAULT_RATIO = 0.25
"""Share of each stack dropped when neither ``ratio`` nor ``count`` is given (ShortGPT removes
about a quarter of the layers of Llama-2 at a modest loss, sec. 4)."""

CALIB_BATCHES = 16
"""Calibration batches Block Influence is averaged over (it converges within a few)."""

Criterion = Literal["importance", "spread"]
Selection = Literal["importance", "spread", "alternate"]


class LayersConfig(TechniqueConfig):
    """Options of ``prune.layers``."""

    ratio: float | None = Field(
        None, gt=0, lt=1, description="fraction of each stack's layers dropped (default 0.25)"
    )
    count: int | None = Field(
        None, ge=1, le=10_000, description="layers dropped from each stack (instead of ratio)"
    )
    criterion: Criterion = Field(
        "importance", description="importance: lowest Block Influence (ShortGPT); spread: even"
    )

    @model_validator(mode="after")
    def _one_amount(self) -> LayersConfig:
        if self.ratio is not None and self.count is not None:
            raise ValueError(
                f"give ratio or count, not both (ratio={self.ratio}, count={self.count})"
            )
        return self


def spread(n: int, m: int) -> list[int]:
    """``m`` of the indices ``0..n-1``, evenly spread with the first and last included (the
    last alone when ``m == 1``)."""
    if m == 1:
        return [n - 1]
    return sorted({round(i * (n - 1) / (m - 1)) for i in range(m)})


def alternate(n: int, m: int) -> list[int]:
    """``m`` of the indices ``0..n-1``, one every ``n / m`` from the first (DistilBERT kept one
    layer out of two, Sanh et al. 2019, sec. 3)."""
    return [i * n // m for i in range(m)]


class _Influence(Reducer):
    """Running mean, over tokens, of the cosine between a layer's input and output states."""

    def __init__(self, inputs: Latest) -> None:
        super().__init__("output")
        self.inputs = inputs
        self.total = 0.0
        self.count = 0

    def update(self, module: nn.Module, x: torch.Tensor) -> None:
        before = self.inputs.value
        if before is None or before.shape != x.shape:
            got = None if before is None else tuple(before.shape)
            raise UnsupportedModuleError(
                f"{type(module).__name__} maps hidden states {got} to {tuple(x.shape)}; "
                "Block Influence needs layers whose output has their input's shape"
            )
        cos = F.cosine_similarity(before.float(), x.float(), dim=-1)
        self.total += float(cos.sum())
        self.count += cos.numel()

    @property
    def influence(self) -> float:
        """1 - the mean cosine (ShortGPT's BI)."""
        return 1.0 - self.total / max(self.count, 1)


def block_influence(
    model: nn.Module, stacks: Iterable[str], batches: Iterable[Batch]
) -> dict[str, list[float]]:
    """ShortGPT's Block Influence of every layer of each stack (dotted paths of ModuleLists in
    ``model``), averaged over the tokens of the first :data:`CALIB_BATCHES` batches."""
    reducers: dict[str, list[_Influence]] = {}
    points: dict[str, list[Reducer]] = {}
    for path in stacks:
        reducers[path] = []
        for i in range(len(model.get_submodule(path))):
            inputs = Latest("input")
            reducers[path].append(_Influence(inputs))
            points[f"{path}.{i}"] = [inputs, reducers[path][-1]]
    collect(model, points, islice(batches, CALIB_BATCHES), "block influence", show=False)
    return {path: [r.influence for r in rs] for path, rs in reducers.items()}


def most_influential(influence: list[float], m: int) -> list[int]:
    """The indices of the ``m`` layers of highest influence, ascending (ties: earlier first)."""
    ranked = sorted(range(len(influence)), key=lambda i: (-influence[i], i))
    return sorted(ranked[:m])


def transformer_stacks(model: nn.Module, what: str) -> dict[str, nn.ModuleList]:
    """:func:`layer_stacks` of ``model``, or :class:`UnsupportedModuleError` saying ``what``
    needs a transformers model or an ``nn.TransformerEncoder``."""
    stacks = layer_stacks(model) if is_transformer(model) else {}
    if not stacks:
        raise UnsupportedModuleError(
            f"{what} drops whole transformer layers; {type(model).__name__} holds no transformers "
            "model or nn.TransformerEncoder/Decoder with two or more layers"
        )
    return stacks


def keep_layers(
    model: nn.Module,
    counts: dict[str, int],
    criterion: Selection,
    batches: Iterable[Batch] | None,
) -> dict[str, list[int]]:
    """Which layers to keep in each stack (a dotted path in ``model``): ``counts[path]`` of them,
    by ``criterion``; ``importance`` runs the model on ``batches``."""
    if criterion != "importance":
        pick = spread if criterion == "spread" else alternate
        return {p: pick(len(model.get_submodule(p)), m) for p, m in counts.items()}
    assert batches is not None
    scores = block_influence(model, counts, batches)
    return {p: most_influential(scores[p], m) for p, m in counts.items()}


def _kept_count(path: str, n: int, config: LayersConfig) -> int:
    """Layers of the ``n`` in ``path`` left after dropping ``count``, or ``ratio * n`` rounded
    half up (a quarter of 2 layers drops one)."""
    ratio = config.ratio or DEFAULT_RATIO
    drop = config.count if config.count is not None else math.floor(n * ratio + 0.5)
    if drop >= n:
        raise ConfigError(
            f"dropping {drop} of the {n} layers of {path!r} leaves none; keep at least one "
            f"(count <= {n - 1}, or a smaller ratio)",
            key="count" if config.count is not None else "ratio",
        )
    if drop == 0:
        raise ConfigError(
            f"ratio={ratio} of the {n} layers of {path!r} rounds to 0 dropped; use a "
            f"ratio >= {0.5 / n:.3g} or count",
            key="ratio",
        )
    return n - drop


def _needs(config: LayersConfig) -> tuple[str, ...]:
    return ("calib_data",) if config.criterion == "importance" else ()


@technique("prune.layers", LayersConfig, needs=_needs)
def drop_transformer_layers(model: nn.Module, config: LayersConfig, ctx: Context) -> nn.Module:
    """Drop whole transformer layers: lowest Block Influence (ShortGPT) or evenly spread."""
    stacks = transformer_stacks(model, "prune.layers")
    counts = {path: _kept_count(path, len(stack), config) for path, stack in stacks.items()}
    keep = keep_layers(model, counts, config.criterion, ctx.calib_data)
    for path, kept in keep.items():
        drop_layers(model, path, kept)
    return model
