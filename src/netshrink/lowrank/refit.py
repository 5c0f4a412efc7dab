"""Sequential refit: each factorized layer fitted to the original model's outputs, in order.

A truncation chosen on the original model's inputs (SVD-LLM's whitening, sec. 3.1) has no way
to make up for the layers before it: once those are factorized, a layer sees other inputs, and
the errors of all layers add up. Here the layers are factorized one at a time in the order the
model calls them. For each, the calibration batches run twice: through the original model,
giving the inputs xo the original layer got (and so its outputs W xo + b, the target), and
through the model with the earlier layers already factorized, giving the inputs x the layer gets
now. The new factors are the rank-k weight W' and bias b' that minimise E||W xo + b − W' x − b'||²
on the calibration tokens: with the inputs centred, b' takes the mean shift and W' is the
reduced-rank regression of :func:`~netshrink.lowrank.decompose.fitted_spectrum`. This is the
order GPTQ calibrates in, with the original layer's output as the target as GPTAQ (Li et al.
2025) does; SVD-LLM v2 (Wang et al. 2025) likewise fits the factors to the layer's output rather
than its weight.

Cost: for every layer, one forward pass per calibration batch up to that layer in each of the
two models (the original is the same model with the factorized layers swapped back, so memory
holds one model). A layer's statistics are those of its first call in each forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from netshrink.batches import run
from netshrink.calibrate import input_vectors, real_tokens, token_mask
from netshrink.calibrate.collect import module_calls
from netshrink.context import Batch
from netshrink.layers import replace_module
from netshrink.lowrank.decompose import Spectrum, fitted_spectrum, weight_matrix
from netshrink.progress import track

Build = Callable[[nn.Module, Spectrum, int], nn.Module]
"""Makes the factorized layer of a module from a spectrum at a rank."""


class _Stop(Exception):
    """Raised in the watched layer's pre-hook: the rest of the forward is not needed."""


def _first_input(model: nn.Module, name: str, inputs: Any) -> torch.Tensor | None:
    """The input of ``model``'s module ``name`` at its first call on ``inputs`` (None: not
    called); the forward stops there."""
    seen: list[torch.Tensor] = []

    def grab(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        seen.append(args[0] if args else next(iter(kwargs.values())))
        raise _Stop

    handle = model.get_submodule(name).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run(model, inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0] if seen else None


def execution_order(model: nn.Module, names: Sequence[str], inputs: Any) -> list[str]:
    """``names`` in the order ``model`` first calls them on ``inputs``; uncalled ones left out."""
    order: list[str] = []
    handles = [
        model.get_submodule(n).register_forward_pre_hook(
            lambda *_a, n=n: None if n in order else order.append(n)
        )
        for n in names
    ]
    try:
        with module_calls(model):
            run(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return order


@dataclass
class _Paired:
    """Float64 sums over calibration vectors: x (now), xo (original), x xᵀ and xo xᵀ."""

    count: int = 0
    x: torch.Tensor | float = 0.0
    xo: torch.Tensor | float = 0.0
    xx: torch.Tensor | float = 0.0
    ox: torch.Tensor | float = 0.0

    def add(self, x: torch.Tensor, xo: torch.Tensor) -> None:
        self.count += x.shape[0]
        self.x = self.x + x.sum(0)
        self.xo = self.xo + xo.sum(0)
        self.xx = self.xx + x.T @ x
        self.ox = self.ox + xo.T @ x


@contextmanager
def _swapped(model: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """``modules`` put into ``model`` by name meanwhile; the ones they replace put back after."""
    gone = {name: replace_module(model, name, m) for name, m in modules.items()}
    try:
        yield
    finally:
        for name, m in gone.items():
            replace_module(model, name, m)  # type: ignore[arg-type]


def _paired(
    model: nn.Module,
    name: str,
    layer: nn.Module,
    originals: dict[str, nn.Module],
    batches: Sequence[Batch],
) -> _Paired:
    """Layer ``name``'s real-token input vectors in the original and in the current model."""
    stats = _Paired()
    for inputs, _ in batches:
        with _swapped(model, originals):
            xo = _first_input(model, name, inputs)
        x = _first_input(model, name, inputs)
        if x is None or xo is None:
            continue
        mask = token_mask(inputs)
        stats.add(
            input_vectors(layer, real_tokens(x, mask)).double(),
            input_vectors(layer, real_tokens(xo, mask)).double(),
        )
    return stats


def _fitted(
    layer: nn.Module,
    spec: Spectrum,
    rank: int,
    stats: _Paired,
    build: Build,
    damping: float,
    out_cov: torch.Tensor | None,
) -> tuple[nn.Module, Spectrum]:
    """``layer`` factorized at ``rank`` by least squares on ``stats`` (see the module doc)."""
    matrix = weight_matrix(layer, spec.variant)
    n = stats.count
    mean, mean_o = stats.x / n, stats.xo / n
    bias = getattr(layer, "bias", None)
    cov, cross = stats.xx / n, stats.ox / n
    if bias is not None:  # centred: the bias absorbs the shift of the inputs' mean
        cov = cov - torch.outer(mean, mean)
        cross = cross - torch.outer(mean_o, mean)
    fitted = fitted_spectrum(matrix, cross, cov, spec.variant, damping, out_cov)
    new = build(layer, fitted, rank)
    if bias is not None:
        a, b = fitted.factors(rank)
        shifted = bias.detach().double() + matrix @ mean_o - a @ (b @ mean)
        with torch.no_grad():
            new.second.bias.copy_(shifted.to(new.second.bias.dtype))
    return new, fitted


def refit(
    model: nn.Module,
    layers: dict[str, nn.Module],
    plan: dict[str, tuple[Spectrum, int]],
    batches: Sequence[Batch],
    build: Build,
    damping: float,
    out_covs: dict[str, torch.Tensor],
    show: bool = True,
) -> dict[str, tuple[nn.Module, Spectrum]]:
    """Factorize the layers of ``plan`` (name -> spectrum, rank) in ``model``, in call order.

    ``layers`` holds each layer as a Linear or Conv2d (its variant and rank are the plan's; its
    factors are refit). Every layer the model calls on ``batches`` is replaced in ``model``;
    returns the new module and its fitted spectrum by name. Layers never called are left to
    the caller.
    """
    done: dict[str, tuple[nn.Module, Spectrum]] = {}
    originals: dict[str, nn.Module] = {}
    order = execution_order(model, list(plan), batches[0][0])
    with module_calls(model):
        for name in track(order, "lowrank: refit", show=show):
            spec, rank = plan[name]
            stats = _paired(model, name, layers[name], originals, batches)
            if stats.count == 0:
                continue
            new, fitted = _fitted(
                layers[name], spec, rank, stats, build, damping, out_covs.get(name)
            )
            originals[name] = replace_module(model, name, new)  # type: ignore[assignment]
            done[name] = (new, fitted)
    return done
