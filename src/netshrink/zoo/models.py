"""The reference models of the zoo, all for 8x8 single-channel digit images ``(N, 1, 8, 8)``.

They are wider than the task needs on purpose, so compression has room to work. ``width``
scales every hidden width (rounded to a multiple of 8), which is how distillation builds
students. No ``forward`` hard-codes a channel count: structured pruning changes them, and the
models must stay traceable by ``torch.fx`` and exportable to ONNX.
"""

from __future__ import annotations

import torch
from torch import nn

from netshrink.zoo.layers import SelfAttention

NUM_CLASSES = 10


def scaled(base: int, width: float) -> int:
    """``base * width`` rounded to the nearest multiple of 8, at least 8."""
    return max(8, round(base * width / 8) * 8)


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> list[nn.Module]:
    """Convolution without bias (BatchNorm supplies it) followed by BatchNorm."""
    conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
    return [conv, nn.BatchNorm2d(cout)]


class ResidualBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut (He et al. 2016, "basic block", sec. 3.3).

    The shortcut is a 1x1 conv-BN projection when the stride or channel count changes,
    otherwise the identity.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn(cin, cout, stride=stride), nn.ReLU(), *conv_bn(cout, cout)
        )
        project = stride != 1 or cin != cout
        self.shortcut = nn.Sequential(*conv_bn(cin, cout, 1, stride)) if project else nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class DigitsCNN(nn.Module):
    """Residual CNN: stem to 64 channels, a 64-channel block, a strided 128-channel stage, pool.

    8x8 -> 8x8 (64 ch) -> 4x4 (128 ch) -> global average -> Linear to 10 logits.
    """

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        c1, c2 = scaled(64, width), scaled(128, width)
        self.stem = nn.Sequential(*conv_bn(1, c1), nn.ReLU())
        self.stage1 = ResidualBlock(c1, c1)
        self.stage2 = nn.Sequential(ResidualBlock(c1, c2, stride=2), ResidualBlock(c2, c2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c2, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stage2(self.stage1(self.stem(x)))
        return self.head(torch.flatten(self.pool(x), 1))


class DigitsMLP(nn.Module):
    """Multi-layer perceptron on the flattened image: 64 -> 512 -> 512 -> 10, ReLU."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        hidden = scaled(512, width)
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``.

    Pre-norm (Xiong et al. 2020, sec. 3) trains stably without learning-rate warm-up.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, head_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitsTransformer(nn.Module):
    """Transformer encoder classifier reading the image's 8 rows as 8 tokens of 8 pixels.

    Linear embedding to ``dim`` (64), learned position embedding, two encoder blocks with 4
    heads, final LayerNorm, mean over tokens, Linear head.
    """

    def __init__(self, width: float = 1.0, depth: int = 2, num_heads: int = 4) -> None:
        super().__init__()
        dim, head_dim, hidden = scaled(64, width), scaled(16, width), scaled(128, width)
        self.embed = nn.Linear(8, dim)
        # An Embedding (not a bare Parameter) so an artifact can rebuild it at a pruned width.
        self.pos = nn.Embedding(8, dim)
        nn.init.normal_(self.pos.weight, std=0.02)
        self.blocks = nn.Sequential(
            *(EncoderBlock(dim, num_heads, head_dim, hidden) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.flatten(1, 2)) + self.pos.weight  # (N, 1, 8, 8) -> (N, 8, dim)
        return self.head(self.norm(self.blocks(tokens)).mean(dim=1))
