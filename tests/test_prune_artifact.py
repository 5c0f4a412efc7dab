"""Every pruned model saves and loads back into a fresh instance with identical outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import netshrink as ns
from netshrink.artifact import artifact_bytes, load, save
from netshrink.prune import SparseLinear
from test_graph import ConvNet, EmbeddingNet, TinyTransformer, image, one_thread  # noqa: F401


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
        nn.Linear(256, 10),
    ).eval()  # fmt: skip


def ids() -> tuple[torch.Tensor]:
    return (torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(0)),)


CASES = {
    "channels-conv": (
        ConvNet,
        image,
        lambda m, x: ns.prune.channels(m, ratio=0.5, example_inputs=x),
    ),
    "channels-transformer": (
        TinyTransformer,
        image,
        lambda m, x: ns.prune.channels(m, ratio=0.5, prune_norm=True, example_inputs=x),
    ),
    "channels-embedding": (
        EmbeddingNet,
        ids,
        lambda m, x: ns.prune.channels(m, ratio=0.5, example_inputs=x),
    ),
    "magnitude-csr": (mlp, image, lambda m, x: ns.prune.magnitude(m, sparsity=0.9, kernel="csr")),
    "random": (ConvNet, image, lambda m, x: ns.prune.random(m, sparsity=0.6)),
    "nm": (mlp, image, lambda m, x: ns.prune.nm(m, n=2, m=4)),
    "channels-then-magnitude": (
        ConvNet,
        image,
        lambda m, x: ns.prune.magnitude(
            ns.prune.channels(m, ratio=0.5, example_inputs=x), sparsity=0.5
        ),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_save_load_gives_identical_outputs(case: str, tmp_path: Path) -> None:
    make, inputs, prune = CASES[case]
    x = inputs()
    pruned = prune(make().eval(), x).eval()
    save(pruned, tmp_path / "a")
    loaded = load(tmp_path / "a", model=make())
    with torch.no_grad():
        assert torch.equal(loaded(*x), pruned(*x))
    for (name, a), (_, b) in zip(pruned.named_modules(), loaded.named_modules(), strict=True):
        assert type(a) is type(b), name
        if isinstance(a, SparseLinear):
            assert b.kernel == a.kernel and torch.equal(b.mask, a.mask)


def test_ninety_percent_sparse_weights_store_at_least_seven_times_smaller(tmp_path: Path) -> None:
    model = mlp()
    save(model, tmp_path / "dense")
    save(ns.prune.magnitude(model, sparsity=0.9, kernel="dense"), tmp_path / "sparse")
    ratio = artifact_bytes(tmp_path / "dense") / artifact_bytes(tmp_path / "sparse")
    assert ratio >= 7.0, ratio
