"""Module types an artifact may rebuild, and the JSON spec that rebuilds each.

Saving records, for every submodule, its type and the constructor arguments that fix its
tensor shapes. Loading rebuilds a module only from a type listed here — standard torch layers
from :data:`STANDARD`, netshrink's own layers registered with :func:`rebuildable` — so a
manifest can never make ``load`` import or construct anything else.

A netshrink layer registers like this::

    @rebuildable
    class QuantLinear(nn.Module):
        def spec(self) -> dict:                 # JSON-serialisable constructor arguments
            return {"in_features": ..., "out_features": ..., "bits": 8}
        @classmethod
        def from_spec(cls, spec: dict) -> "QuantLinear":
            return cls(**spec)                   # shapes right, values filled by load_state_dict
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from netshrink.errors import ArtifactError

_Args = Callable[[nn.Module], dict[str, Any]]


def _conv_args(m: nn.Module) -> dict[str, Any]:
    assert isinstance(m, nn.Conv1d | nn.Conv2d)
    return {
        "in_channels": m.in_channels,
        "out_channels": m.out_channels,
        "kernel_size": list(m.kernel_size),
        "stride": list(m.stride),
        "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
        "dilation": list(m.dilation),
        "groups": m.groups,
        "bias": m.bias is not None,
        "padding_mode": m.padding_mode,
    }


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

_OWN: dict[str, type[nn.Module]] = {}


def rebuildable(cls: type[nn.Module]) -> type[nn.Module]:
    """Class decorator: let artifacts rebuild ``cls`` from ``spec()`` via ``from_spec(spec)``."""
    if not (hasattr(cls, "spec") and hasattr(cls, "from_spec")):
        raise TypeError(f"{cls.__name__} needs a spec() method and a from_spec() classmethod")
    key = f"netshrink:{cls.__name__}"
    if key in _OWN and _OWN[key] is not cls:
        raise TypeError(f"two rebuildable classes are named {cls.__name__}")
    _OWN[key] = cls
    return cls


def spec_of(module: nn.Module) -> dict[str, Any] | None:
    """Return ``{"type": name, "args": {...}}`` for a module an artifact can rebuild, else None."""
    cls = type(module)
    if cls in _STANDARD_BY_CLASS:
        name = _STANDARD_BY_CLASS[cls]
        return {"type": name, "args": STANDARD[name][1](module)}
    key = f"netshrink:{cls.__name__}"
    if _OWN.get(key) is cls:
        return {"type": key, "args": module.spec()}  # type: ignore[operator]
    return None


def build(spec: dict[str, Any]) -> nn.Module:
    """Construct an empty module from a :func:`spec_of` record, or raise ArtifactError."""
    kind, args = spec.get("type"), spec.get("args", {})
    try:
        if kind in STANDARD:
            return STANDARD[kind][0](**args)
        if kind in _OWN:
            return _OWN[kind].from_spec(args)  # type: ignore[attr-defined]
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"cannot rebuild a {kind} from {args}: {exc}") from exc
    known = ", ".join(sorted([*STANDARD, *_OWN]))
    raise ArtifactError(
        f"the manifest names module type {kind!r}, which netshrink does not "
        f"know; known types: {known}"
    )
