"""Observers: they watch the values a tensor takes during calibration and choose its range.

Every observer has ``update(x)`` (called once per calibration batch) and ``range()`` returning
``(lo, hi)`` as float tensors. ``minmax`` and ``moving_average`` keep running statistics; the
others keep a seeded random sample of the values (at most ``max_samples``) and choose the range
that is best for that sample:

- ``percentile``: the ``percentile``-th and ``(100 - percentile)``-th percentiles, which clip
  rare outliers (McKinstry et al. 2019, "Discovering Low-Precision Networks Close to
  Full-Precision Networks for Efficient Inference", Sec. 3).
- ``mse``: the clipping range, among shrunken min-max ranges, whose quantize-dequantize error
  has the least mean square (Banner et al. 2019, "Post-training 4-bit quantization", Sec. 3).
- ``entropy``: the threshold minimizing the KL divergence between the histogram of the values
  and its quantized version (Migacz 2017, "8-bit Inference with TensorRT", slides 29-36).
"""

from __future__ import annotations

from typing import Literal

import torch

from netshrink.errors import DataError
from netshrink.quantize.affine import choose_qparams, dequantize, qrange, quantize

ObserverName = Literal["minmax", "moving_average", "percentile", "mse", "entropy"]


class Observer:
    """Base class: running min and max over every value seen."""

    def __init__(self, name: str = "tensor") -> None:
        self.name = name
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Record the values of one calibration batch ``x``."""
        x = x.detach().float()
        if not torch.isfinite(x).all():
            raise DataError(f"calibration produced NaN or Inf at {self.name}; check the data")
        lo, hi = x.amin(), x.amax()
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float range ``(lo, hi)`` to quantize to."""
        if self.lo is None or self.hi is None:
            raise DataError(f"{self.name} saw no calibration data; was it reached by forward?")
        return self.lo, self.hi


class MovingAverageObserver(Observer):
    """Exponential moving average of each batch's min and max (weight ``momentum``)."""

    def __init__(self, name: str = "tensor", momentum: float = 0.1) -> None:
        super().__init__(name)
        self.momentum = momentum

    def update(self, x: torch.Tensor) -> None:
        """Blend this batch's min and max into the running averages."""
        prev = (self.lo, self.hi)
        self.lo = self.hi = None
        super().update(x)
        if prev[0] is not None and prev[1] is not None:
            assert self.lo is not None and self.hi is not None
            self.lo = prev[0] + self.momentum * (self.lo - prev[0])
            self.hi = prev[1] + self.momentum * (self.hi - prev[1])


class SampleObserver(Observer):
    """Keeps a seeded random sample of the values; subclasses pick the range from it."""

    def __init__(self, name: str = "tensor", max_samples: int = 1 << 18, seed: int = 0) -> None:
        super().__init__(name)
        self.max_samples = max_samples
        self.generator = torch.Generator().manual_seed(seed)
        self.samples: list[torch.Tensor] = []

    def update(self, x: torch.Tensor) -> None:
        """Track min/max and keep up to ``max_samples`` values of ``x``."""
        super().update(x)
        flat = x.detach().float().flatten()
        if flat.numel() > self.max_samples:
            idx = torch.randint(flat.numel(), (self.max_samples,), generator=self.generator)
            flat = flat[idx]
        self.samples.append(flat)
        total = sum(s.numel() for s in self.samples)
        if total > 2 * self.max_samples:  # thin out evenly so memory stays bounded
            merged = torch.cat(self.samples)
            idx = torch.randperm(merged.numel(), generator=self.generator)[: self.max_samples]
            self.samples = [merged[idx]]

    def values(self) -> torch.Tensor:
        """Every kept sample, as one flat tensor."""
        super().range()
        return torch.cat(self.samples)


class PercentileObserver(SampleObserver):
    """Range between the ``100 - percentile`` and ``percentile`` percentiles of the values."""

    def __init__(self, name: str = "tensor", percentile: float = 99.99, **kw: int) -> None:
        super().__init__(name, **kw)
        self.percentile = percentile

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Percentile range of the samples."""
        v = self.values()
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100])
        lo, hi = torch.quantile(v, q)
        return lo, hi


class MSEObserver(SampleObserver):
    """Shrinks the min-max range by the factor (of ``steps``) with the least quantization MSE."""

    def __init__(self, name: str = "tensor", bits: int = 8, steps: int = 40, **kw: int) -> None:
        super().__init__(name, **kw)
        self.bits, self.steps = bits, steps

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The shrunken range with the least mean square error on the samples.

        The two ends are searched one after the other (upper, then lower), so that an outlier
        on one side does not force clipping the other. The error is computed on a 2048-bin
        histogram of the samples (bin centres weighted by counts), which keeps it fast.
        """
        lo, hi = super().range()
        hist = torch.histc(self.values(), bins=2048, min=float(lo), max=float(hi))
        edges = torch.linspace(float(lo), float(hi), 2049)
        centres = (edges[1:] + edges[:-1]) / 2
        centres, counts = centres[hist > 0], hist[hist > 0]
        alphas = torch.linspace(1.0, 0.05, self.steps)
        hi = min((hi * a for a in alphas), key=lambda h: self._error(centres, counts, lo, h))
        lo = min((lo * a for a in alphas), key=lambda lo_: self._error(centres, counts, lo_, hi))
        return lo, hi

    def _error(self, v: torch.Tensor, w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> float:
        qmin, qmax = qrange(self.bits, False)
        scale, zp = choose_qparams(lo, hi, self.bits, False)
        x_hat = dequantize(quantize(v, scale, zp, qmin, qmax), scale, zp)
        return float((w * (x_hat - v) ** 2).sum() / w.sum())


class EntropyObserver(SampleObserver):
    """Clipping threshold on |x| that minimizes KL(P || Q) of 2048-bin histograms (TensorRT)."""

    def __init__(self, name: str = "tensor", bits: int = 8, bins: int = 2048, **kw: int) -> None:
        super().__init__(name, **kw)
        self.bits, self.bins = bits, bins

    def range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Range clipped at the KL-optimal threshold.

        Exact zeros (ReLU outputs, padding) are left out of the histogram: zero is represented
        exactly whatever the threshold, and a pile of zeros in the first bin would otherwise
        pull the threshold far down.
        """
        lo, hi = super().range()
        v = self.values().abs()
        v = v[v > 0]
        if v.numel() == 0:
            return lo, hi
        top = float(v.max())
        hist = torch.histc(v, bins=self.bins, min=0.0, max=top).double()
        levels = 2 ** (self.bits - 1)
        best_i, best_kl = self.bins, float("inf")
        for i in range(levels, self.bins + 1, max(1, (self.bins - levels) // 64)):
            p = hist[:i].clone()
            p[-1] += hist[i:].sum()  # outliers are clipped into the last bin
            # Q: the unclipped bins merged into `levels` quantization bins and spread back over
            # the non-empty ones; the clipped mass in P's last bin is what Q cannot explain
            h = hist[:i]
            chunk = torch.arange(i) * levels // i
            sums = torch.zeros(levels, dtype=h.dtype).index_add_(0, chunk, h)
            filled = torch.zeros(levels, dtype=h.dtype).index_add_(0, chunk, (h > 0).double())
            q = torch.where(h > 0, sums[chunk] / filled[chunk].clamp_min(1), torch.zeros_like(h))
            p, q = p / p.sum(), q / q.sum()
            mask = p > 0
            kl = float((p[mask] * torch.log(p[mask] / q[mask].clamp_min(1e-12))).sum())
            if kl < best_kl:
                best_i, best_kl = i, kl
        threshold = torch.tensor(top * best_i / self.bins)
        return torch.maximum(lo, -threshold), torch.minimum(hi, threshold)


def make_observer(kind: ObserverName, name: str, bits: int = 8, seed: int = 0) -> Observer:
    """Build the observer called ``kind`` for the tensor called ``name``."""
    if kind == "minmax":
        return Observer(name)
    if kind == "moving_average":
        return MovingAverageObserver(name)
    if kind == "percentile":
        return PercentileObserver(name, seed=seed)
    if kind == "mse":
        return MSEObserver(name, bits=bits, seed=seed)
    return EntropyObserver(name, bits=bits, seed=seed)
