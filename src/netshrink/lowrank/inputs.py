"""What the selected layers see: their input Gram matrix and the shapes of their inputs/outputs.

One calibration pass (:func:`netshrink.calibrate.collect`) records, per layer, the sum of xxᵀ
of every input vector x (a Linear's last axis; a Conv2d's receptive-field patch, laid out as
:func:`~netshrink.calibrate.input_vectors` does) and the shapes of the first call. The
activation-aware SVD whitens by this matrix; the MAC budget uses the shapes.

Padding tokens are left out of the Gram matrix (calibrate's reducers do it for every technique):
a batch of texts padded to its longest text is mostly padding when the texts are short (two
thirds of the tokens of 128 standard-library docstring paragraphs), and the states at padded
positions are not inputs the model's outputs depend on.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from netshrink.calibrate import Gram, Reducer, Shape, collect
from netshrink.context import Batch


class _EveryPositionGram(Gram):
    """A Gram matrix that counts padding positions too (``skip_padding: false``)."""

    tokens_only = False


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
    skip_padding: bool = True,
    show: bool = True,
) -> dict[str, LayerInputs]:
    """Run ``model`` on every batch's inputs and return each layer's :class:`LayerInputs`.

    Shapes are those of the first batch. With ``covariance`` the sum of xxᵀ accumulates in
    float64 over all batches (a progress bar counts them), over real tokens only when
    ``skip_padding``.
    """
    ins = {name: Shape("input") for name in layers}
    outs = {name: Shape("output") for name in layers}
    grams = {name: Gram() if skip_padding else _EveryPositionGram() for name in layers}
    points: dict[str, list[Reducer]] = {}
    for name in layers:
        points.setdefault(name, []).extend(
            [ins[name], outs[name], *([grams[name]] if covariance else [])]
        )
    collect(model, points, batches, "lowrank: layer inputs", show=show)
    return {
        name: LayerInputs(grams[name].sum, grams[name].count, ins[name].shape, outs[name].shape)
        for name in layers
    }
