"""Factorized layers and how they are built from the two factors of a truncated SVD.

A weight matrix W (m x n) is replaced by B (k x n) followed by A (m x k), so that W ≈ A @ B and
the layer runs two smaller matrix products: k(m + n) weights and MACs per output position
instead of mn. The functions here take the factors as given; choosing them (plain or whitened
SVD) and choosing k is done in :mod:`netshrink.lowrank.decompose` and
:mod:`netshrink.lowrank.ranks`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from netshrink.artifact.modules import rebuildable


@rebuildable
class LowRankLinear(nn.Module):
    """``y = second(first(x))``: Linear(n -> k, no bias) then Linear(k -> m, with the bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def spec(self) -> dict[str, Any]:
        """JSON constructor arguments: the artifact rebuilds the layer from them."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.second.bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> LowRankLinear:
        """An empty layer of the shapes ``spec`` names; ``load_state_dict`` fills the values."""
        return cls(**spec)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    with torch.no_grad():
        dst.copy_(src.reshape(dst.shape).to(dst.dtype))


def linear_from_factors(layer: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> LowRankLinear:
    """``layer`` (m x n) as a LowRankLinear: first weight ``b`` (k x n), second ``a`` (m x k)."""
    new = LowRankLinear(layer.in_features, layer.out_features, b.shape[0], layer.bias is not None)
    new.to(device=layer.weight.device, dtype=layer.weight.dtype)
    _copy(new.first.weight, b)
    _copy(new.second.weight, a)
    if layer.bias is not None:
        _copy(new.second.bias, layer.bias)
    return new


def _conv(conv: nn.Conv2d, cin: int, cout: int, **overrides: Any) -> nn.Conv2d:
    args: dict[str, Any] = {
        "kernel_size": conv.kernel_size,
        "stride": conv.stride,
        "padding": conv.padding,
        "dilation": conv.dilation,
        "padding_mode": conv.padding_mode,
        "bias": False,
    }
    args.update(overrides)
    new = nn.Conv2d(cin, cout, **args)
    return new.to(device=conv.weight.device, dtype=conv.weight.dtype)


def _bias_of(conv: nn.Conv2d, last: nn.Conv2d) -> None:
    if conv.bias is not None:
        assert last.bias is not None
        _copy(last.bias, conv.bias)


def conv_from_factors(conv: nn.Conv2d, a: torch.Tensor, b: torch.Tensor) -> nn.Sequential:
    """Replace ``conv`` by Conv2d(Cin -> k, kh x kw) then a 1x1 Conv2d(k -> Cout).

    ``b`` (k x Cin*kh*kw) and ``a`` (Cout x k) factor the weight reshaped to
    (Cout, Cin*kh*kw). The first conv keeps the original stride, padding, dilation and
    padding mode, so the output grid is the same; the bias moves to the 1x1 conv.
    """
    k = b.shape[0]
    first = _conv(conv, conv.in_channels, k)
    second = _conv(
        conv,
        k,
        conv.out_channels,
        kernel_size=1,
        stride=1,
        padding=0,
        dilation=1,
        padding_mode="zeros",
        bias=conv.bias is not None,
    )
    _copy(first.weight, b)
    _copy(second.weight, a)
    _bias_of(conv, second)
    return nn.Sequential(first, second)


def _split(value: Any, axis: int) -> Any:
    """A conv padding with only ``axis`` (0: vertical, 1: horizontal) kept, the other axis 0."""
    if isinstance(value, str):  # 'same' / 'valid' apply per axis, so they split as they are
        return value
    return tuple(v if i == axis else 0 for i, v in enumerate(value))


def spatial_from_factors(conv: nn.Conv2d, a: torch.Tensor, b: torch.Tensor) -> nn.Sequential:
    """Replace ``conv`` by Conv2d(Cin -> k, kh x 1) then Conv2d(k -> Cout, 1 x kw).

    Jaderberg, Vedaldi & Zisserman 2014 ("Speeding up CNNs with low rank expansions"), sec. 3,
    scheme 2: the weight rearranged as M[(cin, y), (cout, x)] = W[cout, cin, y, x] is factored
    as M ≈ a @ b, ``a`` (Cin*kh x k) holding the vertical filters and ``b`` (k x Cout*kw) the
    horizontal ones. Each conv takes its own axis of the stride, padding and dilation; padding
    commutes with a one-axis convolution, so non-zero padding modes split exactly too.
    """
    k = a.shape[1]
    kh, kw = conv.kernel_size
    vertical = {
        "kernel_size": (kh, 1),
        "stride": (conv.stride[0], 1),
        "dilation": (conv.dilation[0], 1),
        "padding": _split(conv.padding, 0),
    }
    horizontal = {
        "kernel_size": (1, kw),
        "stride": (1, conv.stride[1]),
        "dilation": (1, conv.dilation[1]),
        "padding": _split(conv.padding, 1),
        "bias": conv.bias is not None,
    }
    first = _conv(conv, conv.in_channels, k, **vertical)
    second = _conv(conv, k, conv.out_channels, **horizontal)
    # a[(cin, y), j] -> first.weight[j, cin, y, 0]; b[j, (cout, x)] -> second.weight[cout, j, 0, x]
    _copy(first.weight, a.T)
    _copy(second.weight, b.reshape(k, conv.out_channels, kw).transpose(0, 1))
    _bias_of(conv, second)
    return nn.Sequential(first, second)
