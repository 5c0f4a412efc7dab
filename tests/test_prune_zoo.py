"""Pruning the real zoo architectures (untrained, so it is fast): shapes, MACs, artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import netshrink as ns
from netshrink import zoo
from netshrink.artifact import artifact_bytes, load, save
from test_graph import one_thread  # noqa: F401
from test_prune_channels import macs


@pytest.mark.parametrize(
    ("name", "min_fewer_macs"),
    [("digits-cnn", 3.0), ("digits-transformer", 1.6), ("digits-mlp", 3.0)],
)
def test_zoo_models_lose_half_their_channels_and_reload(
    name: str, min_fewer_macs: float, tmp_path: Path
) -> None:
    model, x = zoo.build(name).eval(), zoo.example_inputs(name, 4)
    pruned = ns.prune.channels(model, ratio=0.5, example_inputs=x)
    assert macs(model, x) / macs(pruned, x) >= min_fewer_macs
    save(pruned, tmp_path / name)
    loaded = load(tmp_path / name)  # a zoo artifact rebuilds without model=
    with torch.no_grad():
        assert torch.equal(loaded(*x), pruned(*x))


def test_digits_mlp_at_ninety_percent_is_seven_times_smaller_on_disk(tmp_path: Path) -> None:
    model, x = zoo.build("digits-mlp").eval(), zoo.example_inputs("digits-mlp", 4)
    sparse = ns.prune.magnitude(model, sparsity=0.9, kernel="csr")
    save(model, tmp_path / "dense")
    save(sparse, tmp_path / "sparse")
    assert artifact_bytes(tmp_path / "dense") / artifact_bytes(tmp_path / "sparse") >= 7.0
    with torch.no_grad():
        assert torch.equal(load(tmp_path / "sparse")(*x), sparse(*x))
