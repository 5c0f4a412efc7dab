"""Affine quantization arithmetic: ranges, scales, zero points, quantize and dequantize.

For a b-bit integer range [qmin, qmax] and a float range [lo, hi] that contains 0 (Jacob et al.
2018, "Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", Sec. 2.1):

    scale = (hi - lo) / (qmax - qmin);  zero_point = round(qmin - lo / scale)
    q = clamp(round(x / scale) + zero_point, qmin, qmax);  x_hat = (q - zero_point) * scale

Symmetric quantization uses the signed "narrow" range [-(2^(b-1) - 1), 2^(b-1) - 1] with
zero_point 0, so that -x quantizes to -q. Granularity: one (scale, zero_point) per tensor, per
output channel (axis 0 of a weight) or per group of ``group_size`` consecutive input elements.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from netshrink.errors import ConfigError

_TINY = torch.finfo(torch.float32).tiny  # smallest normal float32: a scale never goes below it


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range of ``bits``-bit codes: signed narrow when symmetric, else unsigned."""
    if not 1 <= bits <= 16:
        raise ConfigError(f"bits must be in 1..16, got {bits}")
    if symmetric:
        if bits == 1:
            raise ConfigError("1-bit weights are binary, not affine: use quantize.binary")
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def choose_qparams(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(scale, zero_point)`` (float32, int32) for the float range ``[lo, hi]``.

    The range is widened to contain 0 so that zero (padding, ReLU outputs) is exact. A range of
    width zero (a constant-zero tensor) gets scale 1 instead of dividing by zero; scales never
    fall below the smallest normal float32.
    """
    qmin, qmax = qrange(bits, symmetric)
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    if symmetric:
        scale = torch.maximum(-lo, hi) / qmax
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp_min(_TINY)
    if not symmetric:
        zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int
) -> torch.Tensor:
    """Integer codes (as int32) of ``x``; ``scale``/``zero_point`` broadcast against ``x``."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).to(torch.int32)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Float32 values ``(q - zero_point) * scale`` of integer codes ``q``."""
    return (q.to(torch.int32) - zero_point).to(torch.float32) * scale


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` whose gradient is the identity (straight-through estimator, Bengio 2013)."""
    return x + (torch.round(x) - x).detach()


@dataclass(frozen=True)
class Granularity:
    """Which elements share a scale: the whole tensor, each output channel, or input groups."""

    per_channel: bool = True
    group_size: int = 0  # > 0: groups of this many consecutive elements along the last axis

    def reduce_shape(self, x: torch.Tensor) -> torch.Tensor:
        """View ``x`` as ``(rows, elements)``: each row shares one scale."""
        if self.group_size > 0:
            if x.shape[-1] % self.group_size:
                raise ConfigError(
                    f"group_size {self.group_size} does not divide the last dimension "
                    f"{x.shape[-1]} of a {tuple(x.shape)} weight; pick a divisor"
                )
            return x.reshape(-1, self.group_size)
        if self.per_channel and x.dim() > 1:
            return x.reshape(x.shape[0], -1)
        return x.reshape(1, -1)

    def param_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        """Shape that scales take so that they broadcast against ``x``."""
        if self.group_size > 0:
            return (*x.shape[:-1], x.shape[-1] // self.group_size, 1)
        if self.per_channel and x.dim() > 1:
            return (x.shape[0],) + (1,) * (x.dim() - 1)
        return ()


def quantize_weight(
    w: torch.Tensor, bits: int, symmetric: bool = True, granularity: Granularity | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a weight with min-max ranges; return ``(codes int32, scale, zero_point)``.

    ``scale`` and ``zero_point`` have :meth:`Granularity.param_shape`; for grouped weights the
    codes are shaped ``(*w.shape[:-1], groups, group_size)``.
    """
    g = granularity or Granularity()
    rows = g.reduce_shape(w.detach())
    scale, zero_point = choose_qparams(rows.amin(1), rows.amax(1), bits, symmetric)
    shape = g.param_shape(w)
    scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    qmin, qmax = qrange(bits, symmetric)
    src = w.detach().reshape(*w.shape[:-1], -1, g.group_size) if g.group_size > 0 else w.detach()
    return quantize(src, scale, zero_point, qmin, qmax), scale, zero_point


def fake_quantize_weight(
    w: torch.Tensor, bits: int, symmetric: bool = True, granularity: Granularity | None = None
) -> torch.Tensor:
    """``dequantize(quantize(w))`` with the shape of ``w`` (no gradient: for PTQ)."""
    q, scale, zero_point = quantize_weight(w, bits, symmetric, granularity)
    return dequantize(q, scale, zero_point).reshape(w.shape)
