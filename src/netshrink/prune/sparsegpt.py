"""``prune.sparsegpt``: one-shot pruning with second-order weight reconstruction (SparseGPT).

Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", sec. 3, Algorithm 1. For a layer with weight W (out, in) and calibration inputs X
(tokens, in), pruning should keep ||W X^T - W' X^T||^2 small. With H = X^T X (plus damping) the
optimal brain surgeon (OBS) update for removing weight w_ij spreads its error over the row's
not-yet-processed inputs through H^-1. SparseGPT processes the inputs left to right in blocks of
``blocksize`` columns; within a block it chooses the mask adaptively by the OBS saliency
w^2 / [chol(H^-1)]_jj^2 (computed after the earlier blocks' updates), zeroes each column's masked
weights in turn and subtracts their error, scaled by the upper Cholesky factor of H^-1, from the
columns to their right (sec. 3.3-3.4). N:M keeps the n of every m consecutive inputs with the
largest saliency, chosen when the solver reaches the group (sec. 3.5). That is ``solver: obs``;
the default ``solver: admm`` (:mod:`netshrink.prune.admm`, Boža 2024) solves the same problem on
the same H for the whole matrix at once and leaves about half the output error.

Sparsity is exact per layer: the ``round(sparsity * weights)`` zeros (obs: split over the column
blocks by cumulative rounding). A Conv2d is solved on its Cin*kh*kw patch columns (one Hessian per
group of a grouped conv); Hugging Face ``Conv1D`` is pruned as the Linear it computes. With
``sequential`` each block (a transformer layer) is calibrated on the outputs of the already
pruned blocks before it (the paper's order), through :func:`netshrink.calibrate.run_blocks`;
``true_sequential``, ``asymmetric`` (GPTAQ), ``bias_correction`` and ``norm_correction`` refine
that through :func:`netshrink.calibrate.staged.run_stages`, and ``allocation: owl`` spreads the
sparsity over blocks or layers (:mod:`netshrink.prune.allocation`; exact in total, not per layer).
Pruned layers are the sparse layers ``prune.magnitude`` makes, so artifacts store them packed.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from netshrink.batches import materialize
from netshrink.calibrate import PerLayer, collect, find_blocks, run_blocks
from netshrink.calibrate.hessian import damped_inverse_cholesky, relative_output_error
from netshrink.calibrate.options import StagedConfig
from netshrink.calibrate.staged import Paired, asymmetric_target, bias_shift, run_stages
from netshrink.context import Batch, Context
from netshrink.layers import layer_types, leave_alone, tied_modules
from netshrink.prune.admm import admm_solve
from netshrink.prune.allocation import owl_layer_fractions
from netshrink.prune.sparse_layers import SparseLayer
from netshrink.prune.unstructured import SPARSE_LAYERS, SparseConfig, choose_kernels, sparsify
from netshrink.prune.wanda import DEFAULT_SPARSITY, block_owners
from netshrink.registry import technique
from netshrink.targets import Targets

log = logging.getLogger(__name__)


class SparseGPTConfig(SparseConfig, StagedConfig):
    """Options of ``prune.sparsegpt``."""

    sparsity: float | None = Field(
        None, ge=0, lt=1, description="fraction of weights set to zero (default 0.5; not with n, m)"
    )
    n: int | None = Field(None, ge=1, le=64, description="N:M: weights kept in every block of m")
    m: int | None = Field(None, ge=2, le=64, description="N:M: block length along the inputs")
    damp: float = Field(
        0.01,
        gt=0,
        le=1,
        description="added to H's diagonal: a fraction of its mean (obs), of each entry (admm)",
    )
    blocksize: int = Field(128, ge=1, le=4096, description="input columns per mask-selection block")
    solver: Literal["admm", "obs"] = Field(
        "admm", description="admm: Boza 2024's gradual ADMM; obs: SparseGPT's column-wise update"
    )
    admm_iters: int = Field(60, ge=3, le=1000, description="admm: iterations per layer")
    bias_correction: bool = Field(
        False, description="shift each bias by the mean output change on the calibration data"
    )
    norm_correction: bool = Field(
        False, description="refit each block's LayerNorm affine to the full-precision outputs"
    )
    allocation: Literal["uniform", "owl"] = Field(
        "uniform", description="per-layer sparsity: uniform, or OWL's (same total, exact)"
    )
    owl_groups: Literal["block", "layer"] = Field(
        "block", description="OWL: one sparsity per block (needs sequential) or per layer"
    )
    owl_threshold: float = Field(
        5.0, gt=1, le=1000, description="OWL: outlier = score above this times the mean"
    )
    owl_spread: float = Field(
        0.08, ge=0, lt=0.5, description="OWL: largest change of a group's sparsity"
    )

    @model_validator(mode="after")
    def _one_pattern(self) -> SparseGPTConfig:
        # true_sequential and asymmetric are checked by StagedConfig
        staged = {"bias_correction": self.bias_correction}
        if self.allocation == "owl" and self.owl_groups == "block":
            staged["owl_groups: block"] = True
        asked = [k for k, v in staged.items() if v]
        if asked and not self.sequential:
            raise ValueError(f"{', '.join(asked)} need sequential: true; set it or drop them")
        if self.solver == "admm" and "blocksize" in self.model_fields_set:
            raise ValueError(
                "blocksize sets the OBS update's column blocks, and solver admm solves the whole "
                "matrix at once: drop blocksize, or set solver: obs"
            )
        if self.solver == "obs" and "admm_iters" in self.model_fields_set:
            raise ValueError("admm_iters is for solver: admm; drop it, or set solver: admm")
        if self.norm_correction and not self.asymmetric:
            raise ValueError("norm_correction needs asymmetric: true (the full-precision outputs)")
        if (self.n is None) != (self.m is None):
            raise ValueError(f"give both n and m (e.g. n=2, m=4), got n={self.n}, m={self.m}")
        if self.n is not None and self.m is not None:
            if self.n >= self.m:
                raise ValueError(f"n must be smaller than m, got n={self.n}, m={self.m}")
            if self.sparsity is not None:
                raise ValueError("N:M fixes the sparsity: drop sparsity, or n and m")
            if self.allocation != "uniform":
                raise ValueError("N:M fixes each layer's sparsity: drop allocation, or n and m")
            if self.blocksize % self.m:
                raise ValueError(
                    f"blocksize must be a multiple of m, got blocksize={self.blocksize}, m={self.m}"
                )
        return self

    @property
    def fraction(self) -> float:
        """The unstructured sparsity asked for: ``sparsity``, 0.5 when not given."""
        return DEFAULT_SPARSITY if self.sparsity is None else self.sparsity


def _saliency(block: torch.Tensor, d: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """OBS saliency w^2 / [U]_jj^2 of each weight (sec. 3.3); zero on dead inputs, whose
    weights cost nothing to remove."""
    return (block.square() / d.square()).masked_fill(dead, 0.0)


@torch.no_grad()
def sparsegpt_solve(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    damp: float = 0.01,
    blocksize: int = 128,
) -> torch.Tensor:
    """The pruned and reconstructed ``weight`` (rows, cols) for inputs of Gram ``hessian``.

    Algorithm 1 of Frantar & Alistarh 2023 (see the module docstring). Unstructured: exactly
    ``round(sparsity * weight.numel())`` zeros, chosen per column block; ``nm = (n, m)``: n kept
    in every m consecutive columns of each row (``sparsity`` is then ignored). Computed in
    float32, as the reference code: half the memory of float64 (the inverse's pipeline holds
    two (cols, cols) matrices at once, 9 MiB each at 1536 inputs), returned in ``weight``'s
    dtype.
    """
    rows, cols = weight.shape
    w = weight.to(torch.float32, copy=True)
    u = damped_inverse_cholesky(hessian, damp, torch.float32)
    dead = hessian.diagonal() == 0
    for start in range(0, cols, blocksize):
        end = min(start + blocksize, cols)
        block, hinv, off = w[:, start:end].clone(), u[start:end, start:end], dead[start:end]
        d = hinv.diagonal()
        drop = torch.zeros_like(block, dtype=torch.bool)
        if nm is None:
            count = round(sparsity * rows * end) - round(sparsity * rows * start)
            lowest = _saliency(block, d, off).flatten().argsort(stable=True)[:count]
            drop.view(-1)[lowest] = True
        errors = torch.zeros_like(block)
        for j in range(end - start):
            if nm is not None and j % nm[1] == 0:
                n, m = nm
                group = _saliency(block[:, j : j + m], d[j : j + m], off[j : j + m])
                drop[:, j : j + m].scatter_(
                    1, group.topk(m - n, dim=1, largest=False).indices, True
                )
            column = block[:, j]
            pruned = column.masked_fill(drop[:, j], 0.0)
            err = (column - pruned) / d[j]
            block[:, j:] -= err.unsqueeze(1) * hinv[j, j:].unsqueeze(0)
            block[:, j] = pruned  # exact zeros, not the float residue of the update
            errors[:, j] = err
        w[:, start:end] = block
        w[:, end:] -= errors @ u[start:end, end:]
    return w.to(weight.dtype)


def _solve(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None,
    config: SparseGPTConfig,
) -> torch.Tensor:
    """``weight`` pruned by ``config.solver``: :func:`sparsegpt_solve` or :func:`admm_solve`
    (the mask re-chosen during the first third of its iterations)."""
    if config.solver == "admm":
        iters = config.admm_iters
        return admm_solve(weight, hessian, sparsity, nm, config.damp, iters, iters // 3)
    return sparsegpt_solve(weight, hessian, sparsity, nm, config.damp, config.blocksize)


@torch.no_grad()
def prune_layer(
    layer: SparseLayer,
    hessian: torch.Tensor,
    config: SparseGPTConfig,
    sparsity: float | None = None,
    target: torch.Tensor | None = None,
) -> None:
    """Prune ``layer`` in place with ``config.solver`` on its inputs' Gram ``hessian``.

    ``sparsity``: the layer's fraction (default ``config.fraction``); ``target``: the weight to
    prune and reconstruct instead of the layer's own (the asymmetric optimum), same shape.
    A Conv2d's weight is solved as (Cout, Cin*kh*kw), one group at a time for a grouped conv,
    its columns taken in (kh, kw, Cin) order so that N:M groups run along the input channels,
    as :func:`netshrink.prune.nm_keep` lays them out.
    """
    nm = (config.n, config.m) if config.n is not None and config.m is not None else None
    fraction = config.fraction if sparsity is None else sparsity
    weight = (layer.weight if target is None else target).detach()
    groups = layer.groups if isinstance(layer, nn.Conv2d) else 1
    flat = weight.reshape(groups, weight.shape[0] // groups, -1)
    width = flat.shape[2]
    taps = weight[0, 0].numel() if weight.dim() == 4 else 1
    order = torch.arange(width).view(-1, taps).T.flatten()  # channel-major -> tap-major
    size = flat[0].numel()
    for g in range(groups):
        h = hessian[g * width : (g + 1) * width, g * width : (g + 1) * width]
        # the groups' shares of the layer's zeros, by cumulative rounding: exact per layer
        zeros = round(fraction * size * (g + 1)) - round(fraction * size * g)
        if taps == 1:  # a Linear or 1x1 conv: the columns are in order already
            pruned = _solve(flat[g], h, zeros / size, nm, config)
        else:  # tap-major columns, the Hessian reordered alike (copies)
            pruned = torch.empty_like(flat[g])
            pruned[:, order] = _solve(
                flat[g][:, order], h[order][:, order], zeros / size, nm, config
            )
        layer.weight.view(flat.shape)[g].copy_(pruned)
        del pruned
    layer.refresh_mask()


def _nm_fits(name: str, layer: SparseLayer, config: SparseGPTConfig) -> bool:
    """False (with a warning) when N:M is asked and ``layer``'s inputs are not a multiple of m."""
    if config.m is None:
        return True
    channels = layer.weight.shape[1]
    if channels % config.m == 0:
        return True
    warnings.warn(
        f"prune.sparsegpt: {name} has {channels} input channels, not a multiple of "
        f"m={config.m}; left dense",
        stacklevel=4,
    )
    return False


@torch.no_grad()
def prune_stage(
    layers: dict[str, SparseLayer],
    stats: dict[str, Paired],
    config: SparseGPTConfig,
    fractions: Mapping[str, float],
) -> None:
    """Prune one stage's layers from :class:`Paired` statistics, each to its share of
    ``fractions`` (default ``config.fraction``): the asymmetric target when
    ``config.asymmetric``, the bias shifted by the mean output change when
    ``config.bias_correction``; a warning names the layers that never ran. Each layer's
    Gram sum is taken out of its statistics (in float32) and freed once the layer is pruned."""
    idle = [name for name, pair in stats.items() if pair.gram is None]
    if idle:
        warnings.warn(
            f"prune.sparsegpt: {', '.join(idle)} never ran on calib_data; left dense", stacklevel=3
        )
    for name, pair in stats.items():
        layer = layers[name]
        if pair.gram is None or not _nm_fits(name, layer, config):
            continue
        before = layer.weight.detach().flatten(1).clone()
        spans = before.shape[1] == pair.gram.shape[0]  # false for a grouped conv
        if not spans and (config.asymmetric or config.bias_correction):
            warnings.warn(
                f"prune.sparsegpt: {name} is a grouped conv; asymmetric and bias_correction "
                "need one Gram matrix over all its inputs, so it is pruned without them",
                stacklevel=3,
            )
        target = None
        if config.asymmetric and spans:
            target = asymmetric_target(before, pair, config.damp).view_as(layer.weight)
        # float32 from here (the solve's precision); a float64 model's sum is freed before it
        gram, pair.gram = pair.gram.float(), None
        prune_layer(layer, gram, config, fractions.get(name), target)
        if spans:
            error = relative_output_error(before, layer.weight.flatten(1), gram)
            log.info("prune.sparsegpt: %s relative output error %.2e on calib_data", name, error)
        if config.bias_correction and layer.bias is not None and spans:
            layer.bias.add_(bias_shift(before, layer.weight.detach().flatten(1), pair))
        del gram  # freed before the next layer's solve, not with the stage


def prune_all(
    model: nn.Module,
    layers: dict[str, SparseLayer],
    batches: list[Batch],
    config: SparseGPTConfig,
    fractions: Mapping[str, float],
    show: bool,
) -> None:
    """One calibration pass over ``model`` gathering each layer's X^T X, then every layer pruned.

    The Gram matrices of all ``layers`` are held at once (in^2 float32 each for float32 inputs);
    ``sequential`` holds one block's only.
    """
    stats = {name: Paired() for name in layers}
    collect(model, {n: [s] for n, s in stats.items()}, batches, "sparsegpt: X^T X", show=show)
    prune_stage(layers, stats, config, fractions)


def _untied_targets(model: nn.Module, targets: Targets) -> Targets:
    """``targets`` with the layers whose weights are tied to another module's excluded, with a
    warning: SparseGPT rewrites the kept weights too, which would change the other side."""
    chosen = list(targets.select(model, default_types=layer_types()))
    why = "their weights are tied to another module's, which rewriting them would change too"
    kept = leave_alone(chosen, tied_modules(model), "prune.sparsegpt", why)
    return targets.model_copy(
        update={"exclude": (*targets.exclude, *sorted(set(chosen) - set(kept)))}
    )


@technique("prune.sparsegpt", SparseGPTConfig, needs=("calib_data",), creates=SPARSE_LAYERS)
def sparsegpt(model: nn.Module, config: SparseGPTConfig, ctx: Context) -> nn.Module:
    """Prune and reconstruct each layer from its inputs' X^T X (SparseGPT, Frantar & Alistarh)."""
    batches = materialize(ctx.calib_data or [], "calib_data")[: config.calib_batches]
    blocks = find_blocks(model, config.blocks) if config.sequential else []
    layers = sparsify(model, _untied_targets(model, config.targets))
    owned, outside = block_owners(list(layers), blocks)
    fractions: dict[str, float] = {}
    if config.allocation == "owl":
        by_block = config.owl_groups == "block"
        groups = (
            [*(g for g in owned.values() if g), *([n] for n in outside)]
            if by_block
            else [[n] for n in layers]
        )
        fractions = owl_layer_fractions(
            model, layers, groups, batches, config.fraction, config.owl_threshold,
            config.owl_spread, ctx.progress,
        )  # fmt: skip
    if not config.sequential:
        prune_all(model, layers, batches, config, fractions, ctx.progress)
    else:
        # Layers outside every block are pruned first, on the dense model's statistics.
        if outside:
            first = {n: layers[n] for n in outside}
            prune_all(model, first, batches, config, fractions, ctx.progress)
        if config.true_sequential or config.asymmetric or config.bias_correction:
            report = run_stages(
                model, batches, owned, lambda st: prune_stage(layers, st, config, fractions),
                reference=config.asymmetric, split=config.true_sequential,
                norms=config.norm_correction, blocks=blocks,
                show=ctx.progress,
            )  # fmt: skip
        else:
            per_layer = PerLayer(
                owned, Paired, lambda st: prune_stage(layers, st, config, fractions)
            )
            report = run_blocks(model, batches, per_layer, blocks, ctx.progress)
        log.info("prune.sparsegpt: %s", report)
    choose_kernels(model, layers, config.kernel, ctx)
    return model
