"""``quantize.dynamic``: int8 weights, uint8 activations quantized per token at run time.

The matrix multiply runs on integers for real: oneDNN's uint8 x int8 -> int32 kernel (VNNI on
x86; ``torch._int_mm`` elsewhere) between the per-token (affine) quantized input and the
per-channel (symmetric) quantized weight, then one rescale by ``input_scale * weight_scale``
(Dettmers et al. 2022, "LLM.int8()", Sec. 3.1: vector-wise quantization). In eager mode the
elementwise passes around the GEMM are kept few and in place; under ``torch.compile`` they fuse
into neighbouring kernels (see docs/benchmarks/quantize.md). Embedding tables are stored as int8
rows with one scale per row and dequantized after the lookup.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from netshrink.config import TechniqueConfig
from netshrink.context import Context
from netshrink.cpu import SATURATING_INT8
from netshrink.layers import (
    CompressedLayer,
    DequantLinear,
    as_linear,
    linear_types,
    onnx_translation,
    replace_module,
    untied,
    warn_left_alone,
    with_tables,
)
from netshrink.quantize.affine import Granularity, quantize_weight
from netshrink.quantize.packed_rnn import PackedRNN, packable
from netshrink.registry import technique
from netshrink.targets import Targets

# 7-bit activation codes on CPUs whose int8 kernels saturate (netshrink.cpu): exact but coarser.
_SATURATING_CPU = SATURATING_INT8


def _code_max(device: torch.device) -> int:
    """Largest activation code on ``device``: 255, or 127 on x86 CPUs without VNNI."""
    return 127 if device.type == "cpu" and _SATURATING_CPU else 255


# torch.compile options for models with DynamicInt8Linear layers, chosen by measuring the whole
# MiniLM encoder (docs/benchmarks/quantize.md runs 4-5: 9-13% less time than default compile
# at 1 thread, 10-11% at 2; the same options make torchao's int8 model slower). Freezing makes
# weights constants; realize_reads_threshold=1 makes inductor store buffers read by more than
# one kernel instead of recomputing them. Why the latter helps is not pinned down: on one
# isolated FFN epilogue + GELU + quantization (benchmarks/dynamic_kernels.py) it changes nothing.
COMPILE_OPTIONS: dict[str, Any] = {"freezing": True, "realize_reads_threshold": 1}


def _onednn_available() -> bool:
    """Whether this torch build has oneDNN's int8 linear (x86 CPU builds do)."""
    onednn = getattr(torch.ops, "onednn", None)
    return (
        torch.backends.mkldnn.is_available()
        and onednn is not None
        and hasattr(onednn, "qlinear_pointwise")
        and hasattr(onednn, "qlinear_prepack")
    )


def _linear_u8s8_impl(
    codes: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, zeros: torch.Tensor
) -> torch.Tensor:
    """float32 ``(codes @ weight_codes^T) * weight_scale``: uint8 x int8 -> int32 in oneDNN.

    ``zeros`` (the weight zero points) must be a tensor: passing None selects a kernel 3x slower.
    """
    return torch.ops.onednn.qlinear_pointwise(
        codes, 1.0, 0, packed, weight_scale, zeros, None, 1.0, 0, torch.float32, "none", [], ""
    )


# An opaque op for torch.compile: inductor's own lowering of ``qlinear_pointwise`` insists on
# freezing, while through this wrapper it fuses the quantization and rescale around the call.
_linear_u8s8 = torch.library.custom_op("netshrink::linear_u8s8", mutates_args=())(_linear_u8s8_impl)


@_linear_u8s8.register_fake
def _(codes: torch.Tensor, packed: torch.Tensor, weight_scale: torch.Tensor, zeros: torch.Tensor):
    return codes.new_empty((codes.shape[0], weight_scale.shape[0]), dtype=torch.float32)


def _matmul_u8s8_impl(
    codes: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor
) -> torch.Tensor:
    """float32 ``(codes @ weight_q^T) * weight_scale`` for uint8 ``codes``, via ``torch._int_mm``.

    ``_int_mm`` takes int8 on both sides: the codes are shifted by -128 and 128 times the
    weight's row sums are added back.
    """
    acc = torch._int_mm((codes.to(torch.int32) - 128).to(torch.int8), weight_q.t())
    return (acc + 128 * weight_q.sum(1, dtype=torch.int32)) * weight_scale


# The same product on plain tensors, as one op the ONNX exporter translates to MatMulInteger
# (netshrink.artifact.onnx); oneDNN's packed weight cannot be written to a file.
_matmul_u8s8 = torch.library.custom_op("netshrink::matmul_u8s8", mutates_args=())(_matmul_u8s8_impl)


@_matmul_u8s8.register_fake
def _(codes: torch.Tensor, weight_q: torch.Tensor, weight_scale: torch.Tensor):
    return codes.new_empty((codes.shape[0], weight_q.shape[0]), dtype=torch.float32)


@onnx_translation(torch.ops.netshrink.matmul_u8s8.default)
def _matmul_u8s8_onnx(codes: Any, weight_q: Any, weight_scale: Any) -> Any:
    """ONNX for ``netshrink::matmul_u8s8``: ``MatMulInteger`` (uint8 x int8 -> int32, ONNX
    Runtime's VNNI kernel), then the float rescale."""
    import onnx
    from onnxscript import opset18 as op

    acc = op.MatMulInteger(codes, op.Transpose(weight_q, perm=[1, 0]))
    return op.Mul(op.Cast(acc, to=onnx.TensorProto.FLOAT), weight_scale)


def _token_qparams(x2: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row affine scale and zero point of ``x2`` [tokens, features] for codes 0..qmax.

    Zero stays exact. ``amin`` and ``amax`` separately: ``aminmax(dim=1)`` is ~12x slower on
    CPU in torch 2.13.
    """
    lo = x2.amin(1, keepdim=True).clamp(max=0)
    hi = x2.amax(1, keepdim=True).clamp(min=0)
    s = (hi - lo).clamp_min(1e-12) / qmax
    return s, torch.round(-lo / s)


class DynamicInt8Linear(CompressedLayer):
    """Linear computing uint8 x int8 -> int32 with per-token input and per-channel weight scales."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        # [s_w * row sums of the codes ; bias]: derived from the rest, so not saved
        self.register_buffer("correction", torch.zeros(2, out_features), persistent=False)
        self.register_buffer(
            "weight_zero_point", torch.zeros(out_features, dtype=torch.int64), persistent=False
        )
        # a buffer, not a parameter: the integer kernel has no gradient to train it with
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        # oneDNN's packed weight layout: derived, opaque (cannot be saved or deep-copied)
        self._packed: torch.Tensor | None = None
        self.register_load_state_dict_post_hook(lambda m, _keys: m.refresh())

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute the derived tensors after codes, scales or bias changed.

        New tensors rather than in-place writes: buffers made under ``torch.inference_mode``
        cannot be written outside it.
        """
        row_sums = self.weight_q.sum(1, dtype=torch.int32) * self.weight_scale
        bias = self.bias if self.bias is not None else torch.zeros_like(row_sums)
        self.correction = torch.stack([row_sums, bias])
        on_cpu = self.weight_q.device.type == "cpu"
        self._packed = (
            torch.ops.onednn.qlinear_prepack(self.weight_q, None)
            if on_cpu and _onednn_available()
            else None
        )

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_packed"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.refresh()

    def _apply(self, fn: Any, recurse: bool = True) -> DynamicInt8Linear:
        super()._apply(fn, recurse)
        # scales and bias stay float32 through .half() / .double(): the kernels take only that
        # (the output still comes back in the input's dtype)
        self.weight_scale = self.weight_scale.float()
        if self.bias is not None:
            self.bias = self.bias.float()
        self.refresh()  # a move to another device needs (or drops) the packed copy
        return self

    def spec(self) -> dict[str, Any]:
        """JSON constructor arguments."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "bias": self.bias is not None,
        }

    @property
    def weight(self) -> torch.Tensor:
        """The float weight the int8 codes stand for (dequantized on access)."""
        return self.weight_q.float() * self.weight_scale[:, None]

    def weight_bits(self) -> int:
        """Bits of one weight code: 8."""
        return 8

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

    def netshrink_openvino(self) -> nn.Module:
        """This layer as OpenVINO runs it fastest: int8 weights it keeps, its own dynamic
        activation quantization (see :class:`netshrink.layers.DequantLinear`).
        """
        return DequantLinear(self.weight_q, self.weight_scale, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """y = s_x * (s_w * (q_x @ q_w^T) - z_x * s_w * sum_k q_w) + b, q_x per token in [0, 255].

        (Codes stop at 127 on x86 CPUs without VNNI, see ``_code_max``.)

        Each token gets its own affine range (scale and zero point): one-sided inputs such as
        GELU outputs then use all 256 codes instead of half. The zero point's contribution is
        one rank-1 correction with the weight's precomputed row sums. The GEMM is oneDNN's
        uint8 x int8 kernel (VNNI's native operand types) with the weight scale applied in its
        output stage, or ``torch._int_mm`` where oneDNN is missing (other CPUs, CUDA); exported
        to ONNX it is ``MatMulInteger``.
        """
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        qmax = _code_max(x2.device)
        s, z = _token_qparams(x2, qmax)
        if torch.compiler.is_compiling():  # plain expressions: inductor fuses each side whole
            q = torch.clamp(torch.round(x2 / s + z), 0, qmax)
            acc = self._matmul(q)
            y = (acc - z * self.correction[0]) * s + self.correction[1]
        else:
            # each elementwise pass costs about what a small int8 GEMM does, so they are few
            # and in place: codes = round(x / s + z) clamped, then the cast
            q = x2.div(s).add_(z).round_().clamp_(0, qmax)
            y = self._matmul(q).mul_(s)
            # zero-point correction and bias in one K=2 matmul-accumulate: [-s z, 1] @ correction
            y.addmm_(torch.cat([-s * z, torch.ones_like(s)], dim=1), self.correction)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def _matmul(self, q: torch.Tensor) -> torch.Tensor:
        """s_w * (q @ q_w^T) in float32 for float codes ``q`` in [0, 255] (or [0, 127])."""
        codes = q.to(torch.uint8)
        if torch.compiler.is_exporting():
            return _matmul_u8s8(codes, self.weight_q, self.weight_scale)
        if self._packed is not None and q.device.type == "cpu":
            # the custom-op wrapper costs ~2 ms per call in eager mode: only the compiler needs it
            gemm = _linear_u8s8 if torch.compiler.is_compiling() else _linear_u8s8_impl
            return gemm(codes, self._packed, self.weight_scale, self.weight_zero_point)
        return _matmul_u8s8_impl(codes, self.weight_q, self.weight_scale)


class Int8Embedding(CompressedLayer):
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

    @property
    def weight(self) -> torch.Tensor:
        """The float table the int8 rows stand for (dequantized on access)."""
        return self.weight_q.float() * self.weight_scale

    def weight_bits(self) -> int:
        """Bits of one weight code: 8."""
        return 8

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

    targets: Targets = Field(
        default_factory=Targets, description="Linear layers (and Embedding tables) to quantize"
    )
    embeddings: bool = Field(
        True, description="also store the targeted nn.Embedding tables as int8 rows"
    )
    recurrent: bool = Field(
        True, description="also store LSTM/GRU/RNN weights as int8 (the recurrence runs in float)"
    )


@technique("quantize.dynamic", DynamicConfig, creates=(DynamicInt8Linear, Int8Embedding, PackedRNN))
def dynamic(model: nn.Module, config: DynamicConfig, ctx: Context) -> nn.Module:
    """int8 weights and per-token uint8 activations, integer matmuls (oneDNN or _int_mm).

    Linear layers (and Hugging Face ``Conv1D``) become :class:`DynamicInt8Linear`, embedding
    tables :class:`Int8Embedding`, LSTM/GRU/RNN layers a
    :class:`~netshrink.quantize.packed_rnn.PackedRNN` with int8 weights (torch has no integer
    recurrent kernel to run them on); layers whose weights are tied to another's stay as they
    are with a warning.
    """
    selected = config.targets.select(model, (*linear_types(), nn.Embedding))
    layers = with_tables(selected, config.embeddings, "quantize.dynamic")
    rnns = [n for n, m in model.named_modules() if packable(m)] if config.recurrent else []
    for name in untied(model, [*layers, *rnns], "quantize.dynamic"):
        mod = model.get_submodule(name)
        if isinstance(mod, nn.Embedding):
            replace_module(model, name, Int8Embedding.from_float(mod))
        elif isinstance(mod, nn.RNNBase):  # packable: a plain LSTM/GRU/RNN
            replace_module(model, name, PackedRNN.from_float(mod, "int8"))
        else:
            replace_module(model, name, DynamicInt8Linear.from_float(as_linear(mod)))
    warn_left_alone(model, "quantize.dynamic", (nn.RNNBase,), "no int8 layer for them here")
    return model
