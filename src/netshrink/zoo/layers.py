"""Layers of the zoo models that compression techniques rewrite.

:class:`SelfAttention` keeps each head's projections as contiguous slices of plain ``nn.Linear``
layers and reads its head count from attributes, so structured pruning can remove whole heads
by slicing ``q``/``k``/``v`` (output rows) and ``out`` (input columns) and lowering
``num_heads``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.artifact.modules import rebuildable


@rebuildable
class SelfAttention(nn.Module):
    """Multi-head self-attention over ``(batch, tokens, dim)`` (Vaswani et al. 2017, sec. 3.2).

    ``q``, ``k``, ``v`` map ``dim -> num_heads * head_dim``; head ``h`` owns rows
    ``h*head_dim : (h+1)*head_dim`` of each. ``out`` maps ``num_heads * head_dim -> dim``.
    """

    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        if min(dim, num_heads, head_dim) < 1:
            raise ValueError(
                f"dim, num_heads and head_dim must be positive, got {dim}, {num_heads}, {head_dim}"
            )
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        inner = num_heads * head_dim
        self.q = nn.Linear(dim, inner)
        self.k = nn.Linear(dim, inner)
        self.v = nn.Linear(dim, inner)
        self.out = nn.Linear(inner, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, tokens, heads*head_dim) -> (batch, heads, tokens, head_dim)
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Attend every token to every token; ``x`` and the result are ``(batch, tokens, dim)``."""
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).flatten(2))

    def spec(self) -> dict[str, Any]:
        """Constructor arguments that fix this layer's shapes (JSON)."""
        return {"dim": self.dim, "num_heads": self.num_heads, "head_dim": self.head_dim}

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> SelfAttention:
        """An untrained layer with the shapes ``spec`` records."""
        return cls(int(spec["dim"]), int(spec["num_heads"]), int(spec["head_dim"]))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, head_dim={self.head_dim}"
