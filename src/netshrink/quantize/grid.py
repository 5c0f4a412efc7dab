"""The integer grids GPTQ rounds weights onto, and the search for each group's range on them.

Three b-bit grids (``q`` the code, ``x_hat = (q - zero) * scale``):

- ``narrow`` symmetric: codes -(2^(b-1) - 1) .. 2^(b-1) - 1, zero 0, scale max|w| / qmax
  (:func:`netshrink.quantize.affine.qrange`; what ``quantize.weight_only`` stores);
- ``full`` symmetric: codes -2^(b-1) .. 2^(b-1) - 1, zero 0, the extra negative level used: the
  scale is the smallest that keeps both ends, max(lo / qmin, hi / qmax), so a group whose
  largest magnitude is negative gets a grid finer by 2^(b-1) / (2^(b-1) - 1) (8/7 at 4 bits);
- ``asymmetric``: codes 0 .. 2^b - 1 with an integer zero point per group (Jacob et al. 2018).

:func:`search_range` chooses each group's range by the rounding error it causes, weighted by
how much each input's error costs at the layer's output (diag of GPTQ's Hessian): the MSE grid
search of the GPTQ reference code's quantizer and of llm-compressor's "mse" observer, here
weighted. Clipping a few large weights buys a finer grid for all the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from netshrink.quantize.affine import choose_qparams, qrange, quantize

_TINY = torch.finfo(torch.float32).tiny

SHRINK = torch.linspace(1.0, 0.5, 21)
"""Range shrink factors :func:`search_range` tries (1: the full min-max range)."""


@dataclass(frozen=True)
class Grid:
    """A ``bits``-bit weight grid: symmetric narrow or ``full``, or asymmetric with zero points."""

    bits: int
    symmetric: bool = True
    full: bool = False
    """Symmetric grids only: also use the code -2^(bits-1)."""

    @property
    def qrange(self) -> tuple[int, int]:
        """The smallest and largest code."""
        if self.symmetric and self.full:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return qrange(self.bits, self.symmetric)

    def params(self, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(scale, zero)`` (float32, int32) for the float ranges ``[lo, hi]`` (widened to hold
        0, so that zero stays exact)."""
        if not (self.symmetric and self.full):
            return choose_qparams(lo, hi, self.bits, self.symmetric)
        qmin, qmax = self.qrange
        lo, hi = lo.float().clamp_max(0), hi.float().clamp_min(0)
        scale = torch.maximum(lo / qmin, hi / qmax)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale)).clamp_min(_TINY)
        return scale, torch.zeros_like(scale, dtype=torch.int32)

    def codes(self, x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Grid indices (int32) of ``x``; ``scale`` and ``zero`` broadcast against it."""
        return quantize(x, scale, zero, *self.qrange)


def search_range(
    values: torch.Tensor, importance: torch.Tensor, grid: Grid
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row ``(scale, zero)`` for ``values`` (rows, cols): the min-max range shrunk by the
    factor of :data:`SHRINK` that minimizes sum_j h_j (w_j - x_hat_j)^2, with ``importance``
    h (cols,) = diag(H), the output error each input's weight error causes alone."""
    lo, hi = values.amin(1), values.amax(1)
    best = torch.full_like(lo, float("inf"))
    scale, zero = grid.params(lo, hi)
    for shrink in SHRINK.tolist():
        s, z = grid.params(lo * shrink, hi * shrink)
        q = grid.codes(values, s.unsqueeze(1), z.unsqueeze(1))
        err = ((values - (q - z.unsqueeze(1)) * s.unsqueeze(1)).square() * importance).sum(1)
        better = err < best
        best, scale, zero = (
            torch.where(better, err, best),
            torch.where(better, s, scale),
            torch.where(better, z, zero),
        )
    return scale, zero
