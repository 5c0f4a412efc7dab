"""Helpers for ``(inputs, targets)`` batches: inputs a tensor, a tuple of positional tensors or a
mapping of keyword tensors."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from netshrink.context import Batch
from netshrink.errors import DataError


def as_args(inputs: Any) -> tuple[Any, ...]:
    """Return the positional arguments of a forward call: a tuple stays, anything else wraps."""
    return tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)


class Keywords(nn.Module):
    """``model`` called with positional tensors that it takes as the keywords ``names``.

    Runtimes, MAC counting and timing call a model with a tuple of positional tensors; a model
    taking keyword tensors (``{"input_ids": ..., "attention_mask": ...}``) is seen through this.
    """

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *args: torch.Tensor) -> Any:
        """``model(**{name: arg})`` for the names and ``args`` in order."""
        return self.model(**dict(zip(self.names, args, strict=True)))


def example_args(inputs: Any) -> tuple[Any, ...]:
    """The positional arguments of one forward call: a mapping's values in order, a tuple as it
    is, anything else wrapped (see :func:`positional` for the module to call with them)."""
    return tuple(inputs.values()) if isinstance(inputs, Mapping) else as_args(inputs)


def positional(model: Any, inputs: Any) -> Any:
    """``model`` as called with :func:`example_args` ``(inputs)``: a module taking keyword inputs
    (``inputs`` a mapping) wrapped in :class:`Keywords`, anything else as it is."""
    if isinstance(inputs, Mapping) and isinstance(model, nn.Module):
        return Keywords(model, tuple(inputs))
    return model


def run(model: nn.Module, inputs: Any) -> Any:
    """Call ``model`` on ``inputs``: a tensor, a tuple of positional tensors, or a mapping of
    keyword tensors (``{"input_ids": ..., "attention_mask": ...}``)."""
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*as_args(inputs))


def materialize(batches: Iterable[Batch], what: str) -> list[Batch]:
    """Return ``batches`` as a list, raising :class:`DataError` when it is empty or non-finite."""
    out = list(batches)
    if not out:
        raise DataError(f"{what} is empty; give at least one (inputs, targets) batch")
    for i, (inputs, _) in enumerate(out):
        for t in inputs.values() if isinstance(inputs, Mapping) else as_args(inputs):
            if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
                raise DataError(f"{what} batch {i} contains NaN or Inf values")
    return out


def check_finite_weights(model: nn.Module) -> None:
    """Raise :class:`DataError` naming the first parameter or buffer holding NaN or Inf."""
    for name, t in (*model.named_parameters(), *model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise DataError(f"weight '{name}' contains NaN or Inf; fix the checkpoint first")
