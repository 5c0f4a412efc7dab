"""``prune.ffn``: remove intermediate neurons of transformers' feed-forward blocks, physically.

Works without torch.fx on the FFNs :mod:`netshrink.hf.blocks` finds (BERT, MiniLM, DistilBERT,
ViT, GPT-2's Conv1D, T5's plain and gated ``DenseReluDense``, Llama-style gated MLPs,
``nn.TransformerEncoderLayer``). A removed neuron loses its row of every up projection and its
column of the down projection: the FFN computes exactly what the original computes with that
neuron's activation zeroed. When every FFN ends with one width, the config field holding it
(``intermediate_size``, ``d_ff``, ...) follows.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import nn

from netshrink.context import Context
from netshrink.errors import UnsupportedModuleError
from netshrink.hf.blocks import find_ffn
from netshrink.prune.units import UnitBlock, UnitPruneConfig, needs_calib, prune_blocks
from netshrink.registry import technique


class FfnConfig(UnitPruneConfig):
    """Options of ``prune.ffn``."""

    ratio: float = Field(
        0.3, ge=0, lt=1, description="fraction of FFN intermediate neurons removed"
    )
    criterion: Literal["l2", "activation", "taylor", "obs"] = Field(
        "l2",
        description="importance: weight norm, output size on data, Taylor, or obs: the down "
        "projection's least-squares error after the neuron's removal (structured OBS); all but "
        "l2 read data (calib_data, or train_data with calib_split: train)",
    )
    scope: Literal["layer", "global"] = Field(
        "layer", description="remove ratio of each FFN's neurons, or of all ranked together"
    )
    round_to: int = Field(
        1, ge=1, le=4096, description="keep each FFN's width a multiple of this (fast kernels)"
    )


def ffn_blocks(model: nn.Module, round_to: int) -> list[UnitBlock]:
    """The feed-forward blocks of ``model`` as blocks of intermediate neurons."""
    return [
        UnitBlock(
            f.path,
            f.size,
            tuple((s, 1) for s in f.up),
            (f.down, 1),
            floor=min(f.size, round_to),
            step=round_to,
        )
        for f in find_ffn(model)
    ]


@technique("prune.ffn", FfnConfig, needs=needs_calib)
def ffn(model: nn.Module, config: FfnConfig, ctx: Context) -> nn.Module:
    """Remove the least important FFN neurons of transformers (no tracing needed)."""
    blocks = ffn_blocks(model, config.round_to)
    if not blocks:
        raise UnsupportedModuleError(
            f"prune.ffn found no feed-forward block it understands in {type(model).__name__} "
            "(BERT, DistilBERT, ViT, GPT-2, T5, Llama-style, nn.TransformerEncoderLayer)"
        )
    prune_blocks(model, blocks, config, ctx, "hf.ffn", "FFN neurons")
    return model
