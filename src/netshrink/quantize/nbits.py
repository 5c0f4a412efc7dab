"""ONNX Runtime's ``com.microsoft::MatMulNBits``: the op that int4
:class:`~netshrink.quantize.packed.PackedLinear` layers export to, its torch reference kernel
and its ONNX translation.

``B`` holds ``N`` rows of ``K / block_size`` blocks of packed 4-bit codes (two a byte, the first
in the low nibble), ``scales`` one float per row and block, ``zero_points`` (optional) one 4-bit
zero point per row and block packed row by row; the weight is ``(code - zero) * scale``, with
zero 8 when no zero points are given.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from netshrink.layers import onnx_translation
from netshrink.quantize.packing import unpack


def _matmul_nbits_impl(
    x: torch.Tensor,
    b: torch.Tensor,
    scales: torch.Tensor,
    zero_points: torch.Tensor | None,
    bias: torch.Tensor | None,
    k: int,
    n: int,
    block_size: int,
) -> torch.Tensor:
    """``x @ W^T + bias`` for the 4-bit weight ``W`` (n, k) that MatMulNBits' inputs describe:
    ``b`` (n, k / block_size, block_size / 2) packed codes, ``scales`` (n, k / block_size),
    ``zero_points`` packed (n, ceil(blocks / 2)) or None (8, the op's default)."""
    if zero_points is None:
        zeros = torch.full(scales.shape, 8, dtype=torch.int32, device=x.device)
    else:
        zeros = unpack_rows(zero_points, scales.shape[1])
    return F.linear(x, dequantize_int4(b, scales, zeros, k).to(x.dtype), bias)


def unpack_rows(packed: torch.Tensor, width: int) -> torch.Tensor:
    """int32 (rows, width) of 4-bit codes packed row by row (each row padded to whole bytes)."""
    rows, per_row = packed.shape[0], 2 * packed.shape[1]
    return unpack(packed.flatten(), 4, rows * per_row).reshape(rows, per_row)[:, :width].int()


def dequantize_int4(
    packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, cols: int
) -> torch.Tensor:
    """Float32 (rows, cols) weight ``(code - zero) * scale`` of packed 4-bit codes whose rows
    split into equal groups, with ``scales`` and integer ``zeros`` shaped (rows, groups)."""
    rows, groups = scales.shape
    codes = unpack(packed.flatten(), 4, rows * cols).reshape(rows, groups, -1)
    w = (codes.to(torch.int32) - zeros.unsqueeze(2)).to(torch.float32) * scales.unsqueeze(2)
    return w.reshape(rows, -1)


# One op that the exporter writes as MatMulNBits; eager code never calls it
# (``PackedLinear.forward`` decodes the weight itself), so its own kernel is only the reference
# the tests compare with.
matmul_nbits = torch.library.custom_op("netshrink::matmul_nbits", mutates_args=())(
    _matmul_nbits_impl
)


@matmul_nbits.register_fake
def _(x, b, scales, zero_points, bias, k, n, block_size):  # type: ignore[no-untyped-def]
    return x.new_empty((*x.shape[:-1], n))


ACCURACY_LEVEL = 0
"""MatMulNBits' ``accuracy_level``: 0 computes in the input's float type (outputs match torch
to float rounding); 4 lets ONNX Runtime quantize the input to int8 per block and use its
int8 x int4 kernels (faster, a second rounding; docs/benchmarks/quantize.md measures both)."""


def _matmul_nbits_schema() -> Any:
    """The ONNX schema of ``com.microsoft::MatMulNBits`` (onnx itself does not register
    onnxruntime's contrib ops; onnxscript needs a schema to emit a node)."""
    from onnx.defs import OpSchema

    param, attr, optional = (
        OpSchema.FormalParameter,
        OpSchema.Attribute,
        OpSchema.FormalParameterOption.Optional,
    )
    types = [
        ("T1", ["tensor(float)", "tensor(float16)"], "input, scales, bias and output"),
        ("T2", ["tensor(uint8)"], "packed codes"),
        ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], "zero points"),
        ("T4", ["tensor(int32)"], "group index (deprecated)"),
    ]
    inputs = [param("A", "T1"), param("B", "T2"), param("scales", "T1"),
              param("zero_points", "T3", param_option=optional),
              param("g_idx", "T4", param_option=optional),
              param("bias", "T1", param_option=optional)]  # fmt: skip
    names = ("K", "N", "bits", "block_size", "accuracy_level")
    return OpSchema(
        "MatMulNBits", "com.microsoft", 1, inputs=inputs, outputs=[param("Y", "T1")],
        type_constraints=types, attributes=[attr(n, OpSchema.AttrType.INT, n) for n in names],
    )  # fmt: skip


@onnx_translation(torch.ops.netshrink.matmul_nbits.default)
def _matmul_nbits_onnx(
    x: Any, b: Any, scales: Any, zero_points: Any, bias: Any, k: int, n: int, block_size: int
) -> Any:
    """ONNX for ``netshrink::matmul_nbits``: one ``com.microsoft::MatMulNBits`` node, 4 bits."""
    from onnxscript.values import Op, Opset

    node = Op(Opset("com.microsoft", 1), "MatMulNBits", _matmul_nbits_schema())
    return node(
        x, b, scales, zero_points, None, bias,
        K=k, N=n, bits=4, block_size=block_size, accuracy_level=ACCURACY_LEVEL,
    )  # fmt: skip
