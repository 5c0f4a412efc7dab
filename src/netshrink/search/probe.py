"""Measuring one model variant against the unchanged model: its metric and its output error.

A probe runs the data through the variant once. When an ``evaluate`` function is given, the
outputs it computes are recorded on the way (a forward hook on the model) and the output error
is taken from them, so the metric and the error cost one pass, not two; only when ``evaluate``
did not call the model once on each batch as given are the outputs computed again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from netshrink.batches import as_args, run
from netshrink.context import Batch


def fidelity(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """Relative output error ||y - y_ref||² / ||y_ref||² over all output tensors (0 = identical).

    Each list holds every floating-point output tensor of every batch, in the same order."""
    num = sum(float(((o - r).double() ** 2).sum()) for o, r in zip(outputs, reference, strict=True))
    den = sum(float((r.double() ** 2).sum()) for r in reference)
    return num / max(den, 1e-12)


def float_leaves(output: Any) -> list[torch.Tensor]:
    """The floating-point tensors of one forward's output (a tensor, tuple, dict, ModelOutput)."""
    return [t.detach() for t in tree_leaves(output) if torch.is_tensor(t) and t.is_floating_point()]


@dataclass
class Probe:
    """What one model variant measured: metric (None without labels) and output error."""

    metric: float | None
    error: float


class Prober:
    """Measures model variants against the baseline's outputs on fixed data.

    ``forwards`` counts the passes of the data made so far (one per probe when ``evaluate``
    calls the model once on each batch, two otherwise), so a caller can say what it cost.
    """

    def __init__(
        self, baseline: nn.Module, data: list[Batch], evaluate: Callable[..., float] | None
    ) -> None:
        self.data = data
        self.evaluate = evaluate
        self.forwards = 0
        self.reference = self.outputs(baseline)

    def outputs(self, model: nn.Module) -> list[torch.Tensor]:
        """The floating-point output tensors of the model on every batch, in order.

        Inputs may be positional or keyword (:func:`netshrink.batches.run`); a structured output
        (a tuple, a dict, a transformers ``ModelOutput``) is flattened to its tensors."""
        self.forwards += 1
        with torch.no_grad():
            return [t for x, _ in self.data for t in float_leaves(run(model, x))]

    def probe(self, model: nn.Module) -> Probe:
        """Metric and relative output error of ``model``."""
        if self.evaluate is None:
            return Probe(None, fidelity(self.reference, self.outputs(model)))
        with recording(model) as calls:
            metric = float(self.evaluate(model, self.data))
        self.forwards += 1
        seen = outputs_of(calls, self.data)
        return Probe(metric, fidelity(self.reference, seen or self.outputs(model)))


Call = tuple[tuple[Any, ...], dict[str, Any], Any]
"""One recorded forward: positional arguments, keyword arguments, output."""


@contextmanager
def recording(model: nn.Module) -> Iterator[list[Call]]:
    """Record every call of ``model`` made inside the block."""
    calls: list[Call] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        calls.append((args, kwargs, output))

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def outputs_of(calls: list[Call], data: list[Batch]) -> list[torch.Tensor] | None:
    """The output tensors of ``calls`` on each batch of ``data`` in order, or None when some
    batch was not called with its own input tensors (the same objects, not equal copies)."""
    out: list[torch.Tensor] = []
    unused = list(range(len(calls)))
    for x, _ in data:
        found = next((i for i in unused if _same_inputs(x, *calls[i][:2])), None)
        if found is None:
            return None
        unused.remove(found)
        out += float_leaves(calls[found][2])
    return out


def _same_inputs(x: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a call took exactly the tensors of batch inputs ``x`` (keyword or positional)."""
    if isinstance(x, Mapping):
        given: dict[str, Any] = dict(x)
        pairs = [(kwargs.get(k), v) for k, v in given.items()]
        return not args and kwargs.keys() == given.keys() and all(a is b for a, b in pairs)
    expected = as_args(x)
    return (
        not kwargs
        and len(args) == len(expected)
        and all(a is b for a, b in zip(args, expected, strict=True))
    )
