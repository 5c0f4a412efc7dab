"""Cut attention heads and FFN neurons out of transformer blocks: the ``hf.heads`` and
``hf.ffn`` structural edits.

Keeping a subset of the units :mod:`netshrink.hf.blocks` finds slices every slot
(:func:`shrink_attention`, :func:`shrink_ffn`) and updates the head-count attributes the
module's forward reads. Both are registered as structural edits (``hf.heads``, ``hf.ffn``) so an
artifact replays them on a fresh model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.errors import TargetError
from netshrink.hf.blocks import (
    FFN_FIELDS,
    HEAD_COUNTS,
    HEAD_WIDTHS,
    Attention,
    FeedForward,
    Slot,
    find_attention,
    find_ffn,
    slot_axis,
    slot_positions,
)
from netshrink.layers.edits import edit_kind

__all__ = ["PrunedMultiheadAttention", "model_configs", "shrink_attention", "shrink_ffn"]

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
        setattr(m, attr, nn.Parameter(w.detach().index_select(slot_axis(slot), keep).clone()))
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
