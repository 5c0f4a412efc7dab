"""The one base of every layer a technique puts in place of a dense layer.

A technique that changes how a layer's weight is stored (integer codes, packed bits, half
floats, zeros kept sparse, two low-rank factors) swaps the layer for a subclass of
:class:`CompressedLayer`. The base is what the rest of netshrink reads — measure, report,
artifact and search never look at a subclass's own attribute names:

- ``weight`` (and ``bias`` where the original layer had one): the float tensor the layer
  computes with — decoded, densified or recomposed on access, on the layer's device, in the
  dtype it computes in — so a parent module that reads ``child.weight`` (Hugging Face ViT reads
  ``projection.weight.dtype``, T5 ``wo.weight``) keeps working. Decoding is not cached: it
  costs about one forward of the layer, and a cache would keep a float copy of every weight;
- :meth:`~CompressedLayer.num_params` / :meth:`~CompressedLayer.num_nonzero`: the parameters
  of the function the layer computes, so counts do not change with the storage format;
- :meth:`~CompressedLayer.stored_params` / :meth:`~CompressedLayer.stored_bits`: what is stored;
- :meth:`~CompressedLayer.spec` / :meth:`~CompressedLayer.from_spec`: JSON constructor
  arguments an artifact rebuilds the layer from. A subclass registers by existing (classes whose
  name starts with ``_`` are shared plumbing and are not registered).

The idea of one mixin that every quantized module derives from is optimum-quanto's
``QModuleMixin``; this base is written for storage formats beyond quantization.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

_REBUILDABLE: dict[str, type[nn.Module]] = {}
_ONNX: dict[Any, Callable[..., Any]] = {}

M = TypeVar("M", bound=type[nn.Module])


def rebuildable(cls: M) -> M:
    """Class decorator: let artifacts rebuild ``cls`` from ``spec()`` via ``from_spec(spec)``.

    :class:`CompressedLayer` subclasses are registered without it; other modules netshrink
    creates (a zoo model's attention block, a quantized ReLU) use it.
    """
    if not (hasattr(cls, "spec") and hasattr(cls, "from_spec")):
        raise TypeError(f"{cls.__name__} needs a spec() method and a from_spec() classmethod")
    key = rebuild_key(cls)
    if key in _REBUILDABLE and _REBUILDABLE[key] is not cls:
        raise TypeError(f"two rebuildable classes are named {cls.__name__}")
    _REBUILDABLE[key] = cls
    return cls


def rebuild_key(cls: type[nn.Module]) -> str:
    """The manifest's name for a netshrink layer class: ``netshrink:<class name>``."""
    return f"netshrink:{cls.__name__}"


def rebuildable_types() -> dict[str, type[nn.Module]]:
    """Every registered netshrink layer class by its manifest name (a copy)."""
    return dict(_REBUILDABLE)


def onnx_translation(op: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register the ONNX translation (an onnxscript function) of custom op ``op``.

    The module that defines a layer's custom op registers its translation next to it; the
    exporter (:mod:`netshrink.artifact.onnx`) reads :func:`onnx_translations`.
    """

    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        _ONNX[op] = fn
        return fn

    return register


def onnx_translations() -> dict[Any, Callable[..., Any]]:
    """Translations of the custom ops registered in this process (a copy)."""
    return dict(_ONNX)


class CompressedLayer(nn.Module):
    """Base of every replacement layer; see the module docstring for the contract.

    A subclass provides ``weight`` (a tensor property, or a real parameter when the stored
    tensor is the float weight itself), ``bias`` where the original had one, and ``spec()``.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_"):
            rebuildable(cls)

    def spec(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments: the artifact rebuilds the layer from them."""
        raise NotImplementedError(f"{type(self).__name__} must define spec()")

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Any:
        """An empty layer of the shapes ``spec`` names; ``load_state_dict`` fills the values."""
        return cls(**spec)

    def _float_tensors(self) -> list[torch.Tensor]:
        bias = getattr(self, "bias", None)
        return [self.weight, *([bias] if bias is not None else [])]

    def num_params(self) -> int:
        """Parameters of the function the layer computes: weight and bias elements.

        The same as the dense layer it replaced for a storage-only change (quantized, packed,
        half, sparse); a low-rank layer counts its factors.
        """
        return sum(t.numel() for t in self._float_tensors())

    def num_nonzero(self) -> int:
        """Elements of the float weight and bias that are not zero."""
        with torch.no_grad():
            return sum(int(torch.count_nonzero(t)) for t in self._float_tensors())

    def stored_params(self) -> int:
        """Elements the layer stores: every tensor of its state dict (codes, scales, bias)."""
        return sum(t.numel() for t in self.state_dict().values())

    def stored_bits(self) -> int:
        """Bits the layer stores: each state-dict tensor at its dtype's width."""
        return sum(t.numel() * t.element_size() * 8 for t in self.state_dict().values())

    def weight_bits(self) -> int:
        """Bits of one stored weight element (8 for int8 codes, 1 for binary, 16 for fp16)."""
        return torch.finfo(self.weight.dtype).bits
