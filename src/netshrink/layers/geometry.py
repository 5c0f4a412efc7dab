"""The geometry of a convolution, kept in one place for every conv-like layer.

A compressed conv layer stores its geometry as a :class:`ConvGeometry` and its spec as
``{"conv": geometry.spec(), ...}``; the artifact's record of a plain ``nn.Conv1d``/``nn.Conv2d``
is the same dict plus ``bias``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ConvGeometry:
    """Channels, kernel, stride, padding, dilation and groups of a convolution.

    ``padding`` is a tuple of ints, or ``"same"``/``"valid"`` as torch accepts it.
    ``output_padding`` is set (a tuple) for a transposed convolution only.
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...] | str
    dilation: tuple[int, ...]
    groups: int = 1
    padding_mode: str = "zeros"
    output_padding: tuple[int, ...] | None = None

    @property
    def transposed(self) -> bool:
        """True for a transposed convolution (ConvTranspose)."""
        return self.output_padding is not None

    @classmethod
    def of(cls, conv: nn.Module) -> ConvGeometry:
        """The geometry of a torch convolution module (Conv1d/2d/3d, ConvTranspose1d/2d/3d)."""
        assert isinstance(conv, nn.modules.conv._ConvNd)
        padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        output_padding = tuple(conv.output_padding) if conv.transposed else None
        return cls(
            conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
            padding, tuple(conv.dilation), conv.groups, conv.padding_mode, output_padding,
        )  # fmt: skip

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> ConvGeometry:
        """The geometry a :meth:`spec` dict describes."""
        keys = ("kernel_size", "stride", "dilation", "output_padding")
        tuples = {k: tuple(spec[k]) for k in keys if spec.get(k) is not None}
        padding = spec["padding"]
        return cls(
            **{**spec, **tuples, "padding": padding if isinstance(padding, str) else tuple(padding)}
        )

    def spec(self) -> dict[str, Any]:
        """JSON form: the keyword arguments of the torch conv constructor (without ``bias``)."""
        out = asdict(self)
        for k in ("kernel_size", "stride", "dilation"):
            out[k] = list(out[k])
        if not isinstance(self.padding, str):
            out["padding"] = list(self.padding)
        if self.transposed:
            out["output_padding"] = list(out["output_padding"])
        else:
            del out["output_padding"]
        return out

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the weight: (out_channels, in_channels / groups, *kernel_size), or
        (in_channels, out_channels / groups, *kernel_size) for a transposed convolution."""
        if self.transposed:
            return (self.in_channels, self.out_channels // self.groups, *self.kernel_size)
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def zero_padded(self) -> bool:
        """True for numeric zero padding, the only padding the functional forms here take."""
        return not isinstance(self.padding, str) and self.padding_mode == "zeros"

    def conv2d(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``F.conv2d`` (or ``F.conv_transpose2d``) of ``x`` with this geometry (numeric zero
        padding)."""
        if self.output_padding is not None:
            return F.conv_transpose2d(
                x, weight, bias, self.stride, self.padding, self.output_padding, self.groups,
                self.dilation,
            )  # fmt: skip
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def module(self, bias: bool, **overrides: Any) -> nn.Conv2d:
        """A new ``nn.Conv2d`` of this (not transposed) geometry, ``overrides`` replacing fields."""
        if self.transposed:
            raise ValueError("module() builds an nn.Conv2d; this geometry is transposed")
        fields = {k: v for k, v in asdict(self).items() if k != "output_padding"}
        return nn.Conv2d(**{**fields, **overrides}, bias=bias)
