"""Module types an artifact may rebuild, and the JSON spec that rebuilds each.

Saving records, for every submodule, its type and the constructor arguments that fix its
tensor shapes. Loading rebuilds a module only from a type listed here — standard torch layers
from :data:`STANDARD`, netshrink's own layers (every
:class:`~netshrink.layers.CompressedLayer` subclass, and modules marked
:func:`~netshrink.layers.rebuildable`) — so a manifest can never make ``load`` import or
construct anything else. A netshrink layer's record is ``{"type": "netshrink:<class>",
"args": layer.spec()}`` and it is rebuilt by ``from_spec(args)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from netshrink.errors import ArtifactError
from netshrink.layers import ConvGeometry, rebuildable, rebuildable_types
from netshrink.layers.base import rebuild_key

__all__ = ["STANDARD", "build", "rebuildable", "spec_of"]

_Args = Callable[[nn.Module], dict[str, Any]]


def _conv_args(m: nn.Module) -> dict[str, Any]:
    return {**ConvGeometry.of(m).spec(), "bias": m.bias is not None}


def _bn_args(m: nn.Module) -> dict[str, Any]:
    assert isinstance(m, nn.modules.batchnorm._BatchNorm)
    return {
        "num_features": m.num_features,
        "eps": m.eps,
        "momentum": m.momentum,
        "affine": m.affine,
        "track_running_stats": m.track_running_stats,
    }


STANDARD: dict[str, tuple[type[nn.Module], _Args]] = {
    "torch.nn.Linear": (
        nn.Linear,
        lambda m: {
            "in_features": m.in_features,
            "out_features": m.out_features,
            "bias": m.bias is not None,
        },
    ),
    "torch.nn.Conv1d": (nn.Conv1d, _conv_args),
    "torch.nn.Conv2d": (nn.Conv2d, _conv_args),
    "torch.nn.BatchNorm1d": (nn.BatchNorm1d, _bn_args),
    "torch.nn.BatchNorm2d": (nn.BatchNorm2d, _bn_args),
    "torch.nn.LayerNorm": (
        nn.LayerNorm,
        lambda m: {
            "normalized_shape": list(m.normalized_shape),
            "eps": m.eps,
            "elementwise_affine": m.elementwise_affine,
            "bias": getattr(m, "bias", None) is not None,
        },
    ),
    "torch.nn.Embedding": (
        nn.Embedding,
        lambda m: {
            "num_embeddings": m.num_embeddings,
            "embedding_dim": m.embedding_dim,
            "padding_idx": m.padding_idx,
        },
    ),
    "torch.nn.Identity": (nn.Identity, lambda m: {}),
    "torch.nn.Sequential": (nn.Sequential, lambda m: {}),
}
_STANDARD_BY_CLASS = {cls: name for name, (cls, _) in STANDARD.items()}


def spec_of(module: nn.Module) -> dict[str, Any] | None:
    """Return ``{"type": name, "args": {...}}`` for a module an artifact can rebuild, else None."""
    cls = type(module)
    if cls in _STANDARD_BY_CLASS:
        name = _STANDARD_BY_CLASS[cls]
        return {"type": name, "args": STANDARD[name][1](module)}
    key = rebuild_key(cls)
    if rebuildable_types().get(key) is cls:
        return {"type": key, "args": module.spec()}  # type: ignore[operator]
    return None


def build(spec: dict[str, Any]) -> nn.Module:
    """Construct an empty module from a :func:`spec_of` record, or raise ArtifactError."""
    kind, args = spec.get("type"), spec.get("args", {})
    own = rebuildable_types()
    try:
        if kind in STANDARD:
            return STANDARD[kind][0](**args)
        if kind in own:
            return own[kind].from_spec(args)  # type: ignore[attr-defined]
    except (TypeError, ValueError, KeyError) as exc:
        raise ArtifactError(f"cannot rebuild a {kind} from {args}: {exc}") from exc
    known = ", ".join(sorted([*STANDARD, *own]))
    raise ArtifactError(
        f"the manifest names module type {kind!r}, which netshrink does not "
        f"know; known types: {known}"
    )
