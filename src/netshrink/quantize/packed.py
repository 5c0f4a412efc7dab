"""Layers whose weights are stored as low-bit codes and dequantized on the fly.

One codec serves weight-only int8/int4, binary and ternary weights: a weight element is
``(code * mult - offset) * scale`` where ``code`` is unsigned and ``scale`` has one value per
output channel (or per group of ``group_size`` inputs). Codes of 1, 2 and 4 bits are packed
8/bits per byte (:mod:`netshrink.quantize.packing`); 8-bit codes are stored as int8. The
forward pass rebuilds the float weight and runs the float kernel: storage shrinks, compute in
torch does not (on these CPUs int8 weight-only kernels are slower than fp32; see DESIGN.md).

An int4 :class:`PackedLinear` whose groups are a power of two of at least 16 inputs exports to
ONNX Runtime's ``com.microsoft::MatMulNBits`` (its int4 CPU kernels;
:mod:`netshrink.quantize.nbits`): its packed codes already are that op's ``B`` layout (``N`` rows
of ``K / block_size`` blocks, two codes a byte, the first in the low nibble), so the file stores
them as they are. OpenVINO's ONNX frontend reads the same
node as u4 weights and runs it on its compressed-weight FullyConnected. A ``PackedLinear`` may
also hold a zero point per group (asymmetric int4: ``weight = (code - zero) * scale``) and an
explicit per-input-channel scale that multiplies its input (AWQ's scales where no preceding op
can absorb them, :mod:`netshrink.quantize.awq`).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.layers import CompressedLayer, ConvGeometry
from netshrink.quantize.affine import Granularity, quantize_weight
from netshrink.quantize.nbits import dequantize_int4, matmul_nbits, unpack_rows
from netshrink.quantize.packing import pack, unpack

Codec = Literal["int8", "int4", "binary", "ternary"]
_BITS = {"int8": 8, "int4": 4, "binary": 1, "ternary": 2}
_MULT_OFFSET = {"int8": (1, 0), "int4": (1, 8), "binary": (2, 1), "ternary": (1, 1)}


def encode(w: torch.Tensor, codec: Codec, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(stored codes, scale)`` of weight ``w`` for ``codec``.

    int8/int4: symmetric min-max per channel, or per group when ``group_size`` > 0.
    binary: sign(w) times the mean |w| of the channel (XNOR-Net, Rastegari et al. 2016,
    Sec. 3.1). ternary: 0 where |w| <= 0.7 mean|w|, else sign(w), times the mean |w| of the
    kept weights (Ternary Weight Networks, Li et al. 2016, Sec. 2.2).
    """
    w = w.detach().float()
    if codec in ("int8", "int4"):
        q, scale, _ = quantize_weight(w, _BITS[codec], True, Granularity(True, group_size))
        return stored_codes(q.reshape(w.shape), codec), scale
    rows = w.reshape(w.shape[0], -1)
    if codec == "binary":
        scale = rows.abs().mean(1)
        return pack((rows >= 0).to(torch.int32), 1), scale
    delta = 0.7 * rows.abs().mean(1, keepdim=True)
    keep = rows.abs() > delta
    scale = (rows.abs() * keep).sum(1) / keep.sum(1).clamp_min(1)
    return pack((torch.sign(rows) * keep + 1).to(torch.int32), 2), scale


def stored_codes(q: torch.Tensor, codec: Literal["int8", "int4"]) -> torch.Tensor:
    """Signed integer codes ``q`` (int8: -128..127, int4: -8..7) as the layers store them."""
    if codec == "int8":
        return q.to(torch.int8)
    return pack(q.to(torch.int32) + 8, 4)


class _PackedWeight(CompressedLayer):
    """Storage and decoding shared by the packed conv, linear and embedding layers."""

    weight_shape: tuple[int, ...]

    def _init_storage(
        self, codec: Codec, group_size: int, bias: bool, outputs: int | None = None
    ) -> None:
        """Codes and scales for ``self.weight_shape``; a bias of ``outputs`` elements (default:
        the weight's first dimension)."""
        self.codec, self.group_size, self.has_bias = codec, group_size, bias
        numel = math.prod(self.weight_shape)
        if codec == "int8":
            self.register_buffer("codes", torch.zeros(self.weight_shape, dtype=torch.int8))
        else:
            nbytes = -(-numel * _BITS[codec] // 8)
            self.register_buffer("codes", torch.zeros(nbytes, dtype=torch.uint8))
        scale_shape = Granularity(True, group_size).param_shape(torch.empty(self.weight_shape))
        if codec in ("binary", "ternary"):
            scale_shape = (self.weight_shape[0],)
        self.register_buffer("scale", torch.ones(scale_shape))
        outputs = self.weight_shape[0] if outputs is None else outputs
        self.bias = nn.Parameter(torch.zeros(outputs)) if bias else None

    @torch.no_grad()
    def fill(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Encode ``weight`` (shaped like ``weight_shape``) and copy ``bias`` in."""
        codes, scale = encode(weight, self.codec, self.group_size)
        self.codes.copy_(codes)
        self.scale.copy_(scale.reshape(self.scale.shape))
        if bias is not None:
            assert self.bias is not None
            self.bias.copy_(bias)

    @torch.no_grad()
    def set_codes(
        self, codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
        """Store signed integer ``codes`` chosen elsewhere (GPTQ), ``weight_shape``'s elements in
        its row-major order, with their ``scale`` (one per output row, or per row and group)."""
        self.codes.copy_(stored_codes(codes.reshape(self.weight_shape), self.codec))
        self.scale.copy_(scale.reshape(self.scale.shape))
        if bias is not None:
            assert self.bias is not None
            self.bias.copy_(bias)

    @property
    def weight(self) -> torch.Tensor:
        """The float weight the codes stand for (decoded on access)."""
        mult, offset = _MULT_OFFSET[self.codec]
        if self.codec == "int8":
            codes = self.codes.to(torch.float32)
        else:
            numel = math.prod(self.weight_shape)
            codes = unpack(self.codes, _BITS[self.codec], numel).to(torch.float32)
        values = codes * mult - offset
        if self.group_size > 0 and self.codec in ("int8", "int4"):
            groups = values.reshape(*self.weight_shape[:-1], -1, self.group_size)
            return (groups * self.scale).reshape(self.weight_shape)
        values = values.reshape(self.weight_shape[0], -1) * self.scale.reshape(-1, 1)
        return values.reshape(self.weight_shape)

    def weight_bits(self) -> int:
        """Bits of one weight code."""
        return _BITS[self.codec]

    def _spec(self) -> dict[str, Any]:
        return {"codec": self.codec, "group_size": self.group_size, "bias": self.has_bias}


class PackedLinear(_PackedWeight):
    """Linear layer with int8/int4/binary/ternary weight codes (dequantized on the fly).

    ``zero_point`` (int4 only): the codes are unsigned grid indices 0..15 with one zero point
    per row and group, stored as MatMulNBits stores them (two a byte, each row padded to a
    whole byte). ``input_scale``: a float per input feature that multiplies the input first.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        codec: Codec,
        group_size: int,
        bias: bool,
        zero_point: bool = False,
        input_scale: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_shape = (out_features, in_features)
        self._init_storage(codec, group_size, bias)
        if zero_point and codec != "int4":
            raise ValueError(f"zero points are stored for int4 codes only, not {codec}")
        groups = in_features // group_size if group_size else 1
        self.register_buffer(
            "zero_point",
            torch.zeros(out_features, -(-groups // 2), dtype=torch.uint8) if zero_point else None,
        )
        self.register_buffer("input_scale", torch.ones(in_features) if input_scale else None)
        self._nbits_views()
        self.register_load_state_dict_post_hook(lambda m, _keys: m._nbits_views())

    def spec(self) -> dict[str, Any]:
        """JSON constructor arguments (the optional parts only when present)."""
        optional = {"zero_point": self.zero_point is not None}
        optional["input_scale"] = self.input_scale is not None
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            **self._spec(),
            **{k: v for k, v in optional.items() if v},
        }

    def nbits_block(self) -> int:
        """MatMulNBits' ``block_size`` for this layer, or 0 when it cannot export to it (not
        int4, or groups that are not a power of two of at least 16 inputs)."""
        g = self.group_size
        exportable = self.codec == "int4" and g >= 16 and g & (g - 1) == 0
        return g if exportable and self.in_features % g == 0 else 0

    def _nbits_views(self) -> None:
        """Views of codes and scales in MatMulNBits' shapes, (N, blocks, bytes) and (N, blocks).

        Non-persistent buffers sharing the saved tensors' storage: the exported file holds them
        as initializers in place of the flat codes (a reshape node in between would stop
        OpenVINO, which reads ``B`` only as a constant). Rebuilt after loads and moves.
        """
        block = self.nbits_block()
        blocks = self.in_features // block if block else 0
        self.register_buffer(
            "nbits_b",
            self.codes.view(self.out_features, blocks, block // 2) if block else None,
            persistent=False,
        )
        self.register_buffer(
            "nbits_scales",
            self.scale.view(self.out_features, blocks) if block else None,
            persistent=False,
        )

    def _apply(self, fn: Any, recurse: bool = True) -> PackedLinear:
        super()._apply(fn, recurse)
        self._nbits_views()  # the moved codes and scales are new tensors: view those
        return self

    def zero_points(self) -> torch.Tensor | None:
        """The zero point of each row and group (out, groups) as int32, or None (symmetric)."""
        if self.zero_point is None:
            return None
        return unpack_rows(self.zero_point, self.scale.reshape(self.out_features, -1).shape[1])

    @property
    def weight(self) -> torch.Tensor:
        """The float weight of the function computed: decoded codes (minus zero points) times
        scales, times the input scale per column."""
        zeros = self.zero_points()
        if zeros is None:
            w = super().weight
        else:
            scales = self.scale.reshape(self.out_features, -1)
            w = dequantize_int4(self.codes, scales, zeros, self.in_features)
        return w if self.input_scale is None else w * self.input_scale

    @classmethod
    def from_float(cls, m: nn.Linear, codec: Codec, group_size: int = 0) -> PackedLinear:
        """Encode the weights of ``m``."""
        q = cls(m.in_features, m.out_features, codec, group_size, m.bias is not None)
        q.fill(m.weight, m.bias)
        return q

    @classmethod
    @torch.no_grad()
    def from_codes(
        cls,
        codes: torch.Tensor,
        scale: torch.Tensor,
        codec: Literal["int8", "int4"],
        group_size: int,
        bias: torch.Tensor | None,
        zero_point: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
    ) -> PackedLinear:
        """A layer holding integer ``codes`` shaped (out, in) chosen elsewhere (GPTQ, AWQ), with
        one ``scale`` per output row, or per row and group of ``group_size`` inputs.

        Without ``zero_point`` the codes are signed (-8..7 for int4); with it (int4 only, one
        per row and group, shaped like ``scale``) they are unsigned grid indices 0..15.
        ``input_scale`` (in,) multiplies the layer's input.
        """
        out_features, in_features = codes.shape
        q = cls(in_features, out_features, codec, group_size, bias is not None,
                zero_point is not None, input_scale is not None)  # fmt: skip
        # Unsigned grid indices 0..15 are stored exactly as signed codes shifted by 8.
        q.set_codes(codes if zero_point is None else codes.to(torch.int32) - 8, scale, bias)
        if zero_point is not None:
            assert q.zero_point is not None
            zeros = zero_point.reshape(out_features, -1).to(torch.int32)
            even = F.pad(zeros, (0, 2 * q.zero_point.shape[1] - zeros.shape[1]))
            q.zero_point.copy_(pack(even, 4).reshape(q.zero_point.shape))
        if input_scale is not None:
            assert q.input_scale is not None
            q.input_scale.copy_(input_scale)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float linear with the decoded weight; ``MatMulNBits`` when exported (see the module
        docstring)."""
        if torch.compiler.is_exporting() and self.nbits_b is not None:
            if self.input_scale is not None:
                x = x * self.input_scale.to(x.dtype)
            return matmul_nbits(
                x, self.nbits_b, self.nbits_scales, self.zero_point, self.bias,
                self.in_features, self.out_features, self.group_size,
            )  # fmt: skip
        return F.linear(x, self.weight.to(x.dtype), self.bias)


class PackedConv2d(_PackedWeight):
    """Conv2d or ConvTranspose2d with int8/int4/binary/ternary weight codes (dequantized on the
    fly); a transposed one has a scale per input channel (its weight's first dimension)."""

    def __init__(self, conv: dict[str, Any], codec: Codec, group_size: int, bias: bool) -> None:
        super().__init__()
        self.geometry = ConvGeometry.from_spec(conv)
        self.weight_shape = self.geometry.weight_shape
        self._init_storage(codec, group_size, bias, self.geometry.out_channels)

    def spec(self) -> dict[str, Any]:
        """JSON constructor arguments."""
        return {"conv": self.geometry.spec(), **self._spec()}

    @classmethod
    def from_float(
        cls, m: nn.Conv2d | nn.ConvTranspose2d, codec: Codec, group_size: int = 0
    ) -> PackedConv2d:
        """Encode the weights of ``m`` (numeric zero padding only)."""
        geometry = ConvGeometry.of(m)
        if not geometry.zero_padded:
            raise ValueError("only numeric zero padding")
        q = cls(geometry.spec(), codec, group_size, m.bias is not None)
        q.fill(m.weight, m.bias)
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float convolution with the decoded weight."""
        return self.geometry.conv2d(x, self.weight.to(x.dtype), self.bias)


class PackedEmbedding(_PackedWeight):
    """Embedding table of int8/int4 codes, one scale per row (or per group of a row)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None,
        codec: Codec,
        group_size: int,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.weight_shape = (num_embeddings, embedding_dim)
        self._init_storage(codec, group_size, False)

    def spec(self) -> dict[str, Any]:
        """JSON constructor arguments."""
        shape = {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim}
        return {**shape, "padding_idx": self.padding_idx, **self._spec()}

    def _spec(self) -> dict[str, Any]:
        return {"codec": self.codec, "group_size": self.group_size}

    @classmethod
    def from_float(cls, m: nn.Embedding, codec: Codec, group_size: int = 0) -> PackedEmbedding:
        """Encode the rows of ``m``."""
        q = cls(m.num_embeddings, m.embedding_dim, m.padding_idx, codec, group_size)
        q.fill(m.weight, None)
        return q

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Look the rows up in the decoded table."""
        return F.embedding(ids, self.weight, self.padding_idx)
