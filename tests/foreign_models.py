"""Small models nobody on this project wrote, for the technique contract test.

Each :class:`Foreign` builds a fresh, seeded model (so ``ns.load(path, model=foreign.build())``
has the architecture to rebuild into), example inputs (a tuple of positional tensors or a dict of
keyword tensors) and a few ``(inputs, targets)`` batches. The Hugging Face models are built from
tiny random-init configs (hidden size 32, 2 layers): nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BATCH, SEQ, VOCAB, CLASSES = 4, 8, 64, 4


@dataclass(frozen=True)
class Foreign:
    """A foreign model: how to build it, and how to make one batch of its inputs and targets."""

    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], Any]
    targets: Callable[[torch.Generator], Any]

    def build(self) -> nn.Module:
        """The model with the same random weights every call, in eval mode."""
        torch.manual_seed(0)
        return self.make().eval()

    def batches(self, n: int = 2, seed: int = 0) -> list[tuple[Any, Any]]:
        """``n`` seeded ``(inputs, targets)`` batches."""
        gen = torch.Generator().manual_seed(seed)
        return [(self.inputs(gen), self.targets(gen)) for _ in range(n)]

    def example_inputs(self) -> Any:
        """The inputs of the first batch, as techniques take them."""
        inputs = self.batches(1)[0][0]
        return inputs if isinstance(inputs, dict) else (inputs,)


class EncoderClassifier(nn.Module):
    """nn.TransformerEncoder over (N, S, 16) features, mean-pooled into 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


class LSTMClassifier(nn.Module):
    """Token embedding, a one-layer LSTM, a linear head on the last step."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.head = nn.Linear(16, CLASSES)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(ids))
        return self.head(out[:, -1])


class AutoEncoder(nn.Module):
    """Conv2d down, GroupNorm, ConvTranspose2d back up: (N, 1, 8, 8) -> (N, 1, 8, 8)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.up = nn.ConvTranspose2d(8, 1, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.norm(self.down(x))))


class TiedLM(nn.Module):
    """A language model whose output head shares the token embedding's weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(ids))))


class DictInput(nn.Module):
    """Takes keyword tensors ``features`` and ``mask``, returns a dict of logits and a score."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24))
        self.logits = nn.Linear(24, CLASSES)
        self.score = nn.Linear(24, 1)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.body(features * mask)
        return {"logits": self.logits(h), "score": self.score(h)}


class FunctionalBlock(nn.Module):
    """A block holding its own weight Parameter and calling F.linear on it (no nn.Linear)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim, dim) / dim**0.5)
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(F.linear(x, self.weight, self.bias))


class FunctionalNet(nn.Module):
    """Linear in, two custom F.linear blocks, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 16)
        self.blocks = nn.Sequential(FunctionalBlock(16), FunctionalBlock(16))
        self.head = nn.Linear(16, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.inp(x)))


def _labels(gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, CLASSES, (BATCH,), generator=gen)


def _tokens(gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)


def _no_targets(_gen: torch.Generator) -> None:
    return None


def _dict_inputs(gen: torch.Generator) -> dict[str, torch.Tensor]:
    mask = (torch.rand(BATCH, 12, generator=gen) > 0.2).float()
    return {"features": torch.randn(BATCH, 12, generator=gen), "mask": mask}


PLAIN = [
    Foreign(
        "transformer_encoder",
        EncoderClassifier,
        lambda g: torch.randn(BATCH, SEQ, 16, generator=g),
        _labels,
    ),
    Foreign("lstm", LSTMClassifier, _tokens, _labels),
    Foreign(
        "autoencoder", AutoEncoder, lambda g: torch.randn(BATCH, 1, 8, 8, generator=g), _no_targets
    ),
    Foreign("tied_lm", TiedLM, _tokens, _no_targets),
    Foreign("dict_input", DictInput, _dict_inputs, _labels),
    Foreign("functional", FunctionalNet, lambda g: torch.randn(BATCH, 12, generator=g), _labels),
]


def _hf(kind: str) -> nn.Module:
    """A tiny random-init Hugging Face model of ``kind`` (hidden 32, 2 layers, 2 heads)."""
    import transformers as tf

    small = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
    if kind == "bert":
        return tf.BertModel(tf.BertConfig(vocab_size=VOCAB, hidden_size=32, **small))
    if kind == "distilbert":
        config = tf.DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
        return tf.DistilBertModel(config)
    if kind == "vit":
        config = tf.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=32, **small)
        return tf.ViTModel(config, add_pooling_layer=False)
    if kind == "gpt2":
        config = tf.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=2)
        return tf.GPT2LMHeadModel(config)
    config = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2)
    return tf.T5EncoderModel(config)


def _ids(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"input_ids": _tokens(gen)}


def _pixels(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"pixel_values": torch.randn(BATCH, 1, 8, 8, generator=gen)}


def hugging_face() -> list[Foreign]:
    """The tiny Hugging Face models (empty when transformers is not installed)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return []
    kinds = {"bert": _ids, "distilbert": _ids, "vit": _pixels, "gpt2": _ids, "t5_encoder": _ids}
    return [
        Foreign(f"hf_{kind}", lambda k=kind: _hf(k), inputs, _no_targets)
        for kind, inputs in kinds.items()
    ]


FOREIGN = [*PLAIN, *hugging_face()]
