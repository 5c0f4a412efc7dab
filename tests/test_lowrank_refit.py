"""Sequential refit of ``lowrank.svd``: least-squares fit to the original outputs, in call order."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import netshrink as ns
from netshrink.artifact import load, save
from netshrink.errors import ConfigError
from netshrink.lowrank import report_of
from netshrink.lowrank.decompose import fitted_spectrum, spectrum
from netshrink.lowrank.jacobian import output_grams
from netshrink.lowrank.refit import execution_order


def _inputs(rows: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Correlated inputs with variances over two decades and a non-zero mean."""
    mix = torch.randn(n, n, generator=g) * torch.logspace(0, -2, n)
    return (torch.randn(rows, n, generator=g) @ mix + 0.3).double()


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(2, 12),
    n=st.integers(2, 12),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_fit_to_the_original_outputs_beats_truncating_the_weight(
    m: int, n: int, frac: float, seed: int
) -> None:
    """On inputs x that differ from the original inputs xo, the rank-k fit's error against the
    original outputs W xo is at most the whitened truncation's (fitted on xo), and equals the
    least-squares residual plus its discarded squared singular values."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n, m, bias=False).double()
    xo = _inputs(8 * n, n, g)
    x = xo + 0.3 * torch.randn(xo.shape, generator=g, dtype=torch.float64)
    k = 1 + round(frac * (min(m, n) - 1))
    w = layer.weight.detach()
    target = xo @ w.T

    def error(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((target - x @ (a @ b).T).square().sum())

    rows = x.shape[0]
    fitted = fitted_spectrum(w, xo.T @ x / rows, x.T @ x / rows, "linear", damping=0.0)
    truncated = spectrum(layer, "linear", xo.T @ xo / rows, damping=0.0)
    assert error(*fitted.factors(k)) <= error(*truncated.factors(k)) * (1 + 1e-6) + 1e-9
    best = torch.linalg.lstsq(x, target).solution.T  # W* without a rank limit
    residual = float((target - x @ best.T).square().sum())
    expected = residual + float(fitted.s2[k:].sum()) * rows
    assert error(*fitted.factors(k)) == pytest.approx(expected, rel=1e-6, abs=1e-8)


def _stack() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(32, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 16)
    ).eval()


def _calib() -> list:
    g = torch.Generator().manual_seed(1)
    return [(_inputs(256, 32, g).float(), None) for _ in range(2)]


def test_refit_lowers_the_calibration_output_error() -> None:
    """Same ranks; fitting each layer to the original outputs on the inputs the factorized
    layers before it produce cuts the model's output error on the calibration data."""
    model, calib = _stack(), _calib()
    x = torch.cat([inputs for inputs, _ in calib])
    options = {"rank": 6, "activation_aware": True, "calib_data": calib, "progress": False}
    plain = ns.lowrank.svd(copy.deepcopy(model), **options)
    fitted = ns.lowrank.svd(copy.deepcopy(model), refit=True, **options)
    assert [r.rank for r in report_of(fitted).layers] == [r.rank for r in report_of(plain).layers]
    with torch.no_grad():
        err_plain = float((plain(x) - model(x)).square().mean())
        err_fitted = float((fitted(x) - model(x)).square().mean())
    assert err_fitted < 0.8 * err_plain


def test_refit_meets_the_budget_exactly_and_reloads(tmp_path) -> None:
    """The refit keeps the allocation's ranks: the kept weights are the budget's share to
    within one rank step; the refit biases are saved and loaded with the factors."""
    model = _stack()
    out = ns.lowrank.svd(
        copy.deepcopy(model), budget=0.5, round_to=1, activation_aware=True, refit=True,
        calib_data=_calib(), progress=False,
    )  # fmt: skip
    report = report_of(out)
    dense = sum(r.shape[0] * r.shape[1] for r in report.layers)
    kept = sum(r.params_after - r.shape[0] for r in report.layers)  # the biases stay
    step = max(sum(r.shape) for r in report.layers)
    assert dense / 2 - step < kept <= dense / 2
    assert not torch.equal(out[4].bias, model[4].bias)  # the mean shift went into the bias
    save(out, tmp_path / "r")
    back = load(tmp_path / "r", model=_stack())
    x = _calib()[0][0]
    assert torch.equal(back(x), out(x))


def test_execution_order_follows_the_calls_not_the_names() -> None:
    class Reversed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.unused = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(self.b(x))

    order = execution_order(Reversed(), ["a", "b", "unused"], torch.randn(2, 4))
    assert order == ["b", "a"]


def test_refit_needs_activation_aware() -> None:
    with pytest.raises(ConfigError, match=r"refit=True reads calib_data.*activation_aware=True"):
        ns.lowrank.svd(_stack(), rank=4, refit=True)


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(2, 12), n=st.integers(2, 12), frac=st.floats(0.0, 1.0), seed=st.integers(0, 99)
)
def test_output_weighting_lowers_the_error_after_a_linear_head(
    m: int, n: int, frac: float, seed: int
) -> None:
    """With the exact JᵀJ of a linear head J after the layer, the weighted truncation's error
    at the head's output is at most the input-whitened one's, and equals its discarded
    squared singular values."""
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n, m, bias=False).double()
    head = torch.randn(m, m, generator=g, dtype=torch.float64) * torch.logspace(0, -2, m)
    x = _inputs(8 * n, n, g)
    k = 1 + round(frac * (min(m, n) - 1))
    cov = x.T @ x / x.shape[0]

    def error(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((x @ (layer.weight.detach() - a @ b).T @ head.T).square().sum())

    weighted = spectrum(layer, "linear", cov, damping=0.0, out_cov=head.T @ head)
    whitened = spectrum(layer, "linear", cov, damping=0.0)
    assert error(*weighted.factors(k)) <= error(*whitened.factors(k)) * (1 + 1e-5) + 1e-8
    expected = float(weighted.s2[k:].sum()) * x.shape[0]
    assert error(*weighted.factors(k)) == pytest.approx(expected, rel=1e-4, abs=1e-6)


def test_output_grams_estimate_the_heads_gauss_newton_matrix() -> None:
    """For y = head(fc(x)), E[g gᵀ] at fc's output is headᵀ head (Hutchinson's estimate);
    parameters' requires_grad and grad are left as they were."""
    model = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3)).eval()
    model[0].weight.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(512, 6, generator=g), None) for _ in range(2)]
    grams = output_grams(model, {"0": model[0]}, batches, probes=2, show=False)
    w = model[1].weight.detach().double()
    torch.testing.assert_close(grams["0"], w.T @ w, atol=0.06 * float(w.square().sum()), rtol=0)
    assert not model[0].weight.requires_grad and model[1].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_output_aware_lowers_the_models_output_error() -> None:
    model, calib = _stack(), _calib()
    x = torch.cat([inputs for inputs, _ in calib])
    options = {"rank": 6, "activation_aware": True, "calib_data": calib, "progress": False}
    plain = ns.lowrank.svd(copy.deepcopy(model), **options)
    weighted = ns.lowrank.svd(copy.deepcopy(model), output_aware=True, **options)
    with torch.no_grad():
        err_plain = float((plain(x) - model(x)).square().mean())
        err_weighted = float((weighted(x) - model(x)).square().mean())
    assert err_weighted < 0.8 * err_plain


def test_output_grams_see_through_an_in_place_activation() -> None:
    """ReLU(inplace=True) after the layer must not change what the gradient is taken at."""
    torch.manual_seed(0)
    inplace = nn.Sequential(nn.Linear(6, 8), nn.ReLU(inplace=True), nn.Linear(8, 3)).eval()
    plain = copy.deepcopy(inplace)
    plain[1] = nn.ReLU()
    batches = [(torch.randn(64, 6), None)]
    a = output_grams(inplace, {"0": inplace[0]}, batches, show=False)["0"]
    b = output_grams(plain, {"0": plain[0]}, batches, show=False)["0"]
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("probes", [0, 1001, 2.5])
def test_output_probes_out_of_range_raise_config_error(probes: float) -> None:
    with pytest.raises(ConfigError, match="output_probes"):
        ns.lowrank.svd(_stack(), rank=4, activation_aware=True, output_probes=probes)
