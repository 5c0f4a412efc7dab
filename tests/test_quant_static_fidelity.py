"""quantize.static fidelity options: bias correction."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import netshrink as ns
from quant_fixtures import digits
from test_quant_static import random_cnn


def one_sided(rows: int = 256, dim: int = 64, seed: int = 0) -> torch.Tensor:
    """Inputs with a non-zero mean (as after ReLU/GELU): weight rounding then shifts the mean
    of the output, which is what bias correction removes."""
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(rows, dim, generator=g)) + 0.1


def mean_error(q: nn.Module, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """|E[q(x) - model(x)]| per output channel."""
    with torch.no_grad():
        return (q(x) - model(x)).reshape(-1, q(x).shape[-1]).mean(0).abs()


def test_bias_correction_zeroes_a_layers_mean_output_error() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16)).eval()
    calib = [(one_sided(seed=i), None) for i in range(4)]
    x = torch.cat([b for b, _ in calib])
    opts = {"calib_data": calib, "weights": "int4", "progress": False}
    plain = ns.quantize.static(model, **opts)
    fixed = ns.quantize.static(model, bias_correction=True, **opts)
    before, after = mean_error(plain, model, x), mean_error(fixed, model, x)
    layer = fixed[0]
    unit = layer.weight_scale * layer.input_scale  # one int32 bias code
    assert float(before.mean()) > 5 * float(unit.max())  # int4 rounding shifts the mean
    assert torch.all(after <= unit / 2 + 1e-6)  # removed up to the bias code's rounding
    assert torch.equal(layer.weight_codes(), plain[0].weight_codes())  # only the bias moved


def test_bias_correction_lowers_a_cnns_mean_error_on_new_data() -> None:
    model = random_cnn(8)
    calib, test = digits()
    opts = {"calib_data": calib[:4], "weights": "int4", "progress": False}
    plain = ns.quantize.static(model, **opts)
    fixed = ns.quantize.static(model, bias_correction=True, **opts)
    x = torch.cat([b for b, _ in test[:4]])
    assert float(mean_error(fixed, model, x).mean()) < 0.7 * float(
        mean_error(plain, model, x).mean()
    )


def test_bias_correction_without_biases_warns() -> None:
    model = nn.Sequential(nn.Linear(8, 4, bias=False)).eval()
    with pytest.warns(UserWarning, match="no quantized layer has a bias"):
        ns.quantize.static(
            model, calib_data=[(torch.randn(4, 8), None)], bias_correction=True, progress=False
        )
