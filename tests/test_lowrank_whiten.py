"""Whitened (SVD-LLM) low-rank factorization: output error, padding, allocation, save/load."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import netshrink as ns
from netshrink.artifact import load, save
from netshrink.errors import ConfigError, MissingInputError
from netshrink.lowrank import factorize, report_of
from netshrink.lowrank.decompose import spectrum
from netshrink.lowrank.inputs import layer_inputs
from netshrink.lowrank.layers import linear_from_factors
from netshrink.lowrank.sensitivity import output_weights


def _correlated(rows: int, n: int, seed: int) -> torch.Tensor:
    """Inputs mixed by a random matrix: strongly correlated, variances over decades."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=g) * torch.logspace(0, -2, n)
    return torch.randn(rows, n, generator=g) @ mix


def _output_error(layer: nn.Linear, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> float:
    w = layer.weight.detach().double()
    return float((x.double() @ (w - a @ b).T).square().sum())


@settings(max_examples=30, deadline=None)
@given(
    m=st.integers(2, 16),
    n=st.integers(2, 16),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_whitened_output_error_is_at_most_the_plain_one(
    m: int, n: int, frac: float, seed: int
) -> None:
    """SVD-LLM sec. 3.1: at the same rank, the whitened truncation's error on the calibration
    inputs is never above the plain SVD's, and equals its discarded squared singular values."""
    torch.manual_seed(seed)
    layer = nn.Linear(n, m)
    x = _correlated(4 * n, n, seed)
    gram = x.double().T @ x.double() / x.shape[0]
    k = 1 + round(frac * (min(m, n) - 1))
    whitened = spectrum(layer, "linear", gram, damping=0.0)
    plain = spectrum(layer, "linear")
    err_whitened = _output_error(layer, *whitened.factors(k), x)
    err_plain = _output_error(layer, *plain.factors(k), x)
    assert err_whitened <= err_plain * (1 + 1e-6) + 1e-9
    expected = float(whitened.s2[k:].sum()) * x.shape[0]
    assert err_whitened == pytest.approx(expected, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_identity_gram_is_the_plain_svd(k: int) -> None:
    torch.manual_seed(0)
    layer = nn.Linear(9, 6)
    eye = torch.eye(9, dtype=torch.float64)
    a, b = spectrum(layer, "linear", eye, damping=0.0).factors(k)
    a0, b0 = spectrum(layer, "linear").factors(k)
    torch.testing.assert_close(a @ b, a0 @ b0, atol=1e-10, rtol=0)


class Masked(nn.Module):
    """A Linear and a head on (batch, tokens, 8) inputs; the mask is taken and not used."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 12)
        self.head = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.fc(x))).mean(1)


def _padded_batches(pad_value: float) -> list:
    g = torch.Generator().manual_seed(3)
    batches = []
    for lengths in ([5, 2, 4], [3, 6]):
        x = _correlated(len(lengths) * 6, 8, len(lengths)).reshape(len(lengths), 6, 8)
        mask = torch.zeros(len(lengths), 6, dtype=torch.long)
        for i, length in enumerate(lengths):
            mask[i, :length] = 1
        x = torch.where(mask.bool()[..., None], x, pad_value * torch.randn(x.shape, generator=g))
        batches.append(({"x": x, "attention_mask": mask}, None))
    return batches


def test_padding_tokens_are_left_out_of_the_gram_matrix() -> None:
    torch.manual_seed(0)
    model = Masked().eval()
    batches = _padded_batches(pad_value=100.0)
    stats = layer_inputs(model, {"fc": model.fc}, batches, covariance=True, show=False)
    real = torch.cat([b[0]["x"][b[0]["attention_mask"].bool()] for b in batches]).double()
    assert stats["fc"].count == real.shape[0] == 20
    torch.testing.assert_close(stats["fc"].gram, real.T @ real, atol=1e-9, rtol=1e-9)
    # the factorization does not depend on what the padded positions hold
    a = ns.lowrank.svd(model, rank=3, activation_aware=True, calib_data=batches, progress=False)
    b = ns.lowrank.svd(
        model, rank=3, activation_aware=True, calib_data=_padded_batches(0.0), progress=False
    )
    assert torch.equal(a.fc.first.weight, b.fc.first.weight)
    kept = ns.lowrank.svd(
        model, rank=3, activation_aware=True, skip_padding=False, calib_data=batches,
        progress=False,
    )  # fmt: skip
    assert not torch.allclose(kept.fc.first.weight, a.fc.first.weight)


def _stack(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 16)
    ).eval()


@settings(max_examples=15, deadline=None)
@given(budget=st.floats(0.25, 0.95), seed=st.integers(0, 100), round_to=st.sampled_from([1, 4]))
def test_allocation_meets_the_budget_within_one_rank_step(
    budget: float, seed: int, round_to: int
) -> None:
    model = _stack(seed)
    calib = [(_correlated(64, 24, seed), None)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = ns.lowrank.svd(
            model, budget=budget, round_to=round_to, activation_aware=True, calib_data=calib,
            progress=False,
        )  # fmt: skip
    report = report_of(out)
    assert report is not None
    weights = {r.name: r.shape[0] * r.shape[1] for r in report.layers}
    kept = sum(r.params_after - r.shape[0] for r in report.layers)  # biases stay
    step = max(round_to * sum(r.shape) for r in report.layers)
    assert budget * sum(weights.values()) - step < kept <= budget * sum(weights.values())
    assert all(r.params_after <= r.params_before for r in report.layers)


def test_whitened_model_saves_and_loads_identically(tmp_path) -> None:
    model = Masked().eval()
    batches = _padded_batches(pad_value=1.0)
    out = ns.lowrank.svd(model, ratio=0.5, activation_aware=True, calib_data=batches)
    save(out, tmp_path / "w")
    back = load(tmp_path / "w", model=Masked())
    x = batches[0][0]
    assert torch.equal(back(**x), out(**x))


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"rank": 4, "damping": -0.1}, "damping"),
        ({"rank": 4, "skip_padding": "sometimes"}, "skip_padding"),
        ({"budget": 0.5, "budget_error": "loud"}, "budget_error"),
        ({"budget": 0.5, "error_batches": 0}, "error_batches"),
        ({"ratio": 0.5, "budget_rounds": 2}, "budget_rounds=2"),
        ({"budget": 0.5, "budget_rounds": 2, "budget_error": "relative"}, "budget_rounds"),
    ],
)
def test_bad_whitening_options_raise_config_error(options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ns.lowrank.svd(Masked(), **options)


def test_output_error_budget_needs_calibration_data() -> None:
    with pytest.raises(MissingInputError, match="calib_data"):
        ns.lowrank.svd(Masked(), budget=0.5, budget_error="output")


class Parallel(nn.Module):
    """Two Linears of the same shape whose outputs are summed, the first scaled by 10."""

    def __init__(self) -> None:
        super().__init__()
        self.loud = nn.Linear(16, 16)
        self.quiet = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10 * self.loud(x) + self.quiet(x)


def test_output_weight_of_a_lone_layer_is_one() -> None:
    """With the whitening on the same inputs, the model-output change of a model that is one
    Linear is exactly the layer's discarded Σσ² (per example): the factor is 1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 7)).eval()
    layer = model[0]
    x = _correlated(40, 10, 0)
    gram = x.double().T @ x.double() / x.shape[0]
    spec = spectrum(layer, "linear", gram, damping=0.0)
    weights = output_weights(
        model,
        {"0": (spec, 3)},
        lambda n, s, k: {n: linear_from_factors(layer, *s.factors(k))},
        [(x[:25], None), (x[25:], None)],
        show=False,
    )
    assert weights["0"] == pytest.approx(1.0, rel=1e-4)
    assert model[0] is layer  # restored


def test_output_error_budget_gives_rank_where_the_output_needs_it() -> None:
    torch.manual_seed(0)
    model = Parallel().eval()
    x = _correlated(64, 16, 1)
    calib = [(x, None)]
    options = {"budget": 0.5, "activation_aware": True, "progress": False}
    # a one-pass iterator: the whitening and the probes share one reading of it
    output = ns.lowrank.svd(model, budget_error="output", calib_data=iter(calib), **options)
    relative = ns.lowrank.svd(model, budget_error="relative", calib_data=calib, **options)
    assert output.loud.rank > output.quiet.rank
    with torch.no_grad():
        y = model(x)
        assert (output(x) - y).norm() < (relative(x) - y).norm()


def test_budget_rounds_re_measure_each_layer_at_its_allocated_rank(monkeypatch) -> None:
    model, calib = _stack(3), [(_correlated(64, 24, 3), None)]
    options = {"budget": 0.5, "activation_aware": True, "progress": False, "calib_data": calib}
    first = report_of(ns.lowrank.svd(model, **options))
    assert first is not None
    probed: list[dict[str, int]] = []
    measure = factorize.output_weights

    def spy(model: nn.Module, probes: dict, *args: Any, **kwargs: Any) -> dict[str, float]:
        probed.append({name: rank for name, (_, rank) in probes.items()})
        return measure(model, probes, *args, **kwargs)

    monkeypatch.setattr(factorize, "output_weights", spy)
    again = report_of(ns.lowrank.svd(model, budget_rounds=2, **options))
    assert again is not None and len(probed) == 2
    assert probed[1] == {r.name: r.rank for r in first.factorized}
    kept = sum(r.params_after - r.shape[0] for r in again.layers)  # biases stay
    assert kept <= 0.5 * sum(r.shape[0] * r.shape[1] for r in again.layers)
