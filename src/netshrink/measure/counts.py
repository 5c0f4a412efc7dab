"""Static counts of a model: parameters, non-zero parameters, multiply-accumulates (MACs).

Parameters are the elements of each module's own ``nn.Parameter`` tensors; a compressed layer
(:class:`~netshrink.layers.CompressedLayer`) counts as the function it computes — its
``num_params()`` and ``num_nonzero()`` — whatever it stores (int8 or packed int4 codes, half
floats, a mask), so the count does not change with the storage format. What a layer stores is
its ``stored_params()`` / ``stored_bits()``; bytes on disk are measured on the artifact.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, sdpa_flop_count

from netshrink.batches import run
from netshrink.layers import CompressedLayer


def _sum(
    model: nn.Module,
    layer_count: Callable[[CompressedLayer], int],
    count: Callable[[torch.Tensor], Any],
) -> int:
    """``layer_count`` of each compressed layer plus ``count`` of every other parameter.

    A compressed layer answers for its submodules too (a low-rank layer's two factors); a
    parameter shared by two modules (tied weights) counts once.
    """
    total, seen, inside = 0, set(), None
    for name, module in model.named_modules():
        if inside is not None and (name + ".").startswith(inside):
            continue
        if isinstance(module, CompressedLayer):
            # a parameter it shares with a module counted before (tied weights) counts once
            shared = [p for p in module.parameters() if id(p) in seen]
            total += layer_count(module) - sum(int(count(p)) for p in shared)
            seen.update(id(p) for p in module.parameters())
            inside = f"{name}." if name else ""
            continue
        for p in module.parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                total += int(count(p))
    return total


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (weights), see the module docstring for what counts."""
    return _sum(model, lambda m: m.num_params(), torch.Tensor.numel)


def count_nonzero(model: nn.Module) -> int:
    """Number of parameter elements that are not zero (same tensors as :func:`count_params`)."""
    return _sum(model, lambda m: m.num_nonzero(), torch.count_nonzero)


def count_stored_bits(model: nn.Module) -> int:
    """Bits the weights take as stored: each compressed layer's ``stored_bits()`` (codes,
    scales, masks) plus every other parameter at its dtype's width. Buffers (BatchNorm
    statistics) are not counted; bytes on disk are measured on the artifact."""
    return _sum(model, lambda m: m.stored_bits(), lambda p: p.numel() * p.element_size() * 8)


# Formulas for kernels torch.utils.flop_counter does not know: integer and packed matmuls run
# by quantized layers, and the CPU attention kernel. Each gets shapes, returns FLOPs (2 per MAC).
def _linear_like(x_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """x[..., k] -> out[..., n]: one MAC per input element per output feature."""
    return 2 * _numel(x_shape) * int(out_shape[-1])


def _mm(a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """a[m, k] @ b[k, n]."""
    return 2 * int(a_shape[0]) * int(a_shape[1]) * int(b_shape[1])


def _addmm(c_shape: Any, a_shape: Any, b_shape: Any, *args: Any, **kwargs: Any) -> int:
    """c + a[m, k] @ b[k, n] (the in-place ``addmm_`` torch's counter does not list)."""
    return _mm(a_shape, b_shape)


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _sdpa_cpu(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(q, k, v)


def _extra_formulas() -> dict[Any, Any]:
    aten, quantized = torch.ops.aten, torch.ops.quantized
    extra: dict[Any, Any] = {
        aten._int_mm: _mm,
        aten.addmm_: _addmm,
        aten._weight_int8pack_mm: _linear_like,
        aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu,
    }
    for name in ("_weight_int4pack_mm", "_weight_int4pack_mm_for_cpu"):
        if hasattr(aten, name):
            extra[getattr(aten, name)] = _linear_like
    for name in ("linear", "linear_relu", "linear_dynamic", "linear_relu_dynamic"):
        extra[getattr(quantized, name)] = _linear_like
    onednn = getattr(torch.ops, "onednn", None)
    if onednn is not None and hasattr(onednn, "qlinear_pointwise"):  # quantize.dynamic on x86
        extra[onednn.qlinear_pointwise] = _linear_like
    return extra


_COMPUTE = re.compile(r"mm|matmul|linear|conv|attention|einsum")


class _SeenOps(TorchDispatchMode):
    """Records every op packet that runs, to name compute ops no formula counted."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[Any] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.seen.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


def count_macs(model: nn.Module, example_inputs: Any) -> int:
    """Multiply-accumulates of one forward pass on ``example_inputs`` (the whole batch; a tuple
    of positional inputs or a dict of keyword ones).

    Counted by ``torch.utils.flop_counter.FlopCounterMode`` on the aten ops that actually run
    (MACs = FLOPs / 2), with formulas added for integer/packed matmuls and CPU attention.
    Sparse tensors are counted by their dense shape. A matmul- or convolution-like op without a
    formula is reported in a warning, never silently counted as zero.
    """
    formulas = _extra_formulas()
    seen = _SeenOps()
    counter = FlopCounterMode(display=False, custom_mapping=formulas)
    with torch.no_grad(), counter, seen:
        run(model, example_inputs)  # positional tuple or keyword dict
    missed = sorted(
        str(op)
        for op in seen.seen
        if op not in flop_registry and op not in formulas and _COMPUTE.search(str(op))
    )
    if missed:
        warnings.warn(
            f"count_macs: no FLOP formula for {', '.join(missed)}; their MACs are not counted",
            stacklevel=2,
        )
    return counter.get_total_flops() // 2
