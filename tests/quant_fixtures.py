"""Tiny models and data shared by the quantization tests (digits, a small residual CNN)."""

from __future__ import annotations

import functools

import torch
from sklearn.datasets import load_digits
from torch import nn


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the input, then ReLU (a ResNet basic block)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu1 = nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))) + x)


class ResCNN(nn.Module):
    """Residual CNN for (N, 1, 8, 8) digits: stem, two blocks, global pool, linear."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(Block(c), Block(c))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


@functools.cache
def digits(batch: int = 64) -> tuple[list, list]:
    """(train, test) lists of (inputs (N,1,8,8) in [0,1], labels) batches, fixed split."""
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(d.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    split = 1400
    train = [(x[i : i + batch], y[i : i + batch]) for i in range(0, split, batch)]
    test = [(x[i : i + batch], y[i : i + batch]) for i in range(split, len(y), batch)]
    return train, test
