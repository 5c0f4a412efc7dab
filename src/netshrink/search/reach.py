"""Which layers the model's output never reads.

A layer whose output does not reach the model's output (BERT's pooler under mean pooling of the
token states; a head of another task; a layer never called) probes as zero damage at every
setting, so the search would compress it first and count its bytes as won for free. It is
found from one forward pass with autograd: each layer's output gets a zero scalar leaf added (a
forward hook; the values do not change), and ``torch.autograd.grad`` of the model's output with
respect to those leaves returns None exactly for the leaves the output's graph does not contain.
That is reachability in the graph, not the size of a gradient: a layer the output depends on
with a gradient that happens to be zero (a sum after a LayerNorm) still counts as read.

A layer that reaches the output only through operations without a gradient (an argmax, an
integer cast) counts as unread; and when no output tensor has a graph at all (a model that runs
under ``torch.no_grad`` itself) nothing is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from netshrink.batches import run


def _add_leaf(leaf: torch.Tensor, name: str, seen: dict[str, bool]) -> Callable[..., Any]:
    """A forward hook adding the zero scalar ``leaf`` to a module's floating-point output and
    recording in ``seen[name]`` whether it could (False: called, but its output is a tuple or
    not floating point)."""

    def hook(_module: nn.Module, _args: Any, output: Any) -> Any:
        traced = torch.is_tensor(output) and output.is_floating_point()
        seen[name] = seen.get(name, False) or traced
        return output + leaf.to(output.dtype) if traced else None

    return hook


def unread_layers(model: nn.Module, inputs: Any, names: Sequence[str]) -> list[str]:
    """The layers among ``names`` whose output cannot reach ``model``'s output on ``inputs``
    (a tensor, a tuple of positional tensors or a dict of keyword tensors), in ``names`` order.

    One forward and one backward pass; no parameter's ``.grad`` is touched, and the model is
    left as it was. A layer that was called but whose output could not carry a leaf (a tuple,
    an integer tensor) is never reported: its reach is unknown, so it stays in the search."""
    if not names:
        return []
    leaves = {n: torch.zeros((), requires_grad=True) for n in names}
    seen: dict[str, bool] = {}
    handles = [
        model.get_submodule(n).register_forward_hook(_add_leaf(leaves[n], n, seen)) for n in names
    ]
    try:
        with torch.enable_grad():
            outputs = [
                t for t in tree_leaves(run(model, inputs)) if torch.is_tensor(t) and t.requires_grad
            ]
            if not outputs:
                return []
            grads = torch.autograd.grad(
                outputs,
                list(leaves.values()),
                grad_outputs=[torch.ones_like(t) for t in outputs],
                allow_unused=True,
            )
    finally:
        for handle in handles:
            handle.remove()
    return [n for n, g in zip(leaves, grads, strict=True) if g is None and seen.get(n, True)]
