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
columns of a consumer (output projection, FFN down). Keeping a subset of heads or neurons slices
every slot (:func:`shrink_attention`, :func:`shrink_ffn`) and updates the head-count attributes
the module's forward reads. Both are registered as structural edits (``hf.heads``, ``hf.ffn``)
so an artifact replays them on a fresh model.

Grouped-query attention (fewer K/V heads than query heads) is pruned by whole K/V groups: a
kept group keeps its K/V head and all the query heads that share it, so the number of query
heads per group — what the forward repeats K/V by — never changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.errors import TargetError
from netshrink.layers.edits import edit_kind

__all__ = [
    "Attention",
    "FeedForward",
    "PrunedMultiheadAttention",
    "Slot",
    "find_attention",
    "find_ffn",
    "shrink_attention",
    "shrink_ffn",
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


def _linear_attention(
    path: str, module: nn.Module, names: tuple[str, str, str], out: str, head_dim: int
) -> Attention | None:
    q, k, v = (getattr(module, n) for n in names)
    if not all(_is_linear(m) for m in (q, k, v)) or head_dim <= 0:
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


def _attention_of(path: str, module: nn.Module, model: nn.Module) -> Attention | None:
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
        if not _is_linear(_get(model, out)):
            return None
        qkv = ("query", "key", "value")
        return _linear_attention(path, module, qkv, out, int(module.attention_head_size))
    for names, o, dim in (
        (("q_lin", "k_lin", "v_lin"), "out_lin", "attention_head_size"),
        (("q_proj", "k_proj", "v_proj"), "o_proj", "head_dim"),
        (("q", "k", "v"), "o", "key_value_proj_dim"),
    ):
        if _child(module, *names, o) and _is_linear(getattr(module, o)) and hasattr(module, dim):
            return _linear_attention(path, module, names, _join(path, o), int(getattr(module, dim)))
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


def find_attention(model: nn.Module) -> list[Attention]:
    """Every self-attention module of ``model`` that structured pruning understands."""
    found = []
    for path, module in model.named_modules():
        att = _attention_of(path, module, model)
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
    return w.t() if _axis(slot) == 1 else w


def slot_positions(slot: Slot, units: torch.Tensor) -> torch.Tensor:
    """Positions along the slot's unit axis held by ``units`` (a sorted 1-D index tensor)."""
    return (slot.offset + units[:, None] * slot.width + torch.arange(slot.width)).flatten()


def _axis(slot: Slot) -> int:
    """The axis of the slot's module ``weight`` that holds its units."""
    if slot.kind == "mha":
        return 0
    return int(slot.kind == "embedding" or (slot.kind == "linear") == (slot.role == "in"))


_SIZES = {
    ("linear", "out"): "out_features",
    ("linear", "in"): "in_features",
    ("conv1d", "out"): "nf",
    ("conv1d", "in"): "nx",
    ("embedding", "out"): "embedding_dim",
}


def _slice(model: nn.Module, cuts: dict[Slot, torch.Tensor]) -> None:
    """Keep, in every slot's module, the positions ``cuts`` maps it to (one cut per module:
    GPT-2's ``c_attn`` holds Q, K and V; their positions are concatenated)."""
    by_module: dict[tuple[str, str], list[tuple[Slot, torch.Tensor]]] = {}
    for slot, pos in cuts.items():
        by_module.setdefault((slot.module, slot.role), []).append((slot, pos))
    for (name, role), parts in by_module.items():
        slot = parts[0][0]
        keep = torch.cat([pos for _, pos in sorted(parts, key=lambda p: p[0].offset)])
        m = model.get_submodule(name)
        attr = "in_proj_weight" if slot.kind == "mha" else "weight"
        w = getattr(m, attr)
        setattr(m, attr, nn.Parameter(w.detach().index_select(_axis(slot), keep).clone()))
        bias = "in_proj_bias" if slot.kind == "mha" else "bias"
        if role == "out" and getattr(m, bias, None) is not None:
            setattr(m, bias, nn.Parameter(getattr(m, bias).detach()[keep].clone()))
        size = _SIZES.get((slot.kind, "out" if slot.kind == "embedding" else role))
        if size is not None:
            setattr(m, size, keep.numel())


def _units(keep: Any, total: int, what: str) -> torch.Tensor:
    """``keep`` as a sorted index tensor, or :class:`TargetError` unless it is a non-empty list
    of distinct integers in ``[0, total)``."""
    ok = isinstance(keep, list) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in keep
    )
    if not ok or not keep or len(set(keep)) != len(keep) or not all(0 <= i < total for i in keep):
        raise TargetError(
            f"keep must list distinct {what} in [0, {total}), at least one; got {keep!r}"
        )
    return torch.tensor(sorted(keep), dtype=torch.long)


def _find(items: list[Any], path: Any, what: str) -> Any:
    for item in items:
        if item.path == path:
            return item
    raise TargetError(f"{path!r} is no {what} of the model; known: {[i.path for i in items]}")


@edit_kind("hf.heads")
def shrink_attention(model: nn.Module, args: dict[str, Any]) -> None:
    """Edit ``hf.heads``: keep the K/V groups ``args["keep"]`` (heads, without grouped-query
    attention) of the attention module ``args["module"]``; the rest is cut out of Q, K, V, the
    output projection and T5's bias table, and the module's head-count attributes follow."""
    att: Attention = _find(find_attention(model), args["module"], "attention module")
    kv = _units(args["keep"], att.units, "K/V groups" if att.group > 1 else "heads")
    q = (kv[:, None] * att.group + torch.arange(att.group)).flatten()
    cuts = {s: slot_positions(s, q) for s in (*att.q, att.out)}
    cuts.update({s: slot_positions(s, kv) for s in att.kv})
    _slice(model, cuts)
    module = model.get_submodule(att.path)
    heads = q.numel()
    for name in HEAD_COUNTS:
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, heads)
    for name in HEAD_WIDTHS:
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, heads * att.head_dim)
    if isinstance(getattr(module, "num_key_value_heads", None), int):
        module.num_key_value_heads = kv.numel()
    if isinstance(module, nn.MultiheadAttention):
        # torch's functional attention requires heads x head size == embed_dim.
        module.__class__ = PrunedMultiheadAttention
        module._qkv_same_embed_dim = False  # keeps nn.TransformerEncoderLayer off its fast path


FFN_FIELDS = ("intermediate_size", "d_ff", "hidden_dim", "n_inner", "ffn_dim")
"""Config fields that hold the FFN width of every layer."""


@edit_kind("hf.ffn")
def shrink_ffn(model: nn.Module, args: dict[str, Any]) -> None:
    """Edit ``hf.ffn``: keep the intermediate neurons ``args["keep"]`` of the FFN
    ``args["module"]`` (rows of its up projections, columns of its down projection). When every
    FFN of the model then has one width, the config field holding it follows."""
    ffn: FeedForward = _find(find_ffn(model), args["module"], "feed-forward block")
    keep = _units(args["keep"], ffn.size, "neurons")
    _slice(model, {s: keep for s in (*ffn.up, ffn.down)})
    sizes = {f.size for f in find_ffn(model)}
    if len(sizes) == 1:
        for config in model_configs(model):
            for name in FFN_FIELDS:
                if isinstance(getattr(config, name, None), int):
                    setattr(config, name, next(iter(sizes)))


def model_configs(model: nn.Module) -> list[Any]:
    """The distinct Hugging Face configs (objects with ``to_dict``) held by ``model``'s modules."""
    configs: dict[int, Any] = {}
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            configs.setdefault(id(config), config)
    return list(configs.values())


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` left with fewer heads than ``embed_dim / head_dim``.

    The ``hf.heads`` edit turns a module into this class in place (its state dict keeps the
    original names); the forward is the original's — scaled dot-product attention of
    ``num_heads`` heads of ``head_dim`` — without its requirement that the heads fill
    ``embed_dim``. Bias K/V and zero attention are not supported (such modules are not pruned).
    """

    def forward(  # type: ignore[override]
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of ``query`` over ``key``/``value``, as ``nn.MultiheadAttention`` computes."""
        unbatched, batch_dim = query.dim() == 2, 0 if self.batch_first else 1
        if unbatched:
            query, key, value = (t.unsqueeze(batch_dim) for t in (query, key, value))
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        batch, length, _ = query.shape
        h, d = self.num_heads, self.head_dim
        bias = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        q, k, v = (
            F.linear(x, w, b).unflatten(-1, (h, d)).transpose(1, 2)
            for x, w, b in zip((query, key, value), self.in_proj_weight.chunk(3), bias, strict=True)
        )
        scores = q @ k.transpose(-2, -1) / d**0.5  # (batch, heads, length, source)
        if is_causal and attn_mask is None:
            attn_mask = torch.ones(length, k.shape[2], dtype=torch.bool).triu(1)
        for mask in (attn_mask, key_padding_mask):
            if mask is None:
                continue
            if mask is key_padding_mask:
                mask = mask[:, None, None, :]
            elif mask.dim() == 3:
                mask = mask.view(batch, h, *mask.shape[1:])
            mask = (
                torch.zeros_like(mask, dtype=q.dtype).masked_fill(mask, float("-inf"))
                if mask.dtype == torch.bool
                else mask
            )
            scores = scores + mask
        weights = F.dropout(scores.softmax(-1), self.dropout, self.training)
        out = self.out_proj((weights @ v).transpose(1, 2).flatten(2))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(batch_dim)
        if not need_weights:
            return out, None
        weights = weights.mean(1) if average_attn_weights else weights
        return out, weights.squeeze(0) if unbatched else weights
