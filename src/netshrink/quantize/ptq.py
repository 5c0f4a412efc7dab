"""``quantize.static``: post-training int8 quantization of weights and activations.

Steps (Jacob et al. 2018; Nagel et al. 2021, "A White Paper on Neural Network Quantization",
Sec. 3): fold each BatchNorm into the conv/linear before it, observe the activations on the
calibration batches, freeze their scales, and swap each conv/linear for a layer holding integer
weights (:mod:`netshrink.quantize.layers`). The torch model simulates integer arithmetic; its
ONNX export is QDQ, which ONNX Runtime runs with integer kernels.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from netshrink.batches import materialize
from netshrink.calibrate import Observe, Reducer, collect
from netshrink.calibrate.reducers import Side
from netshrink.config import Options, TechniqueConfig
from netshrink.context import Batch, Context
from netshrink.layers import (
    FLOAT_ONLY,
    WEIGHT_READERS,
    ConvGeometry,
    children_of,
    layer_types,
    leave_alone,
    linearize,
    replace_module,
    untied,
    warn_left_alone,
    with_tables,
)
from netshrink.quantize.affine import choose_qparams
from netshrink.quantize.bias_correction import correct_biases
from netshrink.quantize.dynamic_int8 import DynamicInt8Linear, Int8Embedding
from netshrink.quantize.layers import QuantConv2d, QuantLinear, QuantReLU
from netshrink.quantize.observers import Observer, ObserverName, make_observer
from netshrink.quantize.smoothed import SmoothedLinear
from netshrink.quantize.static_attention import attention_projections
from netshrink.quantize.static_dynamic import dynamic_layers, to_dynamic, unsmooth
from netshrink.quantize.static_gptq import gptq_round
from netshrink.quantize.tracing import fold_bn, trace_flow
from netshrink.registry import technique
from netshrink.targets import Targets

log = logging.getLogger(__name__)

QUANT_LAYERS = (QuantLinear, QuantConv2d, QuantReLU, Int8Embedding, DynamicInt8Linear, nn.Identity)
"""What static quantization puts in the model (Identity where a BatchNorm was folded,
DynamicInt8Linear for the ``dynamic`` layers)."""


class BitsOverride(Options):
    """A different weight bit width for some modules (mixed precision)."""

    targets: Targets = Field(default_factory=Targets, description="modules this override sets")
    bits: Literal[8, 4] = Field(8, description="weight bits of those modules")


class StaticConfig(TechniqueConfig):
    """Options of quantize.static."""

    weights: Literal["int8", "int4"] = Field("int8", description="weight codes (symmetric)")
    activations: Literal["int8", "int4"] = Field(
        "int8", description="activation codes (unsigned affine); int4 is exact but no faster"
    )
    observer: ObserverName = Field("minmax", description="how activation ranges are chosen")
    per_channel: bool = Field(True, description="one weight scale per output channel")
    calib_batches: int = Field(32, ge=1, le=100000, description="calibration batches used at most")
    targets: Targets = Field(
        default_factory=Targets, description="Conv2d/Linear/Conv1D layers to quantize"
    )
    embeddings: bool = Field(True, description="also store nn.Embedding tables as int8 rows")
    overrides: tuple[BitsOverride, ...] = Field(
        (), description="per-module weight bits, e.g. [{targets: {include: [fc]}, bits: 8}]"
    )
    bias_correction: bool = Field(
        False,
        description="shift each layer's bias by its mean output error on calib_data "
        "(quantized inputs, float layer as reference)",
    )
    weight_rounding: Literal["nearest", "gptq"] = Field(
        "nearest",
        description="weight codes on each channel's min-max grid: nearest, or gptq (codes "
        "chosen to lower each layer's output error on calib_data, Frantar et al. 2022)",
    )

    dynamic: Targets | None = Field(
        None,
        description="8-bit Linear layers whose inputs are quantized per token at run time "
        "instead of with a calibrated range (int8 weights as quantize.dynamic), for inputs one "
        "range fits badly, e.g. the FFN output projections (GELU outputs) of a transformer",
    )
    attention: bool = Field(
        False,
        description="also quantize the outputs of self-attention's query and key projections "
        "(int8, symmetric, calibrated), so that a runtime runs Q K^T in int8 (OpenVINO: its "
        "fused int8 attention kernel)",
    )

    @model_validator(mode="after")
    def _gptq_per_channel(self) -> StaticConfig:
        if self.weight_rounding == "gptq" and not self.per_channel:
            raise ValueError(
                "weight_rounding gptq rounds onto one grid per output channel; set "
                "per_channel: true, or weight_rounding: nearest"
            )
        return self

    @model_validator(mode="after")
    def _attention_int8(self) -> StaticConfig:
        if self.attention and self.activations == "int4":
            raise ValueError(
                "attention: true quantizes Q and K to 8 bits, which activations: int4 would "
                "not hold for them; use activations: int8 with attention, or drop attention"
            )
        return self

    @model_validator(mode="after")
    def _dynamic_int8(self) -> StaticConfig:
        if self.dynamic is not None and self.activations == "int4":
            raise ValueError(
                "dynamic layers quantize their inputs to 8 bits per token, so activations: int4 "
                "would not hold for them; use activations: int8 with dynamic, or drop dynamic"
            )
        return self


def weight_bits(
    model: nn.Module, config: Any, default: int, extra: tuple[type[nn.Module], ...] = ()
) -> dict[str, int]:
    """Weight bits of every selected module (Linear, Conv1D, Conv2d and the ``extra`` types):
    ``default``, then each override (later wins).

    Layers tied to another layer's weight are left out, with a warning.
    """
    bits = {}
    types = (*layer_types(), *extra)
    for name, mod in config.targets.select(model, types).items():
        if isinstance(mod, nn.Conv2d) and not ConvGeometry.of(mod).zero_padded:
            warnings.warn(
                f"{name}: padding={mod.padding!r}, padding_mode={mod.padding_mode!r} is not "
                "supported by integer convolution here; the layer stays float",
                stacklevel=3,
            )
            continue
        bits[name] = default
    for override in config.overrides:
        for name in override.targets.select(model, types):
            if name in bits:
                bits[name] = override.bits
    kept = untied(model, bits, "quantize")
    why = "their parent computes with their weight without calling them: no inputs to calibrate"
    kept = leave_alone(kept, children_of(model, WEIGHT_READERS), "quantize", why)
    return {name: b for name, b in bits.items() if name in kept}


def fold_batchnorms(model: nn.Module, names: Iterable[str]) -> set[str]:
    """Fold every BN that directly follows one of ``names``; return names whose output is added."""
    flow = trace_flow(model)
    for name in names:
        if name in flow.bn_after:
            bn_name = flow.bn_after[name]
            fold_bn(model.get_submodule(name), model.get_submodule(bn_name))  # type: ignore[arg-type]
            replace_module(model, bn_name, nn.Identity())
    return flow.feeds_add


class _Smoothed:
    """Hands ``x / s`` to an observer: the input a smoothed Linear will quantize."""

    def __init__(self, observer: Observer, s: torch.Tensor) -> None:
        self.observer, self.s = observer, s

    def update(self, x: torch.Tensor) -> None:
        self.observer.update(x / self.s)


def observe_ranges(
    model: nn.Module,
    names: Iterable[str],
    feeds_add: set[str],
    batches: list[Batch],
    observer: ObserverName,
    ctx: Context,
    act_bits: int = 8,
    signed_outputs: frozenset[str] = frozenset(),
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Observe inputs of ``names``, outputs of those in ``feeds_add`` or ``signed_outputs`` and
    of every ReLU.

    Returns unsigned ``act_bits`` ``(scale, zero_point)`` per observation point:
    ``"<name>:in"``, ``"<name>:out"``; symmetric 8-bit ones (zero point 0) for the outputs of
    ``signed_outputs``. The model is left in eval mode.
    """
    observers: dict[str, Observer] = {}
    points: dict[str, list[Reducer]] = {}

    def watch(name: str, side: Side) -> None:
        key = f"{name}:{'in' if side == 'input' else 'out'}"
        observers[key] = make_observer(observer, key, bits=act_bits, seed=ctx.seed)
        mod = model.get_submodule(name)
        sink: Any = observers[key]
        if side == "input" and isinstance(mod, SmoothedLinear):
            sink = _Smoothed(sink, mod.smooth)  # the quantizer will see x / s
        points.setdefault(name, []).append(Observe(sink, on=side))

    for name in names:
        watch(name, "input")
        if name in feeds_add or name in signed_outputs:
            watch(name, "output")
    for name, mod in model.named_modules():
        if type(mod) is nn.ReLU:
            watch(name, "output")
    model.eval()
    collect(model, points, batches, "quantize calibration", show=ctx.progress)
    signed = {f"{name}:out" for name in signed_outputs}
    return {
        k: choose_qparams(*o.range(), *((8, True) if k in signed else (act_bits, False)))
        for k, o in observers.items()
    }


def quantize_relus(
    model: nn.Module, qparams: dict[str, tuple[torch.Tensor, torch.Tensor]], act_bits: int = 8
) -> None:
    """Swap every calibrated nn.ReLU for a :class:`QuantReLU` with its frozen output qparams."""
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.ReLU and f"{name}:out" in qparams:
            q = QuantReLU(act_bits)
            q.set_qparams(*qparams[f"{name}:out"])
            replace_module(model, name, q)


def convert(
    model: nn.Module,
    bits: dict[str, int],
    qparams: dict[str, tuple[torch.Tensor, torch.Tensor]],
    per_channel: bool,
    weight_scales: dict[str, torch.Tensor] | None = None,
    act_bits: int = 8,
    signed_outputs: frozenset[str] = frozenset(),
) -> nn.Module:
    """Swap the calibrated conv/linear layers and ReLUs for their quantized versions.

    ``weight_scales`` (from QAT, or from GPTQ rounding) fixes the weight scale of the layers it
    names; the others get min-max scales. ``qparams`` are on ``act_bits`` unsigned codes, but
    for the outputs of ``signed_outputs``: symmetric int8 (see :func:`observe_ranges`).
    """
    scales = weight_scales or {}
    for name, b in bits.items():
        mod = model.get_submodule(name)
        layer_cls = QuantConv2d if isinstance(mod, nn.Conv2d) else QuantLinear
        inp, out = qparams[f"{name}:in"], qparams.get(f"{name}:out")
        signed = name in signed_outputs
        new = layer_cls.from_float(
            mod, b, per_channel, inp, out, scales.get(name), act_bits, signed
        )
        replace_module(model, name, new)
    quantize_relus(model, qparams, act_bits)
    return model


def quantize_static_model(
    model: nn.Module,
    bits: dict[str, int],
    config: Any,
    ctx: Context,
    per_channel: bool = True,
    bias_correction: bool = False,
    dynamic: tuple[str, ...] = (),
    signed_outputs: frozenset[str] = frozenset(),
) -> nn.Module:
    """Fold, calibrate on ``ctx.calib_data`` and convert ``model`` in place; with
    ``config.weight_rounding`` gptq the weight codes are chosen by GPTQ first
    (:func:`~netshrink.quantize.static_gptq.gptq_round`); with ``bias_correction``, then shift
    each converted layer's bias by its mean output error (against the float layers). The
    ``dynamic`` Linears (not in ``bits``) get int8 weights, rounded the same way, and per-token
    run-time input quantization (:mod:`netshrink.quantize.static_dynamic`). The layers of
    ``signed_outputs`` also quantize their outputs to symmetric int8
    (:mod:`netshrink.quantize.static_attention`)."""
    batches = materialize(ctx.calib_data or [], "calib_data")[: config.calib_batches]
    act_bits = 8 if config.activations == "int8" else 4
    feeds_add = fold_batchnorms(model, bits)
    qparams = observe_ranges(
        model, bits, feeds_add, batches, config.observer, ctx, act_bits, signed_outputs
    )
    floats = {n: model.get_submodule(n) for n in bits} if bias_correction else {}
    floats = {n: copy.deepcopy(m) for n, m in floats.items() if m.bias is not None}
    if bias_correction and not floats:
        warnings.warn(
            "quantize.static: bias_correction is on but no quantized layer has a bias; "
            "nothing was corrected",
            stacklevel=3,
        )
    scales: dict[str, torch.Tensor] = {}
    if config.weight_rounding == "gptq":
        scales = gptq_round(model, {**bits, **dict.fromkeys(dynamic, 8)}, batches, ctx.progress)
    to_dynamic(model, list(dynamic), scales)
    convert(model, bits, qparams, per_channel, scales, act_bits, signed_outputs)
    if floats:
        shifts = correct_biases(model, floats, batches, ctx.progress)
        log.info("quantize.static: bias correction, mean |shift| per layer %s", shifts)
    return model


@technique("quantize.static", StaticConfig, needs=("calib_data",), creates=QUANT_LAYERS)
def static(model: nn.Module, config: StaticConfig, ctx: Context) -> nn.Module:
    """Post-training int8 quantization of weights and activations (BN folded, calibrated)."""
    default = 8 if config.weights == "int8" else 4
    bits = weight_bits(model, config, default, extra=(SmoothedLinear,))
    dynamic = dynamic_layers(model, config.dynamic, bits)
    static_bits = {n: b for n, b in bits.items() if n not in dynamic}
    qkv = attention_projections(model, static_bits) if config.attention else set()
    selected = config.targets.select(model, (*layer_types(), SmoothedLinear, nn.Embedding))
    changed = with_tables(selected, config.embeddings, "quantize.static")
    tables = untied(
        model, [n for n in changed if isinstance(selected[n], nn.Embedding)], "quantize.static"
    )
    linearize(model, bits)
    unsmooth(model, dynamic)
    model.eval()
    quantize_static_model(
        model, static_bits, config, ctx, config.per_channel, config.bias_correction,
        tuple(dynamic), frozenset(qkv),
    )  # fmt: skip
    for name in tables:
        replace_module(model, name, Int8Embedding.from_float(model.get_submodule(name)))
    warn_left_alone(model, "quantize.static", FLOAT_ONLY, "no integer kernel for them here")
    return model
