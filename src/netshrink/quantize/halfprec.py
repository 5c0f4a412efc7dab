"""``quantize.half``: Linear and Conv2d layers stored and run in float16 or bfloat16.

Each layer casts its input to the half dtype and its output back, so the model keeps taking
and returning float32; normalization layers stay in float32, where their statistics are safe.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from netshrink.artifact.modules import _conv_args, rebuildable
from netshrink.config import TechniqueConfig
from netshrink.context import Context
from netshrink.quantize.tracing import set_submodule
from netshrink.registry import technique
from netshrink.targets import Targets

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@rebuildable
class HalfLinear(nn.Linear):
    """nn.Linear whose parameters are float16/bfloat16; float32 in, float32 out."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: str) -> None:
        super().__init__(in_features, out_features, bias, dtype=DTYPES[dtype])
        self.half_dtype = dtype

    def spec(self) -> dict[str, Any]:
        """JSON constructor arguments."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
            "dtype": self.half_dtype,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> HalfLinear:
        """Empty layer; values come from the state dict."""
        return cls(**spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Linear in the half dtype, result cast back to the input's dtype."""
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


@rebuildable
class HalfConv2d(nn.Conv2d):
    """nn.Conv2d whose parameters are float16/bfloat16; float32 in, float32 out."""

    def __init__(self, conv: dict[str, Any], dtype: str) -> None:
        super().__init__(**conv, dtype=DTYPES[dtype])
        self.conv, self.half_dtype = dict(conv), dtype

    def spec(self) -> dict[str, Any]:
        """JSON constructor arguments."""
        return {"conv": self.conv, "dtype": self.half_dtype}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> HalfConv2d:
        """Empty layer; values come from the state dict."""
        return cls(**spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolution in the half dtype, result cast back to the input's dtype."""
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


class HalfConfig(TechniqueConfig):
    """Options of quantize.half."""

    dtype: Literal["fp16", "bf16"] = Field("fp16", description="half-precision float format")
    targets: Targets = Field(default_factory=Targets, description="Linear/Conv2d to convert")


@technique("quantize.half", HalfConfig, creates=(HalfLinear, HalfConv2d))
def half(model: nn.Module, config: HalfConfig, ctx: Context) -> nn.Module:
    """Store and run Linear/Conv2d layers in float16 or bfloat16 (2x smaller weights)."""
    for name, mod in config.targets.select(model, (nn.Linear, nn.Conv2d)).items():
        if isinstance(mod, nn.Linear):
            new: nn.Module = HalfLinear(
                mod.in_features, mod.out_features, mod.bias is not None, config.dtype
            )
        else:
            new = HalfConv2d(_conv_args(mod), config.dtype)
        new.load_state_dict({k: v.to(DTYPES[config.dtype]) for k, v in mod.state_dict().items()})
        set_submodule(model, name, new)
    return model
