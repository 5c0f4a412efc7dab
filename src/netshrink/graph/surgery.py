"""Per-layer surgery: remove positions of a slot from a layer's tensors, in place.

One function per slot role (see :mod:`netshrink.graph.deps`): ``out`` removes a producer's rows
(conv filters, linear neurons, embedding columns) with their bias; ``in`` removes a consumer's
input columns; ``through``/``norm`` remove BatchNorm/LayerNorm parameters and statistics;
``dw`` removes depthwise conv groups; ``grouped`` removes whole groups of a grouped conv;
``heads`` lowers an attention module's head count;
``param`` slices a bare parameter. :func:`slot_weights` gives, per position, the weights an
importance criterion scores.
"""

from __future__ import annotations

import torch
from torch import nn

from netshrink.graph.deps import Slot


def _slice(module: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    """Replace ``module.<name>`` (parameter or buffer) by its ``keep`` entries along ``dim``."""
    value = getattr(module, name, None)
    if value is None:
        return
    data = value.detach().index_select(dim, keep).clone()
    if isinstance(value, nn.Parameter):
        setattr(module, name, nn.Parameter(data, requires_grad=value.requires_grad))
    else:
        module.register_buffer(name, data)


def _out(m: nn.Module, keep: torch.Tensor) -> None:
    n = int(keep.numel())
    if isinstance(m, nn.Embedding):
        _slice(m, "weight", 1, keep)
        m.embedding_dim = n
        return
    _slice(m, "weight", 0, keep)
    _slice(m, "bias", 0, keep)
    if isinstance(m, nn.Linear):
        m.out_features = n
    else:
        m.out_channels = n  # type: ignore[assignment]


def _in(m: nn.Module, keep: torch.Tensor) -> None:
    _slice(m, "weight", 1, keep)
    if isinstance(m, nn.Linear):
        m.in_features = int(keep.numel())
    else:
        m.in_channels = int(keep.numel())  # type: ignore[assignment]


def _through(m: nn.Module, keep: torch.Tensor) -> None:
    for name in ("weight", "bias", "running_mean", "running_var"):
        _slice(m, name, 0, keep)
    if isinstance(m, nn.LayerNorm):
        m.normalized_shape = (int(keep.numel()),)
    else:
        m.num_features = int(keep.numel())  # type: ignore[assignment]


def _dw(m: nn.Module, keep: torch.Tensor) -> None:
    assert isinstance(m, nn.Conv1d | nn.Conv2d)
    mult = m.out_channels // m.in_channels
    rows = (keep[:, None] * mult + torch.arange(mult)).flatten()
    _slice(m, "weight", 0, rows)
    _slice(m, "bias", 0, rows)
    m.in_channels = m.groups = int(keep.numel())
    m.out_channels = int(rows.numel())


def _grouped(m: nn.Module, keep: torch.Tensor) -> None:
    assert isinstance(m, nn.Conv1d | nn.Conv2d)
    width_in, width_out = m.in_channels // m.groups, m.out_channels // m.groups
    _slice(m, "weight", 0, keep)  # whole groups: each group's input columns are unchanged
    _slice(m, "bias", 0, keep)
    m.groups = int(keep.numel()) // width_out
    m.in_channels, m.out_channels = m.groups * width_in, int(keep.numel())


def _heads(m: nn.Module, keep: torch.Tensor) -> None:
    m.num_heads = int(keep.numel())  # type: ignore[assignment]


def sync_attention(model: nn.Module) -> None:
    """Make every attention module's ``num_heads`` (and ``dim``, when it keeps one) agree with
    its sliced ``q`` layer, so its spec records the shapes it now has."""
    for m in model.modules():
        if isinstance(getattr(m, "q", None), nn.Linear) and isinstance(
            getattr(m, "head_dim", None), int
        ):
            m.num_heads = m.q.out_features // m.head_dim  # type: ignore[union-attr, operator]
            if isinstance(getattr(m, "dim", None), int):
                m.dim = m.q.in_features  # type: ignore[union-attr]


SURGERY = {
    "out": _out,
    "in": _in,
    "through": _through,
    "norm": _through,
    "dw": _dw,
    "grouped": _grouped,
    "heads": _heads,
}
"""The surgery function of each slot role (``param`` slots are sliced directly)."""


def prune_slot(model: nn.Module, slot: Slot, keep: torch.Tensor) -> None:
    """Keep only positions ``keep`` (sorted indices) of ``slot`` in ``model``'s layer."""
    module = model.get_submodule(slot.module)
    if slot.role == "param":
        _slice(module, slot.attr, slot.dim, keep)
        if isinstance(module, nn.Embedding):  # a model adding ``embedding.weight`` directly
            module.embedding_dim = module.weight.shape[1]
        return
    SURGERY[slot.role](module, keep)
    refresh = getattr(module, "refresh_mask", None)
    if callable(refresh):  # a sparse layer's mask follows its sliced weight
        refresh()


def _value(param: torch.Tensor | None, grad: bool) -> torch.Tensor | None:
    if param is None or not grad:
        return None if param is None else param.detach()
    return param.grad if param.grad is not None else torch.zeros_like(param)


def slot_weights(
    model: nn.Module, slot: Slot, grad: bool = False, bias: bool = False
) -> torch.Tensor | None:
    """Weights (or, with ``grad``, their gradients) of each position of ``slot`` as the rows of
    a 2-D tensor; None when the slot has nothing to score.

    With ``bias``, ``out`` rows end with the bias: then the first-order Taylor score of a row,
    sum(w * dL/dw), equals activation x gradient summed over that output channel, since the
    output is linear in its weights and bias (Molchanov et al. 2019, "Importance Estimation for
    Neural Network Pruning", sec. 3). Norm criteria score filter weights only (Li et al. 2017).
    """
    module = model.get_submodule(slot.module)
    if slot.role == "param":
        value = _value(getattr(module, slot.attr), grad)
        assert value is not None
        return value.movedim(slot.dim, 0).flatten(1)
    weight = _value(getattr(module, "weight", None), grad)
    if weight is None or slot.role == "heads":
        return None
    if slot.role in ("out", "grouped"):
        if isinstance(module, nn.Embedding):
            return weight.t()
        rows = weight.flatten(1)
        b = _value(getattr(module, "bias", None), grad) if bias else None
        return rows if b is None else torch.cat([rows, b[:, None]], dim=1)
    if slot.role == "in":
        return weight.transpose(0, 1).flatten(1)
    if slot.role == "dw":
        return weight.flatten(1).reshape(slot.ids.numel(), -1)
    return weight[:, None]  # through / norm: the per-channel scale
