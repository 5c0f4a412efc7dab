"""The one statistics pass (reducers, hooks, batches of every input form) and the block engine."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import netshrink as ns
from netshrink.calibrate import (
    Capture,
    Gram,
    Hooks,
    MinMax,
    PerLayer,
    Reducer,
    Shape,
    SumSquares,
    collect,
    damped_inverse_cholesky,
    find_blocks,
    input_vectors,
    real_tokens,
    relative_output_error,
    run_blocks,
    token_mask,
)
from netshrink.calibrate.collect import Points
from netshrink.calibrate.sequential import BlockCall, piece_rows, split_call
from netshrink.errors import ConfigError, DataError, TargetError, UnsupportedModuleError


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


def test_a_model_failing_on_the_data_before_its_first_block_is_a_data_error() -> None:
    class NeedsY(TwoInputs):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3)])

        def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
            if y is None:  # as an encoder-decoder given no decoder inputs
                raise ValueError("You must specify y")
            h = super().forward(x, y)
            for layer in self.layers:
                h = layer(h)
            return h

    with pytest.raises(DataError, match=r"does not run on the calibration batches.*specify y"):
        run_blocks(NeedsY(), [(torch.randn(2, 4), None)], Record(), show=False)


def test_a_module_giving_no_tensor_is_a_target_error_naming_it() -> None:
    class Named(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"y": x}

    model = nn.Sequential(Named())
    with pytest.raises(TargetError, match="module '0''s output is a dict, not a tensor"):
        collect(model, {"0": [MinMax("output")]}, [(torch.randn(2), None)], "test", show=False)


def test_a_model_output_gives_its_first_set_field() -> None:
    from netshrink.calibrate.collect import first_tensor

    outputs = pytest.importorskip("transformers").modeling_outputs
    hidden, pooled = torch.randn(2, 3, 4), torch.randn(2, 4)
    value = outputs.BaseModelOutputWithPooling(last_hidden_state=hidden, pooler_output=pooled)
    assert first_tensor(value, "out") is hidden
    logits_only = outputs.SequenceClassifierOutput(loss=None, logits=pooled)  # unset loss skipped
    assert first_tensor(logits_only, "out") is pooled


class PaddedEncoder(nn.Module):
    """Token embeddings through two one-Linear blocks; the padding token's embedding is huge,
    so padding that leaked into a statistic would dominate it."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        with torch.no_grad():
            self.embed.weight[0] = 1000.0
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(2)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x


def _padded_batch() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Two sentences of 5 and 2 real tokens, the second padded with token 0; and the mask."""
    ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 0, 0, 0]])
    mask = (ids != 0).long()
    return {"input_ids": ids, "attention_mask": mask}, mask.bool()


def test_padding_tokens_are_left_out_of_token_statistics_only() -> None:
    model = PaddedEncoder()
    inputs, real = _padded_batch()
    gram, squares, extremes = Gram(), SumSquares(), MinMax()
    collect(model, {"layers.0.0": [gram, squares, extremes]}, [(inputs, None)], "t", show=False)
    x = model.embed(inputs["input_ids"]).detach()[real].double()  # (7 real tokens, 4)
    assert gram.count == squares.count == 7
    torch.testing.assert_close(gram.mean(), x.T @ x / 7)
    torch.testing.assert_close(squares.norms(), x.norm(dim=0))
    assert float(extremes.max) == 1000.0  # a reducer over whole tensors still sees the padding


class GramPerBlock:
    """A block compressor gathering each block's Linear input Gram, changing nothing."""

    def __init__(self) -> None:
        self.grams: dict[str, Gram] = {}

    def statistics(self, name: str, block: nn.Module) -> Points:
        self.grams[name] = Gram()
        return {"0": [self.grams[name]]}

    def compress(self, name: str, block: nn.Module, points: Points) -> None:
        pass


def test_sequential_blocks_leave_padding_out_of_their_statistics() -> None:
    model = PaddedEncoder()
    inputs, real = _padded_batch()
    seen = GramPerBlock()
    run_blocks(model, [(inputs, None)], seen, show=False)
    with torch.no_grad():
        x = model.layers[0](model.embed(inputs["input_ids"]))[real].double()
    second = seen.grams["layers.1"]
    assert second.count == 7
    torch.testing.assert_close(second.mean(), x.T @ x / 7)


def test_blocks_run_in_pieces_gather_the_statistics_of_whole_batches(monkeypatch) -> None:
    from netshrink.calibrate import sequential

    monkeypatch.setattr(sequential, "PIECE_ROWS", 5)  # one 5-token sequence a piece
    model = PaddedEncoder()
    inputs, real = _padded_batch()
    sizes: list[int] = []
    model.layers[1].register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    seen = GramPerBlock()
    run_blocks(model, [(inputs, None)], seen, show=False)
    with torch.no_grad():
        x = model.layers[0](model.embed(inputs["input_ids"]))[real].double()
    assert sizes.count(1) == 4  # one sequence at a time: the check's two pieces, the pass's two
    assert seen.grams["layers.1"].count == 7
    torch.testing.assert_close(seen.grams["layers.1"].mean(), x.T @ x / 7)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 9), tokens=st.integers(1, 6), rows=st.integers(0, 40))
def test_split_calls_rejoin_to_the_call_and_leave_shared_arguments_whole(
    batch: int, tokens: int, rows: int
) -> None:
    hidden, mask = torch.randn(batch, tokens, 3), torch.randn(batch, 1, tokens, tokens)
    shared, flags = torch.randn(1, tokens, 3), torch.rand(batch, tokens) > 0.5
    call = BlockCall(
        (hidden, mask), {"bias": shared, "pos": [torch.arange(batch * 2).view(batch, 2)]}, flags
    )
    parts = split_call(call, rows)
    size = max(1, rows // tokens)  # sequences a piece: at most `rows` rows, at least one
    if not rows or size >= batch:
        assert len(parts) == 1 and parts[0] is call
    else:
        assert [p.args[0].shape[0] for p in parts] == [
            min(size, batch - i) for i in range(0, batch, size)
        ]
    torch.testing.assert_close(torch.cat([p.args[0] for p in parts]), hidden)
    torch.testing.assert_close(torch.cat([p.args[1] for p in parts]), mask)
    torch.testing.assert_close(
        torch.cat([p.kwargs["pos"][0] for p in parts]), call.kwargs["pos"][0]
    )
    assert torch.equal(torch.cat([p.tokens for p in parts]), flags)
    assert all(p.kwargs["bias"] is shared for p in parts)  # not per sequence: every piece whole


class _MixesSequences(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        return self.inner(x - x.mean(0))  # each sequence's output depends on the others


class _BatchTimesHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        # a (batch x 2, positions) argument, as ALiBi biases are: not cut, so a piece fails
        return self.inner(x) + heads.view(x.shape[0], 2, -1).sum(1).unsqueeze(-1)


class _PerSequenceKeyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, *, scale: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * scale


def test_per_sequence_keyword_arguments_are_cut_with_the_batch() -> None:
    call = BlockCall((torch.randn(4, 3, 4),), {"scale": torch.rand(4, 1, 1)}, None)
    with torch.no_grad():
        assert piece_rows(_PerSequenceKeyword(), [call], rows=6) == 6


@pytest.mark.parametrize("block", [_MixesSequences(), _BatchTimesHeads()])
def test_a_block_whose_pieces_differ_from_the_whole_runs_whole(block: nn.Module) -> None:
    call = BlockCall((torch.randn(4, 3, 4),), {"heads": torch.randn(8, 3)}, None)
    with torch.no_grad():
        assert piece_rows(block, [call], rows=6) == 0
        assert piece_rows(block, [call], rows=12) == 12  # fits whole: nothing to cut


def test_token_vectors_are_filtered_only_when_shaped_like_the_mask() -> None:
    mask = torch.tensor([[True, False, True]])
    tokens = torch.arange(6.0).view(1, 3, 2)
    torch.testing.assert_close(real_tokens(tokens, mask), torch.tensor([[0.0, 1.0], [4.0, 5.0]]))
    image = torch.randn(1, 3, 4, 4)  # a feature map whose first two sizes match by chance
    assert real_tokens(image, mask) is image
    assert real_tokens(tokens, None) is tokens
    assert token_mask({"input_ids": torch.ones(1, 3)}) is None
    assert token_mask(torch.ones(1, 3)) is None


@settings(max_examples=10, deadline=None)
@given(st.integers(2, 12), st.floats(0.001, 1.0), st.integers(0, 2**16))
def test_damped_inverse_cholesky_factors_the_damped_inverse(width: int, damp: float, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * width, width, generator=gen, dtype=torch.float64)
    x[:, 0] = 0.0  # an input that never fired: no curvature, unit diagonal
    gram = x.T @ x
    u = damped_inverse_cholesky(gram, damp)
    h = gram.clone()
    h[0, 0] = 1.0
    h += damp * h.diagonal().mean() * torch.eye(width, dtype=torch.float64)
    assert torch.equal(u, u.triu())
    torch.testing.assert_close(u.T @ u, torch.linalg.inv(h), rtol=1e-6, atol=1e-8)


def test_a_hessian_damping_cannot_rescue_is_a_config_error_naming_damp() -> None:
    indefinite = torch.tensor([[1.0, 3.0], [3.0, 1.0]])
    with pytest.raises(ConfigError, match=r"damp=0\.01"):
        damped_inverse_cholesky(indefinite, 0.01)


def test_relative_output_error_from_the_gram_equals_the_direct_one() -> None:
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(50, 6, generator=gen), torch.randn(3, 6, generator=gen)
    w2 = w + 0.1 * torch.randn(3, 6, generator=gen)
    direct = float((x @ (w - w2).T).square().sum() / (x @ w.T).square().sum())
    assert relative_output_error(w, w2, x.T @ x) == pytest.approx(direct, rel=1e-5)
    assert relative_output_error(torch.zeros(3, 6), w2, x.T @ x) == 0.0


@pytest.mark.parametrize(
    "compress",
    [
        lambda m, c: ns.quantize.gptq(m, bits=4, group_size=8, sequential=True, calib_data=c),
        lambda m, c: ns.prune.sparsegpt(m, sparsity=0.5, sequential=True, calib_data=c),
        lambda m, c: ns.prune.wanda(m, n=2, m=4, sequential=True, calib_data=c),
    ],
    ids=["gptq", "sparsegpt", "wanda"],
)
def test_padding_a_batch_does_not_change_what_a_method_computes(compress) -> None:
    model, padded = tiny_bert()  # the second sentence has 4 real tokens, then padding
    inputs = padded[0][0]
    one_by_one = [
        ({k: v[i : i + 1, : int(inputs["attention_mask"][i].sum())] for k, v in inputs.items()},
         None)
        for i in range(2)
    ]  # fmt: skip
    a, b = compress(model, padded), compress(model, one_by_one)
    for (name, x), (_, y) in zip(a.named_modules(), b.named_modules(), strict=True):
        if hasattr(x, "weight") and name.startswith("encoder"):
            torch.testing.assert_close(x.weight, y.weight, atol=1e-5, rtol=1e-5, msg=name)


def test_column_statistics_stream_in_chunks_and_match_the_whole_batch_in_float64() -> None:
    from netshrink.calibrate.reducers import CHUNK

    gen = torch.Generator().manual_seed(0)
    layer = nn.Linear(24, 4)
    x = torch.randn(2, CHUNK + 7, 24, generator=gen)  # rows over several chunks and a remainder
    gram, squares = Gram(), SumSquares()
    for reducer in (gram, squares):
        reducer.update(layer, x)
        reducer.update(layer, x[:1, :3])
    rows = torch.cat([x.reshape(-1, 24), x[0, :3]]).double()
    torch.testing.assert_close(gram.sum, rows.T @ rows, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(squares.sum, (rows * rows).sum(0), rtol=1e-12, atol=1e-9)
    assert gram.count == squares.count == len(rows)
    mean = gram.take_mean()
    assert mean is not None and gram.sum is None
    torch.testing.assert_close(mean, rows.T @ rows / len(rows), rtol=1e-12, atol=1e-12)
    assert Gram().take_mean() is None


@pytest.mark.parametrize("reducer", [Gram, SumSquares])
def test_streamed_real_tokens_sum_exactly_what_their_copy_sums(reducer) -> None:
    from netshrink.calibrate.reducers import CHUNK, real_tokens

    gen = torch.Generator().manual_seed(1)
    layer = nn.Linear(16, 4)
    x = torch.randn(3, CHUNK // 2 + 40, 16, generator=gen)  # real rows span several chunks
    mask = torch.rand(3, x.shape[1], generator=gen) > 0.3
    streamed, copied = reducer(), reducer()
    streamed.update_tokens(layer, x, mask)
    copied.update(layer, real_tokens(x, mask))
    assert torch.equal(streamed.sum, copied.sum)
    assert streamed.count == copied.count == int(mask.sum())
    unmasked = reducer()
    unmasked.update_tokens(layer, x, None)  # no mask: every row
    assert unmasked.count == 3 * x.shape[1]


def test_the_report_counts_statistics_a_compressor_frees_as_it_uses_them() -> None:
    model, batches = _encoder()

    class Freeing(PerLayer):
        def compress(self, name: str, block: nn.Module, points: Points) -> None:
            for gram in self.stats.values():
                gram.take_mean()  # as GPTQ does: the sum is gone before the report looks

    owned = {b: [f"{b}.linear2"] for b in find_blocks(model)}
    report = run_blocks(model, batches, Freeing(owned, Gram, lambda _: None), show=False)
    gram_bytes = 16 * 16 * 8  # linear2's inputs are 16 wide, summed in float64
    inputs = sum(x.numel() * x.element_size() for x, _ in batches)
    assert report.peak_activation_bytes >= gram_bytes + 2 * inputs
