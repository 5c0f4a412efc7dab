"""The attention heads and feed-forward neurons of transformer blocks, found without torch.fx.

torch.fx cannot trace Hugging Face models, so structured pruning finds their structure by the
names their code gives to projections (transformers itself is never imported):

- BERT, MiniLM: ``self.query/key/value`` -> the sibling ``output.dense``;
  FFN ``intermediate.dense`` -> ``output.dense``.
- DistilBERT: ``q_lin/k_lin/v_lin`` -> ``out_lin``; ``ffn.lin1`` -> ``ffn.lin2``.
- ViT, Llama (grouped-query): ``q_proj/k_proj/v_proj`` -> ``o_proj``; ``fc1`` -> ``fc2``,
  ``gate_proj, up_proj`` -> ``down_proj``.
- GPT-2: ``c_attn`` (a Conv1D whose columns are [q|k|v]) -> ``c_proj``; ``mlp.c_fc`` ->
  ``mlp.c_proj``.
- T5 encoder: ``q/k/v`` -> ``o`` (block 0 also holds ``relative_attention_bias``, one column
  per head); ``wi`` or ``wi_0, wi_1`` (gated) -> ``wo``.
- ``nn.MultiheadAttention``: ``in_proj_weight`` rows [q|k|v] -> ``out_proj``;
  ``nn.TransformerEncoderLayer``'s ``linear1`` -> ``linear2``.

A *slot* is where a unit's weights live: output rows of a producer (Q, K, V, FFN up), input
columns of a consumer (output projection, FFN down). Cutting units out of the slots is
:mod:`netshrink.hf.shrink`'s job.

Grouped-query attention (fewer K/V heads than query heads) is pruned by whole K/V groups: a
kept group keeps its K/V head and all the query heads that share it, so the number of query
heads per group — what the forward repeats K/V by — never changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "Attention",
    "FeedForward",
    "Slot",
    "find_attention",
    "find_ffn",
    "slot_axis",
    "slot_positions",
    "slot_weight",
]

HEAD_COUNTS = ("num_attention_heads", "n_heads", "num_heads", "n_head")
"""Attributes holding an attention module's head count (forward may read them)."""
HEAD_WIDTHS = ("all_head_size", "inner_dim", "split_size")
"""Attributes holding heads x head size."""


@dataclass(frozen=True)
class Slot:
    """Where units live: positions ``offset + unit * width + [0, width)`` of ``module``'s
    output (``role`` ``out``: producer rows and bias) or input (``in``: consumer columns);
    ``kind`` says how the weight is laid out: ``linear`` (out, in), ``conv1d`` (in, out),
    ``embedding`` (an Embedding's columns: T5's bias table) or ``mha`` (``in_proj_weight``)."""

    module: str
    role: str
    kind: str
    width: int = 1
    offset: int = 0


@dataclass(frozen=True)
class Attention:
    """One attention module: its head-count owner ``path``, slots, and head geometry."""

    path: str
    heads: int
    kv_heads: int
    head_dim: int
    q: tuple[Slot, ...]
    kv: tuple[Slot, ...]
    out: Slot
    tie: str | None = None
    """Attention modules with the same tie must keep the same heads (T5: one bias table per
    stack, computed in block 0 and added to the scores of every block)."""

    @property
    def group(self) -> int:
        """Query heads per K/V head (1 without grouped-query attention)."""
        return self.heads // self.kv_heads

    @property
    def units(self) -> int:
        """Prunable units: K/V groups (every head without grouped-query attention)."""
        return self.kv_heads


@dataclass(frozen=True)
class FeedForward:
    """One FFN: the modules producing its intermediate neurons and the one consuming them."""

    path: str
    size: int
    up: tuple[Slot, ...]
    down: Slot


def _is_linear(m: Any) -> bool:
    return isinstance(m, nn.Linear)


def _is_conv1d(m: Any) -> bool:
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and hasattr(m, "nx")


def _child(module: nn.Module, *names: str) -> list[nn.Module] | None:
    found = [getattr(module, n, None) for n in names]
    return found if all(isinstance(m, nn.Module) for m in found) else None  # type: ignore[misc]


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


IsLinear = Callable[[Any], bool]
"""Which modules count as a Linear projection (pruning: ``nn.Linear`` only)."""


def _linear_attention(
    path: str,
    module: nn.Module,
    names: tuple[str, str, str],
    out: str,
    head_dim: int,
    linear: IsLinear,
) -> Attention | None:
    q, k, v = (getattr(module, n) for n in names)
    if not all(linear(m) for m in (q, k, v)) or head_dim <= 0:
        return None
    heads, kv_heads = q.out_features // head_dim, k.out_features // head_dim
    if heads * head_dim != q.out_features or kv_heads < 1 or heads % kv_heads:
        return None
    tie = None
    if hasattr(module, "relative_attention_bias") or hasattr(module, "has_relative_attention_bias"):
        tie = path.rsplit(".block.", 1)[0]
    kv = tuple(Slot(_join(path, n), "out", "linear", head_dim) for n in names[1:])
    if getattr(module, "relative_attention_bias", None) is not None:
        kv += (Slot(_join(path, "relative_attention_bias"), "cols", "embedding"),)
    return Attention(
        path, heads, kv_heads, head_dim, (Slot(_join(path, names[0]), "out", "linear", head_dim),),
        kv, Slot(out, "in", "linear", head_dim), tie,
    )  # fmt: skip


def _attention_of(
    path: str, module: nn.Module, model: nn.Module, linear: IsLinear = _is_linear
) -> Attention | None:
    """The :class:`Attention` at ``path``, or None when ``module`` is no attention module."""
    if isinstance(module, nn.MultiheadAttention):
        plain = module.in_proj_weight is not None and module.bias_k is None
        if not (
            plain and not module.add_zero_attn and module.kdim == module.vdim == module.embed_dim
        ):
            return None
        h, d = module.num_heads, module.head_dim
        e = h * d
        slots = tuple(Slot(path, "out", "mha", d, i * e) for i in range(3))
        out = Slot(_join(path, "out_proj"), "in", "linear", d)
        return Attention(path, h, h, d, slots[:1], slots[1:], out)
    if _child(module, "query", "key", "value") and hasattr(module, "attention_head_size"):
        parent = path.rpartition(".")[0]
        out = _join(parent, "output", "dense")
        if not linear(_get(model, out)):
            return None
        qkv = ("query", "key", "value")
        return _linear_attention(path, module, qkv, out, int(module.attention_head_size), linear)
    for names, o, dim in (
        (("q_lin", "k_lin", "v_lin"), "out_lin", "attention_head_size"),
        (("q_proj", "k_proj", "v_proj"), "o_proj", "head_dim"),
        (("q", "k", "v"), "o", "key_value_proj_dim"),
    ):
        if _child(module, *names, o) and linear(getattr(module, o)) and hasattr(module, dim):
            head_dim = int(getattr(module, dim))
            return _linear_attention(path, module, names, _join(path, o), head_dim, linear)
    conv = _child(module, "c_attn", "c_proj")
    if conv and all(_is_conv1d(m) for m in conv):
        d, e = int(module.head_dim), int(module.split_size)
        slots = tuple(Slot(_join(path, "c_attn"), "out", "conv1d", d, i * e) for i in range(3))
        cproj = Slot(_join(path, "c_proj"), "in", "conv1d", d)
        return Attention(path, e // d, e // d, d, slots[:1], slots[1:], cproj)
    return None


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


CROSS_ATTENTION = ("EncDecAttention", "crossattention", "encoder_attn")
"""Names of attention modules that read another stack (T5's, BERT's, BART's decoders)."""


def _is_cross(path: str, module: nn.Module) -> bool:
    """Whether the attention at ``path`` attends to another stack's states (left alone: its
    keys and values come from there)."""
    return bool(getattr(module, "is_cross_attention", False)) or any(
        part in CROSS_ATTENTION for part in path.split(".")
    )


def find_attention(model: nn.Module, linear: IsLinear = _is_linear) -> list[Attention]:
    """Every self-attention module of ``model`` that structured pruning understands;
    ``linear`` says which modules count as its Linear projections (by default ``nn.Linear``,
    whose rows and columns pruning cuts)."""
    found = []
    for path, module in model.named_modules():
        att = _attention_of(path, module, model, linear)
        if att is not None and not _is_cross(path, module):
            found.append(att)
    return found


_FFN_PATTERNS = (
    (("gate_proj", "up_proj"), "down_proj"),
    (("wi_0", "wi_1"), "wo"),
    (("wi",), "wo"),
    (("lin1",), "lin2"),
    (("fc1",), "fc2"),
    (("c_fc",), "c_proj"),
    (("linear1",), "linear2"),
    (("intermediate.dense",), "output.dense"),
)


def _ffn_of(path: str, module: nn.Module) -> FeedForward | None:
    for ups, down in _FFN_PATTERNS:
        mods = [_get(module, n) for n in (*ups, down)]
        if any(m is None for m in mods):
            continue
        if all(_is_linear(m) for m in mods):
            kind, size = "linear", mods[0].out_features  # type: ignore[union-attr]
        elif all(_is_conv1d(m) for m in mods):
            kind, size = "conv1d", mods[0].nf  # type: ignore[union-attr]
        else:
            continue
        up = tuple(Slot(_join(path, n), "out", kind) for n in ups)
        return FeedForward(path, int(size), up, Slot(_join(path, down), "in", kind))
    return None


def find_ffn(model: nn.Module) -> list[FeedForward]:
    """Every feed-forward block of ``model`` whose intermediate neurons can be pruned."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            continue
        ffn = _ffn_of(path, module)
        # GPT-2's attention also has c_proj: an FFN must not be an attention module.
        if ffn is not None and _attention_of(path, module, model) is None:
            found.append(ffn)
    return found


def slot_weight(model: nn.Module, slot: Slot, grad: bool = False) -> torch.Tensor:
    """The slot's weight (or its gradient, zeros when there is none) as a view with the unit
    axis first; a producer's bias is not included."""
    m = model.get_submodule(slot.module)
    param = m.in_proj_weight if slot.kind == "mha" else m.weight
    w = param if not grad else param.grad if param.grad is not None else torch.zeros_like(param)
    return w.t() if slot_axis(slot) == 1 else w


def slot_positions(slot: Slot, units: torch.Tensor) -> torch.Tensor:
    """Positions along the slot's unit axis held by ``units`` (a sorted 1-D index tensor)."""
    return (slot.offset + units[:, None] * slot.width + torch.arange(slot.width)).flatten()


def slot_axis(slot: Slot) -> int:
    """The axis of the slot's module ``weight`` that holds its units."""
    if slot.kind == "mha":
        return 0
    return int(slot.kind == "embedding" or (slot.kind == "linear") == (slot.role == "in"))


FFN_FIELDS = ("intermediate_size", "d_ff", "hidden_dim", "n_inner", "ffn_dim")
"""Config fields that hold the FFN width of every layer."""
