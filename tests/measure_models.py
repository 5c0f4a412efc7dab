"""Tiny models for the measure, runtime and ONNX tests: residual CNN, MLP, attention."""

from __future__ import annotations

import torch
from torch import nn


class ResidualCNN(nn.Module):
    """Conv-BN-ReLU stem, one residual block, global pooling, classifier; input (N, 1, 8, 8)."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width))
        self.block = nn.Sequential(
            nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = h + self.block(h)
        return self.head(h.mean(dim=(2, 3)))


class MLP(nn.Module):
    """Flatten, two hidden layers; input (N, 1, 8, 8)."""

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class TinyAttention(nn.Module):
    """Rows as tokens, one multi-head self-attention layer (q, k, v, out) and LayerNorm."""

    def __init__(self, dim: int = 8, num_heads: int = 2):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.flatten(1, 2)  # (N, 8 rows, 8 columns)
        b, t, d = tokens.shape

        def heads(proj: nn.Linear) -> torch.Tensor:
            return proj(tokens).view(b, t, self.num_heads, -1).transpose(1, 2)

        att = nn.functional.scaled_dot_product_attention(
            heads(self.q), heads(self.k), heads(self.v)
        )
        mixed = self.out(att.transpose(1, 2).reshape(b, t, d))
        return self.head(self.norm(tokens + mixed).mean(dim=1))


def tiny_models() -> dict[str, nn.Module]:
    """One seeded, eval-mode instance of each test model, by name."""
    torch.manual_seed(0)
    models = {"cnn": ResidualCNN(), "mlp": MLP(), "attention": TinyAttention()}
    for m in models.values():
        m.eval()
    return models
