"""``quantize.weight_only``, ``quantize.binary`` and ``quantize.ternary``: packed weight codes.

Weights become codes (int8, int4 packed two per byte, ternary four per byte, binary eight per
byte) plus per-channel or per-group scales; activations stay float and the weight is decoded
on the fly (:mod:`netshrink.quantize.packed`).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

from pydantic import Field
from torch import nn

from netshrink.config import TechniqueConfig
from netshrink.context import Context
from netshrink.quantize.packed import Codec, PackedConv2d, PackedLinear
from netshrink.quantize.tracing import set_submodule
from netshrink.registry import Knob, technique
from netshrink.targets import Targets

KINDS = (nn.Linear, nn.Conv2d)


def encode_layers(model: nn.Module, names: list[str], codec: Codec, group_size: int) -> nn.Module:
    """Replace each named Linear/Conv2d by its packed version; grouping applies to Linear."""
    for name in names:
        mod = model.get_submodule(name)
        if isinstance(mod, nn.Conv2d):
            if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
                warnings.warn(f"{name}: padding {mod.padding!r} is not supported; kept float",
                              stacklevel=3)  # fmt: skip
                continue
            set_submodule(model, name, PackedConv2d.from_float(mod, codec))
            continue
        groups = group_size
        if group_size and mod.in_features % group_size:
            warnings.warn(
                f"{name}: group_size {group_size} does not divide in_features "
                f"{mod.in_features}; using one scale per output channel",
                stacklevel=3,
            )
            groups = 0
        set_submodule(model, name, PackedLinear.from_float(mod, codec, groups))
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
    targets: Targets = Field(default_factory=Targets, description="Linear/Conv2d to quantize")


def _probe_options(bits: float, targets: dict[str, Any]) -> dict[str, Any]:
    return {"bits": int(bits), "targets": targets}


@technique(
    "quantize.weight_only",
    WeightOnlyConfig,
    creates=(PackedLinear, PackedConv2d),
    knob=Knob("bits", (8, 4), _probe_options),
)
def weight_only(model: nn.Module, config: WeightOnlyConfig, ctx: Context) -> nn.Module:
    """int8 or packed int4 weights with float activations, dequantized on the fly."""
    names = list(config.targets.select(model, KINDS))
    codec: Codec = "int8" if config.bits == 8 else "int4"
    group_size = config.group_size
    if group_size is None:
        group_size = 0 if config.bits == 8 else 32
    return encode_layers(model, names, codec, group_size)


class SignConfig(TechniqueConfig):
    """Options of quantize.binary and quantize.ternary."""

    targets: Targets = Field(default_factory=Targets, description="Linear/Conv2d to quantize")
    keep_first_last: bool = Field(
        True, description="leave the first and last selected layers float (standard practice)"
    )


def _sign_layers(model: nn.Module, config: SignConfig) -> list[str]:
    names = list(config.targets.select(model, KINDS))
    return names[1:-1] if config.keep_first_last and len(names) > 2 else names


@technique("quantize.binary", SignConfig, creates=(PackedLinear, PackedConv2d))
def binary(model: nn.Module, config: SignConfig, ctx: Context) -> nn.Module:
    """1-bit weights: sign times the per-channel mean |w| (XNOR-Net), packed 8 per byte."""
    return encode_layers(model, _sign_layers(model, config), "binary", 0)


@technique("quantize.ternary", SignConfig, creates=(PackedLinear, PackedConv2d))
def ternary(model: nn.Module, config: SignConfig, ctx: Context) -> nn.Module:
    """Ternary weights {-a, 0, a} per channel (TWN, threshold 0.7 mean|w|), packed 4 per byte."""
    return encode_layers(model, _sign_layers(model, config), "ternary", 0)
