"""``quantize.awq``: low-bit weights whose salient input channels are scaled up first (AWQ).

Lin et al. 2023, "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration" (arXiv 2306.00978; sections as in the MLSys 2024 version). Weight channels that
meet large activations matter most (sec. 3.1). Rather than keeping them in float, each input
channel j is scaled: the weight's column j is multiplied by s_j and the input divided by it,
Q(W diag(s)) (diag(s)^-1 x); a scaled-up column keeps more of its precision relative to its
group's shared scale (sec. 3.2). The scales are s = mean|x|^alpha per input channel, alpha
chosen on a grid of ``grid`` values in [0, 1) to minimise the layer's output error on
calibration inputs, ||Q(W s)(x / s) - W x||^2 (sec. 3.2, "Searching to scale", eqs. 4-5; the
grid of 20 and the normalisation s / sqrt(max s * min s) follow the authors' code). alpha = 0
gives s = 1, plain round-to-nearest, so the search never does worse than it on the calibration
rows. ``clip`` then shrinks each group's range by the ratio in 1, 0.975, .., 0.525 that gives
the least error on that group's share of the output (the weight clipping search of the
authors' code).

Where x comes from: when every reader of a LayerNorm's or RMSNorm's output is a quantized Linear
(Q, K and V after a pre-LN block's norm), the division by s is folded into the norm's weight
and bias and the readers share one s searched on their summed errors; which op reads what is
found as :mod:`netshrink.quantize.smoothquant` finds it. Anywhere else (a post-LN BERT block's
norm also feeds a residual; a Linear after GELU) the layer keeps 1/s as an explicit input scale
that multiplies its input (one elementwise pass). The layers are the packed ones that
``quantize.weight_only`` and ``quantize.gptq`` make
(:class:`~netshrink.quantize.packed.PackedLinear`), with a zero point per group at 3 and 4
bits unless ``symmetric`` is set (the authors' default grid: unsigned codes and a zero point).
With ``sequential`` each block (a transformer layer) is calibrated on the outputs of the
already-quantized blocks before it (:func:`netshrink.calibrate.run_blocks`).
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
from netshrink.calibrate import PerLayer, Reducer, collect, find_blocks, input_vectors, run_blocks
from netshrink.calibrate.options import BlockwiseConfig
from netshrink.context import Batch, Context
from netshrink.errors import TargetError
from netshrink.layers import as_linear, linear_types, replace_module, untied
from netshrink.quantize.affine import Granularity, fake_quantize_weight, quantize_weight
from netshrink.quantize.lowbit import _groups
from netshrink.quantize.packed import PackedLinear
from netshrink.quantize.smooth_observe import NORMS, observe, plan
from netshrink.quantize.smoothquant import fold
from netshrink.registry import technique

log = logging.getLogger(__name__)

CLIP_RATIOS = tuple(1 - i / 40 for i in range(20))
"""Range shrink factors the clipping search tries: 1, 0.975, .., 0.525."""


class AWQConfig(BlockwiseConfig):
    """Options of ``quantize.awq``."""

    bits: Literal[3, 4, 8] = Field(
        4, description="weight bits: 8 are stored as int8, 3 and 4 as int4 codes two per byte"
    )
    group_size: int = Field(
        128, ge=0, le=4096, description="inputs sharing a scale; 0: one scale per output channel"
    )
    symmetric: bool | None = Field(
        None,
        description="signed grid around 0, or false: a zero point per group (3 or 4 bits); "
        "default: false for 3 and 4 bits (as the authors quantize), true for 8",
    )
    grid: int = Field(
        20, ge=1, le=100, description="alphas searched: 0, 1/grid, .., (grid-1)/grid; 1: RTN"
    )
    clip: bool = Field(True, description="also search a range shrink per output row and group")
    fold: bool = Field(
        True, description="fold 1/s into a LayerNorm/RMSNorm read only by quantized Linears"
    )
    search_rows: int = Field(
        512, ge=16, le=65536, description="input rows per layer the searches measure error on"
    )
    sequential: bool = Field(
        True,
        description="calibrate each block on the outputs of the quantized blocks before it "
        "(left at its default: one pass over the whole model when it has no repeated blocks)",
    )

    @model_validator(mode="after")
    def _storable(self) -> AWQConfig:
        if self.symmetric is False and self.bits == 8:
            raise ValueError(
                "symmetric: false stores a zero point per group for int4 codes only; "
                "use bits 3 or 4, or symmetric: true"
            )
        return self

    @property
    def signed(self) -> bool:
        """Whether the grid is symmetric (``symmetric``, or its default for ``bits``)."""
        return self.bits == 8 if self.symmetric is None else self.symmetric

    def fake_quantize(self, w: torch.Tensor, group_size: int) -> torch.Tensor:
        """``w`` (out, in) quantized and dequantized on this config's grid."""
        return fake_quantize_weight(w, self.bits, self.signed, Granularity(True, group_size))


class ActivationSample(Reducer):
    """Mean |x_j| per input channel j over every input vector a layer sees, and up to ``rows``
    of the vectors (at most ``rows // 8`` evenly spaced ones per call, so several batches
    contribute)."""

    def __init__(self, rows: int) -> None:
        super().__init__("input")
        self.rows = rows
        self.abs_sum: torch.Tensor | None = None
        self.count = 0
        self.kept: list[torch.Tensor] = []

    def update(self, module: nn.Module, x: torch.Tensor) -> None:
        v = input_vectors(module, x.detach()).float()
        part = v.abs().sum(0, dtype=torch.float64)
        self.abs_sum = part if self.abs_sum is None else self.abs_sum + part
        self.count += v.shape[0]
        room = self.rows - sum(len(k) for k in self.kept)
        if room > 0:
            step = max(1, math.ceil(v.shape[0] / max(1, self.rows // 8)))
            self.kept.append(v[::step][:room].clone())

    def nbytes(self) -> int:
        held = [*self.kept, *([self.abs_sum] if self.abs_sum is not None else [])]
        return sum(t.numel() * t.element_size() for t in held)

    def mean_abs(self) -> torch.Tensor:
        """mean |x_j| per input channel (float32); only after some input was seen."""
        assert self.abs_sum is not None
        return (self.abs_sum / self.count).float()

    def sample(self) -> torch.Tensor:
        """The kept input rows, (rows, in)."""
        return torch.cat(self.kept)


def search_scale(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    mean_abs: torch.Tensor,
    config: AWQConfig,
    group_size: int,
) -> tuple[torch.Tensor, float]:
    """The per-input-channel scale s = mean|x|^alpha (normalised) of the grid alpha whose
    quantized outputs ``Q(W s)(x / s)``, summed over ``weights``, are closest to ``x W^T``.

    Returns ``(s, alpha)``; alpha 0 (s = 1, round-to-nearest) is always on the grid.
    """
    ws = [w.detach().float() for w in weights]
    reference = [x @ w.T for w in ws]
    base = mean_abs.clamp_min(1e-4)
    best: tuple[float, torch.Tensor, float] | None = None
    for i in range(config.grid):
        alpha = i / config.grid
        s = base.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        xs = x / s
        err = sum(
            float((xs @ config.fake_quantize(w * s, group_size).T - ref).pow(2).sum())
            for w, ref in zip(ws, reference, strict=True)
        )
        if best is None or err < best[0]:
            best = (err, s, alpha)
    assert best is not None
    return best[1], best[2]


def clip_weight(
    x: torch.Tensor, w: torch.Tensor, config: AWQConfig, group_size: int
) -> torch.Tensor:
    """``w`` (out, in) with each row's group clamped to its range times the ratio of
    :data:`CLIP_RATIOS` that minimises that group's output error ``||x_g (w_g - Q(w_g))^T||^2``
    on the input rows ``x`` (rows, in)."""
    out, cols = w.shape
    width = group_size or cols
    xg = x.reshape(len(x), -1, width)
    wg = w.reshape(out, -1, width)
    lo, hi = wg.amin(2, keepdim=True), wg.amax(2, keepdim=True)
    best_err = torch.full(wg.shape[:2], math.inf)
    best = wg
    for ratio in CLIP_RATIOS:
        clipped = torch.clamp(wg, lo * ratio, hi * ratio)
        q = config.fake_quantize(clipped.reshape(out, cols), group_size).reshape(wg.shape)
        err = torch.einsum("ngk,ogk->ogn", xg, wg - q).pow(2).sum(2)  # (out, groups)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.unsqueeze(2), clipped, best)
    return best.reshape(out, cols)


def _pack(
    model: nn.Module,
    name: str,
    x: torch.Tensor,
    s: torch.Tensor,
    explicit: bool,
    config: AWQConfig,
    group_size: int,
) -> None:
    """Replace layer ``name`` by its packed version of ``W diag(s)`` (clipped on the scaled
    rows ``x / s`` when asked); ``explicit``: the layer multiplies its input by 1 / s itself."""
    linear = as_linear(model.get_submodule(name))
    w = linear.weight.detach().float() * s
    if config.clip:
        w = clip_weight(x / s, w, config, group_size)
    q, scale, zero = quantize_weight(w, config.bits, config.signed, Granularity(True, group_size))
    codes = q.reshape(w.shape)
    codec: Literal["int8", "int4"] = "int8" if config.bits == 8 else "int4"
    bias = None if linear.bias is None else linear.bias.detach()
    layer = PackedLinear.from_codes(
        codes, scale, codec, group_size, bias,
        zero_point=None if config.signed else zero,
        input_scale=1 / s if explicit and not bool((s == 1).all()) else None,
    )  # fmt: skip
    replace_module(model, name, layer)


def _quantize_seen(
    model: nn.Module,
    stats: Mapping[str, ActivationSample],
    shared: Mapping[str, list[str]],
    config: AWQConfig,
) -> None:
    """Search and pack every layer whose inputs were seen; ``shared`` maps a producer to the
    layers reading only its output (one scale, folded into it). A warning names idle layers."""
    idle = [name for name, r in stats.items() if r.abs_sum is None]
    if idle:
        warnings.warn(
            f"quantize.awq: {', '.join(idle)} never ran on calib_data; left float", stacklevel=3
        )
    done: set[str] = set(idle)
    for producer, readers in shared.items():
        if not all(r in stats and r not in done for r in readers):
            continue
        sample = stats[readers[0]]
        x, layers = sample.sample(), [as_linear(model.get_submodule(r)) for r in readers]
        group_size = _groups(readers[0], layers[0].in_features, config.group_size)
        s, alpha = search_scale(
            x, [m.weight for m in layers], sample.mean_abs(), config, group_size
        )
        fold(model.get_submodule(producer), layers, s)  # the readers' weights now hold W s
        for reader in readers:
            _pack(model, reader, x / s, torch.ones_like(s), False, config, group_size)
        log.info("quantize.awq: %s -> %s, alpha %.2f (folded)", producer, ", ".join(readers), alpha)
        done.update(readers)
    for name, sample in stats.items():
        if name in done:
            continue
        x, linear = sample.sample(), as_linear(model.get_submodule(name))
        group_size = _groups(name, linear.in_features, config.group_size)
        s, alpha = search_scale(x, [linear.weight], sample.mean_abs(), config, group_size)
        _pack(model, name, x, s, True, config, group_size)
        log.info("quantize.awq: %s, alpha %.2f", name, alpha)


def _block_of(name: str, blocks: Sequence[str]) -> str:
    """The block holding module ``name``, or "" when none does."""
    return next((b for b in blocks if name.startswith(f"{b}.")), "")


def _foldable(
    model: nn.Module, names: list[str], batches: list[Batch], blocks: list[str], show: bool
) -> dict[str, list[str]]:
    """Producer -> its readers, for each norm whose output only quantized Linears in its own
    block (or all outside any block) read; each other layer keeps an explicit scale."""
    seen = observe(model, batches, set(), 0, show)
    pairs, refused = plan(seen.producers, seen.fed, set(names))
    for why in refused:
        log.info("quantize.awq: explicit input scales for %s", why)
    return {
        producer: readers
        for producer, readers in pairs.items()
        if isinstance(model.get_submodule(producer), NORMS)
        and {_block_of(r, blocks) for r in readers} == {_block_of(producer, blocks)}
    }


def _blocks(model: nn.Module, config: AWQConfig) -> list[str]:
    """The blocks to calibrate one at a time; none when ``sequential`` is off, or left at its
    default on a model without repeated blocks."""
    if not config.sequential:
        return []
    try:
        return find_blocks(model, config.blocks)
    except TargetError:
        if config.blocks or "sequential" in config.model_fields_set:
            raise
        return []


@technique("quantize.awq", AWQConfig, needs=("calib_data",), creates=(PackedLinear,))
def awq(model: nn.Module, config: AWQConfig, ctx: Context) -> nn.Module:
    """3/4/8-bit weights with activation-aware per-channel scales (AWQ, Lin et al. 2023)."""
    batches = materialize(ctx.calib_data or [], "calib_data")[: config.calib_batches]
    blocks = _blocks(model, config)
    names = untied(model, list(config.targets.select(model, linear_types())), "quantize.awq")
    shared = _foldable(model, names, batches, blocks, ctx.progress) if config.fold else {}

    def sample() -> ActivationSample:
        return ActivationSample(config.search_rows)

    inside = [n for n in names if _block_of(n, blocks)]
    outside = [n for n in names if n not in inside]
    # Layers outside every block (a pooler, a classifier, a model without repeated blocks) are
    # quantized on the float model's inputs, before the blocks see their outputs.
    if outside:
        stats = {name: sample() for name in outside}
        collect(model, {n: [r] for n, r in stats.items()}, batches, "awq: activations",
                show=ctx.progress)  # fmt: skip
        _quantize_seen(model, stats, shared, config)
    if inside:
        owned = {b: [n for n in inside if _block_of(n, blocks) == b] for b in blocks}
        per_layer = PerLayer(
            owned, sample, lambda stats: _quantize_seen(model, stats, shared, config)
        )
        report = run_blocks(model, batches, per_layer, blocks, ctx.progress)
        log.info("quantize.awq: %s", report)
    return model
