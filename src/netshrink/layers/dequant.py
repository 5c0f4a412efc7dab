"""A Linear whose int8 weight is dequantized inside the graph, for runtimes that recognise the
pattern (OpenVINO's weight compression)."""

from __future__ import annotations

from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed ops
import torch.nn.functional as F
from torch import nn

_QD = torch.ops.quantized_decomposed


class DequantLinear(nn.Module):
    """Linear whose int8 weight is dequantized inside the graph: OpenVINO's weight-compression
    pattern (int8 constant -> Convert -> Multiply by per-channel scale -> MatMul).

    OpenVINO's CPU plugin keeps such weights int8 and runs the layer as an int8
    FullyConnected, quantizing its input on the fly per token in groups of
    ``DYNAMIC_QUANTIZATION_GROUP_SIZE`` (32 by default) input features: dynamic int8 on
    OpenVINO's own kernel. A ``MatMulInteger`` graph instead runs the per-token quantization as
    float elementwise ops and the GEMM in float (measured: no faster than fp32 on MiniLM).
    """

    def __init__(self, weight_q: torch.Tensor, weight_scale: torch.Tensor, bias: Any) -> None:
        super().__init__()
        self.register_buffer("weight_q", weight_q)
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1))
        self.register_buffer("zero_point", torch.zeros(len(weight_q), dtype=torch.int64))
        self.register_buffer("bias", None if bias is None else bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _QD.dequantize_per_channel(
            self.weight_q, self.weight_scale, self.zero_point, 0, -128, 127, torch.int8
        )
        return F.linear(x, weight, self.bias)
