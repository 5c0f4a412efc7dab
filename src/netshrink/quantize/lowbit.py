"""``quantize.weight_only``, ``quantize.binary`` and ``quantize.ternary``: packed weight codes.

Weights become codes (int8, int4 packed two per byte, ternary four per byte, binary eight per
byte) plus per-channel or per-group scales; activations stay float and the weight is decoded
on the fly (:mod:`netshrink.quantize.packed`).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

from pydantic import Field
from torch import nn

from netshrink.config import TechniqueConfig
from netshrink.context import Context
from netshrink.layers import (
    FLOAT_ONLY,
    ConvGeometry,
    as_linear,
    layer_types,
    replace_module,
    untied,
    warn_left_alone,
    with_tables,
)
from netshrink.quantize.packed import Codec, PackedConv2d, PackedEmbedding, PackedLinear
from netshrink.quantize.packed_rnn import PackedRNN, input_widths, packable
from netshrink.registry import Knob, technique
from netshrink.targets import Targets

PACKED_LAYERS = (PackedLinear, PackedConv2d, PackedEmbedding, PackedRNN)
"""What the weight-only, binary and ternary quantizers put in the model."""


def _groups(name: str, width: int, group_size: int) -> int:
    """``group_size``, or 0 (one scale per row) with a warning when it does not divide ``width``."""
    if group_size and width % group_size:
        warnings.warn(
            f"{name}: group_size {group_size} does not divide its {width} inputs; "
            "using one scale per output channel",
            stacklevel=4,
        )
        return 0
    return group_size


def encode_layers(model: nn.Module, names: list[str], codec: Codec, group_size: int) -> nn.Module:
    """Replace each named Linear/Conv1D/Conv2d/ConvTranspose2d/Embedding/LSTM/GRU/RNN by its
    packed version.

    Grouping applies to Linear and recurrent weight inputs and to embedding rows. Layers tied
    to another layer's weight stay as they are, with a warning.
    """
    for name in untied(model, names, f"quantize ({codec})"):
        mod = model.get_submodule(name)
        if packable(mod):
            assert isinstance(mod, nn.RNNBase)
            groups = _groups(name, math.gcd(*input_widths(mod)), group_size)
            replace_module(model, name, PackedRNN.from_float(mod, codec, groups))
        elif isinstance(mod, nn.Embedding):
            groups = _groups(name, mod.embedding_dim, group_size)
            replace_module(model, name, PackedEmbedding.from_float(mod, codec, groups))
        elif isinstance(mod, nn.Conv2d | nn.ConvTranspose2d):
            if not ConvGeometry.of(mod).zero_padded:
                warnings.warn(f"{name}: padding {mod.padding!r} is not supported; kept float",
                              stacklevel=3)  # fmt: skip
                continue
            replace_module(model, name, PackedConv2d.from_float(mod, codec))
        else:
            linear = as_linear(mod)
            groups = _groups(name, linear.in_features, group_size)
            replace_module(model, name, PackedLinear.from_float(linear, codec, groups))
    warn_left_alone(
        model, f"quantize ({codec})", FLOAT_ONLY, "no packed-weight layer for them here"
    )
    return model


class WeightOnlyConfig(TechniqueConfig):
    """Options of quantize.weight_only."""

    bits: Literal[8, 4] = Field(8, description="weight bits: 8 (int8) or 4 (int4, packed)")
    group_size: int | None = Field(
        None,
        ge=0,
        le=4096,
        description="inputs sharing a scale in Linear layers; 0: per channel; "
        "default: per channel for 8 bits, 32 for 4 bits",
    )
    targets: Targets = Field(
        default_factory=Targets,
        description="Linear/Conv1D/Conv2d/ConvTranspose2d/LSTM/GRU/RNN layers (and Embedding "
        "tables) to quantize",
    )
    embeddings: bool = Field(
        True,
        description="also store the targeted nn.Embedding tables as codes (a scale per row or "
        "group)",
    )


def _probe_options(bits: float, targets: dict[str, Any]) -> dict[str, Any]:
    return {"bits": int(bits), "targets": targets}


@technique(
    "quantize.weight_only",
    WeightOnlyConfig,
    creates=PACKED_LAYERS,
    knob=Knob("bits", (8, 4), _probe_options),
)
def weight_only(model: nn.Module, config: WeightOnlyConfig, ctx: Context) -> nn.Module:
    """int8 or packed int4 weights with float activations, dequantized on the fly."""
    kinds = (*layer_types(), nn.ConvTranspose2d, nn.LSTM, nn.GRU, nn.RNN, nn.Embedding)
    selected = config.targets.select(model, kinds)
    names = with_tables(selected, config.embeddings, "quantize.weight_only")
    codec: Codec = "int8" if config.bits == 8 else "int4"
    group_size = config.group_size
    if group_size is None:
        group_size = 0 if config.bits == 8 else 32
    return encode_layers(model, names, codec, group_size)


class SignConfig(TechniqueConfig):
    """Options of quantize.binary and quantize.ternary."""

    targets: Targets = Field(
        default_factory=Targets, description="Linear/Conv1D/Conv2d layers to quantize"
    )
    keep_first_last: bool = Field(
        True, description="leave the first and last selected layers float (standard practice)"
    )


def _sign_layers(model: nn.Module, config: SignConfig) -> list[str]:
    names = list(config.targets.select(model, layer_types()))
    return names[1:-1] if config.keep_first_last and len(names) > 2 else names


@technique("quantize.binary", SignConfig, creates=PACKED_LAYERS)
def binary(model: nn.Module, config: SignConfig, ctx: Context) -> nn.Module:
    """1-bit weights: sign times the per-channel mean |w| (XNOR-Net), packed 8 per byte."""
    return encode_layers(model, _sign_layers(model, config), "binary", 0)


@technique("quantize.ternary", SignConfig, creates=PACKED_LAYERS)
def ternary(model: nn.Module, config: SignConfig, ctx: Context) -> nn.Module:
    """Ternary weights {-a, 0, a} per channel (TWN, threshold 0.7 mean|w|), packed 4 per byte."""
    return encode_layers(model, _sign_layers(model, config), "ternary", 0)
