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
the one round-to-nearest uses. The grid is :mod:`netshrink.quantize.grid`'s: narrow signed
(-7..7 at 4 bits), ``full_range`` (-8..7) or asymmetric (0..15 with a zero point per group; the
default for Linear layers below 8 bits, see :meth:`GPTQConfig.grid_for`).
``clip`` chooses each group's range by the diag(H)-weighted search of
:func:`~netshrink.quantize.grid.search_range`. ``awq`` first scales each Linear's inputs by AWQ's
rms(x)^alpha (Lin et al. 2023, sec. 3.2), alpha searched on the round-to-nearest output error,
and quantizes W diag(s) against the scaled inputs' Hessian. The inverse Hessian is the one
:func:`netshrink.calibrate.damped_inverse_cholesky` SparseGPT uses too, here in float32 as in the
reference code. Each layer's relative output error on the calibration data is logged
(``relative_output_error``).

The result is the packed layer ``quantize.weight_only`` makes (int8 codes, or int4 codes two
per byte holding 2-, 3- and 4-bit values): artifacts, ONNX export and kernels are shared.
Asymmetric 4-bit grids keep a zero point per group (``PackedLinear``'s, MatMulNBits' layout);
at 2 and 3 bits the code minus the zero point is stored, which fits the signed int4 codes. With
``sequential`` each block (a transformer layer) is calibrated on the outputs of the
already-quantized blocks before it, through :func:`netshrink.calibrate.run_blocks`;
``true_sequential`` and ``asymmetric`` (GPTAQ, Li et al. 2025) run it stage by stage through
:func:`netshrink.calibrate.staged.run_stages`. The defaults (zero-point grid on Linears, ``awq``,
``act_order``, ``clip``, ``damp`` 0.1) are the best setting measured on MiniLM that applies to
any model.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Mapping, Sequence
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
from netshrink.calibrate.memory import release_freed_memory
from netshrink.calibrate.options import StagedConfig
from netshrink.calibrate.staged import Paired, asymmetric_target, run_stages
from netshrink.context import Batch, Context
from netshrink.errors import ConfigError
from netshrink.layers import (
    ConvGeometry,
    as_linear,
    leave_alone,
    linear_types,
    replace_module,
    untied,
)
from netshrink.quantize.grid import Grid, search_range
from netshrink.quantize.lowbit import _groups
from netshrink.quantize.packed import PackedConv2d, PackedLinear
from netshrink.registry import technique
from netshrink.targets import Targets

log = logging.getLogger(__name__)

BLOCK = 128
"""Columns per lazy batch update (the paper's B, sec. 4)."""


class GPTQConfig(StagedConfig):
    """Options of ``quantize.gptq``."""

    bits: Literal[2, 3, 4, 8] = Field(
        4, description="weight bits: 8 are stored as int8, 2-4 as int4 codes two per byte"
    )
    group_size: int = Field(
        128, ge=0, le=4096, description="inputs sharing a scale; 0: one scale per output channel"
    )
    symmetric: bool | None = Field(
        None,
        description="weight grid: signed around 0; false: unsigned codes with a zero point per "
        "group (2-4 bits); unset: false for Linear/Conv1D below 8 bits, true for Conv2d and 8 "
        "bits (the grid only: asymmetric: true is GPTAQ's calibration targets)",
    )
    full_range: bool = Field(
        False, description="symmetric grid with the extra negative code (-8..7 at 4 bits)"
    )
    awq: bool = Field(
        True, description="scale Linear inputs by searched rms(x)^alpha first (AWQ), then GPTQ"
    )
    act_order: bool = Field(
        True, description="quantize the inputs of largest diag(H) = largest activations first"
    )
    damp: float = Field(0.1, gt=0, le=1, description="added to diag(H), as a fraction of its mean")
    clip: bool = Field(
        True, description="shrink each group's range where that lowers its diag(H)-weighted error"
    )
    targets: Targets = Field(
        default_factory=Targets, description="Linear/Conv1D/Conv2d layers to quantize"
    )

    def grid_for(self, module: nn.Module) -> Grid:
        """The integer grid ``module``'s weights are rounded onto: ``symmetric`` as given; unset,
        the asymmetric grid for Linear/Conv1D below 8 bits (the more accurate one on MiniLM)
        and the symmetric one for Conv2d (``PackedConv2d`` stores no zero point), at 8 bits and
        with ``full_range``."""
        symmetric = self.symmetric
        if symmetric is None:
            symmetric = self.bits == 8 or self.full_range or isinstance(module, nn.Conv2d)
        return Grid(self.bits, symmetric, self.full_range)

    @model_validator(mode="after")
    def _storable(self) -> GPTQConfig:
        if self.symmetric is False and self.bits == 8:
            raise ValueError(
                "asymmetric 8-bit codes minus their zero point do not fit the int8 codes; "
                "use symmetric: true, or bits 2-4"
            )
        if self.full_range and self.symmetric is False:
            raise ValueError("full_range applies to the symmetric grid; drop it or symmetric")
        return self


def gptq_codes(
    weight: torch.Tensor,
    gram: torch.Tensor,
    grid: Grid,
    group_size: int = 0,
    act_order: bool = False,
    damp: float = 0.01,
    clip: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize ``weight`` (out, in) by GPTQ onto ``grid`` given ``gram`` = E[x x^T] (in, in)
    of its inputs.

    Returns ``(codes, scale, zero)``: grid indices (out, in), int32, and the float32 scale and
    int32 zero point per output row (out,) or per row and group (out, in // group_size); the
    weight is ``(codes - zero) * scale`` broadcast over the groups. ``clip`` fits each group's
    range with :func:`~netshrink.quantize.grid.search_range` instead of its min-max.
    """
    w = weight.detach().float().clone()
    rows, cols = w.shape
    gram = gram.to(w.device)
    order = torch.arange(cols, device=w.device)
    importance = gram.diagonal().float()
    # float32, as the reference code: half the memory of float64 (three 9 MiB matrices at 1536
    # inputs rather than 18 MiB ones), and damping keeps the factorization well conditioned
    if act_order:
        order = torch.argsort(gram.diagonal(), descending=True, stable=True)
        w = w[:, order]
        # the reordered copy (no name holds it) is the factorization's working matrix, freed
        # as soon as it is factored
        u = damped_inverse_cholesky(
            gram[order.unsqueeze(1), order].float(), damp, torch.float32, overwrite=True
        )
    else:
        u = damped_inverse_cholesky(gram, damp, torch.float32)
    groups = cols // group_size if group_size else 1
    scale = torch.ones(rows, groups, device=w.device)
    zero = torch.zeros(rows, groups, dtype=torch.int32, device=w.device)

    def fit(g: int, values: torch.Tensor) -> None:
        if clip:
            cols_g = slice(g * group_size, (g + 1) * group_size) if group_size else slice(None)
            scale[:, g], zero[:, g] = search_range(values, importance[cols_g], grid)
        else:
            scale[:, g], zero[:, g] = grid.params(values.amin(1), values.amax(1))

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
            q = grid.codes(w1[:, k], s, z)
            codes[:, col] = q
            err = (w1[:, k] - (q - z) * s) / u1[k, k]
            w1[:, k:] -= err.unsqueeze(1) * u1[k, k:].unsqueeze(0)
            errors[:, k] = err
        w[:, end:] -= errors @ u[start:end, end:]
    if not group_size:
        return codes, scale[:, 0], zero[:, 0]
    return codes, scale, zero


def _packed(
    module: nn.Module,
    codes: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    grid: Grid,
    group_size: int,
    input_scale: torch.Tensor | None,
) -> PackedLinear | PackedConv2d:
    """The packed layer holding grid indices ``codes`` with ``scale`` and ``zero`` in place of
    ``module``: signed codes, or unsigned 4-bit ones with a zero point per group (asymmetric int4;
    2 and 3 bits store code minus zero point, which fits the signed int4 codes)."""
    codec: Literal["int8", "int4"] = "int8" if grid.bits == 8 else "int4"
    bias = None if module.bias is None else module.bias.detach()
    with_zero = not grid.symmetric and grid.bits == 4
    if isinstance(module, nn.Conv2d):
        geometry = ConvGeometry.of(module).spec()
        layer = PackedConv2d(geometry, codec, 0, bias is not None)
        layer.set_codes(codes - zero.reshape(-1, 1), scale, bias)
        return layer
    if not with_zero:
        per_group = zero.reshape(zero.shape[0], -1, 1)
        codes = (codes.reshape(*per_group.shape[:2], -1) - per_group).reshape(codes.shape)
    return PackedLinear.from_codes(
        codes, scale, codec, group_size, bias, zero if with_zero else None, input_scale
    )


def _awq_scale(
    weight: torch.Tensor, second_moment: torch.Tensor, grid: Grid, group_size: int
) -> torch.Tensor:
    """AWQ's per-input scale s = rms(x)^alpha / sqrt(max * min) (Lin et al. 2023, sec. 3.2)
    for the alpha of 0, 0.05, .., 0.95 whose round-to-nearest ``Q(W s) / s`` has the least
    output error tr(D E[x x^T] D^T); rms from the diagonal of ``second_moment`` (the mean |x|
    the authors use is not in the Gram matrix). alpha 0 (s = 1) is always tried."""
    w = weight.detach().float()
    rms = second_moment.diagonal().float().clamp_min(1e-8).sqrt()
    best: tuple[float, torch.Tensor] = (math.inf, torch.ones_like(rms))
    for alpha in (i / 20 for i in range(20)):
        s = rms.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        scaled = (w * s).reshape(w.shape[0], -1, group_size or w.shape[1])
        lo, hi = scaled.amin(2, keepdim=True), scaled.amax(2, keepdim=True)
        sc, z = grid.params(lo, hi)
        rounded = ((grid.codes(scaled, sc, z) - z) * sc).reshape(w.shape) / s
        err = relative_output_error(w, rounded, second_moment)
        if err < best[0]:
            best = (err, s)
    return best[1]


def _matrix(module: nn.Module, name: str, config: GPTQConfig) -> tuple[torch.Tensor, int]:
    """``module``'s weight as the (out, in) matrix GPTQ solves and its group size: a Conv2d's
    (Cout, Cin*kh*kw) patch matrix with one scale per output channel, as
    ``quantize.weight_only`` stores convolutions; a Linear's or Conv1D's weight."""
    if isinstance(module, nn.Conv2d):
        return module.weight.detach().flatten(1), 0
    weight = as_linear(module).weight.detach()
    return weight, _groups(name, weight.shape[1], config.group_size)


def _quantize_layer(model: nn.Module, name: str, stats: Gram | Paired, config: GPTQConfig) -> None:
    """Replace layer ``name`` by its packed GPTQ version, from its inputs' statistics.

    A Conv2d is solved as the (Cout, Cin*kh*kw) matrix its patches multiply
    (:func:`netshrink.calibrate.input_vectors`). With ``asymmetric`` (``stats`` then pair the
    quantized model's inputs with the full-precision model's) the weight rounded is GPTAQ's
    target :func:`~netshrink.calibrate.staged.asymmetric_target`, which maps the quantized
    model's inputs to the full-precision outputs (Li et al. 2025, sec. 3). With ``awq`` a
    Linear's weight columns are multiplied by :func:`_awq_scale`'s s and its Hessian rows and
    columns divided by it (the input x / s); the packed layer multiplies its input by 1 / s.
    """
    module = model.get_submodule(name)
    weight, group_size = _matrix(module, name, config)
    target = weight
    if config.asymmetric and isinstance(stats, Paired):
        target = asymmetric_target(weight, stats, config.damp)
    mean = stats.take_mean()
    assert mean is not None
    hessian = mean.float()  # GPTQ works in float32 (see gptq_codes)
    del mean
    grid = config.grid_for(module)
    s: torch.Tensor | None = None
    if config.awq and not isinstance(module, nn.Conv2d):
        s = _awq_scale(target, hessian, grid, group_size)
        # the Hessian of the inputs x / s, in place: no second (in, in) matrix kept
        target = target * s
        hessian.div_(s.outer(s))
    codes, scale, zero = gptq_codes(
        target, hessian, grid, group_size, config.act_order, config.damp, config.clip
    )
    explicit = None if s is None or bool((s == 1).all()) else 1 / s
    packed = _packed(module, codes, scale, zero, grid, group_size, explicit)
    if s is None:
        error = relative_output_error(weight, packed.weight.flatten(1), hessian)
    else:
        # the error on the scaled inputs x / s is the error on x: tr(D s H s D^T / s s)
        error = relative_output_error(weight * s, packed.weight.flatten(1) * s, hessian)
    # Under asymmetric, hessian is the quantized stream's: the error is the packed weight
    # against the layer's own on the inputs it now sees, not against GPTAQ's target.
    inputs = "the quantized model's inputs" if isinstance(stats, Paired) else "calib_data"
    log.info("quantize.gptq: %s relative output error %.2e on %s", name, error, inputs)
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


def _quantize_seen(
    model: nn.Module, stats: Mapping[str, Gram | Paired], config: GPTQConfig
) -> None:
    """Quantize every layer whose inputs were seen; a warning names those never called."""
    idle = [name for name, g in stats.items() if not g.count]
    if idle:
        warnings.warn(
            f"quantize.gptq: {', '.join(idle)} never ran on calib_data; left float", stacklevel=3
        )
    for name, g in stats.items():
        if g.count:
            _quantize_layer(model, name, g, config)
            release_freed_memory()  # the layer's Hessian and its factors


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
    # names only: a reference to a layer kept here would keep its float weight alive after
    # its packed replacement (the working copy would never shrink as the blocks are quantized)
    selected = list(config.targets.select(model, (*linear_types(), nn.Conv2d)))
    names = _solvable(model, untied(model, selected, "quantize.gptq"))
    convs = [n for n in names if isinstance(model.get_submodule(n), nn.Conv2d)]
    if convs and config.symmetric is False and config.bits == 4:
        raise ConfigError(
            f"asymmetric int4 keeps a zero point per group in Linear layers only, and "
            f"{', '.join(convs)} are Conv2d; use symmetric: true, bits 2 or 3, or targets "
            "without them",
            key="symmetric",
        )
    inside = [n for n in names if any(n.startswith(f"{b}.") for b in blocks)]
    outside = [n for n in names if n not in inside]
    # Layers outside every block (a pooler, a classifier, a model without repeated blocks) are
    # quantized on the float model's inputs, before the blocks see their outputs.
    if outside:
        _quantize_together(model, outside, batches, config, ctx.progress)
    if inside:
        owned = {b: [n for n in inside if n.startswith(f"{b}.")] for b in blocks}
        if config.true_sequential or config.asymmetric:
            report = run_stages(
                model, batches, owned, lambda stats: _quantize_seen(model, stats, config),
                reference=config.asymmetric, split=config.true_sequential, blocks=blocks,
                show=ctx.progress,
            )  # fmt: skip
        else:
            per_layer = PerLayer(owned, Gram, lambda grams: _quantize_seen(model, grams, config))
            report = run_blocks(model, batches, per_layer, blocks, ctx.progress)
        log.info("quantize.gptq: %s", report)
    return model
