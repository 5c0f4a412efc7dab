"""The ``lowrank.svd`` technique: options, rank rules, sizes, MACs, skips, save and load."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import netshrink as ns
from netshrink.artifact import load, save
from netshrink.errors import ConfigError, DataError, MissingInputError, UnsupportedModuleError
from netshrink.lowrank import LowRankLinear, report_of
from netshrink.lowrank.layers import LowRankConv2d


class Net(nn.Module):
    """A conv, a grouped conv and two Linears, on (N, 4, 8, 8) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 32, 3, padding=1)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.fc1 = nn.Linear(32 * 16, 96)
        self.fc2 = nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.depthwise(torch.relu(self.conv(x))))
        x = nn.functional.max_pool2d(x, 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def _net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


X = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def _macs(model: nn.Module, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() // 2


def _svd(model: nn.Module, **kw) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ns.lowrank.svd(model, **kw)


def test_fixed_rank_params_and_macs_follow_the_formula() -> None:
    model = _net()
    out = _svd(model, rank=8, conv_variant="channel", targets={"include": ["conv", "fc1"]})
    assert isinstance(out.fc1, LowRankLinear) and out.fc1.rank == 8
    assert isinstance(model.fc1, nn.Linear)  # the caller's model is untouched
    # fc1: 8 * (512 + 96) + 96 bias; conv: 8 * (4*3*3) + 32 * 8 + 32 bias
    assert sum(p.numel() for p in out.fc1.parameters()) == 8 * (512 + 96) + 96
    assert sum(p.numel() for p in out.conv.parameters()) == 8 * 36 + 32 * 8 + 32
    saved_params = (512 * 96 - 8 * 608) + (32 * 36 - (8 * 36 + 32 * 8))
    before = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in out.parameters()) == before - saved_params
    # MACs: fc1 runs once per sample, conv at every one of the 8x8 output positions
    saved_macs = 2 * (512 * 96 - 8 * 608) + 2 * 64 * (32 * 36 - (8 * 36 + 32 * 8))
    assert _macs(out, X) == _macs(model, X) - saved_macs
    record = {r.name: r for r in report_of(out).layers}["fc1"]
    assert (record.rank, record.params_before, record.params_after) == (8, 512 * 96 + 96, 4960)


def test_energy_keeps_the_smallest_rank_and_rounds_up() -> None:
    model = _net()
    report = report_of(_svd(model, energy=0.8, targets={"include": ["fc1"]}))
    (fc1,) = report.factorized
    s2 = torch.linalg.svdvals(model.fc1.weight.double()).square()
    kept = (s2.cumsum(0) / s2.sum()).tolist()
    assert kept[fc1.rank - 1] >= 0.8 > kept[fc1.rank - 2]
    assert fc1.energy_kept == pytest.approx(kept[fc1.rank - 1])
    rounded = report_of(_svd(model, energy=0.8, round_to=8, targets={"include": ["fc1"]}))
    assert rounded.factorized[0].rank == -(-fc1.rank // 8) * 8


def test_ratio_keeps_at_most_that_share_of_each_layer() -> None:
    out = _svd(_net(), ratio=0.25, round_to=2)
    report = report_of(out)
    assert {r.name for r in report.factorized} == {"conv", "fc1", "fc2"}
    for r in report.factorized:
        dense_weights = r.params_before - r.shape[0]  # every layer of Net has a bias
        assert r.params_after - r.shape[0] <= 0.25 * dense_weights
        assert r.rank % 2 == 0


def test_layers_that_would_not_shrink_are_left_and_reported() -> None:
    # At full energy no layer shrinks: the technique changed nothing and says why.
    reason = r"changed nothing in Net: .*depthwise \(grouped convolution \(groups=32\)"
    with pytest.raises(UnsupportedModuleError, match=reason):
        ns.lowrank.svd(_net(), energy=1.0)


def test_separable_conv_takes_the_spatial_variant() -> None:
    """A weight that is a sum of 2 vertical x horizontal products is rank 2 in the spatial form."""
    conv = nn.Conv2d(8, 16, 3, padding=1)
    g = torch.Generator().manual_seed(0)
    v, h = torch.randn(2, 8, 3, generator=g), torch.randn(2, 16, 3, generator=g)
    with torch.no_grad():
        conv.weight.copy_(0.2 * torch.einsum("kcy,kox->ocyx", v, h))
    model = nn.Sequential(conv)
    out = _svd(model, energy=0.999)
    (record,) = report_of(out).factorized
    assert (record.variant, record.rank) == ("spatial", 2)
    assert out[0].first.kernel_size == (3, 1) and out[0].second.kernel_size == (1, 3)
    torch.testing.assert_close(out[0].weight, conv.weight, atol=1e-5, rtol=0)
    x = torch.randn(2, 8, 9, 9)
    torch.testing.assert_close(out(x), model(x), atol=1e-5, rtol=0)


def _two_layer_spectra() -> nn.Sequential:
    """Two 64x64 layers: one with fast-decaying singular values, one with flat ones."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    for layer, decay in zip(model, (0.7, 1.0), strict=True):
        u, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
        v, _ = torch.linalg.qr(torch.randn(64, 64, generator=g))
        with torch.no_grad():
            layer.weight.copy_(u @ torch.diag(decay ** torch.arange(64.0)) @ v.T)
    return model


def _error(report) -> float:
    return sum(1 - (r.energy_kept if r.skipped is None else 1.0) for r in report.layers)


def test_budget_meets_the_total_and_beats_a_uniform_split() -> None:
    model = _two_layer_spectra()
    out = _svd(model, budget=0.3)
    report = report_of(out)
    weights_after = sum(r.params_after - 64 for r in report.layers)
    assert weights_after <= 0.3 * 2 * 64 * 64
    uniform = report_of(_svd(model, ratio=0.3))
    assert sum(r.params_after - 64 for r in uniform.layers) <= 0.3 * 2 * 64 * 64
    assert _error(report) < _error(uniform)
    assert report.layers[0].rank < report.layers[1].rank  # the flat spectrum gets more rank


def test_mac_budget_counts_positions() -> None:
    """The conv runs at 64 positions per sample: under a MAC budget it costs 64x a weight."""
    model = _net()
    out = _svd(model, budget=0.5, budget_metric="macs", example_inputs=(X,))
    # MACs of conv, fc1, fc2 on X (the depthwise conv is not factorizable, so not counted)
    selected_before = 2 * 64 * 32 * 36 + 2 * (512 * 96 + 96 * 10)
    assert _macs(model, X) - _macs(out, X) >= 0.5 * selected_before
    assert report_of(out).layers[0].name == "conv" and report_of(out).layers[0].rank is not None


def test_activation_aware_beats_plain_on_the_calibration_inputs() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 64), nn.Tanh(), nn.Linear(64, 16)).eval()
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(48, 48, generator=g))
    calib = [((torch.randn(64, 48, generator=g) * torch.logspace(0, -2, 48)) @ q.T, None)]
    x = calib[0][0]
    plain = _svd(model, rank=8)
    aware = _svd(model, rank=8, activation_aware=True, calib_data=calib, progress=False)
    assert report_of(aware).activation_aware and report_of(aware).layers[0].rank == 8
    err_plain = (plain(x) - model(x)).norm()
    err_aware = (aware(x) - model(x)).norm()
    assert err_aware < 0.7 * err_plain


def test_save_load_gives_identical_outputs(tmp_path) -> None:
    model = _net()
    out = _svd(model, ratio=0.5, conv_variant="spatial")
    assert isinstance(out.conv, LowRankConv2d) and isinstance(out.fc1, LowRankLinear)
    save(out, tmp_path / "a")
    back = load(tmp_path / "a", model=_net())
    assert isinstance(back.fc1, LowRankLinear) and back.fc1.rank == out.fc1.rank
    assert back.conv.first.kernel_size == (3, 1)
    assert torch.equal(back(X), out(X))


def test_counts_never_exceed_the_parameters() -> None:
    """A factorized layer counts the non-zeros of its factors, not of the recomposed weight."""
    from netshrink.measure import count_nonzero, count_params

    out = _svd(_net(), ratio=0.5)
    with torch.no_grad():
        out.fc1.first.weight[0].zero_()  # 512 zeros in the first factor
    factored = out.fc1.first.weight.numel() + out.fc1.second.weight.numel() + 96
    assert out.fc1.num_params() == factored
    assert out.fc1.num_nonzero() == factored - 512
    assert count_nonzero(out) == count_params(out) - 512


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({}, "exactly one of energy, ratio, rank, budget"),
        ({"energy": 0.9, "rank": 4}, r"got energy=0.9, rank=4"),
        ({"ratio": 1.0}, "ratio"),
        ({"energy": 0.0}, "energy"),
        ({"rank": 0}, "rank"),
        ({"budget": 0.5, "round_to": 0}, "round_to"),
        ({"budget": 0.5, "budget_metric": "flops"}, "budget_metric"),
        ({"rank": 4, "conv_variant": "spatial", "activation_aware": True}, "spatial"),
        ({"rank": 4, "ranks": 3}, "unknown option"),
    ],
)
def test_bad_options_raise_config_error(options: dict, match: str) -> None:
    model = _net()
    with pytest.raises(ConfigError, match=match):
        ns.lowrank.svd(model, **options)


def test_missing_inputs_and_impossible_budget() -> None:
    with pytest.raises(MissingInputError, match="calib_data"):
        ns.lowrank.svd(_net(), rank=4, activation_aware=True)
    with pytest.raises(MissingInputError, match="example_inputs"):
        ns.lowrank.svd(_net(), budget=0.5, budget_metric="macs")
    with pytest.raises(ConfigError, match=r"budget 0\.01 is below"):
        _svd(_net(), budget=0.01, round_to=16)


def test_zoo_transformer_factorizes_and_reloads_by_name(tmp_path) -> None:
    """Attention's q/k/v/out Linears are factorized; the artifact reloads without model=."""
    from netshrink import zoo

    torch.manual_seed(0)
    model = zoo.build("digits-transformer").eval()
    x = zoo.example_inputs("digits-transformer", 4)
    calib = [(x[0], None)]
    out = _svd(model, ratio=0.5, round_to=8, activation_aware=True, calib_data=calib)
    report = report_of(out)
    attention = [r for r in report.factorized if r.name.endswith((".q", ".k", ".v", ".out"))]
    assert attention and all(r.rank % 8 == 0 for r in report.factorized)
    assert out(*x).shape == model(*x).shape
    save(out, tmp_path / "t")
    back = load(tmp_path / "t")
    assert torch.equal(back(*x), out(*x))


class FirstOnly(nn.Sequential):
    """Two Linears of which forward only uses the first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[0](x)


def test_mac_budget_needs_every_layer_to_run() -> None:
    model = FirstOnly(nn.Linear(32, 32), nn.Linear(32, 32))
    with pytest.raises(DataError, match=r"but 1 never ran on them"):
        _svd(model, budget=0.5, budget_metric="macs", example_inputs=(torch.randn(2, 32),))
