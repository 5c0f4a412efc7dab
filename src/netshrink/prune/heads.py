"""``prune.heads``: remove whole attention heads of transformers, physically.

Works without torch.fx on the attention modules :mod:`netshrink.hf.blocks` finds (BERT, MiniLM,
DistilBERT, ViT, GPT-2, the T5 encoder, Llama-style grouped-query attention and
``nn.MultiheadAttention``). A removed head loses its rows of Q, K and V and its columns of the
output projection, so the model is smaller and does fewer multiply-adds, and computes exactly
what the original computes with those heads' outputs zeroed. With grouped-query attention whole
K/V groups are removed (a K/V head with every query head that reads it); T5 keeps the same
heads in every block of a stack, because block 0's relative position bias is added to every
block's scores.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field
from torch import nn

from netshrink.context import Context
from netshrink.errors import UnsupportedModuleError
from netshrink.hf.blocks import find_attention
from netshrink.hf.shrink import PrunedMultiheadAttention
from netshrink.prune.units import UnitBlock, UnitPruneConfig, needs_calib, prune_blocks
from netshrink.registry import technique


class HeadsConfig(UnitPruneConfig):
    """Options of ``prune.heads``."""

    ratio: float = Field(0.3, ge=0, lt=1, description="fraction of attention heads removed")
    criterion: Literal["l2", "activation", "taylor", "mask", "obs"] = Field(
        "l2",
        description="importance: weight norm, output size on data, Taylor, head-mask gradient "
        "(Michel et al. 2019), or obs: the output projection's least-squares error after the "
        "head's removal (structured OBS); all but l2 read data (calib_data, or train_data "
        "with calib_split: train)",
    )
    scope: Literal["layer", "global"] = Field(
        "layer", description="remove ratio of each layer's heads, or of all heads ranked together"
    )
    min_heads: int = Field(1, ge=1, le=4096, description="heads every attention module keeps")


def head_blocks(model: nn.Module, min_heads: int) -> list[UnitBlock]:
    """The attention modules of ``model`` as blocks of K/V groups (heads without GQA)."""
    blocks = []
    for att in find_attention(model):
        repeat = ((s, att.group) for s in att.q)
        blocks.append(
            UnitBlock(
                att.path,
                att.units,
                (*repeat, *((s, 1) for s in att.kv)),
                (att.out, att.group),
                floor=min(att.units, math.ceil(min_heads / att.group)),
                tie=att.tie,
            )
        )
    return blocks


@technique("prune.heads", HeadsConfig, needs=needs_calib, creates=(PrunedMultiheadAttention,))
def heads(model: nn.Module, config: HeadsConfig, ctx: Context) -> nn.Module:
    """Remove the least important attention heads of transformers (no tracing needed)."""
    blocks = head_blocks(model, config.min_heads)
    if not blocks:
        raise UnsupportedModuleError(
            f"prune.heads found no attention module it understands in {type(model).__name__} "
            "(BERT, DistilBERT, ViT, GPT-2, T5 encoder, Llama-style, nn.MultiheadAttention)"
        )
    prune_blocks(
        model,
        blocks,
        config,
        ctx,
        "hf.heads",
        "attention heads (K/V groups under grouped-query attention)",
    )
    return model
