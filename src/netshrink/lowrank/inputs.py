"""What the selected layers see: their input Gram matrix and the shapes of their inputs/outputs.

One calibration pass (:func:`netshrink.calibrate.collect`) records, per layer, the sum of xxᵀ
of every input vector x (a Linear's last axis; a Conv2d's receptive-field patch, laid out as
:func:`~netshrink.calibrate.input_vectors` does) and the shapes of the first call. The
activation-aware SVD whitens by this matrix; the MAC budget uses the shapes.

Padding tokens are left out of the Gram matrix: a batch of texts padded to its longest text is
mostly padding when the texts are short (two thirds of the tokens of 128 standard-library
docstring paragraphs), and the states at padded positions are not inputs the model's outputs
depend on. Where a batch's inputs are a mapping with an ``attention_mask`` (Hugging Face and
``text:`` batches), a layer input whose leading axes have the mask's shape keeps only the
vectors at mask != 0. :class:`BatchCursor` knows which batch is running: it watches the module
that is called once per batch (the model, or a block in the sequential engine).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from netshrink.calibrate import Gram, Reducer, Shape, collect
from netshrink.context import Batch


def token_masks(batches: Sequence[Batch]) -> list[torch.Tensor | None]:
    """Each batch's ``attention_mask`` as booleans (True: a real token), or None without one."""
    out: list[torch.Tensor | None] = []
    for inputs, _ in batches:
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        out.append(mask.bool() if torch.is_tensor(mask) else None)
    return out


class BatchCursor(Reducer):
    """Counts the calls of the module it watches (once per batch) to name the batch running.

    Hook it on the module called once per batch, before the layers it holds: then, while a
    layer of that batch runs, :attr:`mask` is that batch's token mask.
    """

    def __init__(self, masks: Sequence[torch.Tensor | None]) -> None:
        super().__init__("input")
        self.masks, self.index = masks, -1

    def update(self, module: nn.Module, x: torch.Tensor) -> None:
        self.index += 1

    @property
    def mask(self) -> torch.Tensor | None:
        """The running batch's token mask (None: no mask, or no batch has started)."""
        return self.masks[self.index] if 0 <= self.index < len(self.masks) else None


class TokenGram(Gram):
    """:class:`~netshrink.calibrate.Gram` of the vectors at real tokens only (see the module
    docstring); an input whose leading axes do not match the running batch's mask counts whole."""

    def __init__(self, cursor: BatchCursor) -> None:
        super().__init__()
        self.cursor = cursor

    def update(self, module: nn.Module, x: torch.Tensor) -> None:
        mask = self.cursor.mask
        if (
            mask is not None
            and not isinstance(module, nn.Conv2d)
            and x.dim() == mask.dim() + 1
            and x.shape[:-1] == mask.shape
        ):
            x = x[mask.to(x.device)]
        super().update(module, x)


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
    batches = list(batches)
    cursor = BatchCursor(token_masks(batches) if skip_padding else [])
    ins = {name: Shape("input") for name in layers}
    outs = {name: Shape("output") for name in layers}
    grams = {name: TokenGram(cursor) for name in layers}
    points: dict[str, list[Reducer]] = {"": [cursor]}
    for name in layers:
        points.setdefault(name, []).extend(
            [ins[name], outs[name], *([grams[name]] if covariance else [])]
        )
    collect(model, points, batches, "lowrank: layer inputs", show=show)
    return {
        name: LayerInputs(grams[name].sum, grams[name].count, ins[name].shape, outs[name].shape)
        for name in layers
    }
