"""Layers that read the same input, factorized jointly: one first factor, one second each.

Linears applied to the same tensor (a transformer's query and key projections both read the
hidden state) can be stacked into one matrix [W1; W2; ...] and factored together,
[W1; W2] ≈ [A1; A2] · B: the first factor B (k x n) is shared, so the group holds
k(n + m1 + m2) weights instead of each layer's own k_i(n + m_i), and x Bᵀ is computed once
per input. Each layer stays a module of its own (:class:`SharedLowRankLinear`), so the parent
model's forward still calls ``query(x)`` and ``key(x)``; they hold the same
:class:`SharedBasis` object as their ``first`` child, and the artifact restores that sharing
on load (a module at several paths, see :mod:`netshrink.artifact.store`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from netshrink.lowrank.layers import LowRankLinear, _copy


class SharedBasis(nn.Module):
    """``x Bᵀ`` for ``users`` layers that call it on the same input: computed once per input.

    The result is kept until every user has taken it, or until another input comes, and only
    while the input, the weight and the grad mode are the ones it was computed with (an
    in-place change to either tensor bumps its version), so a kept result is never stale. An
    input made under ``torch.inference_mode`` has no version counter: there the input is
    matched by identity alone (a forward that changed its input in place between two sibling
    projections would defeat that; none known does).
    """

    def __init__(self, in_features: int, rank: int, users: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(rank, in_features))
        nn.init.kaiming_uniform_(self.weight, a=5**0.5)  # nn.Linear's initialisation
        self.users = users
        self._kept: tuple[torch.Tensor, tuple[int, int, bool], torch.Tensor, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return F.linear(x, self.weight)  # an exporter traces each call; ORT merges them
        version = -1 if x.is_inference() else x._version
        key = (version, self.weight._version, torch.is_grad_enabled())
        kept = self._kept
        if kept is not None and kept[0] is x and kept[1] == key:
            y, left = kept[2], kept[3] - 1
        else:
            y, left = F.linear(x, self.weight), self.users - 1
        self._kept = (x, key, y, left) if left > 0 else None
        return y

    def __getstate__(self) -> dict[str, Any]:
        # the kept result is one forward's cache; with autograd history it cannot be deep-copied
        return {**self.__dict__, "_kept": None}

    def extra_repr(self) -> str:
        rank, n = self.weight.shape
        return f"in_features={n}, rank={rank}, users={self.users}"


class SharedLowRankLinear(LowRankLinear):
    """A :class:`LowRankLinear` whose ``first`` factor is a :class:`SharedBasis` that other
    layers of its group hold too; ``second`` (rank -> out, with the bias) is its own."""

    def __init__(
        self, in_features: int, out_features: int, rank: int, users: int, bias: bool = True
    ) -> None:
        super().__init__(in_features, out_features, rank, bias)
        self.first = SharedBasis(in_features, rank, users)

    def spec(self) -> dict[str, Any]:
        """JSON constructor arguments: the artifact rebuilds the layer from them."""
        assert isinstance(self.first, SharedBasis)
        return {**super().spec(), "users": self.first.users}


def group_from_factors(
    layers: list[nn.Linear], a: torch.Tensor, b: torch.Tensor
) -> list[SharedLowRankLinear]:
    """``layers`` (their weights stacked in this order: a @ b ≈ [W1; W2; ...]) as one
    SharedLowRankLinear each, all holding one SharedBasis with weight ``b`` (k x n)."""
    first = layers[0].weight
    basis = SharedBasis(b.shape[1], b.shape[0], len(layers)).to(first.device, first.dtype)
    _copy(basis.weight, b)
    out, row = [], 0
    for layer in layers:
        m = layer.out_features
        new = SharedLowRankLinear(
            layer.in_features, m, b.shape[0], len(layers), layer.bias is not None
        ).to(first.device, first.dtype)
        new.first = basis
        _copy(new.second.weight, a[row : row + m])
        if layer.bias is not None:
            _copy(new.second.bias, layer.bias)
        out.append(new)
        row += m
    return out
