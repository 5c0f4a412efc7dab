"""Layers of a ``quantize.static`` model whose inputs are quantized per token at run time
(the ``dynamic`` option).

One calibrated per-tensor range fits some inputs badly. On MiniLM after SmoothQuant the worst
are the GELU outputs read by the FFN output projections: a few tokens carry values tens of
times the rest, so the per-tensor step is coarse for every other token, and widening or
narrowing the range does not help (``docs/benchmarks/runtimes.md``). A per-token range does.
Those layers become :class:`~netshrink.quantize.dynamic_int8.DynamicInt8Linear` (int8 weights,
each token's input row quantized with its own range at run time, as ``quantize.dynamic``), the
rest stay static. OpenVINO runs them as int8 weight-compressed FullyConnected with its own
dynamic quantization of the input (:mod:`netshrink.runtime.openvino`), ONNX Runtime as
``MatMulInteger``. A per-token range needs no migration, so a :class:`SmoothedLinear` among
them is first turned back into the plain Linear it computes; smoothing SmoothQuant folded into
the op before a layer (a LayerNorm's or a Linear's output) stays, and the layer keeps the
weights scaled to match it.
"""

from __future__ import annotations

import torch
from torch import nn

from netshrink.errors import ConfigError
from netshrink.layers import layer_types, replace_module
from netshrink.quantize.dynamic_int8 import DynamicInt8Linear
from netshrink.quantize.smoothed import SmoothedLinear
from netshrink.targets import Targets


def dynamic_layers(model: nn.Module, targets: Targets | None, bits: dict[str, int]) -> list[str]:
    """Names ``targets`` selects among the Linear (or Conv1D) layers of ``model``; each must be
    one ``quantize.static`` quantizes with 8-bit weights (in ``bits``). Raises before any
    change."""
    if targets is None:
        return []
    chosen = targets.select(model, (*layer_types(), SmoothedLinear))
    wrong = [given for n, m in chosen.items() if (given := _given(n, m, bits))]
    if wrong:
        raise ConfigError(
            f"quantize.static: dynamic selects {'; '.join(wrong)}; dynamic must name Linear "
            "(or Conv1D) layers this run quantizes with 8-bit weights (check targets, weights "
            "and overrides)"
        )
    return list(chosen)


def _given(name: str, mod: nn.Module, bits: dict[str, int]) -> str:
    """What layer ``name`` gets from this run when that is not 8-bit weights in a Linear (or
    Conv1D), else an empty string."""
    if name not in bits:
        why = "outside targets, tied to another layer's weight, or an unsupported Conv2d"
        return f"{name} (stays float: {why})"
    if isinstance(mod, nn.Conv2d):
        return f"{name} (a Conv2d, static with {bits[name]}-bit weights: no per-token kernel)"
    return f"{name} ({bits[name]}-bit weights)" if bits[name] != 8 else ""


@torch.no_grad()
def unsmooth(model: nn.Module, names: list[str]) -> None:
    """Replace each :class:`SmoothedLinear` among ``names`` by the plain Linear it computes."""
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, SmoothedLinear):
            linear = nn.Linear(mod.in_features, mod.out_features, mod.bias is not None)
            linear.to(device=mod.scaled_weight.device, dtype=mod.scaled_weight.dtype)
            linear.weight.copy_(mod.weight)
            if mod.bias is not None:
                linear.bias.copy_(mod.bias)
            replace_module(model, name, linear)


@torch.no_grad()
def to_dynamic(model: nn.Module, names: list[str], scales: dict[str, torch.Tensor]) -> None:
    """Swap each Linear among ``names`` for a :class:`DynamicInt8Linear`; a layer in
    ``scales`` (per output channel, from GPTQ rounding) holds weights already on that grid
    and keeps exactly those codes, the others get min-max scales."""
    for name in names:
        linear = model.get_submodule(name)
        layer = DynamicInt8Linear.from_float(linear)
        if name in scales:
            scale = scales[name].to(linear.weight.device)
            codes = torch.round(linear.weight.float() / scale.unsqueeze(1)).clamp(-127, 127)
            layer.weight_q.copy_(codes.to(torch.int8))
            layer.weight_scale.copy_(scale)
            layer.refresh()
        replace_module(model, name, layer)
