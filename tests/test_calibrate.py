"""The one statistics pass (reducers, hooks, batches of every input form) and the block engine."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from netshrink.calibrate import (
    Capture,
    Gram,
    Hooks,
    MinMax,
    Reducer,
    Shape,
    SumSquares,
    collect,
    find_blocks,
    input_vectors,
    run_blocks,
)
from netshrink.calibrate.collect import Points
from netshrink.errors import TargetError, UnsupportedModuleError


class TwoInputs(nn.Module):
    """A model taking two tensors, positionally or by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(y)


@settings(max_examples=10, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(0, 2**16))
def test_streamed_sums_equal_the_whole_data_at_once(batches: int, rows: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(6, 2)
    xs = [torch.randn(rows, 3, 6, generator=gen) * torch.arange(1, 7) for _ in range(batches)]
    sq, gram, mm = SumSquares(), Gram(), MinMax()
    collect(layer, {"": [sq, gram, mm]}, [(x, None) for x in xs], "test", show=False)
    v = torch.cat(xs).reshape(-1, 6).double()
    assert sq.count == gram.count == v.shape[0]
    torch.testing.assert_close(sq.norms(), v.norm(dim=0))
    torch.testing.assert_close(gram.mean(), v.T @ v / v.shape[0])
    assert float(mm.min) == float(v.min()) and float(mm.max) == float(v.max())


def test_conv_statistics_line_up_with_the_weight_columns() -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 5, 5)
    sq = SumSquares()
    collect(conv, {"": [sq]}, [(x, None)], "test", show=False)
    cols = input_vectors(conv, x)
    assert sq.sum is not None and sq.sum.shape == (conv.weight[0].numel(),)
    torch.testing.assert_close(sq.norms(), cols.double().norm(dim=0))


@pytest.mark.parametrize("form", ["tuple", "dict"])
def test_positional_and_keyword_batches_reach_the_hooks(form: str) -> None:
    model = TwoInputs()
    x, y = torch.randn(5, 4), torch.randn(5, 4)
    inputs = (x, y) if form == "tuple" else {"x": x, "y": y}
    got = {"a": Capture(), "b": Capture()}
    collect(model, {n: [c] for n, c in got.items()}, [(inputs, None)], "test", show=False)
    assert torch.equal(got["a"].tensors[0], x) and torch.equal(got["b"].tensors[0], y)


def test_capture_keeps_at_most_its_limit_and_shape_the_first() -> None:
    layer = nn.Linear(4, 2)
    cap, out_shape = Capture(limit=2, on="output"), Shape("output")
    batches = [(torch.randn(n, 4), None) for n in (1, 2, 3)]
    collect(layer, {"": [cap, out_shape]}, batches, "test", show=False)
    assert [t.shape[0] for t in cap.tensors] == [1, 2]
    assert out_shape.shape == (1, 2)


def test_hooks_are_removed_even_when_the_forward_fails() -> None:
    model = TwoInputs().train()
    with pytest.raises(TypeError):
        collect(model, {"a": [MinMax()]}, [(torch.randn(2, 4), None)], "test", show=False)
    assert not model.a._forward_pre_hooks and model.training


def test_an_unknown_module_name_is_a_target_error() -> None:
    with pytest.raises(TargetError, match="has no module named 'c'"):
        Hooks(TwoInputs(), {"c": [MinMax()]})


class Record:
    """A block compressor that changes nothing and captures every block's inputs and outputs."""

    def __init__(self) -> None:
        self.seen: dict[str, list[Reducer]] = {}

    def statistics(self, name: str, block: nn.Module) -> Points:
        self.seen[name] = [Capture(8, "input"), Capture(8, "output")]
        return {"": self.seen[name]}

    def compress(self, name: str, block: nn.Module, points: Points) -> None:
        pass


def _reference(model: nn.Module, batches: list, blocks: list[str]) -> dict[str, list[Reducer]]:
    ref: dict[str, list[Reducer]] = {n: [Capture(8, "input"), Capture(8, "output")] for n in blocks}
    collect(model, ref, batches, "reference", show=False)
    return ref


def tiny_bert() -> tuple[nn.Module, list]:
    """A random 3-layer BERT (with pooler) and one keyword batch with padding."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0  # padding: the attention mask must reach every block as a keyword argument
    return transformers.BertModel(config).eval(), [
        ({"input_ids": ids, "attention_mask": mask}, None)
    ]


def _encoder() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()
    return model, [(torch.randn(2, 5, 8), None), (torch.randn(3, 5, 8), None)]


@pytest.mark.parametrize("build", [tiny_bert, _encoder], ids=["hf-bert", "nn-transformer"])
def test_with_an_identity_compressor_every_block_sees_what_the_model_feeds_it(build) -> None:
    model, batches = build()
    blocks = find_blocks(model)
    assert len(blocks) == 3
    ref = _reference(model, batches, blocks)
    recorder = Record()
    report = run_blocks(model, batches, recorder, show=False)
    assert report.blocks == tuple(blocks)
    for name in blocks:
        for want, got in zip(ref[name], recorder.seen[name], strict=True):
            assert len(want.tensors) == len(got.tensors) == len(batches)  # type: ignore[attr-defined]
            for a, b in zip(want.tensors, got.tensors, strict=True):  # type: ignore[attr-defined]
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # one block's inputs and outputs over all batches are held at once, and counted
    hidden = sum(t.numel() * t.element_size() for t in ref[blocks[0]][0].tensors)  # type: ignore[attr-defined]
    assert report.peak_activation_bytes >= 2 * hidden
    assert report.peak_bytes == report.model_bytes + report.peak_activation_bytes


def test_each_block_is_calibrated_on_the_compressed_blocks_before_it() -> None:
    model, batches = _encoder()
    dense = _reference(model, batches, find_blocks(model))

    class ZeroFirst(Record):
        def compress(self, name: str, block: nn.Module, points: Points) -> None:
            if name == "layers.0":
                block.linear2.weight.data.zero_()

    recorder = ZeroFirst()
    run_blocks(model, batches, recorder, show=False)
    seen_by_second = recorder.seen["layers.1"][0].tensors[0]  # type: ignore[attr-defined]
    with torch.no_grad():
        expected = model.layers[0](batches[0][0])
    torch.testing.assert_close(seen_by_second, expected)
    assert not torch.allclose(seen_by_second, dense["layers.1"][0].tensors[0])  # type: ignore[attr-defined]


def test_blocks_are_found_or_a_clear_error_names_what_to_do() -> None:
    with pytest.raises(TargetError, match="name the blocks"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))
    with pytest.raises(TargetError, match="not modules"):
        find_blocks(TwoInputs(), ["c"])
    assert find_blocks(TwoInputs(), ["a", "b"]) == ["a", "b"]


def test_blocks_that_never_run_are_reported() -> None:
    model = TwoInputs()
    model.unused = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    with pytest.raises(UnsupportedModuleError, match="never ran"):
        run_blocks(model, [((torch.randn(1, 4), torch.randn(1, 4)), None)], Record(), show=False)


def test_a_module_giving_no_tensor_is_a_target_error_naming_it() -> None:
    class Named(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"y": x}

    model = nn.Sequential(Named())
    with pytest.raises(TargetError, match="module '0''s output is a dict, not a tensor"):
        collect(model, {"0": [MinMax("output")]}, [(torch.randn(2), None)], "test", show=False)
