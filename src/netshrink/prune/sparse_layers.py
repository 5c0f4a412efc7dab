"""Layers whose pruned weights stay zero, and that run a sparse kernel when it is faster.

:class:`SparseLinear` and :class:`SparseConv2d` subclass the torch layers, so their state dict
is the plain dense ``weight`` (the artifact stores mostly-zero tensors packed, bitmask or CSR).
The mask is not saved: it is ``weight != 0``. In training mode the layer holds it as a bool
tensor and the forward multiplies the weight by it, so pruned weights get no gradient and
contribute nothing; ``eval()`` and ``state_dict()`` set them back to exactly zero, in case an
optimizer's momentum moved them (a mask applied while Adam state exists, as in gradual pruning).
In eval mode the weights' zeros are the mask and no bool copy is held: a byte per weight, a
quarter of a float32 layer's memory, that inference and calibration never read.

In eval mode a layer whose ``kernel`` is ``"csr"`` multiplies with the weight in compressed
sparse row form (``torch.addmm`` with a CSR matrix); the choice is made by :func:`choose_kernel`,
which times both kernels on this machine, and is recorded in the layer's spec.
"""

from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.layers import CompressedLayer, ConvGeometry, as_linear


class _Masked:
    """Shared behaviour of the sparse layers (a mixin before the torch layer class)."""

    weight: nn.Parameter
    kernel: str
    timing: dict[str, float]

    training: bool
    _held: torch.Tensor | None

    def _setup(self, kernel: str, timing: dict[str, float] | None) -> None:
        self.kernel = kernel
        self.timing = dict(timing or {})
        # a buffer, so that it follows .to(device) while training; None in eval mode
        self.register_buffer("_held", None, persistent=False)  # type: ignore[attr-defined]
        self.refresh_mask()
        self._csr: tuple[tuple[int, int], torch.Tensor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # The CSR cache is derived data, and torch cannot deep-copy or pickle a CSR tensor.
        return {**self.__dict__, "_csr": None}

    @property
    def mask(self) -> torch.Tensor:
        """True where a weight is kept: the mask held while training, else ``weight != 0``."""
        return self._held if self._held is not None else self.weight.detach() != 0

    @mask.setter
    def mask(self, keep: torch.Tensor) -> None:
        """Prune to ``keep``: the weights outside it set to zero (and held so while training)."""
        with torch.no_grad():
            self.weight.mul_(keep)
        self._held = keep if self.training else None

    def refresh_mask(self) -> None:
        """Recompute the mask from the weights (after pruning more, or loading)."""
        self._held = self.weight.detach() != 0 if self.training else None

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Set the masked weights back to exactly zero (optimizer momentum may have moved them:
        their gradient is zero but Adam's running average of earlier gradients is not)."""
        if self._held is not None and (self.weight[~self._held] != 0).any():
            self.weight.mul_(self._held)

    def train(self, mode: bool = True) -> Any:
        if mode and self._held is None:
            self._held = self.weight.detach() != 0  # eval left the pruned weights exactly zero
        out = super().train(mode)  # type: ignore[misc]
        if not mode:
            self.apply_mask()
            self._held = None
        return out

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)  # type: ignore[misc]
        self.refresh_mask()

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)  # type: ignore[misc]
        if not keep_vars and self._held is not None:
            destination[prefix + "weight"] = destination[prefix + "weight"] * self._held

    def sparsity(self) -> float:
        """Fraction of weights that are zero."""
        return float((self.weight == 0).float().mean())

    def csr_weight(self) -> torch.Tensor:
        """The 2-D weight in CSR form, cached until the weights change."""
        key = (self.weight._version, self.weight.data_ptr())
        if self._csr is None or self._csr[0] != key:
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                self._csr = (key, self.weight.detach().flatten(1).to_sparse_csr())
        return self._csr[1]

    def masked_weight(self) -> torch.Tensor:
        return self.weight * self.mask

    def _common_spec(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "timing": self.timing}

    def stored_params(self) -> int:
        """Elements stored: the non-zero weights and the bias (the artifact packs the zeros)."""
        bias = self.bias.numel() if self.bias is not None else 0  # type: ignore[attr-defined]
        return int(self.mask.count_nonzero()) + bias

    def stored_bits(self) -> int:
        """Bits stored: one mask bit per weight plus the non-zero values and the bias."""
        width = self.weight.element_size() * 8
        return self.weight.numel() + self.stored_params() * width


def _csr_matmul(csr: torch.Tensor, x2: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``csr @ x2.T (+ bias)`` as an ``(out, rows)`` tensor; x2 is ``(rows, in)``."""
    if bias is None:
        return torch.sparse.mm(csr, x2.t())
    return torch.addmm(bias[:, None], csr, x2.t())


class SparseLinear(_Masked, CompressedLayer, nn.Linear):
    """``nn.Linear`` with a fixed sparsity pattern and a dense or CSR kernel."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        kernel: str = "dense",
        timing: dict[str, float] | None = None,
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._setup(kernel, timing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return F.linear(x, self.masked_weight(), self.bias)
        if self.kernel != "csr":
            return F.linear(x, self.weight, self.bias)
        y = _csr_matmul(self.csr_weight(), x.reshape(-1, self.in_features), self.bias)
        return y.t().reshape(*x.shape[:-1], self.out_features)

    def spec(self) -> dict[str, Any]:
        """Constructor arguments (JSON), including the kernel chosen and its timing."""
        shape = {"in_features": self.in_features, "out_features": self.out_features}
        return {**shape, "bias": self.bias is not None, **self._common_spec()}


class SparseConv2d(_Masked, CompressedLayer, nn.Conv2d):
    """``nn.Conv2d`` with a fixed sparsity pattern; 1x1 convs may run the CSR kernel."""

    def __init__(
        self,
        conv: dict[str, Any],
        bias: bool = True,
        kernel: str = "dense",
        timing: dict[str, float] | None = None,
    ) -> None:
        nn.Conv2d.__init__(self, **ConvGeometry.from_spec(conv).spec(), bias=bias)
        self._setup(kernel, timing)

    def pointwise(self) -> bool:
        """True for a 1x1, stride-1, ungrouped, unpadded conv: a matmul over channels."""
        return (
            tuple(self.kernel_size) == (1, 1)
            and tuple(self.stride) == (1, 1)
            and self.groups == 1
            and (self.padding == "valid" or tuple(self.padding) == (0, 0))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self._conv_forward(x, self.masked_weight(), self.bias)
        if self.kernel != "csr" or not self.pointwise():
            return self._conv_forward(x, self.weight, self.bias)
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)  # (pixels, channels)
        y = _csr_matmul(self.csr_weight(), rows, self.bias)  # (out, pixels)
        return y.reshape(self.out_channels, n, h, w).transpose(0, 1)

    def spec(self) -> dict[str, Any]:
        """Constructor arguments (JSON), including the kernel chosen and its timing."""
        conv = ConvGeometry.of(self).spec()
        return {"conv": conv, "bias": self.bias is not None, **self._common_spec()}


SparseLayer = SparseLinear | SparseConv2d


def make_sparse(module: nn.Module) -> SparseLayer:
    """A sparse layer sharing ``module``'s parameters (a Linear, Hugging Face Conv1D — its
    weight transposed into a new tensor — or Conv2d)."""
    if isinstance(module, SparseLinear | SparseConv2d):
        return module
    training = module.training
    if isinstance(module, nn.Conv2d):
        geometry = ConvGeometry.of(module).spec()
        out: SparseLayer = SparseConv2d(geometry, bias=module.bias is not None)
    else:
        module = as_linear(module)
        out = SparseLinear(module.in_features, module.out_features, bias=module.bias is not None)
    out.weight, out.bias = module.weight, module.bias
    out.refresh_mask()
    return out.train(training)


def time_pair(fn: Callable[[], Any], other: Callable[[], Any], runs: int) -> tuple[float, float]:
    """Median milliseconds of ``fn`` and ``other``, timed alternately after a warm-up."""
    for _ in range(3):
        fn(), other()
    a, b = [], []
    for _ in range(runs):
        for f, times in ((fn, a), (other, b)):
            start = time.perf_counter()
            f()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(a), statistics.median(b)


@torch.no_grad()
def choose_kernel(layer: SparseLayer, x: torch.Tensor, runs: int = 25, margin: float = 0.9) -> str:
    """Time ``layer`` on ``x`` with the dense and the CSR kernel; keep CSR only when its median
    is below ``margin`` x dense. Records ``layer.kernel`` and ``layer.timing`` (ms); returns the
    kernel."""
    if isinstance(layer, SparseConv2d) and not layer.pointwise():
        layer.kernel, layer.timing = "dense", {}  # no sparse kernel for a spatial conv
        return layer.kernel
    was_training = layer.training
    layer.eval()

    def with_kernel(kind: str) -> Callable[[], Any]:
        def call() -> Any:
            layer.kernel = kind
            return layer(x)

        return call

    dense, csr = time_pair(with_kernel("dense"), with_kernel("csr"), runs)
    layer.kernel = "csr" if csr < margin * dense else "dense"
    layer.timing = {"dense_ms": round(dense, 4), "csr_ms": round(csr, 4)}
    layer.train(was_training)
    return layer.kernel
