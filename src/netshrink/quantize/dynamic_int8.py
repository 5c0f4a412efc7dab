"""``quantize.dynamic``: int8 weights, int8 activations quantized per token at run time.

The matrix multiply runs on integers for real: ``torch._int_mm`` (int8 x int8 -> int32,
VNNI/AMX kernels on x86) between the per-token (affine) quantized input and the per-channel
(symmetric) quantized weight, then one rescale by ``input_scale * weight_scale`` (Dettmers et
al. 2022, "LLM.int8()", Sec. 3.1: vector-wise quantization). The extra elementwise passes cost
about what the integer GEMM saves in eager mode; under ``torch.compile`` they fuse into
neighbouring kernels (see docs/benchmarks/quantize.md). Embedding tables are stored as int8 rows
with one scale per row and dequantized after the lookup.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from netshrink.artifact.modules import rebuildable
from netshrink.config import TechniqueConfig
from netshrink.context import Context
from netshrink.quantize.affine import Granularity, quantize_weight
from netshrink.quantize.tracing import set_submodule
from netshrink.registry import technique
from netshrink.targets import Targets


@rebuildable
class DynamicInt8Linear(nn.Module):
    """Linear computing int8 x int8 -> int32 with per-token input and per-channel weight scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        # [s_w * row sums of the codes ; bias]: derived from the rest, so not saved
        self.register_buffer("correction", torch.zeros(2, out_features), persistent=False)
        # a buffer, not a parameter: the integer kernel has no gradient to train it with
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_load_state_dict_post_hook(lambda m, _keys: m.refresh())

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the derived correction rows after codes, scales or bias changed."""
        self.correction[0] = self.weight_q.sum(1, dtype=torch.int32) * self.weight_scale
        self.correction[1] = self.bias if self.bias is not None else 0.0

    def spec(self) -> dict[str, Any]:
        """JSON constructor arguments."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> DynamicInt8Linear:
        """Empty layer; values come from the state dict."""
        return cls(**spec)

    @classmethod
    @torch.no_grad()
    def from_float(cls, m: nn.Linear) -> DynamicInt8Linear:
        """Quantize ``m``'s weight symmetrically per output channel."""
        q = cls(m.in_features, m.out_features, m.bias is not None)
        codes, scale, _ = quantize_weight(m.weight, 8, True, Granularity(True))
        q.weight_q.copy_(codes.to(torch.int8))
        q.weight_scale.copy_(scale.reshape(-1))
        if m.bias is not None:
            q.bias.copy_(m.bias)  # type: ignore[union-attr]
        q.refresh()
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = s_x * s_w * (q_x @ q_w^T - z_x * sum_k q_w) + b, q_x per token in [-128, 127].

        Each token gets its own affine range (scale and zero point): one-sided inputs such as
        GELU outputs then use all 256 codes instead of half. The zero point's contribution is
        one rank-1 correction with the weight's precomputed row sums.
        """
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        lo, hi = torch.aminmax(x2, dim=1, keepdim=True)
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # zero stays exact
        s = (hi - lo).clamp_min(1e-12) / 255
        z = torch.round(-128 - lo / s)
        # Every elementwise pass over these tensors costs about as much as the int8 GEMM saves,
        # so they are few and in place: codes = round(z + x / s), clamped (2 passes + cast) ...
        q = torch.addcmul(z, x2, 1 / s).round_().clamp_(-128, 127).to(torch.int8)
        acc = torch._int_mm(q, self.weight_q.t())
        if torch.compiler.is_compiling():  # one elementwise expression: inductor fuses it whole
            wsum, bias = self.correction[0], self.correction[1]
            y = (acc * self.weight_scale - z * wsum) * s + bias
            return y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        # ... and the output: int32 * s_w promotes to float in one pass, * s_x in a second, and
        # the zero-point correction and the bias in a third, as one K=2 matmul-accumulate:
        # [-s_x z, 1] @ [s_w * sum_k q_w ; b]
        y = torch.mul(acc, self.weight_scale).mul_(s)
        left = torch.cat([-s * z, torch.ones_like(s)], dim=1)
        y.addmm_(left, self.correction)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)


@rebuildable
class Int8Embedding(nn.Module):
    """Embedding table of int8 rows, one float scale per row (symmetric)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.register_buffer(
            "weight_q", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8)
        )
        self.register_buffer("weight_scale", torch.ones(num_embeddings, 1))

    def spec(self) -> dict[str, Any]:
        """JSON constructor arguments."""
        return {
            "num_embeddings": self.num_embeddings,
            "embedding_dim": self.embedding_dim,
            "padding_idx": self.padding_idx,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Int8Embedding:
        """Empty table; values come from the state dict."""
        return cls(**spec)

    @classmethod
    @torch.no_grad()
    def from_float(cls, m: nn.Embedding) -> Int8Embedding:
        """Quantize every row of ``m`` symmetrically."""
        q = cls(m.num_embeddings, m.embedding_dim, m.padding_idx)
        codes, scale, _ = quantize_weight(m.weight, 8, True, Granularity(True))
        q.weight_q.copy_(codes.to(torch.int8))
        q.weight_scale.copy_(scale)
        return q

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Look the int8 rows up, then scale them to float."""
        return F.embedding(ids, self.weight_q).to(torch.float32) * F.embedding(
            ids, self.weight_scale
        )


class DynamicConfig(TechniqueConfig):
    """Options of quantize.dynamic."""

    targets: Targets = Field(default_factory=Targets, description="Linear layers to quantize")
    embeddings: bool = Field(True, description="also store nn.Embedding tables as int8 rows")


@technique("quantize.dynamic", DynamicConfig)
def dynamic(model: nn.Module, config: DynamicConfig, ctx: Context) -> nn.Module:
    """int8 weights and per-token int8 activations, integer matmuls via torch._int_mm."""
    for name, mod in config.targets.select(model, (nn.Linear,)).items():
        set_submodule(model, name, DynamicInt8Linear.from_float(mod))  # type: ignore[arg-type]
    if config.embeddings:
        for name, mod in list(model.named_modules()):
            if type(mod) is nn.Embedding and mod.max_norm is None:
                set_submodule(model, name, Int8Embedding.from_float(mod))
    return model
