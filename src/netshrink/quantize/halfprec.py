"""``quantize.half``: Linear, Conv2d and embedding layers stored and run in float16 or bfloat16.

Each layer casts its input to the half dtype and its output back (an embedding its rows to
float32), so the model keeps taking and returning float32; normalization layers stay in
float32, where their statistics are safe.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from netshrink.config import TechniqueConfig
from netshrink.context import Context
from netshrink.layers import (
    FAST_PATH_READERS,
    CompressedLayer,
    ConvGeometry,
    as_linear,
    children_of,
    layer_types,
    leave_alone,
    replace_module,
    untied,
    with_tables,
)
from netshrink.registry import technique
from netshrink.targets import Targets

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class HalfLinear(CompressedLayer, nn.Linear):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Linear in the half dtype, result cast back to the input's dtype."""
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


class HalfConv2d(CompressedLayer, nn.Conv2d):
    """nn.Conv2d whose parameters are float16/bfloat16; float32 in, float32 out."""

    def __init__(self, conv: dict[str, Any], bias: bool, dtype: str) -> None:
        geometry = ConvGeometry.from_spec(conv)
        super().__init__(**geometry.spec(), bias=bias, dtype=DTYPES[dtype])
        self.half_dtype = dtype

    def spec(self) -> dict[str, Any]:
        """JSON constructor arguments."""
        conv = ConvGeometry.of(self).spec()
        return {"conv": conv, "bias": self.bias is not None, "dtype": self.half_dtype}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolution in the half dtype, result cast back to the input's dtype."""
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


class HalfEmbedding(CompressedLayer, nn.Embedding):
    """nn.Embedding whose table is float16/bfloat16; rows come out as float32."""

    def __init__(
        self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, dtype: str
    ) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx, dtype=DTYPES[dtype])
        self.half_dtype = dtype

    def spec(self) -> dict[str, Any]:
        """JSON constructor arguments."""
        shape = {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim}
        return {**shape, "padding_idx": self.padding_idx, "dtype": self.half_dtype}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Look the half rows up, cast to float32 (what the layers after it take)."""
        return super().forward(ids).float()


class HalfConfig(TechniqueConfig):
    """Options of quantize.half."""

    dtype: Literal["fp16", "bf16"] = Field("fp16", description="half-precision float format")
    targets: Targets = Field(
        default_factory=Targets,
        description="Linear/Conv1D/Conv2d layers (and Embedding tables) to convert",
    )
    embeddings: bool = Field(
        True, description="also store the targeted nn.Embedding tables in the half dtype"
    )


def half_layer(mod: nn.Module, dtype: str) -> nn.Module:
    """The half-precision layer computing what ``mod`` (Embedding, Conv2d or Linear) does."""
    if isinstance(mod, nn.Embedding):
        new: nn.Module = HalfEmbedding(
            mod.num_embeddings, mod.embedding_dim, mod.padding_idx, dtype
        )
    elif isinstance(mod, nn.Conv2d):
        new = HalfConv2d(ConvGeometry.of(mod).spec(), mod.bias is not None, dtype)
    else:
        mod = as_linear(mod)
        new = HalfLinear(mod.in_features, mod.out_features, mod.bias is not None, dtype)
    state = {k: v.to(DTYPES[dtype]) for k, v in mod.state_dict().items()}
    new.load_state_dict(state)
    return new.to(next(mod.parameters()).device)


@technique("quantize.half", HalfConfig, creates=(HalfLinear, HalfConv2d, HalfEmbedding))
def half(model: nn.Module, config: HalfConfig, ctx: Context) -> nn.Module:
    """Store and run Linear/Conv2d layers (and embedding tables) in float16 or bfloat16.

    Halves the bytes of their weights. Layers whose weights are tied to another's, and children
    of parents that compute with their weights (nn.MultiheadAttention, nn.TransformerEncoderLayer),
    stay as they are, with a warning.
    """
    selected = config.targets.select(model, (*layer_types(), nn.Embedding))
    names = untied(
        model, with_tables(selected, config.embeddings, "quantize.half"), "quantize.half"
    )
    why = "their parent may compute with their weights in float32 (an inference fast path)"
    names = leave_alone(names, children_of(model, FAST_PATH_READERS), "quantize.half", why)
    for name in names:
        replace_module(model, name, half_layer(model.get_submodule(name), config.dtype))
    return model
