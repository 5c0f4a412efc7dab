"""What techniques need besides the model.

A technique declares the context items it needs (by field name); :meth:`Context.require`
reports every missing one before the model is touched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import nn

from netshrink.errors import MissingInputError

Batch = tuple[Any, Any]
"""One ``(inputs, targets)`` batch; ``inputs`` is a tensor or a tuple of positional tensors."""

Evaluate = Callable[[nn.Module, Iterable[Batch]], float]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]
"""``loss_fn(model, batch) -> scalar tensor``: what training minimises."""
"""``evaluate(model, batches) -> float``, higher is better."""

_HINTS = {
    "example_inputs": "a tuple of positional inputs, e.g. example_inputs=(x,)",
    "calib_data": "an iterable of (inputs, targets) batches, e.g. calib_data=loader",
    "train_data": "an iterable of (inputs, targets) batches, e.g. train_data=loader",
    "val_data": "an iterable of (inputs, targets) batches, e.g. val_data=loader",
    "teacher": "the model to learn from, e.g. teacher=original_model",
    "evaluate": "a function evaluate(model, batches) -> float, higher is better",
    "loss_fn": "a function loss_fn(model, batch) -> scalar tensor, e.g. netshrink.hf.loss_for(...)",
}


@dataclass
class Context:
    """Inputs a technique may need. Every field is optional until a technique asks for it."""

    example_inputs: tuple[Any, ...] | None = None
    calib_data: Iterable[Batch] | None = None
    train_data: Iterable[Batch] | None = None
    val_data: Iterable[Batch] | None = None
    teacher: nn.Module | None = None
    evaluate: Evaluate | None = None
    loss_fn: LossFn | None = None
    """What fine-tuning minimises (default: cross-entropy against the batch's labels)."""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seed: int = 0
    progress: bool = True

    def require(self, names: Iterable[str], technique: str) -> None:
        """Raise :class:`MissingInputError` naming every item of ``names`` that is ``None``."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            how = "; ".join(f"{n}: {_HINTS.get(n, 'see the docs')}" for n in missing)
            raise MissingInputError(f"{technique} needs {', '.join(missing)} ({how})")

    def with_(self, **changes: Any) -> Context:
        """Return a copy with ``changes`` applied."""
        return replace(self, **changes)

    @classmethod
    def item_names(cls) -> tuple[str, ...]:
        """Names of every context item."""
        return tuple(f.name for f in fields(cls))
