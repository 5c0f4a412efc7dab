"""The float layer SmoothQuant leaves where its smoothing cannot be folded away.

SmoothQuant (Xiao et al. 2022, sec. 4) divides a Linear's input by a per-channel vector s and
multiplies the weight's columns by s, so that ``quantize.static`` sees smaller activation
outliers. Where s cannot be folded into the op before the Linear (that op's output also
feeds a residual, or it is not a norm or Linear), the division stays in the layer:
:class:`SmoothedLinear`, which ``quantize.static`` turns into a
:class:`~netshrink.quantize.layers.QuantLinear` holding the same s.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.layers import CompressedLayer


class SmoothedLinear(CompressedLayer):
    """A float Linear computing ``(x / s) (W s)^T + b``: the same function as ``x W^T + b``.

    ``quantize.smoothquant`` puts it where the smoothing vector s cannot be folded into the
    op before (its output also feeds a residual, or it is not a norm or Linear);
    ``quantize.static`` turns it into a ``QuantLinear`` that quantizes x / s and W s.
    ``scaled_weight`` is W s; ``smooth`` is s.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scaled_weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("smooth", torch.ones(in_features))

    def spec(self) -> dict[str, Any]:
        """JSON constructor arguments."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    @classmethod
    @torch.no_grad()
    def from_float(cls, linear: nn.Linear, s: torch.Tensor) -> SmoothedLinear:
        """``linear`` with its input columns multiplied by ``s`` (positive, one per column)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None)
        new.to(device=linear.weight.device, dtype=linear.weight.dtype)
        new.smooth.copy_(s)
        new.scaled_weight.copy_(linear.weight * s)
        if linear.bias is not None:
            new.bias.copy_(linear.bias)
        return new

    @property
    def weight(self) -> torch.Tensor:
        """W: the weight of the function computed (W s / s)."""
        return self.scaled_weight / self.smooth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``linear(x / s, W s, b)``."""
        return F.linear(x / self.smooth, self.scaled_weight, self.bias)
