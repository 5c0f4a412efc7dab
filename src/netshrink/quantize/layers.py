"""Statically quantized layers: integer weights and frozen activation scales.

Each layer keeps what an integer kernel needs in its state dict — int8 weight codes (int4
codes packed two per byte), one float32 scale per output channel, an int32 bias in units of
``input_scale * weight_scale`` and the uint8 scale/zero point of its input (and of its output
when that output joins a residual addition, or the int8 scale of its output when it feeds
attention's matmuls: see :mod:`netshrink.quantize.static_attention`). The forward pass
*simulates* the integer kernel in float (fake quantization: quantize, dequantize, float conv); it
is exact up to float rounding against an integer implementation. Exported to ONNX, the same ops
become QuantizeLinear / DequantizeLinear pairs that ONNX Runtime fuses into QLinearConv / QGemm /
QLinearAdd.

A :class:`QuantLinear` may also keep a per-input-channel smoothing vector s (SmoothQuant, Xiao
et al. 2022, sec. 4, where s cannot be folded into the op before it): it quantizes x / s and
holds the codes of W s, so x W^T is unchanged while the activation's outlier channels shrink.
The division exports as one Mul by 1 / s before QuantizeLinear.
:class:`~netshrink.quantize.smoothed.SmoothedLinear` is the float layer ``quantize.smoothquant``
leaves for ``quantize.static`` to turn into that form.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed ops
from torch import nn

from netshrink.cpu import SATURATING_INT8
from netshrink.layers import CompressedLayer, ConvGeometry, rebuildable
from netshrink.quantize.affine import Granularity, qrange, quantize_weight
from netshrink.quantize.packing import pack, to_signed, to_unsigned, unpack
from netshrink.quantize.smoothed import SmoothedLinear

_QD = torch.ops.quantized_decomposed
_INT32 = (-(2**31), 2**31 - 1)


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    frozen: tuple[float, int] | None = None,
    qmax: int = 255,
    signed: bool = False,
) -> torch.Tensor:
    """Quantize ``x`` to unsigned codes in [0, qmax] and back (``signed``: int8 codes in
    [-(qmax + 1) / 2, qmax / 2] with the zero point 0).

    Activations are asymmetric uint8 (what ONNX Runtime's x86 kernels expect); ``qmax`` below 255
    keeps fewer codes of the same container (4-bit activations: 15). With ``frozen`` (the same
    scale and zero point as Python numbers) and no gradient needed, the decomposed
    quantize/dequantize ops run: they export with dynamic shapes to ONNX QuantizeLinear +
    DequantizeLinear, which the autograd-friendly ``fake_quantize_per_tensor_affine`` (used for
    training) does not.
    """
    lo, hi, dtype = (-(qmax + 1) // 2, qmax // 2, torch.int8) if signed else (0, qmax, torch.uint8)
    if frozen is None or (torch.is_grad_enabled() and x.requires_grad):
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, lo, hi)
    s, z = frozen
    q = _QD.quantize_per_tensor(x, s, z, lo, hi, dtype)
    return _QD.dequantize_per_tensor(q, s, z, lo, hi, dtype)


class _FrozenQParams(nn.Module):
    """Keeps Python copies of per-tensor qparams buffers, refreshed whenever they are loaded."""

    _frozen: dict[str, tuple[float, int]]

    def _track(self, *prefixes: str) -> None:
        self._prefixes = prefixes
        self._frozen = {}
        self.register_load_state_dict_post_hook(lambda m, _keys: m.freeze())

    def freeze(self) -> None:
        """Copy the scale/zero-point buffers into Python numbers (after they changed)."""
        for p in self._prefixes:
            scale, zero_point = getattr(self, f"{p}scale"), getattr(self, f"{p}zero_point")
            self._frozen[p] = (float(scale), int(zero_point))


class _QuantWeights(_FrozenQParams, CompressedLayer):
    """Shared storage and dequantization of integer weights, integer bias and input qparams."""

    weight_shape: tuple[int, ...]

    def _init_storage(
        self,
        bits: int,
        bias: bool,
        quant_output: bool,
        act_bits: int,
        smooth: bool = False,
        signed_output: bool = False,
    ) -> None:
        self.bits, self.has_bias, self.quant_output = bits, bias, quant_output
        self.act_bits, self.smoothed = act_bits, smooth
        self.signed_output = quant_output and signed_output
        # codes live in the smallest packable container: 2, 4 or 8 bits
        self.storage_bits = next(b for b in (2, 4, 8) if bits <= b)
        out_channels, numel = self.weight_shape[0], math.prod(self.weight_shape)
        if self.storage_bits == 8:
            self.register_buffer("weight_q", torch.zeros(self.weight_shape, dtype=torch.int8))
        else:
            self.register_buffer(
                "weight_packed", torch.zeros(-(-numel * self.storage_bits // 8), dtype=torch.uint8)
            )
        self.register_buffer("weight_scale", torch.ones(out_channels))
        if bias:
            self.register_buffer("bias_q", torch.zeros(out_channels, dtype=torch.int32))
        self.register_buffer("input_scale", torch.tensor(1.0))
        self.register_buffer("input_zero_point", torch.tensor(0, dtype=torch.int32))
        if smooth:  # 1 / s per input channel: the input is multiplied by it, then quantized
            self.register_buffer("input_smooth", torch.ones(self.weight_shape[1]))
        if quant_output:
            self.register_buffer("output_scale", torch.tensor(1.0))
            self.register_buffer("output_zero_point", torch.tensor(0, dtype=torch.int32))
        self._track("input_", *(("output_",) if quant_output else ()))
        self.freeze()

    @torch.no_grad()
    def _fill(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        per_channel: bool,
        input_qparams: tuple[torch.Tensor, torch.Tensor],
        output_qparams: tuple[torch.Tensor, torch.Tensor] | None,
        weight_scale: torch.Tensor | None = None,
        smooth: torch.Tensor | None = None,
    ) -> None:
        if smooth is not None:  # the kernel sees x / s; ``weight`` is W s already
            self.input_smooth.copy_(1 / smooth)
        if weight_scale is None:
            q, scale, _ = quantize_weight(weight, self.bits, True, Granularity(per_channel))
        else:  # a scale learned by QAT: codes on exactly the grid training saw
            lo, hi = qrange(self.bits, True)
            scale = weight_scale.reshape(-1, *([1] * (weight.dim() - 1)))
            q = torch.clamp(torch.round(weight / scale), lo, hi).to(torch.int32)
        scale = scale.reshape(-1).expand(weight.shape[0]).contiguous()
        if self.storage_bits == 8:
            self.weight_q.copy_(q.to(torch.int8))
        else:
            self.weight_packed.copy_(pack(to_unsigned(q, self.storage_bits), self.storage_bits))
        self.weight_scale.copy_(scale)
        self.input_scale.copy_(input_qparams[0])
        self.input_zero_point.copy_(input_qparams[1])
        if bias is not None:
            codes = torch.round(bias / (scale * self.input_scale)).clamp(*_INT32)
            self.bias_q.copy_(codes.to(torch.int32))
        if output_qparams is not None:
            self.output_scale.copy_(output_qparams[0])
            self.output_zero_point.copy_(output_qparams[1])
        self.freeze()

    def _storage_spec(self) -> dict[str, Any]:
        """The constructor arguments every quantized conv/linear shares."""
        return {
            "bias": self.has_bias,
            "bits": self.bits,
            "quant_output": self.quant_output,
            "act_bits": self.act_bits,
            **({"smooth": True} if self.smoothed else {}),
            **({"signed_output": True} if self.signed_output else {}),
        }

    @classmethod
    def empty_like(
        cls, mod: Any, bits: int, quant_output: bool, act_bits: int, signed_output: bool = False
    ) -> Any:
        """An unfilled quantized layer shaped like the float layer ``mod`` (``signed_output``:
        its output on int8 codes with the zero point 0 rather than on uint8)."""
        raise NotImplementedError

    @classmethod
    def from_float(
        cls,
        mod: Any,
        bits: int,
        per_channel: bool,
        inp: Any,
        out: Any,
        wscale: Any = None,
        act_bits: int = 8,
        signed_output: bool = False,
    ) -> Any:
        """Quantize the conv/linear ``mod`` with input qparams ``inp``, output qparams ``out``
        (or None; symmetric int8 ones with ``signed_output``), optionally given per-channel
        weight scales ``wscale`` (from QAT), activation codes on ``act_bits`` bits. A
        :class:`SmoothedLinear` keeps its smoothing vector; ``inp`` is then the range of its
        smoothed input x / s."""
        q = cls.empty_like(mod, bits, out is not None, act_bits, signed_output)
        if isinstance(mod, SmoothedLinear):
            q._fill(mod.scaled_weight, mod.bias, per_channel, inp, out, wscale, mod.smooth)
        else:
            q._fill(mod.weight, mod.bias, per_channel, inp, out, wscale)
        return q

    def weight_codes(self) -> torch.Tensor:
        """Integer weight codes as int8, shaped like the float weight."""
        if self.storage_bits == 8:
            return self.weight_q
        flat = unpack(self.weight_packed, self.storage_bits, math.prod(self.weight_shape))
        flat = to_signed(flat, self.storage_bits)
        return flat.reshape(self.weight_shape)

    def dequantized(self, transposed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Float weight and bias as the integer kernel sees them (W s when smoothed); with
        ``transposed`` the weight of a Linear is (in, out), dequantized from transposed codes."""
        lo, hi = qrange(self.bits, True)
        codes, axis = (self.weight_codes().t(), 1) if transposed else (self.weight_codes(), 0)
        w = _QD.dequantize_per_channel(codes, self.weight_scale, None, axis, lo, hi, torch.int8)
        if not self.has_bias:
            return w, None
        b = _QD.dequantize_per_channel(
            self.bias_q, self.weight_scale * self.input_scale, None, 0, *_INT32, torch.int32
        )
        return w, b

    @property
    def weight(self) -> torch.Tensor:
        """The float weight the layer computes with (dequantized on access; W s / s when
        smoothed, so ``x @ weight.T`` is the layer's product on the unsmoothed input)."""
        w = self.dequantized()[0]
        return w * self.input_smooth if self.smoothed else w

    @property
    def bias(self) -> torch.Tensor | None:
        """The float bias the int32 codes stand for, or None."""
        return self.dequantized()[1] if self.has_bias else None

    def weight_bits(self) -> int:
        """Bits of one weight code."""
        return self.bits

    def netshrink_openvino(self) -> nn.Module:
        """This layer as OpenVINO's CPU plugin computes it without overflow: itself, or, on a
        CPU whose int8 kernels saturate (:data:`netshrink.cpu.SATURATING_INT8`) and for 8-bit
        weights meeting 8-bit (u8) inputs, a copy with 7-bit weights (codes halved, scale
        doubled). OpenVINO runs only 8-bit activations on integer kernels, so the weights give
        the bit, as NNCF's ``OverflowFix`` does; the result is off by at most half a weight
        step of the original grid, where the saturated sums were off by whole products."""
        if not (SATURATING_INT8 and self.bits == 8 and self.act_bits == 8):
            return self
        bias = self.bias
        layer = copy.deepcopy(self)
        layer.weight_q.copy_(torch.round(self.weight_q / 2).to(torch.int8))
        layer.weight_scale.mul_(2)
        if bias is not None:
            codes = torch.round(bias / (layer.weight_scale * layer.input_scale)).clamp(*_INT32)
            layer.bias_q.copy_(codes.to(torch.int32))
        return layer

    def _around(self, x: torch.Tensor, op: Any) -> torch.Tensor:
        """``op(x quantized)`` with the output quantized too when it joins a residual."""
        qmax = 2**self.act_bits - 1
        if self.smoothed:
            x = x * self.input_smooth
        x = fake_quant(x, self.input_scale, self.input_zero_point, self._frozen["input_"], qmax)
        y = op(x)
        if self.quant_output:
            out = self.output_scale, self.output_zero_point, self._frozen["output_"]
            y = fake_quant(y, *out, 255 if self.signed_output else qmax, self.signed_output)
        return y


class QuantConv2d(_QuantWeights):
    """Conv2d with int8 (or packed int4) weights, int32 bias and uint8 input quantization."""

    def __init__(
        self,
        conv: dict[str, Any],
        bias: bool,
        bits: int = 8,
        quant_output: bool = False,
        act_bits: int = 8,
        signed_output: bool = False,
    ) -> None:
        super().__init__()
        self.geometry = ConvGeometry.from_spec(conv)
        self.weight_shape = self.geometry.weight_shape
        self._init_storage(bits, bias, quant_output, act_bits, signed_output=signed_output)

    def spec(self) -> dict[str, Any]:
        """JSON constructor arguments."""
        return {"conv": self.geometry.spec(), **self._storage_spec()}

    @classmethod
    def empty_like(
        cls,
        conv: nn.Conv2d,
        bits: int,
        quant_output: bool,
        act_bits: int,
        signed_output: bool = False,
    ) -> QuantConv2d:
        """An unfilled layer shaped like ``conv``."""
        geometry = ConvGeometry.of(conv)
        if not geometry.zero_padded:
            raise ValueError("only numeric zero padding")
        spec = geometry.spec()
        return cls(spec, conv.bias is not None, bits, quant_output, act_bits, signed_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Simulated integer convolution (see the module docstring)."""
        return self._around(x, lambda xq: self.geometry.conv2d(xq, *self.dequantized()))


class QuantLinear(_QuantWeights):
    """Linear with int8 (or packed int4) weights, int32 bias and uint8 input quantization."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        bits: int = 8,
        quant_output: bool = False,
        act_bits: int = 8,
        smooth: bool = False,
        signed_output: bool = False,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_shape = (out_features, in_features)
        self._init_storage(bits, bias, quant_output, act_bits, smooth, signed_output)

    def spec(self) -> dict[str, Any]:
        """JSON constructor arguments."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            **self._storage_spec(),
        }

    @classmethod
    def empty_like(
        cls,
        linear: nn.Linear | SmoothedLinear,
        bits: int,
        quant_output: bool,
        act_bits: int,
        signed_output: bool = False,
    ) -> QuantLinear:
        """An unfilled layer shaped like ``linear``."""
        return cls(
            linear.in_features, linear.out_features, linear.bias is not None, bits,
            quant_output, act_bits, isinstance(linear, SmoothedLinear), signed_output,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Simulated integer matrix multiply (see the module docstring)."""
        return self._around(x, self._matmul)

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        # x @ DQ(codes^T) rather than linear(x, DQ(codes)): the exported weight
        # DequantizeLinear then feeds MatMul directly (the transpose folds into the int8
        # initializer), the pattern ONNX Runtime fuses into an integer matmul; a Transpose
        # between them blocks the fusion.
        w, b = self.dequantized(transposed=True)
        y = torch.matmul(x, w)
        return y if b is None else y + b


@rebuildable
class QuantReLU(_FrozenQParams):
    """ReLU whose output is quantized to ``act_bits`` unsigned codes with a frozen scale."""

    def __init__(self, act_bits: int = 8) -> None:
        super().__init__()
        self.act_bits = act_bits
        self.register_buffer("scale", torch.tensor(1.0))
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32))
        self._track("")
        self.freeze()

    @torch.no_grad()
    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Set the output scale and zero point."""
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        self.freeze()

    def spec(self) -> dict[str, Any]:
        """JSON constructor arguments."""
        return {"act_bits": self.act_bits}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> QuantReLU:
        """Empty layer; scale and zero point come from the state dict."""
        return cls(**spec)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """relu then fake quantization; ONNX Runtime folds the ReLU into the quantization."""
        qmax = 2**self.act_bits - 1
        return fake_quant(torch.relu(x), self.scale, self.zero_point, self._frozen[""], qmax)
