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

from netshrink.layers import CompressedLayer, ConvGeometry


class _Factored(CompressedLayer):
    """Two layers ``first`` then ``second`` standing for one; the bias lives in ``second``."""

    first: nn.Module
    second: nn.Module

    @property
    def bias(self) -> torch.Tensor | None:
        """The bias of the original layer (held by ``second``)."""
        return self.second.bias  # type: ignore[return-value]

    def num_params(self) -> int:
        """Parameters of the two factors (fewer than the dense layer: the point of the layer)."""
        return sum(p.numel() for p in self.parameters())

    def num_nonzero(self) -> int:
        """Non-zero elements of the two factors and the bias.

        The inherited count reads ``weight``, the recomposed m x n product, and so counted more
        non-zeros than :meth:`num_params` counts parameters.
        """
        with torch.no_grad():
            return sum(int(torch.count_nonzero(p)) for p in self.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


class LowRankLinear(_Factored):
    """``y = second(first(x))``: Linear(n -> k, no bias) then Linear(k -> m, with the bias)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.first = nn.Linear(in_features, rank, bias=False)
        self.second = nn.Linear(rank, out_features, bias=bias)

    @property
    def weight(self) -> torch.Tensor:
        """The recomposed weight ``second.weight @ first.weight`` (out x in)."""
        return self.second.weight @ self.first.weight

    def spec(self) -> dict[str, Any]:
        """JSON constructor arguments: the artifact rebuilds the layer from them."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "rank": self.rank,
            "bias": self.second.bias is not None,
        }

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _split(value: Any, axis: int) -> Any:
    """A conv padding with only ``axis`` (0: vertical, 1: horizontal) kept, the other axis 0."""
    if isinstance(value, str):  # 'same' / 'valid' apply per axis, so they split as they are
        return value
    return tuple(v if i == axis else 0 for i, v in enumerate(value))


class LowRankConv2d(_Factored):
    """A Conv2d as two convolutions through ``rank`` channels.

    ``channel``: Conv2d(Cin -> k, kh x kw) then a 1x1 Conv2d(k -> Cout); the first keeps the
    original stride, padding, dilation and padding mode. ``spatial``: Conv2d(Cin -> k, kh x 1)
    then Conv2d(k -> Cout, 1 x kw), each taking its own axis of the stride, padding and dilation
    (Jaderberg, Vedaldi & Zisserman 2014, sec. 3, scheme 2); padding commutes with a one-axis
    convolution, so non-zero padding modes split exactly too.
    """

    def __init__(self, conv: dict[str, Any], rank: int, variant: str, bias: bool = True):
        super().__init__()
        if variant not in ("channel", "spatial"):
            raise ValueError(f"variant must be 'channel' or 'spatial', got {variant!r}")
        self.geometry, self.rank, self.variant = ConvGeometry.from_spec(conv), rank, variant
        g = self.geometry
        if variant == "channel":
            self.first = g.module(False, out_channels=rank)
            one = {"kernel_size": 1, "stride": 1, "padding": 0, "dilation": 1}
            self.second = g.module(bias, in_channels=rank, padding_mode="zeros", **one)
        else:
            (kh, kw), (sh, sw), (dh, dw) = g.kernel_size, g.stride, g.dilation
            self.first = g.module(
                False, out_channels=rank, kernel_size=(kh, 1), stride=(sh, 1),
                dilation=(dh, 1), padding=_split(g.padding, 0),
            )  # fmt: skip
            self.second = g.module(
                bias, in_channels=rank, kernel_size=(1, kw), stride=(1, sw),
                dilation=(1, dw), padding=_split(g.padding, 1),
            )  # fmt: skip

    @property
    def weight(self) -> torch.Tensor:
        """The recomposed (Cout, Cin, kh, kw) kernel of the two convolutions."""
        first, second = self.first.weight, self.second.weight
        if self.variant == "channel":  # W[o, c, y, x] = sum_j second[o, j] first[j, c, y, x]
            return torch.einsum("oj,jcyx->ocyx", second[:, :, 0, 0], first)
        # W[o, c, y, x] = sum_j first[j, c, y, 0] second[o, j, 0, x]
        return torch.einsum("jcy,ojx->ocyx", first[..., 0], second[:, :, 0])

    def spec(self) -> dict[str, Any]:
        """JSON constructor arguments: the artifact rebuilds the layer from them."""
        bias = self.second.bias is not None
        return {
            "conv": self.geometry.spec(),
            "rank": self.rank,
            "variant": self.variant,
            "bias": bias,
        }

    def extra_repr(self) -> str:
        return f"variant={self.variant}, rank={self.rank}"


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    with torch.no_grad():
        dst.copy_(src.reshape(dst.shape).to(dst.dtype))


def linear_from_factors(layer: nn.Linear, a: torch.Tensor, b: torch.Tensor) -> LowRankLinear:
    """``layer`` (m x n) as a LowRankLinear: first weight ``b`` (k x n), second ``a`` (m x k)."""
    new = LowRankLinear(layer.in_features, layer.out_features, b.shape[0], layer.bias is not None)
    return _filled(new, layer, b, a)


def _filled(new: _Factored, layer: nn.Module, first: torch.Tensor, second: torch.Tensor) -> Any:
    """``new`` on ``layer``'s device and dtype, holding the two factor weights and its bias."""
    new.to(device=layer.weight.device, dtype=layer.weight.dtype)
    _copy(new.first.weight, first)
    _copy(new.second.weight, second)
    if layer.bias is not None:
        _copy(new.second.bias, layer.bias)
    return new


def conv_from_factors(conv: nn.Conv2d, a: torch.Tensor, b: torch.Tensor) -> LowRankConv2d:
    """Replace ``conv`` by Conv2d(Cin -> k, kh x kw) then a 1x1 Conv2d(k -> Cout).

    ``b`` (k x Cin*kh*kw) and ``a`` (Cout x k) factor the weight reshaped to
    (Cout, Cin*kh*kw).
    """
    geometry = ConvGeometry.of(conv).spec()
    new = LowRankConv2d(geometry, b.shape[0], "channel", conv.bias is not None)
    return _filled(new, conv, b, a)


def spatial_from_factors(conv: nn.Conv2d, a: torch.Tensor, b: torch.Tensor) -> LowRankConv2d:
    """Replace ``conv`` by Conv2d(Cin -> k, kh x 1) then Conv2d(k -> Cout, 1 x kw).

    The weight rearranged as M[(cin, y), (cout, x)] = W[cout, cin, y, x] is factored as
    M ≈ a @ b, ``a`` (Cin*kh x k) holding the vertical filters and ``b`` (k x Cout*kw) the
    horizontal ones.
    """
    k = a.shape[1]
    geometry = ConvGeometry.of(conv).spec()
    new = LowRankConv2d(geometry, k, "spatial", conv.bias is not None)
    # a[(cin, y), j] -> first.weight[j, cin, y, 0]; b[j, (cout, x)] -> second.weight[cout, j, 0, x]
    second = b.reshape(k, conv.out_channels, conv.kernel_size[1]).transpose(0, 1)
    return _filled(new, conv, a.T, second)
