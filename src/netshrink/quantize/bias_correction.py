"""Bias correction for ``quantize.static``: remove the mean output shift quantization causes.

Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias Correction",
sec. 4.2 (the empirical variant; NNCF's fast bias correction does the same): rounding weights and
clipping activations moves the mean of a layer's output, E[y_q] - E[y] per output channel, and
the shift carries through every later layer as a bias. It is measured on the calibration data,
with each quantized layer seeing the inputs the quantized model really feeds it, against the
float layer on those same inputs, and subtracted from the layer's int32 bias. The graph and the
kernels stay the same: only bias codes change.
"""

from __future__ import annotations

import torch
from torch import nn

from netshrink.calibrate import Reducer, collect
from netshrink.context import Batch
from netshrink.quantize.layers import QuantConv2d, QuantLinear

_INT32 = (-(2**31), 2**31 - 1)


class OutputShift(Reducer):
    """Sum over calibration rows of (float output - quantized output) per output channel.

    ``reference`` is the float layer the quantized one replaced; both run on the input the
    quantized model gives. Padding tokens are left out (``tokens_only``).
    """

    tokens_only = True

    def __init__(self, reference: nn.Module) -> None:
        super().__init__("input")
        self.reference = reference
        self.sum: torch.Tensor | None = None
        self.count = 0

    def update(self, module: nn.Module, x: torch.Tensor) -> None:
        # ``forward``, not ``module(x)``: calling the module would run this hook again
        diff = (self.reference(x) - module.forward(x)).double()
        if isinstance(module, QuantConv2d):  # (N, C, H, W): channels on axis 1
            diff = diff.transpose(0, 1).reshape(diff.shape[1], -1).T
        rows = diff.reshape(-1, diff.shape[-1])
        part = rows.sum(0)
        self.sum = part if self.sum is None else self.sum + part
        self.count += rows.shape[0]

    def mean(self) -> torch.Tensor:
        """E[y - y_q] per output channel (zeros when nothing was seen)."""
        if self.sum is None or self.count == 0:
            raise ValueError("OutputShift saw no input")
        return (self.sum / self.count).float()


@torch.no_grad()
def shift_bias(layer: QuantLinear | QuantConv2d, delta: torch.Tensor) -> None:
    """Add ``delta`` (float, one per output channel) to ``layer``'s int32 bias codes."""
    unit = layer.weight_scale * layer.input_scale  # the value of one bias code
    bias = layer.bias
    assert bias is not None
    codes = torch.round((bias + delta) / unit).clamp(*_INT32)
    layer.bias_q.copy_(codes.to(torch.int32))


def correct_biases(
    model: nn.Module, references: dict[str, nn.Module], batches: list[Batch], show: bool
) -> dict[str, float]:
    """Shift the bias of every quantized layer named in ``references`` (name -> the float layer
    it replaced) by its mean output error on ``batches``; the model is changed in place.

    Returns each corrected layer's shift size, |E[y - y_q]| averaged over output channels.
    Layers without a bias are left out of ``references`` by the caller.
    """
    shifts = {name: OutputShift(ref.eval()) for name, ref in references.items()}
    points = {name: [r] for name, r in shifts.items()}
    collect(model, points, batches, "quantize: bias correction", show=show)  # type: ignore[arg-type]
    sizes = {}
    for name, shift in shifts.items():
        delta = shift.mean()
        shift_bias(model.get_submodule(name), delta)  # type: ignore[arg-type]
        sizes[name] = float(delta.abs().mean())
    return sizes
