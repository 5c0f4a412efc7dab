"""quantize.static with weight_rounding gptq: same grids as nearest rounding, codes chosen to
lower each layer's output error; smoothed layers solved on the input their quantizer sees."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netshrink as ns
from netshrink.errors import ConfigError
from netshrink.quantize.layers import QuantConv2d, QuantLinear


class Correlated(nn.Module):
    """Two Linears whose inputs have strongly correlated channels (where GPTQ beats nearest)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(48, 64), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def correlated_batches(n: int, seed: int) -> list:
    """``n`` batches of 64 rows drawn from 8 latent factors mixed into 48 channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(8, 48, generator=torch.Generator().manual_seed(99))
    return [(torch.randn(64, 8, generator=g) @ mix, None) for _ in range(n)]


def weight_error(q: QuantLinear, ref: nn.Linear, x: torch.Tensor) -> float:
    """||x W^T - x Q^T||^2 summed over ``x``'s rows: the output error the weight codes cause."""
    return float((x @ (q.weight - ref.weight).detach().T).pow(2).sum())


@pytest.fixture(scope="module")
def pair() -> tuple[nn.Module, nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = Correlated().eval()
    calib = correlated_batches(4, seed=1)
    near = ns.quantize.static(model, calib_data=calib, progress=False)
    gptq = ns.quantize.static(model, calib_data=calib, weight_rounding="gptq", progress=False)
    return model, near, gptq


def test_gptq_keeps_the_grid_and_changes_codes_within_it(pair) -> None:
    _, near, gptq = pair
    for name in ("fc1", "fc2"):
        a, b = near.get_submodule(name), gptq.get_submodule(name)
        assert torch.equal(a.weight_scale, b.weight_scale)  # each row's min-max grid
        assert torch.equal(a.input_scale, b.input_scale)  # activation ranges untouched
        assert b.weight_q.dtype == torch.int8 and int(b.weight_q.abs().max()) <= 127
        assert float((a.weight_q != b.weight_q).float().mean()) > 0.05


def test_gptq_lowers_each_layers_output_error_on_new_inputs(pair) -> None:
    model, near, gptq = pair
    (x,) = [b for b, _ in correlated_batches(1, seed=7)]
    assert weight_error(gptq.fc1, model.fc1, x) < 0.5 * weight_error(near.fc1, model.fc1, x)
    h = torch.tanh(model.fc1(x)).detach()
    assert weight_error(gptq.fc2, model.fc2, h) < 0.5 * weight_error(near.fc2, model.fc2, h)
    with torch.no_grad():
        ref = model(x)
        assert float((gptq(x) - ref).pow(2).mean()) < float((near(x) - ref).pow(2).mean())


def test_smoothed_layers_are_solved_on_the_quantizers_input() -> None:
    torch.manual_seed(0)
    model = Correlated().eval()
    with torch.no_grad():
        model.fc1.weight[:, 3] *= 20  # an outlier weight column for smoothing to move
    calib = correlated_batches(4, seed=1)
    smoothed = ns.quantize.smoothquant(model, alpha=0.5, calib_data=calib, progress=False)
    near = ns.quantize.static(smoothed, calib_data=calib, progress=False)
    gptq = ns.quantize.static(smoothed, calib_data=calib, weight_rounding="gptq", progress=False)
    assert gptq.fc1.smoothed and torch.equal(gptq.fc1.input_smooth, near.fc1.input_smooth)
    (x,) = [b for b, _ in correlated_batches(1, seed=7)]
    assert weight_error(gptq.fc1, model.fc1, x) < weight_error(near.fc1, model.fc1, x)


def test_grouped_convolutions_stay_nearest_with_a_warning() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8)).eval()
    calib = [(torch.randn(2, 4, 10, 10), None) for _ in range(2)]
    near = ns.quantize.static(model, calib_data=calib, progress=False)
    with pytest.warns(UserWarning, match=r"leaves 2 rounded to nearest"):
        gptq = ns.quantize.static(model, calib_data=calib, weight_rounding="gptq", progress=False)
    assert isinstance(gptq[0], QuantConv2d) and isinstance(gptq[2], QuantConv2d)
    assert torch.equal(gptq[2].weight_q, near[2].weight_q)
    assert torch.equal(gptq[0].weight_scale, near[0].weight_scale)
    assert not torch.equal(gptq[0].weight_q, near[0].weight_q)


def test_gptq_needs_per_channel_scales() -> None:
    with pytest.raises(ConfigError, match="per_channel"):
        ns.quantize.static(
            Correlated(), calib_data=correlated_batches(1, 0), weight_rounding="gptq",
            per_channel=False,
        )  # fmt: skip
    with pytest.raises(ConfigError, match="weight_rounding"):
        ns.quantize.static(Correlated(), calib_data=correlated_batches(1, 0), weight_rounding="x")
