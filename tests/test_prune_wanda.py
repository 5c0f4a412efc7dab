"""prune.wanda: exact sparsity per row, N:M groups, better reconstruction than magnitude."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import netshrink as ns
from netshrink.calibrate import SumSquares, collect
from netshrink.prune import SparseConv2d, SparseLinear
from netshrink.prune.wanda import wanda_scores
from test_calibrate import tiny_bert


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=4), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 36, 16), nn.ReLU(), nn.Linear(16, 8),
    ).eval()  # fmt: skip


def images(batches: int = 2, seed: int = 1) -> list[tuple[torch.Tensor, None]]:
    gen = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.1, 1.0, 10.0, 3.0]).view(1, 4, 1, 1)  # channels of unequal size
    return [(torch.randn(4, 4, 8, 8, generator=gen) * scale, None) for _ in range(batches)]


def sparse_layers(model: nn.Module) -> dict[str, SparseLinear | SparseConv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear | SparseConv2d)}


def norms_of(model: nn.Module, names: list[str], batches: list) -> dict[str, torch.Tensor]:
    """Input norms the dense model's layers see: the reference for the scores."""
    stats = {n: SumSquares() for n in names}
    collect(model, {n: [s] for n, s in stats.items()}, batches, "test", show=False)
    return {n: s.norms() for n, s in stats.items()}


@settings(max_examples=6, deadline=None)
@given(sparsity=st.floats(0.0, 0.95))
def test_each_output_row_loses_exactly_its_lowest_scores(sparsity: float) -> None:
    model, calib = convnet(), images()
    pruned = ns.prune.wanda(model, sparsity=sparsity, calib_data=calib, kernel="dense")
    layers = sparse_layers(pruned)
    assert len(layers) == 4
    norms = norms_of(model, list(layers), calib)
    for name, layer in layers.items():
        dense = model.get_submodule(name)
        scores = wanda_scores(dense, norms[name]).flatten(1)
        gone = (layer.weight == 0).flatten(1)
        for row_scores, row_gone in zip(scores, gone, strict=True):
            assert int(row_gone.sum()) == round(sparsity * row_scores.numel())
            if 0 < int(row_gone.sum()) < row_scores.numel():
                assert row_scores[row_gone].max() <= row_scores[~row_gone].min()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reconstruction_beats_magnitude_when_inputs_have_outlier_channels(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = nn.Linear(64, 32)
    scales = 10 ** torch.empty(64).uniform_(-2, 2, generator=gen)  # anisotropic: 1e-2 .. 1e2
    x = torch.randn(256, 64, generator=gen) * scales
    model = nn.Sequential(layer).eval()
    w = ns.prune.wanda(model, sparsity=0.5, calib_data=[(x, None)], kernel="dense")
    mag = ns.prune.magnitude(model, sparsity=0.5, kernel="dense")
    with torch.no_grad():
        ref = model(x)
        err_w, err_m = float((w(x) - ref).norm()), float((mag(x) - ref).norm())
    assert err_w <= err_m, (err_w, err_m)


def encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()


def test_sequential_calibrates_later_blocks_on_pruned_outputs() -> None:
    calib = [(torch.randn(4, 6, 16), None)]
    options = {"sparsity": 0.5, "calib_data": calib, "kernel": "dense"}
    targets = {"include": ["*linear*"]}  # out_proj is read by MultiheadAttention, never called
    plain = sparse_layers(ns.prune.wanda(encoder(), targets=targets, **options))
    seq = sparse_layers(ns.prune.wanda(encoder(), targets=targets, sequential=True, **options))
    assert len(seq) == 6
    for name, layer in seq.items():
        rows = (layer.weight == 0).sum(1)
        assert bool((rows == layer.weight.shape[1] // 2).all()), name
    # the first block sees the dense inputs either way; the last sees pruned ones only in seq
    assert torch.equal(seq["layers.0.linear1"].mask, plain["layers.0.linear1"].mask)
    assert not torch.equal(seq["layers.2.linear2"].mask, plain["layers.2.linear2"].mask)


def test_block_scope_hits_the_sparsity_over_each_block() -> None:
    calib = [(torch.randn(4, 6, 16), None)]
    pruned = ns.prune.wanda(
        encoder(), sparsity=0.4, scope="block", calib_data=calib, targets={"include": ["*linear*"]}
    )
    layers = sparse_layers(pruned)
    for block in ("layers.0", "layers.1", "layers.2"):
        mine = [m.weight for n, m in layers.items() if n.startswith(block + ".")]
        zero = sum(int((w == 0).sum()) for w in mine)
        assert zero == round(0.4 * sum(w.numel() for w in mine))


def test_sequential_on_a_hugging_face_bert_with_keyword_batches() -> None:
    model, calib = tiny_bert()
    pruned = ns.prune.wanda(model, sparsity=0.5, sequential=True, calib_data=calib, kernel="dense")
    layers = sparse_layers(pruned)
    # per layer q, k, v, attention output, intermediate, output; the pooler is outside the blocks
    assert len(layers) == 3 * 6 + 1
    for name, layer in layers.items():
        assert bool(((layer.weight == 0).sum(1) == layer.weight.shape[1] // 2).all()), name
    with torch.no_grad():
        assert pruned(**calib[0][0]).last_hidden_state.shape == (2, 7, 16)
