"""Reducers: running statistics of what a module sees, in memory that does not grow with data.

A reducer watches one side of a module's forward call (``on="input"``: its first positional
argument; ``on="output"``: its first output tensor) and folds every call into a fixed-size
summary, so a calibration pass over any number of batches holds one summary per point:

- :class:`MinMax`: running minimum and maximum.
- :class:`Observe`: hands each tensor to an observer (anything with ``update(tensor)``).
- :class:`SumSquares`: sum of x_j^2 per input channel j (Wanda's ||X_j||_2, Sun et al. 2023).
- :class:`Gram`: sum of x x^T over input vectors (the Hessian proxy X^T X of GPTQ/SparseGPT and
  the covariance that activation-aware low-rank whitens by).
- :class:`Capture`: the first ``limit`` tensors, copied (a capped sample, for kernel timing).
- :class:`Shape`: the shape of the first tensor seen.
- :class:`Latest`: the latest tensor, autograd graph kept (feature distillation reads it).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from torch import nn

Side = Literal["input", "output"]


class Reducer:
    """Folds the tensors a module takes (``on="input"``) or gives (``"output"``) into a summary.

    ``tokens_only``: the summary is over token vectors, so a text batch's padding positions
    (attention mask 0) are dropped before :meth:`update` sees the tensor (then ``(tokens, dim)``);
    see :func:`netshrink.calibrate.real_tokens`.
    """

    tokens_only = False

    def __init__(self, on: Side = "input") -> None:
        self.on = on

    def update(self, module: nn.Module, x: torch.Tensor) -> None:
        """Fold one forward call's tensor ``x`` into the summary."""
        raise NotImplementedError

    def update_tokens(self, module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Fold ``x``'s real tokens (``mask``, as :func:`real_tokens` reads it) into the
        summary: :meth:`update` on a copy of those rows, unless a subclass streams them."""
        self.update(module, real_tokens(x, mask))

    def nbytes(self) -> int:
        """Bytes of tensor memory the summary holds."""
        return sum(t.numel() * t.element_size() for t in vars(self).values() if torch.is_tensor(t))


class MinMax(Reducer):
    """Running minimum and maximum over every element seen."""

    def __init__(self, on: Side = "input") -> None:
        super().__init__(on)
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    def update(self, module: nn.Module, x: torch.Tensor) -> None:
        lo, hi = x.detach().aminmax()
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)


class Sink(Protocol):
    """Anything that accumulates tensors through ``update`` (e.g. a quantization observer)."""

    def update(self, x: torch.Tensor) -> None: ...


class Observe(Reducer):
    """Passes every tensor to ``sink.update`` (quantization observers keep their own state)."""

    def __init__(self, sink: Sink, on: Side = "input") -> None:
        super().__init__(on)
        self.sink = sink

    def update(self, module: nn.Module, x: torch.Tensor) -> None:
        self.sink.update(x)


def real_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of a (batch, tokens, dim) ``x`` at ``mask``'s real tokens, as (real, dim).

    ``x`` is returned unchanged when there is no mask or its leading two sizes are not the
    mask's (a conv feature map, attention scores): only token vectors are filtered.
    """
    return x[mask.to(x.device)] if _token_shaped(x, mask) else x


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """Indices of ``mask``'s real tokens among the ``batch * tokens`` rows of a (batch, tokens,
    dim) ``x`` flattened to (rows, dim), or None when ``x`` is not token-shaped (every row is
    real). Gathering chunks of rows by these indices avoids copying the real rows whole."""
    if not _token_shaped(x, mask):
        return None
    assert mask is not None
    return mask.to(x.device).reshape(-1).nonzero().squeeze(1)


def _token_shaped(x: torch.Tensor, mask: torch.Tensor | None) -> bool:
    """Whether ``x`` is (batch, tokens, dim) with ``mask`` (batch, tokens) marking its tokens."""
    return mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape


def _pad_amounts(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """``F.pad`` amounts (left, right, top, bottom) that ``conv`` applies before convolving."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":  # torch puts the odd extra pixel on the right / bottom
        (dh, dw), (kh, kw) = conv.dilation, conv.kernel_size
        th, tw = dh * (kh - 1), dw * (kw - 1)
        return (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    ph, pw = conv.padding  # type: ignore[misc]
    return (pw, pw, ph, ph)


def input_vectors(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Rows the weight multiplies: (tokens, in) for a Linear, (patches, Cin*kh*kw) for a Conv2d.

    A Conv2d's patches are laid out as ``F.unfold`` does, channel-major, so column j lines up
    with column j of the weight reshaped to (Cout, Cin*kh*kw) when the conv is ungrouped.
    """
    if isinstance(module, nn.Conv2d):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        padded = F.pad(x, _pad_amounts(module), mode=mode)
        cols = F.unfold(padded, module.kernel_size, module.dilation, 0, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


class _Columns(Reducer):
    """A float64 sum over every input vector the weight multiplies, and the vectors' count.

    Padding tokens are left out (``tokens_only``): the model's output never depends on them, and
    counted they would bias the statistics towards vectors no real input produces. The vectors
    are converted to float64 :data:`CHUNK` rows at a time and added into the sum in place, so a
    batch costs one chunk's copy, not a float64 copy of the batch and a second sum.
    """

    tokens_only = True

    def __init__(self) -> None:
        super().__init__("input")
        self.sum: torch.Tensor | None = None
        self.count = 0

    def update(self, module: nn.Module, x: torch.Tensor) -> None:
        self.update_tokens(module, x, None)

    def update_tokens(self, module: nn.Module, x: torch.Tensor, mask: torch.Tensor | None) -> None:
        """As :meth:`update` on the real tokens, each chunk gathered from ``x`` directly: no copy
        of the batch's real rows (10 MiB for MiniLM's FFN output input at 16 x 101 tokens) is
        made. The chunks hold the same rows in the same order, so the sums are the same."""
        rows = token_rows(x, mask)
        vectors = input_vectors(module, x.detach())  # (batch * tokens, in): a view for a Linear
        for chunk in row_chunks(vectors, rows):
            self._add(chunk.double())
        self.count += vectors.shape[0] if rows is None else rows.numel()

    def _add(self, v: torch.Tensor) -> None:
        raise NotImplementedError


CHUNK = 256
"""Input vectors converted to float64 at a time by the column statistics."""


def row_chunks(vectors: torch.Tensor, rows: torch.Tensor | None) -> Iterator[torch.Tensor]:
    """The (n, dim) ``vectors`` :data:`CHUNK` rows at a time: slices (views) of all of them,
    or, given the indices ``rows`` (see :func:`token_rows`), those rows gathered in order."""
    if rows is None:
        yield from vectors.split(CHUNK)
    else:
        for index in rows.split(CHUNK):
            yield vectors.index_select(0, index)


class SumSquares(_Columns):
    """Sum over all input vectors of x_j^2 per input column j (float64), and their count."""

    def _add(self, v: torch.Tensor) -> None:
        part = (v * v).sum(0)
        self.sum = part if self.sum is None else self.sum.add_(part)

    def norms(self) -> torch.Tensor:
        """||X_j||_2 per input column: the root of the summed squares."""
        if self.sum is None:
            raise ValueError("SumSquares saw no input")
        return self.sum.sqrt()


class Gram(_Columns):
    """Sum of x x^T over all input vectors (float64), and their count."""

    def _add(self, v: torch.Tensor) -> None:
        if self.sum is None:
            self.sum = v.new_zeros(v.shape[1], v.shape[1])
        self.sum.addmm_(v.T, v)

    def mean(self) -> torch.Tensor | None:
        """The second-moment matrix E[x x^T], or None when nothing was seen."""
        return None if self.sum is None or self.count == 0 else self.sum / self.count

    def take_mean(self) -> torch.Tensor | None:
        """:meth:`mean`, computed in the sum's own storage (no second matrix); the reducer
        holds nothing afterwards."""
        if self.sum is None or self.count == 0:
            return None
        mean, self.sum = self.sum.div_(self.count), None
        return mean


class Capture(Reducer):
    """Copies of the first ``limit`` tensors seen; later calls are ignored."""

    def __init__(self, limit: int = 1, on: Side = "input") -> None:
        super().__init__(on)
        self.limit = limit
        self.tensors: list[torch.Tensor] = []

    def update(self, module: nn.Module, x: torch.Tensor) -> None:
        if len(self.tensors) < self.limit:
            self.tensors.append(x.detach().clone())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)


class Shape(Reducer):
    """The shape of the first tensor seen (empty until one is)."""

    def __init__(self, on: Side = "input") -> None:
        super().__init__(on)
        self.shape: tuple[int, ...] = ()

    def update(self, module: nn.Module, x: torch.Tensor) -> None:
        if not self.shape:
            self.shape = tuple(x.shape)


class Latest(Reducer):
    """The latest tensor seen, not detached: a loss may backpropagate through it."""

    def __init__(self, on: Side = "output") -> None:
        super().__init__(on)
        self.value: torch.Tensor | None = None

    def update(self, module: nn.Module, x: torch.Tensor) -> None:
        self.value = x
