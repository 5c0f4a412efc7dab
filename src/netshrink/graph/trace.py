"""Trace a model into a torch.fx graph whose nodes carry the shapes of one real forward pass.

Tracing is symbolic (``torch.fx.symbolic_trace``): Python control flow that depends on tensor
values cannot be traced. When a submodule's forward fails to trace, that submodule is made an
opaque leaf (the graph sees one call, its inside is left untouched) and tracing is retried; the
names of such modules are returned so the caller can warn about them. Only a failure in the
model's own ``forward`` raises :class:`~netshrink.errors.UnsupportedModuleError`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from netshrink.errors import UnsupportedModuleError


def is_attention(module: nn.Module) -> bool:
    """True for multi-head attention with Linear children ``q k v out`` and head attributes.

    This is the interface of ``netshrink.zoo.layers.SelfAttention(dim, num_heads, head_dim)``:
    heads are contiguous blocks of ``head_dim`` rows of q, k and v (and columns of out), and the
    forward reads ``num_heads`` from the attribute, so lowering it after slicing prunes heads.
    """
    if not all(isinstance(getattr(module, n, None), nn.Linear) for n in ("q", "k", "v", "out")):
        return False
    heads, dim = getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    if not (isinstance(heads, int) and isinstance(dim, int)):
        return False
    width = heads * dim
    q, k, v, out = module.q, module.k, module.v, module.out  # type: ignore[union-attr]
    return q.out_features == k.out_features == v.out_features == out.in_features == width


class _Tracer(fx.Tracer):
    """A tracer that keeps ``leaves`` (and attention) opaque and remembers where it failed."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves
        self.failed_in: str | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.leaves or is_attention(m) or super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The innermost module whose forward raised is recorded first.
            if self.failed_in is None:
                self.failed_in = self.path_of_module(m)
            raise


@dataclass
class Traced:
    """A traced model: the fx graph (sharing the model's submodules) and its opaque modules."""

    module: fx.GraphModule
    opaque: dict[str, str] = field(default_factory=dict)
    """``{qualified name: why}`` for submodules that could not be traced into."""


def _positional(gm: fx.GraphModule, example_inputs: Sequence[Any] | Mapping[str, Any]) -> list:
    """``example_inputs`` as the graph's positional placeholders (a dict is matched by name;
    a placeholder it lacks takes the forward's default)."""
    if not isinstance(example_inputs, Mapping):
        return list(example_inputs)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return [example_inputs.get(n.target, n.args[0] if n.args else None) for n in placeholders]


def trace(model: nn.Module, example_inputs: Sequence[Any] | Mapping[str, Any]) -> Traced:
    """Trace ``model`` symbolically and record every node's output shape on ``example_inputs``
    (a tuple of positional inputs or a dict of keyword inputs).

    The model's submodules are shared with the returned graph module, not copied. The model is
    run once in eval mode without gradients (so BatchNorm statistics do not move), then its
    training flag is restored.
    """
    opaque: dict[str, str] = {}
    while True:
        tracer = _Tracer(set(opaque))
        try:
            graph = tracer.trace(model)
            break
        except Exception as exc:
            where = tracer.failed_in
            if not where or where in opaque:
                raise UnsupportedModuleError(
                    f"cannot trace {type(model).__name__}.forward with torch.fx "
                    f"({type(exc).__name__}: {exc}); structured pruning needs a forward without "
                    "data-dependent control flow"
                ) from exc
            kind = type(model.get_submodule(where)).__name__
            opaque[where] = f"{kind}.forward is not traceable ({type(exc).__name__}: {exc})"
    gm = fx.GraphModule(model, graph)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*_positional(gm, example_inputs))
    except Exception as exc:
        raise UnsupportedModuleError(
            f"the traced {type(model).__name__} failed on example_inputs "
            f"({type(exc).__name__}: {exc}); give inputs the model's forward accepts"
        ) from exc
    finally:
        model.train(was_training)
    return Traced(gm, opaque)


def shape_of(node: Any) -> tuple[int, ...] | None:
    """Shape of a node's tensor output recorded by :func:`trace`, or None when not a tensor."""
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None
