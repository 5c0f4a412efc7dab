"""Numerics of the low-rank factorization: Eckart-Young, exactness at full rank, whitening."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import netshrink as ns
from netshrink.batches import run
from netshrink.calibrate import input_vectors
from netshrink.errors import DataError
from netshrink.lowrank import caller, ranks
from netshrink.lowrank.decompose import spectrum, whitening
from netshrink.lowrank.layers import (
    LowRankLinear,
    conv_from_factors,
    linear_from_factors,
    spatial_from_factors,
)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def _factorize_linear(layer: nn.Linear, rank: int, cov: torch.Tensor | None = None):
    return linear_from_factors(layer, *spectrum(layer, "linear", cov).factors(rank))


@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(2, 24),
    n=st.integers(2, 24),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_rank_k_is_the_best_rank_k_approximation(m: int, n: int, frac: float, seed: int) -> None:
    """Eckart-Young: ||W - W_k||_F = sqrt(sum of the discarded squared singular values)."""
    torch.manual_seed(seed)
    layer = nn.Linear(n, m)
    k = 1 + round(frac * (min(m, n) - 1))
    low = _factorize_linear(layer, k)
    w_k = (low.second.weight @ low.first.weight).detach().double()
    w = layer.weight.detach().double()
    s = torch.linalg.svdvals(w)
    expected = s[k:].square().sum().sqrt()
    assert torch.linalg.matrix_rank(w_k, atol=1e-5) <= k
    assert float((w - w_k).norm()) == pytest.approx(float(expected), rel=1e-4, abs=1e-5)


def test_full_rank_linear_keeps_the_output() -> None:
    layer = nn.Linear(20, 12)
    x = torch.randn(7, 5, 20)
    low = _factorize_linear(layer, 12)
    assert isinstance(low, LowRankLinear) and low.rank == 12
    torch.testing.assert_close(low(x), layer(x), atol=1e-5, rtol=0)


CONVS = [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
    dict(kernel_size=3, padding="same", padding_mode="reflect", bias=False),
    dict(kernel_size=(5, 3), stride=2, padding=(2, 0), padding_mode="circular"),
]


@pytest.mark.parametrize("args", CONVS)
def test_full_rank_conv_keeps_the_output(args: dict) -> None:
    """Both conv variants, at full rank, reproduce the conv on any stride/padding/dilation."""
    conv = nn.Conv2d(4, 6, **args)
    x = torch.randn(2, 4, 11, 13)
    for variant, build in (("channel", conv_from_factors), ("spatial", spatial_from_factors)):
        spec = spectrum(conv, variant)
        new = build(conv, *spec.factors(spec.max_rank))
        torch.testing.assert_close(new(x), conv(x), atol=1e-5, rtol=0)


def test_conv_rank_k_output_equals_the_rank_k_weight() -> None:
    """The factorized conv computes the conv with the truncated weight, in both variants."""
    conv = nn.Conv2d(5, 7, 3, padding=1, stride=2)
    x = torch.randn(2, 5, 9, 9)
    for variant, build in (("channel", conv_from_factors), ("spatial", spatial_from_factors)):
        spec = spectrum(conv, variant)
        a, b = spec.factors(4)
        matrix = (a @ b).float()
        if variant == "channel":
            w = matrix.reshape(conv.weight.shape)
        else:  # M[(cin, y), (cout, x)] -> W[cout, cin, y, x]
            w = matrix.reshape(5, 3, 7, 3).permute(2, 0, 1, 3)
        expected = nn.functional.conv2d(x, w, conv.bias, stride=2, padding=1)
        torch.testing.assert_close(build(conv, a, b)(x), expected, atol=1e-5, rtol=0)
        error = (spectrum(conv, variant).s2[4:].sum().sqrt()).item()
        assert (conv.weight.double().reshape(-1) - w.double().reshape(-1)).norm().item() == (
            pytest.approx(error, rel=1e-4)
        )


def _anisotropic(rows: int, n: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose variance spans four orders of magnitude along random directions."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    scales = torch.logspace(0, -2, n)
    return (torch.randn(rows, n, generator=g) * scales) @ q.T


@torch.no_grad()
def test_whitened_svd_has_lower_output_error_on_its_inputs() -> None:
    layer = nn.Linear(32, 24)
    x = _anisotropic(512, 32)
    v = input_vectors(layer, x).double()
    cov = v.T @ v / v.shape[0]
    y = layer(x)
    for k in (2, 4, 8, 16):
        plain = (_factorize_linear(layer, k)(x) - y).norm()
        aware_layer = _factorize_linear(layer, k, cov)
        aware = (aware_layer(x) - y).norm()
        assert aware < 0.8 * plain, (k, float(aware), float(plain))
        # with no damping the discarded squared singular values of W L are the output error
        exact = spectrum(layer, "linear", cov, damping=0.0)
        a, b = exact.factors(k)
        err2 = (x.double() @ (layer.weight.double() - a @ b).T).square().sum() / x.shape[0]
        assert float(err2) == pytest.approx(float(exact.s2[k:].sum()), rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whitened_conv_has_lower_output_error(seed: int) -> None:
    torch.manual_seed(seed)
    conv = nn.Conv2d(6, 8, 3, padding=1)
    # channels mixed by a random rotation, their variances spanning four orders of magnitude
    x = _anisotropic(8 * 10 * 10, 6, seed=seed).reshape(8, 10, 10, 6).permute(0, 3, 1, 2)
    v = input_vectors(conv, x).double()
    cov = v.T @ v / v.shape[0]
    y = conv(x)
    for k in (3, 6):
        plain = (conv_from_factors(conv, *spectrum(conv, "channel").factors(k))(x) - y).norm()
        aware_conv = conv_from_factors(conv, *spectrum(conv, "channel", cov).factors(k))
        assert (aware_conv(x) - y).norm() < 0.9 * plain


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")  # the point here
@pytest.mark.parametrize(
    "args", [dict(stride=(1, 2), padding=(1, 1)), dict(padding="same", dilation=(2, 1))]
)
def test_input_vectors_match_the_conv(args: dict) -> None:
    """Patches line up with the weight: patches @ W.T reproduces the conv, any padding mode."""
    for mode in ("zeros", "reflect"):
        conv = nn.Conv2d(3, 5, (3, 2), padding_mode=mode, **args)
        x = torch.randn(2, 3, 7, 8)
        y = conv(x)
        rows = input_vectors(conv, x) @ conv.weight.reshape(5, -1).T + conv.bias
        expected = y.permute(0, 2, 3, 1).reshape(-1, 5)
        torch.testing.assert_close(rows, expected, atol=1e-5, rtol=0)


def test_whitening_raises_damping_on_a_singular_covariance_and_says_so() -> None:
    cov = torch.zeros(4, 4, dtype=torch.float64)
    cov[0, 0] = 1.0
    with pytest.warns(UserWarning, match=r"damping=0; whitened with damping=1e-06 instead"):
        chol = whitening(cov, damping=0.0)
    eye = torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(chol @ chol.T, cov + 1e-6 * 0.25 * eye)  # not a scaled identity
    assert torch.equal(
        whitening(torch.zeros(3, 3, dtype=torch.float64), 0.01), torch.eye(3).double()
    )


def test_the_raised_damping_warning_names_the_line_that_called_netshrink() -> None:
    """The warning comes from deep inside the factorization (the registry, the technique, the
    spectrum); it must point at the caller's file, not at netshrink's."""
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x = torch.randn(16, 4)
    x[:, -1] = 0.0  # an input that never varies: singular covariance, Cholesky fails at 0
    with pytest.warns(UserWarning, match="whitened with damping=1e-06") as caught:
        ns.lowrank.svd(
            model, rank=2, activation_aware=True, damping=0.0, calib_data=[(x, None)],
            progress=False,
        )  # fmt: skip
    damping = [w for w in caught if "whitened with damping" in str(w.message)]
    assert damping and {w.filename for w in damping} == {__file__}


class _Warns(nn.Module):
    """A user model whose forward, run by netshrink, calls netshrink's ``warn``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.line = sys._getframe().f_lineno + 1
        caller.warn("from user code")
        return x


def test_a_warning_names_the_innermost_user_frame_when_netshrink_runs_user_code() -> None:
    model = _Warns()
    with pytest.warns(UserWarning, match="from user code") as caught:
        run(model, torch.zeros(1))  # netshrink -> torch -> this file -> netshrink
    assert (caught[0].filename, caught[0].lineno) == (__file__, model.line)


def test_whitening_keeps_a_working_damping_silently_and_rejects_non_finite_inputs() -> None:
    cov = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(whitening(cov, 0.0), torch.linalg.cholesky(cov))
    with pytest.raises(DataError, match="non-finite"):
        whitening(cov * float("nan"), 0.01)


@settings(max_examples=60, deadline=None)
@given(
    curves=st.lists(
        st.lists(st.tuples(st.integers(1, 50), st.floats(0.0, 1.0)), min_size=1, max_size=6),
        min_size=1,
        max_size=5,
    ),
    share=st.floats(0.0, 1.0),
)
def test_allocation_fits_the_budget_and_leaves_no_affordable_gain(
    curves: list[list[tuple[int, float]]], share: float
) -> None:
    """The greedy allocation stays within budget, and ends only when no layer can still lower
    its error with the budget left (no affordable improvement is left on the table)."""
    points = {
        f"layer{i}": [ranks.Point(None, j, float(c), e) for j, (c, e) in enumerate(curve)]
        for i, curve in enumerate(curves)
    }
    least = sum(min(p.cost for p in ps) for ps in points.values())
    most = sum(max(p.cost for p in ps) for ps in points.values())
    budget = least + share * (most - least)
    chosen = ranks.allocate(points, budget)
    assert chosen is not None
    total = sum(p.cost for p in chosen.values())
    assert total <= budget + 1e-9
    for name, p in chosen.items():
        assert all(q.error >= p.error or q.cost - p.cost > budget - total for q in points[name]), (
            name
        )
    assert ranks.allocate(points, least - 0.5) is None
