"""What the selected layers see: their input covariance and the shapes of their inputs/outputs.

One calibration pass (:func:`netshrink.calibrate.collect`) records, per layer, the sum of xxᵀ
of every input vector x (a Linear's last axis; a Conv2d's receptive-field patch, laid out as
:func:`~netshrink.calibrate.input_vectors` does) and the shapes of the first call. The
activation-aware SVD whitens by this covariance; the MAC budget uses the shapes.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from netshrink.calibrate import Gram, Reducer, Shape, collect
from netshrink.context import Batch


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


def layer_inputs(
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
    ins = {name: Shape("input") for name in layers}
    outs = {name: Shape("output") for name in layers}
    grams = {name: Gram() for name in layers}
    points: dict[str, list[Reducer]] = {
        name: [ins[name], outs[name], *([grams[name]] if covariance else [])] for name in layers
    }
    collect(model, points, batches, "lowrank: layer inputs", show=show)
    return {
        name: LayerInputs(grams[name].sum, grams[name].count, ins[name].shape, outs[name].shape)
        for name in layers
    }
