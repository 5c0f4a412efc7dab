"""Dependency graphs of small models: which channels the tracer couples, and what it refuses.

The models here are shared with tests/test_prune_channels.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from netshrink.artifact.modules import rebuildable
from netshrink.errors import UnsupportedModuleError
from netshrink.graph import FROZEN, dependency_graph


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these models are tiny and the test machine's cores are shared (with
    two threads each small conv waited tens of ms on the other core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@rebuildable
class Attention(nn.Module):
    """The interface of netshrink.zoo.layers.SelfAttention: Linear q k v out, head attributes."""

    def __init__(self, dim: int, num_heads: int, head_dim: int) -> None:
        super().__init__()
        self.dim, self.num_heads, self.head_dim = dim, num_heads, head_dim
        inner = num_heads * head_dim
        self.q, self.k, self.v = (nn.Linear(dim, inner) for _ in range(3))
        self.out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
        return self.out(y.transpose(1, 2).flatten(2))

    def spec(self) -> dict[str, int]:
        return {"dim": self.dim, "num_heads": self.num_heads, "head_dim": self.head_dim}

    @classmethod
    def from_spec(cls, spec: dict[str, int]) -> Attention:
        return cls(**spec)


class ConvNet(nn.Module):
    """Residual add, concat, chunk + multiply, depthwise conv, BatchNorm, flatten into Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16),
        )  # fmt: skip
        self.left = nn.Conv2d(16, 8, 1)
        self.right = nn.Conv2d(16, 16, 3, padding=1)
        self.gate = nn.Conv2d(24, 24, 1)
        self.dw = nn.Conv2d(12, 24, 3, padding=1, groups=12)  # depthwise, channel multiplier 2
        self.dw_bn = nn.BatchNorm2d(24)
        self.pw = nn.Conv2d(24, 16, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 4 * 4, 32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.body(x))
        x = torch.cat([self.left(x), self.right(x)], dim=1)
        a, b = self.gate(x).chunk(2, dim=1)
        x = F.relu(self.dw_bn(self.dw(a * torch.sigmoid(b))))
        x = self.pool(F.relu(self.pw(x)))
        return self.head(F.relu(self.fc(torch.flatten(x, 1))))


class TinyTransformer(nn.Module):
    """Pre-norm encoder block with attention and an MLP; rows of an 8x8 image are the tokens."""

    def __init__(self, dim: int = 16, heads: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.embed = nn.Linear(8, dim)
        self.pos = nn.Embedding(8, dim)  # added as a tensor, like zoo:digits-transformer
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim // heads)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x.flatten(1, 2)) + self.pos.weight
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return self.head(x.mean(dim=1))


class EmbeddingNet(nn.Module):
    """Token ids -> Embedding -> Linear -> mean over tokens -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 12)
        self.proj = nn.Linear(12, 24)
        self.head = nn.Linear(24, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(self.emb(ids))).mean(dim=1))


def image(n: int = 4) -> tuple[torch.Tensor]:
    return (torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(1)),)


def units_of(graph, module: str, role: str) -> list[int]:
    slot = graph.slots[(module, role, "")]
    return graph.roots(slot.ids).tolist()


def test_residual_add_merges_the_two_producers_channels() -> None:
    graph = dependency_graph(ConvNet().eval(), image())
    assert units_of(graph, "stem.0", "out") == units_of(graph, "body.3", "out")
    assert len(set(units_of(graph, "stem.0", "out"))) == 16


def test_concat_chunk_and_depthwise_map_positions_to_their_producers() -> None:
    graph = dependency_graph(ConvNet().eval(), image())
    gate_in = units_of(graph, "gate", "in")
    assert gate_in == units_of(graph, "left", "out") + units_of(graph, "right", "out")
    gate_out = units_of(graph, "gate", "out")
    # a * sigmoid(b) couples gate channel i with channel i + 12; the depthwise conv reads them.
    assert gate_out[:12] == gate_out[12:] == units_of(graph, "dw", "dw")
    assert units_of(graph, "dw_bn", "through") == [u for u in gate_out[:12] for _ in range(2)]


def test_flatten_into_linear_repeats_each_channel_per_position() -> None:
    graph = dependency_graph(ConvNet().eval(), image())
    fc_in = units_of(graph, "fc", "in")
    assert len(fc_in) == 256
    assert fc_in == [u for u in units_of(graph, "pw", "out") for _ in range(16)]


def test_model_outputs_and_inputs_are_frozen() -> None:
    graph = dependency_graph(ConvNet().eval(), image())
    assert set(units_of(graph, "head", "out")) == {FROZEN}
    assert ("stem.0", "in", "") not in graph.slots  # the image's channel is not a unit


def test_attention_heads_couple_q_k_v_rows_and_out_columns() -> None:
    graph = dependency_graph(TinyTransformer().eval(), image())
    heads = units_of(graph, "attn", "heads")
    assert len(set(heads)) == 4
    rows = [h for h in heads for _ in range(4)]
    for part in ("q", "k", "v"):
        assert units_of(graph, f"attn.{part}", "out") == rows
    assert units_of(graph, "attn.out", "in") == rows
    # The residual stream joins embed, the position parameter, attn.out and the MLP output.
    stream = units_of(graph, "embed", "out")
    assert units_of(graph, "attn.out", "out") == stream == units_of(graph, "mlp.2", "out")
    assert graph.slots[("pos", "param", "weight")].dim == 1


def test_embedding_columns_are_units() -> None:
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(0))
    graph = dependency_graph(EmbeddingNet().eval(), (ids,))
    assert units_of(graph, "emb", "out") == units_of(graph, "proj", "in")
    assert FROZEN not in units_of(graph, "emb", "out")


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) if x.sum() > 0 else -self.lin(x)  # data-dependent branch


def test_untraceable_submodule_is_kept_opaque_and_named() -> None:
    model = nn.Sequential(nn.Linear(4, 8), Untraceable(), nn.Linear(8, 2))
    graph = dependency_graph(model, (torch.randn(3, 4),))
    assert any(w.startswith("1: Untraceable.forward is not traceable") for w in graph.warnings)
    assert set(units_of(graph, "0", "out")) == {FROZEN}  # feeds the opaque module


def test_untraceable_model_raises_unsupported() -> None:
    with pytest.raises(UnsupportedModuleError, match=r"cannot trace Untraceable\.forward"):
        dependency_graph(Untraceable(), (torch.randn(3, 8),))


def test_grouped_conv_groups_are_whole_units_with_their_input_blocks() -> None:
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 6, 3, groups=2), nn.Conv2d(6, 4, 1))
    graph = dependency_graph(model, image())
    first, grouped = units_of(graph, "0", "out"), units_of(graph, "1", "grouped")
    assert first == [first[0]] * 4 + [first[4]] * 4 and first[0] != first[4]
    assert grouped == [first[0]] * 3 + [first[4]] * 3
    assert units_of(graph, "2", "in") == grouped


class Splitter(nn.Module):
    """torch.split into unequal parts along channels, each part read by its own layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.a, self.b = nn.Conv2d(1, 12, 1), nn.Conv2d(4, 2, 1), nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = torch.split(self.conv(x), [4, 8], dim=1)
        return torch.cat([self.a(left), self.b(right)], dim=1)


def test_split_gives_each_consumer_its_slice_of_the_labels() -> None:
    graph = dependency_graph(Splitter(), image())
    conv = units_of(graph, "conv", "out")
    assert units_of(graph, "a", "in") == conv[:4] and units_of(graph, "b", "in") == conv[4:]
