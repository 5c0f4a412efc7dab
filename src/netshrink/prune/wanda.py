"""``prune.wanda``: prune by weight magnitude times input activation norm (Wanda).

Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models", sec. 3:
weight W_ij (output i, input j) scores S_ij = |W_ij| * ||X_j||_2, where X_j collects input
feature j over every token (or conv patch) of the calibration data. An input that is always
large makes even its small weights matter, which magnitude pruning misses on models with
outlier features. Scores compete per output row (the paper's comparison group, sec. 3), per
layer, or across all targeted layers of a block (one sparsity per block); N:M keeps the n
best-scored weights of every m consecutive inputs. No weight is updated.

With ``sequential`` each block (a transformer layer) is calibrated on the outputs of the blocks
before it *after* they were pruned (as GPTQ and SparseGPT calibrate), through
:func:`netshrink.calibrate.run_blocks`. Pruned layers are the sparse layers ``prune.magnitude``
makes, so artifacts store them packed and the dense/CSR kernel choice is shared.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from netshrink.batches import materialize
from netshrink.calibrate import PerLayer, SumSquares, collect, find_blocks, run_blocks
from netshrink.context import Batch, Context
from netshrink.prune.sparse_layers import SparseLayer
from netshrink.prune.unstructured import (
    SPARSE_LAYERS,
    SparseConfig,
    choose_kernels,
    nm_keep,
    sparsify,
    zero_lowest,
)
from netshrink.registry import technique

log = logging.getLogger(__name__)

DEFAULT_SPARSITY = 0.5


class WandaConfig(SparseConfig):
    """Options of ``prune.wanda``."""

    sparsity: float | None = Field(
        None, ge=0, lt=1, description="fraction of weights set to zero (default 0.5; not with n, m)"
    )
    n: int | None = Field(None, ge=1, le=64, description="N:M: weights kept in every block of m")
    m: int | None = Field(None, ge=2, le=64, description="N:M: block length along the inputs")
    scope: Literal["row", "layer", "block"] = Field(
        "row", description="where scores compete: each output row, each layer, or each block"
    )
    sequential: bool = Field(
        False, description="calibrate each block on the outputs of the pruned blocks before it"
    )
    blocks: tuple[str, ...] = Field(
        (), description="block module names (default: the repeated children of a ModuleList)"
    )
    calib_batches: int = Field(32, ge=1, le=100000, description="calibration batches used at most")

    @model_validator(mode="after")
    def _one_pattern(self) -> WandaConfig:
        if self.blocks and not (self.sequential or self.scope == "block"):
            raise ValueError("blocks applies with sequential: true or scope: block; set one")
        if (self.n is None) != (self.m is None):
            raise ValueError(f"give both n and m (e.g. n=2, m=4), got n={self.n}, m={self.m}")
        if self.n is not None and self.m is not None:
            if self.n >= self.m:
                raise ValueError(f"n must be smaller than m, got n={self.n}, m={self.m}")
            if self.sparsity is not None or self.scope != "row":
                raise ValueError("N:M fixes the pattern: drop sparsity and scope, or n and m")
        return self

    @property
    def fraction(self) -> float:
        """The unstructured sparsity asked for: ``sparsity``, 0.5 when not given."""
        return DEFAULT_SPARSITY if self.sparsity is None else self.sparsity


def wanda_scores(layer: nn.Module, norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2, shaped like the weight; ``norms`` is per input column.

    A Conv2d's columns are its Cin*kh*kw patch entries (:func:`netshrink.calibrate.input_vectors`);
    a grouped conv's output channel sees only its group's columns.
    """
    w = layer.weight.detach().abs()
    cols = norms.to(w.dtype)
    if isinstance(layer, nn.Conv2d) and layer.groups > 1:
        per_group = layer.out_channels // layer.groups
        cols = cols.view(layer.groups, -1).repeat_interleave(per_group, dim=0)
    return (w.flatten(1) * cols).view_as(w)


def row_keep(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Mask dropping the ``round(sparsity * row length)`` lowest scores of every output row."""
    rows = scores.flatten(1)
    drop = rows.argsort(dim=1, stable=True)[:, : round(sparsity * rows.shape[1])]
    keep = torch.ones_like(rows, dtype=torch.bool).scatter_(1, drop, False)
    return keep.view_as(scores)


@torch.no_grad()
def prune_group(
    layers: dict[str, SparseLayer], norms: dict[str, torch.Tensor], config: WandaConfig
) -> None:
    """Prune ``layers`` (one block's, or one layer) by their Wanda scores, as ``config`` says."""
    scores = {name: wanda_scores(layer, norms[name]) for name, layer in layers.items()}
    if config.scope != "row" and config.n is None:
        scope = "global" if config.scope == "block" else "layer"
        zero_lowest(layers, scores, config.fraction, scope)
        return
    for name, layer in layers.items():
        if config.n is not None and config.m is not None:
            if layer.weight.shape[1] % config.m:
                warnings.warn(
                    f"prune.wanda: {name} has {layer.weight.shape[1]} input channels, not a "
                    f"multiple of m={config.m}; left dense",
                    stacklevel=3,
                )
                continue
            keep = nm_keep(scores[name], config.n, config.m)
        else:
            keep = row_keep(scores[name], config.fraction)
        layer.weight.mul_(keep)
        layer.refresh_mask()


def _norms(stats: dict[str, SumSquares]) -> dict[str, torch.Tensor]:
    """Input norms of the layers that ran; a warning names those that never did."""
    idle = [name for name, s in stats.items() if s.sum is None]
    if idle:
        warnings.warn(
            f"prune.wanda: {', '.join(idle)} never ran on calib_data; left dense", stacklevel=3
        )
    return {name: s.norms() for name, s in stats.items() if s.sum is not None}


def prune_all(
    model: nn.Module,
    layers: dict[str, SparseLayer],
    groups: Sequence[Sequence[str]],
    batches: list[Batch],
    config: WandaConfig,
    show: bool,
) -> None:
    """One calibration pass over ``model`` for ``layers``, then each group pruned on it."""
    stats = {name: SumSquares() for name in layers}
    collect(model, {n: [s] for n, s in stats.items()}, batches, "wanda: input norms", show=show)
    norms = _norms(stats)
    for names in groups:
        prune_group({n: layers[n] for n in names if n in norms}, norms, config)


def _prune_block(
    layers: dict[str, SparseLayer], stats: dict[str, SumSquares], config: WandaConfig
) -> None:
    """Prune one block's layers on its input norms: together (scope block) or one by one."""
    norms = _norms(stats)
    ready = [n for n in stats if n in norms]
    for names in [ready] if config.scope == "block" else [[n] for n in ready]:
        prune_group({n: layers[n] for n in names}, norms, config)


def block_owners(
    names: Sequence[str], blocks: Sequence[str]
) -> tuple[dict[str, list[str]], list[str]]:
    """The layer names inside each block, and those inside none."""
    owned: dict[str, list[str]] = {block: [] for block in blocks}
    outside = []
    for name in names:
        block = next((b for b in blocks if name.startswith(f"{b}.")), None)
        (owned[block] if block is not None else outside).append(name)
    return owned, outside


@technique("prune.wanda", WandaConfig, needs=("calib_data",), creates=SPARSE_LAYERS)
def wanda(model: nn.Module, config: WandaConfig, ctx: Context) -> nn.Module:
    """Zero the weights of smallest |w| x input norm, per output row (Wanda, Sun et al. 2023)."""
    batches = materialize(ctx.calib_data or [], "calib_data")[: config.calib_batches]
    by_block = config.sequential or config.scope == "block"
    blocks = find_blocks(model, config.blocks) if by_block else []
    layers = sparsify(model, config.targets)
    owned, outside = block_owners(list(layers), blocks)
    if not config.sequential:
        groups = [g for g in owned.values() if g] if config.scope == "block" else []
        singles = [[n] for n in outside] if config.scope == "block" else [[n] for n in layers]
        prune_all(model, layers, [*groups, *singles], batches, config, ctx.progress)
    else:
        # Layers outside every block (embeddings' projections, a pooler, a classifier) are
        # pruned on the dense model's statistics, before the blocks see their outputs.
        if outside:
            pruned = {n: layers[n] for n in outside}
            prune_all(model, pruned, [[n] for n in outside], batches, config, ctx.progress)
        per_layer = PerLayer(owned, SumSquares, lambda st: _prune_block(layers, st, config))
        report = run_blocks(model, batches, per_layer, blocks, ctx.progress)
        log.info("prune.wanda: %s", report)
    choose_kernels(model, layers, config.kernel, ctx)
    return model
