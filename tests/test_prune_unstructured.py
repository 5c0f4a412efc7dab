"""prune.magnitude / random / nm: exact sparsity, zeros that survive training, sparse kernels."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import netshrink as ns
from netshrink.errors import ConfigError
from netshrink.prune import (
    SparseConv2d,
    SparseLinear,
    nm_layout_ok,
    sparse_layers,
    sparsity_report,
    unstructured,
)
from netshrink.prune.schedules import Schedule, fractions
from netshrink.prune.sparse_layers import choose_kernel, make_sparse
from test_graph import one_thread  # noqa: F401


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10)
    ).eval()


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.Flatten(),
        nn.Linear(16 * 64, 10),
    ).eval()  # fmt: skip


def data(n: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    return [(torch.randn(n, 1, 8, 8, generator=gen), torch.randint(0, 10, (n,), generator=gen))]


def zeros(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight == 0 for n, m in model.named_modules() if isinstance(m, SparseLinear)}


@settings(max_examples=15, deadline=None)
@given(sparsity=st.floats(0.0, 0.99), scope=st.sampled_from(["layer", "global"]))
def test_magnitude_sparsity_is_exact_and_removes_the_smallest(sparsity: float, scope: str) -> None:
    model = mlp()
    pruned = ns.prune.magnitude(model, sparsity=sparsity, scope=scope, kernel="dense")
    layers = [(m, o) for m, o in zip(pruned.modules(), model.modules(), strict=True)
              if isinstance(m, SparseLinear)]  # fmt: skip
    total = sum(o.weight.numel() for _, o in layers)
    removed = sum(int((m.weight == 0).sum()) for m, _ in layers)
    groups = [[pair] for pair in layers] if scope == "layer" else [layers]
    for group in groups:  # per layer, or over all layers: exact count, smallest |w| removed
        gone = torch.cat([o.weight[m.weight == 0].abs() for m, o in group])
        kept = torch.cat([o.weight[m.weight != 0].abs() for m, o in group])
        assert gone.numel() == round(sparsity * sum(o.weight.numel() for _, o in group))
        if gone.numel() and kept.numel():
            assert gone.max() <= kept.min()
    if scope == "global":
        assert removed == round(sparsity * total)
    for m, o in layers:  # kept weights are untouched
        torch.testing.assert_close(m.weight[m.weight != 0], o.weight[m.weight != 0])


def test_random_is_exact_per_layer_and_seeded() -> None:
    a = ns.prune.random(mlp(), sparsity=0.7, kernel="dense")
    b = ns.prune.random(mlp(), sparsity=0.7, kernel="dense")
    for name, mask in zeros(a).items():
        assert int(mask.sum()) == round(0.7 * mask.numel())
        assert torch.equal(mask, zeros(b)[name])


def test_finetuning_keeps_pruned_weights_at_zero() -> None:
    model = mlp()
    pruned = ns.prune.magnitude(model, sparsity=0.8, kernel="dense")
    before = zeros(pruned)
    tuned = ns.prune.magnitude(
        model, sparsity=0.8, kernel="dense", finetune={"epochs": 3, "lr": 0.05}, train_data=data()
    )
    for name, mask in zeros(tuned).items():
        assert torch.equal(mask, before[name])
        assert not torch.equal(tuned.get_submodule(name).weight, pruned.get_submodule(name).weight)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 3), extra=st.integers(1, 3), blocks=st.integers(1, 4))
def test_nm_keeps_n_largest_of_every_m(n: int, extra: int, blocks: int) -> None:
    m = n + extra
    torch.manual_seed(n * 100 + m)
    model = nn.Sequential(nn.Linear(m * blocks, 6), nn.Conv2d(m * blocks, 4, 3))
    pruned = ns.prune.nm(model, n=n, m=m, kernel="dense")
    for layer in pruned:
        assert nm_layout_ok(layer.weight, n, m)
        assert int((layer.weight != 0).sum()) == layer.weight.numel() * n // m
    w, o = pruned[0].weight.view(6, blocks, m), model[0].weight.view(6, blocks, m)
    kept_min = torch.where(w != 0, o.abs(), torch.inf).amin(-1)
    gone_max = torch.where(w == 0, o.abs(), -torch.inf).amax(-1)
    assert (kept_min >= gone_max).all()


def test_nm_layout_check_and_options() -> None:
    assert not nm_layout_ok(torch.ones(2, 8), 2, 4)
    assert not nm_layout_ok(torch.ones(2, 6), 2, 4)  # 6 is not a multiple of 4
    with pytest.raises(ConfigError, match="n must be smaller than m"):
        ns.prune.nm(mlp(), n=4, m=4)
    with pytest.warns(UserWarning, match="6 input channels, not a multiple of m=4"):
        ns.prune.nm(nn.Sequential(nn.Linear(6, 4)), n=2, m=4)
    with pytest.raises(ConfigError, match="sparsity"):
        ns.prune.magnitude(mlp(), sparsity=1.0)


@settings(max_examples=10, deadline=None)
@given(sparsity=st.floats(0.0, 0.99), rows=st.integers(1, 9), bias=st.booleans())
def test_csr_kernel_matches_dense(sparsity: float, rows: int, bias: bool) -> None:
    torch.manual_seed(rows)
    linear = make_sparse(nn.Linear(12, 7, bias=bias)).eval()
    conv = make_sparse(nn.Conv2d(12, 7, 1, bias=bias)).eval()
    for layer, x in ((linear, torch.randn(2, rows, 12)), (conv, torch.randn(2, 12, rows, 3))):
        with torch.no_grad():
            layer.weight[torch.rand(layer.weight.shape) < sparsity] = 0
        dense = layer(x)
        layer.kernel = "csr"
        torch.testing.assert_close(layer(x), dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("dense_ms", "csr_ms", "chosen"),
    [(2.0, 1.0, "csr"), (1.0, 0.95, "dense"), (1.0, 0.89, "csr"), (1.0, 3.0, "dense")],
)
def test_calibration_keeps_csr_only_when_10_percent_faster(
    monkeypatch: pytest.MonkeyPatch, dense_ms: float, csr_ms: float, chosen: str
) -> None:
    layer = make_sparse(nn.Linear(256, 256)).eval()
    timed: list[str] = []

    def fake_timing(dense, csr, runs):  # the kernels each run once; the clock is ours
        dense()
        timed.append(layer.kernel)
        csr()
        timed.append(layer.kernel)
        return dense_ms, csr_ms

    monkeypatch.setattr(sparse_layers, "time_pair", fake_timing)
    assert choose_kernel(layer, torch.randn(4, 256), runs=5) == chosen
    assert timed == ["dense", "csr"]
    assert layer.kernel == layer.spec()["kernel"] == chosen
    assert layer.timing == {"dense_ms": dense_ms, "csr_ms": csr_ms}


def test_calibration_times_both_kernels_and_the_report_lists_dense_layers() -> None:
    layer = make_sparse(nn.Linear(256, 256)).eval()
    with torch.no_grad():
        layer.weight[torch.rand(256, 256) < 0.99] = 0
    kernel = choose_kernel(layer, torch.randn(64, 256), runs=5)
    assert layer.spec()["kernel"] == kernel
    assert layer.timing["dense_ms"] > 0 and layer.timing["csr_ms"] > 0
    pruned = ns.prune.magnitude(cnn(), sparsity=0.3, example_inputs=data(4)[0][:1])
    report = sparsity_report(pruned)
    assert report.dense_layers == ["0", "2", "4"]  # below 0.7 sparsity nothing is timed
    assert "0.300" in str(report) and isinstance(pruned[0], SparseConv2d)


@pytest.mark.parametrize(
    ("sparsity", "rows", "timed"),
    [(0.5, 64, False), (0.69, 64, False), (0.9, 64, True), (0.95, 1, False), (0.995, 1, True)],
)
def test_auto_times_only_where_the_crossover_lets_csr_win(
    sparsity: float, rows: int, timed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    monkeypatch.setattr(unstructured, "choose_kernel", lambda layer, x: seen.append(layer.kernel))
    model = nn.Sequential(nn.Linear(200, 200)).eval()
    pruned = ns.prune.magnitude(model, sparsity=sparsity, example_inputs=(torch.randn(rows, 200),))
    assert len(seen) == int(timed)
    assert pruned[0].kernel == "dense" and pruned[0].timing == {}  # untimed layers stay dense
    assert unstructured.csr_may_win(pruned[0], torch.randn(rows, 200)) == timed


def test_state_dict_is_the_dense_layout_and_loading_restores_the_mask() -> None:
    pruned = ns.prune.magnitude(mlp(), sparsity=0.9, kernel="csr")
    state = pruned.state_dict()
    assert set(state) == set(mlp().state_dict())
    fresh = SparseLinear.from_spec(pruned[1].spec())
    fresh.load_state_dict({"weight": state["1.weight"], "bias": state["1.bias"]})
    assert fresh.kernel == "csr" and torch.equal(fresh.mask, state["1.weight"] != 0)
    x = torch.randn(3, 64)
    torch.testing.assert_close(fresh.eval()(x), pruned[1](x))


def test_schedules_reach_the_final_fraction() -> None:
    assert fractions(Schedule(), 0.9) == [0.9]
    assert fractions(Schedule(kind="iterative", steps=3), 0.9) == pytest.approx([0.3, 0.6, 0.9])
    gradual = fractions(Schedule(kind="gradual", steps=4), 0.8)
    assert gradual == pytest.approx([0.8 * (1 - (1 - j / 4) ** 3) for j in range(1, 5)])
    assert gradual[0] > 0.8 / 4  # Zhu & Gupta prune fastest at the start
    sched = {"kind": "gradual", "steps": 3, "epochs": 1}
    pruned = ns.prune.magnitude(
        mlp(), sparsity=0.75, schedule=sched, kernel="dense", train_data=data()
    )
    for mask in zeros(pruned).values():
        assert int(mask.sum()) == round(0.75 * mask.numel())


def test_weights_moved_by_momentum_are_zeroed_again_for_eval_and_saving() -> None:
    layer = make_sparse(nn.Linear(8, 4))
    with torch.no_grad():
        layer.weight[:, :4] = 0
    layer.refresh_mask()
    layer.train()
    with torch.no_grad():
        layer.weight.add_(0.5)  # what Adam's momentum does to a freshly pruned weight
    x = torch.randn(3, 8)
    expected = nn.functional.linear(x, layer.weight * layer.mask, layer.bias)
    torch.testing.assert_close(layer(x), expected)  # training forward uses the mask
    assert (layer.state_dict()["weight"][:, :4] == 0).all()
    layer.eval()
    assert (layer.weight[:, :4] == 0).all()
    torch.testing.assert_close(layer(x), expected)


def test_eval_mode_holds_no_mask_copy_and_training_gets_it_back() -> None:
    layer = make_sparse(nn.Linear(8, 4)).eval()
    with torch.no_grad():
        layer.weight[:, :4] = 0
    assert not any(b.dtype == torch.bool for b in layer.buffers())  # no byte per weight held
    assert torch.equal(layer.mask, layer.weight != 0)
    layer.mask = layer.mask & (torch.arange(8) != 6)  # prune one more column in eval mode
    assert (layer.weight[:, 6] == 0).all() and int(layer.mask.sum()) == 12
    layer.train()
    held = [b for b in layer.buffers() if b.dtype == torch.bool]
    assert len(held) == 1 and torch.equal(held[0], layer.weight != 0)
    with torch.no_grad():
        layer.weight.add_(0.5)  # momentum moves every weight; the held mask still knows
    assert int(layer.mask.sum()) == 12 and layer.stored_params() == 12 + 4
    layer.eval()
    assert int((layer.weight != 0).sum()) == 12 and not list(layer.buffers())
