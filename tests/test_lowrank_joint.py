"""Layers factorized jointly (``lowrank.svd(joint=...)``): one shared first factor per group."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import netshrink as ns
from netshrink.artifact import load, save
from netshrink.artifact.onnx import export_onnx
from netshrink.errors import ConfigError
from netshrink.lowrank import report_of
from netshrink.lowrank.shared import SharedBasis, SharedLowRankLinear, group_from_factors
from netshrink.measure.counts import count_params
from netshrink.runtime import EagerRunner, OrtRunner


class Attention(nn.Module):
    """Single-head self-attention whose query, key and value read one input, then an output."""

    def __init__(self, n: int = 24) -> None:
        super().__init__()
        self.query, self.key, self.value = nn.Linear(n, n), nn.Linear(n, n), nn.Linear(n, n)
        self.out = nn.Linear(n, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query(x), self.key(x), self.value(x)
        attention = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.out(attention @ v)


def _model() -> Attention:
    torch.manual_seed(0)
    return Attention().eval()


def _inputs(seed: int, rows: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(24, 24, generator=g) * torch.logspace(0, -2, 24)
    return torch.randn(rows, 5, 24, generator=g) @ mix


def _joint(model: nn.Module, joint: list[list[str]] | None = None) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ns.lowrank.svd(
            model, budget=0.5, activation_aware=True, joint=joint or [["query", "key"]],
            calib_data=[(_inputs(1), None)], progress=False,
        )  # fmt: skip


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(2, 12),
    k=st.integers(1, 6),
    outs=st.lists(st.integers(1, 9), min_size=2, max_size=3),
)
def test_group_computes_each_members_rows_of_the_factor_product(
    n: int, k: int, outs: list[int]
) -> None:
    g = torch.Generator().manual_seed(n * 100 + k)
    layers = [nn.Linear(n, m) for m in outs]
    a, b = torch.randn(sum(outs), k, generator=g), torch.randn(k, n, generator=g)
    group = group_from_factors(layers, a, b)
    x = torch.randn(3, n, generator=g)
    row = 0
    for layer, new in zip(layers, group, strict=True):
        m = layer.out_features
        assert new.first is group[0].first and new.rank == k
        assert torch.allclose(new.weight, a[row : row + m] @ b, atol=1e-5)
        with torch.no_grad():
            expected = x @ (a[row : row + m] @ b).T + layer.bias
            assert torch.allclose(new(x), expected, atol=1e-4)
        row += m


def test_basis_is_computed_once_per_input_and_never_stale() -> None:
    basis = SharedBasis(6, 3, users=2)
    x = torch.randn(4, 6)
    first = basis(x)
    assert basis(x) is first  # the second user takes the kept result
    assert basis._kept is None  # released once every user took it
    again = basis(x)
    with torch.no_grad():
        basis.weight.mul_(2)  # an in-place change bumps the weight's version
    assert torch.allclose(basis(x), 2 * again)
    assert basis(x.clone()) is not basis(x)  # another input tensor: computed anew


class NormedAttention(nn.Module):
    """A LayerNorm before the attention: query and key read a tensor made inside the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(24), Attention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.norm(x))


def test_a_joint_model_runs_under_inference_mode_as_the_runners_call_it() -> None:
    # tensors made under inference_mode have no version counter to check the kept result by
    torch.manual_seed(0)
    model = NormedAttention().eval()
    out = _joint(model)
    assert isinstance(out.attn.query, SharedLowRankLinear)
    x = _inputs(2)
    with torch.no_grad():
        want = out(x)
    torch.testing.assert_close(EagerRunner(out)((x,)), want, rtol=0, atol=0)


def test_a_basis_holding_a_result_with_history_deep_copies() -> None:
    out = _joint(_model())
    out.query(_inputs(2))  # grad on: the kept result, awaiting key, carries autograd history
    assert out.query.first._kept is not None
    copied = copy.deepcopy(out)
    assert copied.query.first._kept is None
    assert copied.query.first is copied.key.first  # the sharing survives the copy


def test_svd_shares_the_first_factor_and_meets_the_budget() -> None:
    model = _model()
    out = _joint(model)
    assert isinstance(out.query, SharedLowRankLinear) and isinstance(out.key, SharedLowRankLinear)
    assert out.query.first is out.key.first and out.query.rank == out.key.rank
    assert not isinstance(out.value, SharedLowRankLinear)
    report = report_of(out)
    assert report is not None
    assert {r.name: r.variant for r in report.factorized}.get("query") == "joint"
    dense = sum(p.numel() for p in model.parameters())
    assert count_params(out) == dense - report.params_before + report.params_after
    weights = sum(r.params_after - r.shape[0] for r in report.layers)  # biases stay
    assert weights <= 0.5 * sum(r.shape[0] * r.shape[1] for r in report.layers)
    dense_again = _model()  # the parent's forward is unchanged: dense layers of the products
    for name in ("query", "key", "value", "out"):
        with torch.no_grad():
            getattr(dense_again, name).weight.copy_(getattr(out, name).weight)
    x = _inputs(2)
    with torch.no_grad():
        assert torch.allclose(out(x), dense_again(x), atol=1e-5)


def test_save_load_restores_the_sharing_and_the_outputs(tmp_path: Path) -> None:
    out = _joint(_model())
    loaded = load(save(out, tmp_path / "a"), model=_model())
    assert isinstance(loaded.key, SharedLowRankLinear) and loaded.query.first is loaded.key.first
    x = _inputs(3)
    with torch.no_grad():
        assert torch.equal(loaded(x), out(x))


def test_onnx_export_matches_torch(tmp_path: Path) -> None:
    out = _joint(_model())
    x = _inputs(4)
    path = export_onnx(out, tmp_path / "m.onnx", (x[:2],))
    with torch.no_grad():
        expected = out(x).numpy()
    np.testing.assert_allclose(OrtRunner(path, threads=1)((x,)), expected, atol=1e-4, rtol=0)


def test_joint_needs_the_output_error_budget_and_two_names() -> None:
    with pytest.raises(ConfigError, match="budget"):
        ns.lowrank.svd(_model(), ratio=0.5, activation_aware=True, joint=[["query", "key"]])
    with pytest.raises(ConfigError, match="two or more"):
        _joint(_model(), [["query"]])


def test_members_reading_different_inputs_are_factorized_one_by_one() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query, self.key = nn.Linear(24, 24), nn.Linear(24, 24)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.key(torch.relu(self.query(x)))

    with pytest.warns(UserWarning, match="do not read the same input"):
        out = ns.lowrank.svd(
            Two().eval(), budget=0.5, activation_aware=True, joint=[["query", "key"]],
            calib_data=[(_inputs(1), None)], progress=False,
        )  # fmt: skip
    assert not isinstance(out.query, SharedLowRankLinear)


def test_a_group_with_a_member_left_out_by_targets_says_so() -> None:
    said = r"1 joint group\(s\) incomplete.*no selected Linear \['key'\]"
    with pytest.warns(UserWarning, match=said):
        out = ns.lowrank.svd(
            _model(), budget=0.5, activation_aware=True, joint=[["query", "key"]],
            targets={"exclude": ["key"]}, calib_data=[(_inputs(1), None)], progress=False,
        )  # fmt: skip
    assert not isinstance(out.query, SharedLowRankLinear)
    assert type(out.key) is nn.Linear  # excluded: untouched
