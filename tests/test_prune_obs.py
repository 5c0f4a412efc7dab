"""Structured OBS (``criterion: obs`` of ``prune.heads`` / ``prune.ffn``): the greedy costs are
the least-squares output errors they claim to be, the order removes the cheapest unit first, and
with refit it leaves a smaller output error than the activation criterion."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import netshrink as ns
from netshrink.prune.obs import greedy_order
from test_prune_heads import build, edits, output
from test_prune_refit import calib, error

torch.set_num_threads(1)


def _refit_error(x: torch.Tensor, w: torch.Tensor, keep: list[int]) -> float:
    """Summed squared error of the best least-squares fit of ``x @ w`` from ``x``'s ``keep``
    columns (``x``: tokens x n, ``w``: n x out)."""
    target = x @ w
    kept = x[:, keep]
    solution = torch.linalg.lstsq(kept, target).solution
    return float((kept @ solution - target).pow(2).sum())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), width=st.sampled_from([1, 2, 3]), units=st.integers(3, 5))
@example(seed=72, width=3, units=4)  # a later removal ties with the first
def test_first_removal_is_the_cheapest_and_costs_its_refit_error(
    seed: int, width: int, units: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    n = units * width
    x = torch.randn(256, n, generator=gen, dtype=torch.float64)
    x[:, 1:] += 0.7 * x[:, :-1].clone()  # correlated inputs, still well conditioned
    w = torch.randn(n, 4, generator=gen, dtype=torch.float64)
    scores = greedy_order(w, x.T @ x, width, floor=1)
    errors = [_refit_error(x, w, [i for i in range(n) if i // width != u]) for u in range(units)]
    # Scores are made non-decreasing, so a later removal that costs less than the first ties
    # with it (seed 72, width 3): the first removal is one of the units at the lowest score.
    lowest = [u for u in range(units) if scores[u] == scores.min()]
    assert min(errors[u] for u in lowest) <= 1.02 * min(errors)  # up to the ridge term's effect
    assert float(scores.min()) == pytest.approx(min(errors), rel=1e-2)
    assert scores.shape == (units,)


def test_scores_follow_the_removal_order_and_keep_the_floor_on_top() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=gen)
    w = torch.randn(8, 3, generator=gen)
    w[5] = 0.0  # a unit whose weights are zero costs nothing: removed first
    scores = greedy_order(w, x.T @ x, 1, floor=3)
    assert int(scores.argmin()) == 5
    order = torch.argsort(scores)
    assert torch.all(scores[order].diff() >= 0)
    assert len(set(scores.tolist())) == 8  # the 3 kept units rank above every removal


@pytest.mark.parametrize("name", ["bert", "mha"])
def test_obs_with_refit_beats_activation_with_refit(name: str) -> None:
    model, x = build(name)
    data = calib(x)
    errors = {}
    for criterion in ("activation", "obs"):
        opts = {"ratio": 0.5, "criterion": criterion, "calib_data": data, "refit": True}
        pruned = ns.prune.ffn(ns.prune.heads(model, **opts), **opts)
        errors[criterion] = error(pruned, model, data)
    assert errors["obs"] < errors["activation"]


@pytest.mark.parametrize(("name", "kept"), [("t5-encoder", 1), ("llama-gqa", 1)])
def test_obs_removes_whole_tied_and_grouped_heads(name: str, kept: int) -> None:
    """T5 keeps one head set per stack (1 of 2 heads) and Llama whole K/V groups (1 of 2, with
    its 2 query heads), and the model still runs."""
    model, x = build(name)
    pruned = ns.prune.heads(model, ratio=0.5, criterion="obs", calib_data=calib(x, n=2))
    assert {len(k) for k in edits(pruned, "hf.heads").values()} == {kept}
    with torch.no_grad():
        assert torch.isfinite(output(pruned, x)).all()
