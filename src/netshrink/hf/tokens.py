"""Token-level targets of language models: next tokens (causal) and masked tokens (masked LM).

Both return the logits and labels of the positions a language-model loss is computed on, so
training losses and perplexity share one definition.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from netshrink.errors import ConfigError, DataError

MASK_RATE = 0.15
"""Fraction of real tokens masked for masked-LM targets (Devlin et al. 2019, BERT, sec. 3.1)."""


def token_inputs(inputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` (all ones when absent) of a keyword-inputs batch."""
    if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
        got = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
        raise DataError(f"language-model targets need keyword inputs with input_ids, got {got}")
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    return ids, torch.ones_like(ids) if mask is None else mask


def next_token_targets(
    logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal LM: the logits at each real position that has a real next token, ``(n, vocab)``,
    and that next token, ``(n,)``."""
    keep = (attention_mask[:, :-1] * attention_mask[:, 1:]).bool()
    return logits[:, :-1][keep], input_ids[:, 1:][keep]


def mask_positions(attention_mask: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A boolean ``(batch, tokens)`` choice of :data:`MASK_RATE` of the real tokens (at least one
    per sequence), drawn from ``generator`` (the global RNG when None)."""
    real = attention_mask.bool()
    draw = torch.rand(real.shape, generator=generator)
    chosen = (draw < MASK_RATE) & real
    # The real token with the smallest draw is always chosen, so no sequence is left unscored.
    first = draw.masked_fill(~real, 2.0).argmin(dim=1, keepdim=True)
    return chosen | (torch.zeros_like(real).scatter(1, first, True) & real)


def masked_inputs(
    inputs: Mapping[str, torch.Tensor],
    mask_token_id: int | None,
    generator: torch.Generator | None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Masked LM: ``inputs`` with the chosen tokens replaced by ``mask_token_id``, and the boolean
    positions chosen (see :func:`mask_positions`)."""
    if mask_token_id is None:
        raise ConfigError(
            "masked-LM targets need the tokenizer's mask token; load the model with "
            "netshrink.hf.load_model from a folder that holds its tokenizer"
        )
    ids, attention_mask = token_inputs(inputs)
    positions = mask_positions(attention_mask, generator)
    return {**inputs, "input_ids": ids.masked_fill(positions, mask_token_id)}, positions
