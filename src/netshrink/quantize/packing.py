"""Packing of low-bit integer codes into bytes: 8/bits codes per uint8, first code in low bits.

Codes are unsigned (``0 .. 2**bits - 1``); signed codes are offset by the caller
(:func:`to_unsigned`). The packed tensor is flat and padded with zero codes to a whole byte;
``unpack`` needs the code count back.
"""

from __future__ import annotations

import torch

from netshrink.errors import ConfigError

PACKABLE_BITS = (1, 2, 4)


def _check(bits: int) -> int:
    if bits not in PACKABLE_BITS:
        raise ConfigError(f"packing supports {PACKABLE_BITS} bits per code, got {bits}")
    return 8 // bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ``bits``-bit codes into a flat uint8 tensor of ceil(n * bits / 8) bytes."""
    per_byte = _check(bits)
    flat = codes.flatten().to(torch.int32)
    if flat.numel() and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes must lie in 0..{2**bits - 1} to pack into {bits} bits")
    pad = (-flat.numel()) % per_byte
    flat = torch.cat([flat, flat.new_zeros(pad)]).reshape(-1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=flat.device) * bits
    return (flat << shifts).sum(dim=1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack`: the first ``numel`` codes, as a flat uint8 tensor."""
    per_byte = _check(bits)
    # division and remainder rather than >> and &: the ONNX exporter has no bit-shift
    # translation, and on non-negative integers the two agree exactly
    place = 2 ** (torch.arange(per_byte, dtype=torch.int32, device=packed.device) * bits)
    codes = torch.remainder(torch.div(packed.to(torch.int32).unsqueeze(1), place,
                                      rounding_mode="floor"), 2**bits)  # fmt: skip
    return codes.flatten()[:numel].to(torch.uint8)


def to_unsigned(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Offset signed codes in ``-(2**(bits-1)) .. 2**(bits-1) - 1`` to unsigned ones."""
    return q.to(torch.int32) + 2 ** (bits - 1)


def to_signed(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`to_unsigned`, as int8."""
    return (u.to(torch.int32) - 2 ** (bits - 1)).to(torch.int8)
