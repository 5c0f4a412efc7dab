"""``quantize.smoothquant``: migrate activation outliers into the weights before static int8.

Xiao et al. 2022, "SmoothQuant", sec. 4: a few input channels of a transformer's Linear layers
carry activations far larger than the rest, so one per-tensor int8 scale wastes its codes on
them. Per input channel j, with s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), the activation is
divided by s and the weight's input column j multiplied by s: X W^T = (X / s)(W s)^T, so the
float model computes the same function while the activation's channels become even and the
weights absorb the difference. The division is folded into the layer that produced X: a
LayerNorm's (or RMSNorm's) weight and bias, or a Linear's output rows. Linears reading one
tensor (Q, K and V after one LayerNorm) share one s. ``alpha: auto`` picks alpha per producer on
the calibration data: the value of the grid 0, 0.05, .., 1 whose simulated int8 output
(per-tensor activations, per-channel weights, as ``quantize.static``) is closest to the float
output on calibration calls it was not fitted on (2-fold cross-validation, see
:func:`cross_validated_alpha`).

Which tensor feeds which Linear is found by :mod:`netshrink.quantize.smooth_observe`. Post-LN
blocks (BERT, DistilBERT, ``nn.TransformerEncoderLayer`` without ``norm_first``) also add the
norm's output to a residual, and dividing it there would change the model. Their readers, and
every other targeted Linear whose input comes from elsewhere (attention's output projection, the
FFN's second Linear after GELU), are smoothed inside the layer instead (``in_layer``, the
default): each becomes a :class:`~netshrink.quantize.smoothed.SmoothedLinear` computing
(x / s)(W s)^T with s from its own input's statistics (Linears reading one tensor share one s),
which ``quantize.static`` turns into a quantized Linear that multiplies its input by 1 / s before
quantizing it (a Mul before QuantizeLinear in ONNX). Pre-LN blocks (ViT, GPT-style,
``norm_first``) fold and cost nothing at run time; post-LN ones (BERT, MiniLM, DistilBERT) pay
one elementwise Mul per smoothed input. The technique keeps the float function; run
``quantize.static`` after it.
"""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from netshrink.batches import materialize
from netshrink.config import TechniqueConfig
from netshrink.context import Context
from netshrink.errors import UnsupportedModuleError
from netshrink.layers import replace_module, untied
from netshrink.quantize.affine import choose_qparams, dequantize, fake_quantize_weight, quantize
from netshrink.quantize.smooth_observe import Producer, in_layer_groups, merged, observe, plan
from netshrink.quantize.smoothed import SmoothedLinear
from netshrink.registry import technique
from netshrink.targets import Targets

log = logging.getLogger(__name__)

ALPHAS = tuple(i / 20 for i in range(21))
"""The grid ``alpha: auto`` searches: 0, 0.05, .., 1."""


class SmoothQuantConfig(TechniqueConfig):
    """Options of ``quantize.smoothquant``."""

    alpha: float | Literal["auto"] = Field(
        0.5,
        description="migration strength in [0, 1] (0: weights keep all, 1: activations even), "
        "or auto: searched per layer on calib_data",
    )
    targets: Targets = Field(default_factory=Targets, description="Linear layers to smooth")
    calib_batches: int = Field(32, ge=1, le=100000, description="calibration batches used at most")
    search_rows: int = Field(
        512, ge=16, le=1000000, description="activation rows kept per producer for alpha: auto"
    )
    in_layer: bool = Field(
        True,
        description="smooth Linears whose input cannot be folded into the op before it (post-LN "
        "residuals, attention outputs) with a per-channel Mul kept in the layer",
    )

    @model_validator(mode="after")
    def _alpha_in_range(self) -> SmoothQuantConfig:
        if self.alpha != "auto" and not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] or 'auto', got {self.alpha}")
        return self


def smoothing_scales(
    absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float
) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (SmoothQuant eq. 4), over every weight.

    Channels never active, or whose weight columns are all zero, keep s_j = 1.
    """
    wmax = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    s = absmax.pow(alpha) / wmax.pow(1 - alpha)
    ok = (absmax > 0) & (wmax > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp_min(1e-5)


def int8_error(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    s: torch.Tensor,
    span: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """Squared error of the int8 outputs with smoothing ``s`` against the float ``x W^T``.

    As ``quantize.static`` computes: x / s on unsigned per-tensor codes, W s on symmetric
    per-output-channel codes. The activation range is the min-max of x / s over ``x``, or over
    all the calibration data when ``span`` gives its per-channel (min, max): the range the
    static quantizer will really use.
    """
    xs = x / s
    lo, hi = (xs.min(), xs.max()) if span is None else ((span[0] / s).min(), (span[1] / s).max())
    scale, zero = choose_qparams(lo, hi, 8, False)
    xq = dequantize(quantize(xs, scale, zero, 0, 255), scale, zero)
    err = 0.0
    for w in weights:
        wq = fake_quantize_weight(w.detach().float() * s, 8)
        err += float((xq @ wq.T - x @ w.detach().float().T).pow(2).sum())
    return err


def search_alpha(
    x: torch.Tensor,
    absmax: torch.Tensor,
    weights: list[torch.Tensor],
    span: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """The alpha of :data:`ALPHAS` whose smoothing gives the least int8 output error on ``x``
    (activation range from ``span``, see :func:`int8_error`)."""
    errors = {a: int8_error(x, weights, smoothing_scales(absmax, weights, a), span) for a in ALPHAS}
    return min(errors, key=lambda a: errors[a])


def cross_validated_alpha(stats: Producer, weights: list[torch.Tensor]) -> float:
    """The alpha of :data:`ALPHAS` with the least int8 output error on data it was not fitted
    on: s and the activation range from the even calibration calls, the error on the odd
    calls' rows, plus the same the other way round (2-fold cross-validation).

    Scored on the rows s was fitted on, alpha 1 always wins when every channel's calibration
    maximum is known exactly (each channel of x / s then fills the range), and new text with a
    larger value in a channel that was quiet in calibration is clipped hard: on MiniLM's
    attention output projections that choice had 3-5x the held-out error of this one. With
    fewer than two calibration calls there is nothing to hold out: the search of
    :func:`search_alpha` on every row is used.
    """
    fit, test = stats.halves
    if fit.absmax is None or test.absmax is None or not fit.rows or not test.rows:
        assert stats.absmax is not None and stats.lo is not None and stats.hi is not None
        return search_alpha(torch.cat(stats.rows), stats.absmax, weights, (stats.lo, stats.hi))

    def error(alpha: float) -> float:
        total = 0.0
        for a, b in ((fit, test), (test, fit)):
            s = smoothing_scales(a.absmax, weights, alpha)  # type: ignore[arg-type]
            total += int8_error(torch.cat(b.rows), weights, s, (a.lo, a.hi))  # type: ignore[arg-type]
        return total

    errors = {a: error(a) for a in ALPHAS}
    return min(errors, key=lambda a: errors[a])


@torch.no_grad()
def fold(producer: nn.Module, readers: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide ``producer``'s output channels by ``s``; multiply the readers' input columns."""
    if isinstance(producer, nn.Linear):
        producer.weight.div_(s.to(producer.weight.dtype).unsqueeze(1))
    else:
        producer.weight.div_(s.to(producer.weight.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(s.to(producer.bias.dtype))
    for linear in readers:
        linear.weight.mul_(s.to(linear.weight.dtype))


def choose_scales(
    stats: Producer, weights: list[torch.Tensor], alpha: float | str
) -> tuple[torch.Tensor, float]:
    """The smoothing vector s for Linears sharing one input with ``stats``, and its alpha."""
    assert stats.absmax is not None and stats.lo is not None and stats.hi is not None
    if alpha == "auto":
        alpha = cross_validated_alpha(stats, weights)
    return smoothing_scales(stats.absmax, weights, float(alpha)), float(alpha)


@technique(
    "quantize.smoothquant", SmoothQuantConfig, needs=("calib_data",), creates=(SmoothedLinear,)
)
def smoothquant(model: nn.Module, config: SmoothQuantConfig, ctx: Context) -> nn.Module:
    """Move activation outliers into the weights of the targeted Linears (SmoothQuant)."""
    batches = materialize(ctx.calib_data or [], "calib_data")[: config.calib_batches]
    targeted = set(
        untied(model, config.targets.select(model, (nn.Linear,)), "quantize.smoothquant")
    )
    obs = observe(model, batches, targeted, config.search_rows, ctx.progress)
    pairs, refused = plan(obs.producers, obs.fed, targeted)
    folded = {r for readers in pairs.values() for r in readers}
    groups = in_layer_groups(obs, folded) if config.in_layer else []
    if not pairs and not groups:
        why = f": {'; '.join(refused)}" if refused else ""
        raise UnsupportedModuleError(
            f"quantize.smoothquant found nothing to smooth in {type(model).__name__}: no "
            "LayerNorm/RMSNorm/Linear output feeds only targeted Linear layers (pre-LN blocks' "
            "norms do; a post-LN block also adds the norm's output to a residual), and "
            f"in_layer is off or no targeted Linear ran on the calibration data{why}"
        )
    if refused and not config.in_layer:
        warnings.warn(f"quantize.smoothquant leaves {'; '.join(refused)}", stacklevel=2)
    for name, readers in pairs.items():
        weights = [model.get_submodule(r).weight for r in readers]
        s, alpha = choose_scales(obs.producers[name], weights, config.alpha)
        fold(model.get_submodule(name), [model.get_submodule(r) for r in readers], s)
        log.info("quantize.smoothquant: %s -> %s, alpha %.2f", name, ", ".join(readers), alpha)
    for group in groups:
        linears = [model.get_submodule(r) for r in group]
        stats = merged([obs.inputs[r] for r in group])
        s, alpha = choose_scales(stats, [m.weight for m in linears], config.alpha)
        for name, linear in zip(group, linears, strict=True):
            replace_module(model, name, SmoothedLinear.from_float(linear, s))
        log.info("quantize.smoothquant: in layer %s, alpha %.2f", ", ".join(group), alpha)
    return model
