"""What the selected layers see: their input covariance and the shapes of their inputs/outputs.

Forward hooks on the layers record, over the calibration batches, the sum of xxᵀ of every
input vector x (a Linear's last axis; a Conv2d's receptive-field patch, Cin*kh*kw long, as
``F.unfold`` lays it out so it lines up with the weight reshaped to (Cout, Cin*kh*kw)).
The activation-aware SVD whitens by this covariance; the MAC budget uses the shapes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.batches import run
from netshrink.context import Batch
from netshrink.progress import track


@dataclass
class LayerInputs:
    """Statistics of one layer's inputs: sum of xxᵀ over ``count`` vectors, and the shapes."""

    gram: torch.Tensor | None = None
    count: int = 0
    in_shape: tuple[int, ...] = ()
    out_shape: tuple[int, ...] = ()

    @property
    def cov(self) -> torch.Tensor | None:
        """The second-moment matrix E[xxᵀ] (float64), or None when nothing was recorded."""
        return None if self.gram is None or self.count == 0 else self.gram / self.count


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
    """Rows the weight multiplies: (tokens, in) for a Linear, (patches, Cin*kh*kw) for a Conv2d."""
    if isinstance(module, nn.Conv2d):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        padded = F.pad(x, _pad_amounts(module), mode=mode)
        cols = F.unfold(padded, module.kernel_size, module.dilation, 0, module.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def collect(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Iterable[Batch],
    *,
    covariance: bool,
    show: bool = True,
) -> dict[str, LayerInputs]:
    """Run ``model`` on every batch's inputs and return each layer's :class:`LayerInputs`.

    Shapes are those of the first batch. With ``covariance`` the sum of xxᵀ accumulates in
    float64 over all batches (a progress bar counts them).
    """
    stats = {name: LayerInputs() for name in layers}

    def hook(name: str):
        def record(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
            s, x = stats[name], args[0]
            if not s.in_shape:
                s.in_shape, s.out_shape = tuple(x.shape), tuple(out.shape)
            if covariance:
                v = input_vectors(module, x.detach()).double()
                s.gram = v.T @ v if s.gram is None else s.gram + v.T @ v
                s.count += v.shape[0]

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    was_training = model.training
    model.eval()
    try:
        for inputs, _ in track(batches, "lowrank: layer inputs", show=show):
            run(model, inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return stats
