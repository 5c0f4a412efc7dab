"""``quantize.gptq``: low-bit weights chosen with second-order error compensation (GPTQ).

Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", Algorithm 1. A Linear layer's output error on calibration inputs X is
||X W^T - X Q^T||^2, whose Hessian with respect to a weight row is H = 2 X^T X (sec. 3). The
columns (inputs) are quantized one at a time; the error each one makes is spread onto the
columns not yet quantized, weighted by the Cholesky factor of H^-1 (sec. 4, step 3), so later
columns absorb what earlier ones lost. Updates to the columns after the current block of 128
are applied once per block (sec. 4, step 2, "lazy batch updates"). H is damped by ``damp``
times its mean diagonal (step 3). ``act_order`` quantizes the columns of largest diag(H)
first (the "act-order" heuristic of the reference code); each group keeps the scale computed
from its original weights, so groups stay runs of consecutive inputs and the stored layout is
the one round-to-nearest uses. ``clip`` chooses each group's range by a search over shrunk
min-max ranges that minimizes the diag(H)-weighted rounding error (the MSE grid search of the
reference code's quantizer and of llm-compressor's "mse" observer, weighted here by how much
each input's error costs at the output); the inverse Hessian is the one
:func:`netshrink.calibrate.damped_inverse_cholesky` SparseGPT uses too. Each layer's relative
output error on the calibration data is logged (``relative_output_error``).

The result is the packed layer ``quantize.weight_only`` makes (int8 codes, or int4 codes two
per byte holding 2-, 3- and 4-bit values): artifacts, ONNX export and kernels are shared.
Asymmetric grids (a zero point per group) are stored as the difference code minus zero point,
which fits the int4 codes for 2 and 3 bits only. With ``sequential`` each block (a transformer
layer) is calibrated on the outputs of the already-quantized blocks before it, through
:func:`netshrink.calibrate.run_blocks`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from netshrink.batches import materialize
from netshrink.calibrate import (
    Gram,
    PerLayer,
    collect,
    damped_inverse_cholesky,
    find_blocks,
    relative_output_error,
    run_blocks,
)
from netshrink.config import TechniqueConfig
from netshrink.context import Batch, Context
from netshrink.layers import (
    ConvGeometry,
    as_linear,
    leave_alone,
    linear_types,
    replace_module,
    untied,
)
from netshrink.quantize.affine import choose_qparams, qrange, quantize
from netshrink.quantize.lowbit import _groups
from netshrink.quantize.packed import PackedConv2d, PackedLinear
from netshrink.registry import technique
from netshrink.targets import Targets

log = logging.getLogger(__name__)

BLOCK = 128
"""Columns per lazy batch update (the paper's B, sec. 4)."""


class GPTQConfig(TechniqueConfig):
    """Options of ``quantize.gptq``."""

    bits: Literal[2, 3, 4, 8] = Field(
        4, description="weight bits: 8 are stored as int8, 2-4 as int4 codes two per byte"
    )
    group_size: int = Field(
        128, ge=0, le=4096, description="inputs sharing a scale; 0: one scale per output channel"
    )
    symmetric: bool = Field(
        True, description="signed grid around 0; false: a zero point per group (2 or 3 bits)"
    )
    act_order: bool = Field(
        False, description="quantize the inputs of largest diag(H) = largest activations first"
    )
    damp: float = Field(0.01, gt=0, le=1, description="added to diag(H), as a fraction of its mean")
    clip: bool = Field(
        False, description="shrink each group's range where that lowers its diag(H)-weighted error"
    )
    sequential: bool = Field(
        False, description="calibrate each block on the outputs of the quantized blocks before it"
    )
    blocks: tuple[str, ...] = Field(
        (), description="block module names (default: the repeated children of a ModuleList)"
    )
    calib_batches: int = Field(32, ge=1, le=100000, description="calibration batches used at most")
    targets: Targets = Field(
        default_factory=Targets, description="Linear/Conv1D/Conv2d layers to quantize"
    )

    @model_validator(mode="after")
    def _storable(self) -> GPTQConfig:
        if not self.symmetric and self.bits > 3:
            raise ValueError(
                f"asymmetric {self.bits}-bit codes minus their zero point do not fit the packed "
                "int4/int8 codes; use symmetric: true, or bits 2 or 3"
            )
        if self.blocks and not self.sequential:
            raise ValueError("blocks applies with sequential: true; set it or drop blocks")
        return self


SHRINK = torch.linspace(1.0, 0.5, 11)
"""Range shrink factors ``clip`` tries for each row of a group (1: the full min-max range)."""


def clipped_qparams(
    values: torch.Tensor, importance: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero_point)`` for ``values`` (rows, cols) whose min-max range, shrunk
    by the factor of :data:`SHRINK` that minimizes the rounding error sum_j h_j (w_j - q_j)^2
    weighted by ``importance`` h (cols,) = diag(H), the output error each input's weight error
    causes alone. Clipping a few large weights buys a finer grid for all the others.
    """
    qmin, qmax = qrange(bits, symmetric)
    lo, hi = values.amin(1), values.amax(1)
    best = torch.full_like(lo, float("inf"))
    scale, zero = choose_qparams(lo, hi, bits, symmetric)
    for shrink in SHRINK.tolist():
        s, z = choose_qparams(lo * shrink, hi * shrink, bits, symmetric)
        q = quantize(values, s.unsqueeze(1), z.unsqueeze(1), qmin, qmax)
        err = ((values - (q - z.unsqueeze(1)) * s.unsqueeze(1)).square() * importance).sum(1)
        better = err < best
        best, scale, zero = (
            torch.where(better, err, best),
            torch.where(better, s, scale),
            torch.where(better, z, zero),
        )
    return scale, zero


def gptq_codes(
    weight: torch.Tensor,
    gram: torch.Tensor,
    bits: int,
    group_size: int = 0,
    symmetric: bool = True,
    act_order: bool = False,
    damp: float = 0.01,
    clip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` (out, in) by GPTQ given ``gram`` = E[x x^T] (in, in) of its inputs.

    Returns ``(codes, scale)``: signed integer codes (out, in), int32, equal to the grid index
    minus its zero point, and the float32 scale per output row (out,) or per row and group
    (out, in // group_size); the weight is ``codes * scale`` broadcast over the groups.
    ``clip`` fits each group's range with :func:`clipped_qparams` instead of its min-max.
    """
    w = weight.detach().float().clone()
    rows, cols = w.shape
    qmin, qmax = qrange(bits, symmetric)
    gram = gram.to(w.device)
    order = torch.arange(cols, device=w.device)
    importance = gram.diagonal().float()
    if act_order:
        order = torch.argsort(gram.diagonal(), descending=True, stable=True)
        w, gram = w[:, order], gram[order][:, order]
    u = damped_inverse_cholesky(gram, damp).float()
    groups = cols // group_size if group_size else 1
    scale = torch.ones(rows, groups, device=w.device)
    zero = torch.zeros(rows, groups, dtype=torch.int32, device=w.device)

    def fit(g: int, values: torch.Tensor) -> None:
        if clip:
            cols_g = slice(g * group_size, (g + 1) * group_size) if group_size else slice(None)
            scale[:, g], zero[:, g] = clipped_qparams(values, importance[cols_g], bits, symmetric)
        else:
            scale[:, g], zero[:, g] = choose_qparams(
                values.amin(1), values.amax(1), bits, symmetric
            )

    original = weight.detach().float()
    if act_order or not group_size:  # static ranges from the weights before any update
        for g in range(groups):
            fit(g, original[:, g * group_size : (g + 1) * group_size] if group_size else original)
    # a group never straddles two blocks, so its range is read from up-to-date columns
    block = group_size * max(1, BLOCK // group_size) if group_size else BLOCK
    codes = torch.zeros(rows, cols, dtype=torch.int32, device=w.device)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        w1, u1 = w[:, start:end], u[start:end, start:end]
        errors = torch.zeros_like(w1)
        for k in range(end - start):
            col = int(order[start + k])
            g = col // group_size if group_size else 0
            if group_size and not act_order and col % group_size == 0:
                fit(g, w1[:, k : k + group_size])
            s, z = scale[:, g], zero[:, g]
            q = quantize(w1[:, k], s, z, qmin, qmax) - z
            codes[:, col] = q
            err = (w1[:, k] - q * s) / u1[k, k]
            w1[:, k:] -= err.unsqueeze(1) * u1[k, k:].unsqueeze(0)
            errors[:, k] = err
        w[:, end:] -= errors @ u[start:end, end:]
    return codes, scale if group_size else scale[:, 0]


def _packed(
    module: nn.Module, codes: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int
) -> PackedLinear | PackedConv2d:
    """The packed layer holding ``codes`` and ``scale`` in place of ``module``."""
    codec: Literal["int8", "int4"] = "int8" if bits == 8 else "int4"
    bias = None if module.bias is None else module.bias.detach()
    if isinstance(module, nn.Conv2d):
        geometry = ConvGeometry.of(module).spec()
        layer: PackedLinear | PackedConv2d = PackedConv2d(geometry, codec, 0, bias is not None)
    else:
        layer = PackedLinear(codes.shape[1], codes.shape[0], codec, group_size, bias is not None)
    layer.set_codes(codes, scale, bias)
    return layer


def _quantize_layer(model: nn.Module, name: str, gram: Gram, config: GPTQConfig) -> None:
    """Replace layer ``name`` by its packed GPTQ version, from its inputs' ``gram``.

    A Conv2d is solved as the (Cout, Cin*kh*kw) matrix its patches multiply
    (:func:`netshrink.calibrate.input_vectors`), one scale per output channel as
    ``quantize.weight_only`` stores convolutions.
    """
    module = model.get_submodule(name)
    second_moment = gram.mean()
    assert second_moment is not None
    if isinstance(module, nn.Conv2d):
        weight, group_size = module.weight.detach().flatten(1), 0
    else:
        weight = as_linear(module).weight.detach()
        group_size = _groups(name, weight.shape[1], config.group_size)
    codes, scale = gptq_codes(
        weight, second_moment, config.bits, group_size, config.symmetric,
        config.act_order, config.damp, config.clip,
    )  # fmt: skip
    packed = _packed(module, codes, scale, config.bits, group_size)
    error = relative_output_error(weight, packed.weight.flatten(1), second_moment)
    log.info("quantize.gptq: %s relative output error %.2e on calib_data", name, error)
    replace_module(model, name, packed)


def _solvable(model: nn.Module, names: list[str]) -> list[str]:
    """``names`` without the convolutions GPTQ cannot solve as one matrix, with a warning:
    grouped ones (each group has its own inputs) and those padding other than with zeros."""
    odd = set()
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, nn.Conv2d) and (
            module.groups > 1 or not ConvGeometry.of(module).zero_padded
        ):
            odd.add(name)
    why = "grouped or non-zero-padded convolutions are not solved by GPTQ; use weight_only"
    return leave_alone(names, odd, "quantize.gptq", why)


def _quantize_seen(model: nn.Module, grams: dict[str, Gram], config: GPTQConfig) -> None:
    """Quantize every layer whose inputs were seen; a warning names those never called."""
    idle = [name for name, g in grams.items() if g.mean() is None]
    if idle:
        warnings.warn(
            f"quantize.gptq: {', '.join(idle)} never ran on calib_data; left float", stacklevel=3
        )
    for name, gram in grams.items():
        if gram.mean() is not None:
            _quantize_layer(model, name, gram, config)


def _quantize_together(
    model: nn.Module, names: Sequence[str], batches: list[Batch], config: GPTQConfig, show: bool
) -> None:
    """One calibration pass over ``model`` for ``names``, then each layer quantized on it."""
    grams = {name: Gram() for name in names}
    collect(model, {n: [g] for n, g in grams.items()}, batches, "gptq: input Hessians", show=show)
    _quantize_seen(model, grams, config)


@technique("quantize.gptq", GPTQConfig, needs=("calib_data",), creates=(PackedLinear, PackedConv2d))
def gptq(model: nn.Module, config: GPTQConfig, ctx: Context) -> nn.Module:
    """2/3/4/8-bit weights with Hessian-based error compensation (GPTQ, Frantar et al. 2022)."""
    batches = materialize(ctx.calib_data or [], "calib_data")[: config.calib_batches]
    blocks = find_blocks(model, config.blocks) if config.sequential else []
    selected = config.targets.select(model, (*linear_types(), nn.Conv2d))
    names = _solvable(model, untied(model, list(selected), "quantize.gptq"))
    inside = [n for n in names if any(n.startswith(f"{b}.") for b in blocks)]
    outside = [n for n in names if n not in inside]
    # Layers outside every block (a pooler, a classifier, a model without repeated blocks) are
    # quantized on the float model's inputs, before the blocks see their outputs.
    if outside:
        _quantize_together(model, outside, batches, config, ctx.progress)
    if inside:
        owned = {b: [n for n in inside if n.startswith(f"{b}.")] for b in blocks}
        per_layer = PerLayer(owned, Gram, lambda grams: _quantize_seen(model, grams, config))
        report = run_blocks(model, batches, per_layer, blocks, ctx.progress)
        log.info("quantize.gptq: %s", report)
    return model
