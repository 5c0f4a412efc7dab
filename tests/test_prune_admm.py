"""prune.sparsegpt solver: admm (Boža 2024): exact sparsity, N:M groups, a lower output error
than SparseGPT's OBS update and magnitude pruning, dead inputs pruned first."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import netshrink as ns
from netshrink.errors import ConfigError
from netshrink.prune import nm_layout_ok
from netshrink.prune.admm import admm_solve
from netshrink.prune.sparsegpt import sparsegpt_solve
from test_prune_sparsegpt import correlated
from test_prune_wanda import convnet, images, sparse_layers


def _error(x: torch.Tensor, w: torch.Tensor, pruned: torch.Tensor) -> float:
    return float((x @ (w - pruned).T).norm())


@settings(max_examples=6, deadline=None)
@given(sparsity=st.floats(0.2, 0.7), seed=st.integers(0, 2**16))
def test_admm_output_error_is_below_sparsegpts(sparsity: float, seed: int) -> None:
    w = torch.randn(20, 80, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = correlated(320, 80, seed).double()
    admm = _error(x, w, admm_solve(w, x.T @ x, sparsity))
    # 150 draws from 10% to 60%: at most 1.001x SparseGPT's error (at 10%, where both are tiny)
    assert admm <= 1.01 * _error(x, w, sparsegpt_solve(w, x.T @ x, sparsity))


@settings(max_examples=8, deadline=None)
@given(
    nm=st.sampled_from([(2, 4), (1, 4), (4, 8)]),
    rows=st.integers(1, 24),
    groups=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_admm_keeps_n_of_every_m_and_beats_sparsegpt_there(
    nm: tuple[int, int], rows: int, groups: int, seed: int
) -> None:
    n, m = nm
    cols = groups * m
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    x = correlated(4 * cols, cols, seed).double()
    out = admm_solve(w, x.T @ x, 0.0, nm=nm)
    assert nm_layout_ok(out, n, m)
    assert bool(((out != 0).view(rows, groups, m).sum(-1) == n).all())
    if rows >= 16 and groups >= 8:
        # 100 draws of this size: at most 0.49x SparseGPT's error (median 0.29x); on tiny
        # layers the gradual mask can lose (1 row, 1 group: up to 1.12x)
        assert _error(x, w, out) <= 0.75 * _error(x, w, sparsegpt_solve(w, x.T @ x, 0.0, nm=nm))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), nm=st.sampled_from([None, (2, 4)]))
def test_admm_is_never_worse_than_wandas_mask_on_uncorrelated_inputs(
    seed: int, nm: tuple[int, int] | None
) -> None:
    # Uncorrelated inputs of uneven scale: no update helps, Wanda's |w| * ||x|| mask is the
    # optimum, and the gradual schedule alone ended 1.04-1.11x above it.
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 64, generator=gen, dtype=torch.float64)
    x *= 3 * torch.rand(64, generator=gen, dtype=torch.float64)
    w = torch.randn(32, 64, generator=gen, dtype=torch.float64)
    h = x.T @ x
    score = w.abs() * h.diagonal().sqrt()
    if nm is None:
        keep = torch.ones_like(w, dtype=torch.bool)
        keep.view(-1)[score.flatten().argsort()[: w.numel() // 2]] = False
    else:
        groups = score.view(32, -1, 4)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep = keep.scatter_(2, groups.topk(2, dim=2).indices, True).view_as(w)
    wanda = _error(x, w, w * keep)
    # the solver computes in float32: Wanda's own mask comes back rounded to it
    assert _error(x, w, admm_solve(w, h, 0.5, nm=nm)) <= wanda * (1 + 1e-6)


def test_admm_prunes_dead_inputs_first_and_keeps_the_rest_at_zero_sparsity() -> None:
    w = torch.randn(6, 16, dtype=torch.float64)
    x = correlated(64, 16, 3).double()
    x[:, 5] = 0.0
    out = admm_solve(w, x.T @ x, 6 / 96)
    assert bool((out[:, 5] == 0).all()) and int((out == 0).sum()) == 6
    same = admm_solve(w, torch.eye(16, dtype=torch.float64), 0.0)
    assert torch.allclose(same, w, atol=1e-9)


def test_admm_rejects_a_mask_schedule_longer_than_the_run() -> None:
    with pytest.raises(ConfigError, match="mask_iters=9"):
        admm_solve(torch.randn(2, 4), torch.eye(4), 0.5, iters=5, mask_iters=9)


def test_sparsegpt_admm_solver_is_exact_on_every_conv_and_linear() -> None:
    pruned = ns.prune.sparsegpt(
        convnet(), sparsity=0.4, solver="admm", admm_iters=9, calib_data=images(), kernel="dense"
    )
    layers = sparse_layers(pruned)
    assert len(layers) == 4
    for layer in layers.values():
        assert int((layer.weight == 0).sum()) == round(0.4 * layer.weight.numel())
