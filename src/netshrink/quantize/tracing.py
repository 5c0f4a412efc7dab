"""What static quantization needs to know about a model's data flow, found by torch.fx.

Only the module hierarchy survives saving (artifacts replay module specs on a fresh model), so
quantization points are attached to modules: a quantized conv/linear quantizes its input, and
its output too when that output feeds an addition (a residual join), and a ReLU module
quantizes its output. The trace answers which BatchNorm follows which conv/linear (to fold it)
and which outputs reach an addition. Models that torch.fx cannot trace are quantized without
BN folding or output quantization, with a warning.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn

_ADDS = {operator.add, operator.iadd, torch.add}
# Linear -> BatchNorm1d is not folded: on (N, C, L) inputs BN normalizes a different axis than
# the one Linear produces, which the trace cannot tell apart without shapes.
_FOLDABLE = {nn.Conv2d: nn.BatchNorm2d}


@dataclass
class Flow:
    """Facts about the data flow of a model, by qualified module name."""

    bn_after: dict[str, str] = field(default_factory=dict)  # conv/linear -> the BN it feeds
    feeds_add: set[str] = field(default_factory=set)  # modules whose (post-BN) output is added
    traced: bool = True


def trace_flow(model: nn.Module) -> Flow:
    """Trace ``model`` symbolically and report foldable BNs and outputs that feed additions."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many types for untraceable Python
        warnings.warn(
            f"torch.fx cannot trace {type(model).__name__} ({exc}); quantizing without "
            "BatchNorm folding or residual-join quantization",
            stacklevel=3,
        )
        return Flow(traced=False)
    modules = dict(model.named_modules())
    flow = Flow()
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        mod = modules[node.target]
        users = list(node.users)
        bn_type = _FOLDABLE.get(type(mod))
        if (
            bn_type is not None
            and len(users) == 1
            and users[0].op == "call_module"
            and type(modules[users[0].target]) is bn_type
            and len(users[0].args) == 1
        ):
            flow.bn_after[node.target] = users[0].target
            users = list(users[0].users)
        if any(u.op == "call_function" and u.target in _ADDS for u in users):
            flow.feeds_add.add(node.target)
    # a BN used more than once (shared module) cannot be folded into one conv
    counts: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            counts[node.target] = counts.get(node.target, 0) + 1
    flow.bn_after = {c: b for c, b in flow.bn_after.items() if counts[b] == 1 and counts[c] == 1}
    return flow


@torch.no_grad()
def fold_bn(layer: nn.Conv2d, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold inference-mode ``bn`` into ``layer``'s weight and bias, in place.

    y = gamma * (W x + b - mean) / sqrt(var + eps) + beta, so W' = W * k and
    b' = (b - mean) * k + beta with k = gamma / sqrt(var + eps) per output channel
    (Jacob et al. 2018, Sec. 3.2).
    """
    assert bn.running_mean is not None and bn.running_var is not None
    k = torch.rsqrt(bn.running_var + bn.eps)
    if bn.affine:
        k = k * bn.weight
    beta = bn.bias if bn.affine else torch.zeros_like(k)
    bias = layer.bias if layer.bias is not None else torch.zeros_like(k)
    layer.weight.mul_(k.reshape(-1, *([1] * (layer.weight.dim() - 1))))
    new_bias = (bias - bn.running_mean) * k + beta
    if layer.bias is None:
        layer.bias = nn.Parameter(new_bias)
    else:
        layer.bias.copy_(new_bias)
