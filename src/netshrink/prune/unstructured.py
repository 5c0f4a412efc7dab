"""Unstructured and N:M pruning: ``prune.magnitude``, ``prune.random`` and ``prune.nm``.

Selected Linear and Conv2d layers become :class:`~netshrink.prune.sparse_layers.SparseLinear` /
``SparseConv2d``: the pruned weights are zero in the dense tensor (the artifact stores it packed)
and stay zero through fine-tuning. Sparsity is exact: ``round(sparsity * n)`` weights are zeroed,
ties broken by position. Afterwards each layer keeps the faster of the dense and the CSR kernel,
timed on this machine (:func:`~netshrink.prune.sparse_layers.choose_kernel`).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from netshrink.calibrate import Capture, collect
from netshrink.config import TechniqueConfig
from netshrink.context import Context
from netshrink.layers import layer_types, replace_module
from netshrink.progress import track
from netshrink.prune.schedules import Schedule, run_schedule, schedule_needs
from netshrink.prune.sparse_layers import (
    SparseConv2d,
    SparseLayer,
    SparseLinear,
    choose_kernel,
    make_sparse,
)
from netshrink.registry import Knob, technique
from netshrink.targets import Targets

SPARSE_LAYERS = (SparseLinear, SparseConv2d)
"""The layer types the unstructured techniques put in place of Linear and Conv2d."""

CSR_CROSSOVER = ((16, 0.7), (0, 0.99))
"""(at least this many rows, below this sparsity): where CSR never came within reach of dense in
the measured crossover (1 thread, docs/benchmarks/prune.md "Where CSR beats dense": it lost at
70% and below for 64 rows, and below 99% for one row). ``kernel: auto`` keeps such layers dense
without timing them."""


class SparseConfig(TechniqueConfig):
    """Options shared by the unstructured techniques."""

    kernel: Literal["auto", "dense", "csr"] = Field(
        "auto", description="auto: time dense vs CSR per layer and keep the faster"
    )
    targets: Targets = Field(
        default_factory=Targets, description="layers to sparsify (default: Linear and Conv2d)"
    )


class MagnitudeConfig(SparseConfig):
    """Options of ``prune.magnitude``."""

    sparsity: float = Field(0.5, ge=0, lt=1, description="fraction of weights set to zero")
    scope: Literal["layer", "global"] = Field(
        "layer", description="same sparsity in every layer, or smallest |w| across all layers"
    )
    schedule: Schedule = Field(
        default_factory=Schedule, description="oneshot, iterative or gradual pruning"
    )


class RandomConfig(SparseConfig):
    """Options of ``prune.random``."""

    sparsity: float = Field(0.5, ge=0, lt=1, description="fraction of weights set to zero")


class NMConfig(SparseConfig):
    """Options of ``prune.nm``."""

    n: int = Field(2, ge=1, le=64, description="weights kept in every block of m")
    m: int = Field(4, ge=2, le=64, description="block length along the input dimension")

    @model_validator(mode="after")
    def _n_below_m(self) -> NMConfig:
        if self.n >= self.m:
            raise ValueError(f"n must be smaller than m, got n={self.n}, m={self.m} (e.g. 2:4)")
        return self


def sparsify(model: nn.Module, targets: Targets) -> dict[str, SparseLayer]:
    """Swap the selected Linear/Conv1D/Conv2d layers for sparse ones (sharing parameters)."""
    layers: dict[str, SparseLayer] = {}
    kinds = layer_types()
    for name, module in targets.select(model, default_types=kinds).items():
        if not isinstance(module, kinds):
            kind = type(module).__name__
            warnings.warn(f"{name} ({kind}) cannot be sparsified; left untouched", stacklevel=3)
            continue
        layer = make_sparse(module)
        replace_module(model, name, layer)
        layers[name] = layer
    return layers


@torch.no_grad()
def zero_lowest(
    layers: dict[str, SparseLayer], keys: dict[str, torch.Tensor], fraction: float, scope: str
) -> None:
    """Zero ``round(fraction * n)`` weights with the lowest ``keys``, per layer or over all."""
    groups = [[name] for name in layers] if scope == "layer" else [list(layers)]
    for names in groups:
        flat = torch.cat([keys[n].flatten() for n in names])
        drop = torch.zeros(flat.numel(), dtype=torch.bool)
        drop[torch.argsort(flat, stable=True)[: round(fraction * flat.numel())]] = True
        for name, part in zip(names, drop.split([keys[n].numel() for n in names]), strict=True):
            layer = layers[name]
            layer.mask = layer.mask & ~part.view_as(layer.weight)  # pruned weights stay pruned


@torch.no_grad()
def choose_kernels(
    model: nn.Module, layers: dict[str, SparseLayer], kernel: str, ctx: Context
) -> None:
    """Set each layer's kernel: forced, or (auto) timed on its real input shape."""
    seen = {name: Capture(limit=1) for name in layers}
    if kernel == "auto" and ctx.example_inputs is not None:
        points = {name: [capture] for name, capture in seen.items()}
        collect(model, points, [(ctx.example_inputs, None)], "kernel choice", show=False)
    gen = torch.Generator().manual_seed(ctx.seed)
    timed: list[tuple[SparseLayer, torch.Tensor]] = []
    for name, layer in layers.items():
        if kernel != "auto":
            layer.kernel = kernel
            continue
        x = seen[name].tensors[0] if seen[name].tensors else None
        if x is None and isinstance(layer, nn.Linear):
            x = torch.randn(64, layer.in_features, generator=gen)  # no example: a 64-row batch
        layer.kernel, layer.timing = "dense", {}
        if x is not None and csr_may_win(layer, x):
            timed.append((layer, x))
    for layer, x in track(timed, f"timing dense vs CSR ({len(timed)} layers)", show=ctx.progress):
        choose_kernel(layer, x)


def csr_may_win(layer: SparseLayer, x: torch.Tensor) -> bool:
    """False where the measured crossover (:data:`CSR_CROSSOVER`) rules the CSR kernel out for
    ``layer``'s sparsity on input ``x``: its matmul has ``x.numel() / in_features`` rows."""
    in_features = x.shape[-1] if isinstance(layer, nn.Linear) else x.shape[1]
    rows = x.numel() // max(in_features, 1)
    below = next(s for least, s in CSR_CROSSOVER if rows >= least)
    return layer.sparsity() >= below


def _magnitude_keys(layers: dict[str, SparseLayer]) -> dict[str, torch.Tensor]:
    return {n: (layer.weight.detach() * layer.mask).abs() for n, layer in layers.items()}


def _probe_options(sparsity: float, targets: dict[str, Any]) -> dict[str, Any]:
    return {"sparsity": sparsity, "kernel": "dense", "targets": targets}


@technique(
    "prune.magnitude",
    MagnitudeConfig,
    needs=lambda cfg: schedule_needs(cfg.schedule),
    creates=SPARSE_LAYERS,
    knob=Knob("sparsity", (0.5, 0.75, 0.9, 0.95, 0.98), _probe_options),
)
def magnitude(model: nn.Module, config: MagnitudeConfig, ctx: Context) -> nn.Module:
    """Zero the weights of smallest |w|, per layer or globally (Han et al. 2015, sec. 3)."""
    layers = sparsify(model, config.targets)

    def step(_m: nn.Module, _previous: float, target: float) -> None:
        zero_lowest(layers, _magnitude_keys(layers), target, config.scope)

    run_schedule(
        model, config.schedule, config.sparsity, step, ctx, "prune.magnitude", in_training=True
    )
    choose_kernels(model, layers, config.kernel, ctx)
    return model


@technique("prune.random", RandomConfig, creates=SPARSE_LAYERS)
def random(model: nn.Module, config: RandomConfig, ctx: Context) -> nn.Module:
    """Zero a seeded random choice of weights in every layer: the baseline for other criteria."""
    layers = sparsify(model, config.targets)
    gen = torch.Generator().manual_seed(ctx.seed)
    keys = {n: torch.rand(layer.weight.shape, generator=gen) for n, layer in layers.items()}
    zero_lowest(layers, keys, config.sparsity, "layer")
    choose_kernels(model, layers, config.kernel, ctx)
    return model


def _input_last(weight: torch.Tensor) -> torch.Tensor:
    """The weight with the input-channel dimension last: (out, in) or (out, kh, kw, in)."""
    return weight if weight.dim() == 2 else weight.permute(0, 2, 3, 1)


def nm_keep(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Mask keeping the ``n`` highest ``scores`` of every ``m`` consecutive input weights.

    ``scores`` is shaped like the weight, (out, in) or (out, in, kh, kw); groups run along the
    input channels, whose count must be a multiple of ``m``.
    """
    s = _input_last(scores)
    blocks = s.reshape(*s.shape[:-1], -1, m)
    keep = torch.zeros_like(blocks, dtype=torch.bool)
    keep.scatter_(-1, blocks.topk(n, dim=-1).indices, True)
    mask = keep.reshape(s.shape)
    return mask if scores.dim() == 2 else mask.permute(0, 3, 1, 2)


def nm_layout_ok(weight: torch.Tensor, n: int, m: int) -> bool:
    """True when every block of ``m`` consecutive input weights holds at most ``n`` non-zeros."""
    w = _input_last(weight)
    if w.shape[-1] % m:
        return False
    return bool(((w.reshape(*w.shape[:-1], -1, m) != 0).sum(-1) <= n).all())


@technique("prune.nm", NMConfig, creates=SPARSE_LAYERS)
def nm(model: nn.Module, config: NMConfig, ctx: Context) -> nn.Module:
    """Keep the n largest |w| of every m consecutive input weights (N:M, e.g. 2:4)."""
    n, m = config.n, config.m
    layers = {}
    for name, layer in sparsify(model, config.targets).items():
        w = _input_last(layer.weight.detach())
        if w.shape[-1] % m:
            warnings.warn(
                f"prune.nm: {name} has {w.shape[-1]} input channels, not a multiple of m={m}; "
                "left dense",
                stacklevel=2,
            )
            layer.kernel = "dense"
            continue
        with torch.no_grad():
            layer.weight.mul_(nm_keep(layer.weight.detach().abs(), n, m))
        layer.refresh_mask()
        assert nm_layout_ok(layer.weight, n, m)
        layers[name] = layer
    choose_kernels(model, layers, config.kernel, ctx)
    return model
