"""Choosing ranks: per layer (energy, parameter ratio, fixed rank) or globally under a budget.

Ranks are multiples of ``round_to``. A rank saves something only when its two factors hold
fewer weights than the dense matrix, k(rows + cols) < rows * cols; the caller leaves a layer
whose chosen rank saves nothing as it is.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

from netshrink.lowrank.decompose import Spectrum


def round_up(rank: int, round_to: int) -> int:
    """``rank`` rounded up to a multiple of ``round_to``."""
    return math.ceil(rank / round_to) * round_to


def by_energy(spec: Spectrum, energy: float, round_to: int) -> int:
    """Smallest rank (a multiple of ``round_to``, at most full) keeping ``energy`` of Σσ²."""
    kept = spec.s2.cumsum(0) / max(float(spec.s2.sum()), 1e-300)
    rank = int((kept < energy - 1e-12).sum()) + 1
    return min(round_up(rank, round_to), spec.max_rank)


def by_ratio(spec: Spectrum, ratio: float, round_to: int) -> int:
    """Largest rank (a multiple of ``round_to``) whose factors hold <= ``ratio`` of the weights.

    0 when even ``round_to`` does not fit.
    """
    rank = math.floor(ratio * spec.dense_params / (spec.rows + spec.cols))
    return min(rank // round_to * round_to, spec.max_rank)


def by_rank(spec: Spectrum, rank: int, round_to: int) -> int:
    """``rank`` rounded up to a multiple of ``round_to``, at most the full rank."""
    return min(round_up(rank, round_to), spec.max_rank)


def saves(spec: Spectrum, rank: int) -> bool:
    """Whether rank ``rank`` (>= 1) needs fewer weights than the dense matrix."""
    return rank >= 1 and spec.params(rank) < spec.dense_params


def pick(spectra: list[Spectrum], ranks: list[int], prefer: str) -> tuple[Spectrum, int]:
    """Of one layer's variants at their chosen ranks, the one to use.

    ``prefer="params"``: fewest weights (the variants were sized for the same kept energy or
    rank); ``prefer="energy"``: most energy kept (they were sized for the same weights). Ties go
    to the first variant listed.
    """
    pairs = list(zip(spectra, ranks, strict=True))
    if prefer == "params":
        return min(pairs, key=lambda p: p[0].params(p[1]))
    return max(pairs, key=lambda p: p[0].energy(p[1]))


@dataclass(frozen=True)
class Point:
    """One way to treat a layer: ``spec`` at ``rank`` (``spec`` None: keep it dense).

    ``cost`` is in the budget's unit (weights or MACs); ``error`` is the fraction of the
    (whitened) Σσ² discarded, so errors of different layers are on one scale.
    """

    spec: Spectrum | None
    rank: int
    cost: float
    error: float


def lower_hull(points: list[Point]) -> list[Point]:
    """The points on the lower convex hull of (cost, error), cheapest first.

    Points that cost more for no less error are dropped, then points above the segment joining
    their neighbours: on the hull each extra unit of cost buys less error than the one before.
    """
    frontier: list[Point] = []
    for p in sorted(points, key=lambda p: (p.cost, p.error)):
        if not frontier or p.error < frontier[-1].error:
            frontier.append(p)
    hull: list[Point] = []
    for p in frontier:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b stays only if it lies strictly below the segment from a to p
            if (b.cost - a.cost) * (p.error - a.error) > (b.error - a.error) * (p.cost - a.cost):
                break
            hull.pop()
        hull.append(p)
    return hull


def allocate(curves: dict[str, list[Point]], budget: float) -> dict[str, Point] | None:
    """One point per layer with total cost <= ``budget`` and the least total error.

    Every layer starts at its cheapest hull point; then the step with the largest error
    decrease per unit of cost, over all layers, is taken while it fits the budget. On convex
    per-layer curves this greedy order solves the continuous relaxation of the multiple-choice
    knapsack exactly (Sinha & Zoltners 1979, "The multiple-choice knapsack problem", sec. 2);
    the integer answer can miss the optimum only by the one step that did not fit. Returns None
    when even the cheapest points exceed ``budget``.
    """
    hulls = {name: lower_hull(points) for name, points in curves.items()}
    at = dict.fromkeys(hulls, 0)
    total = sum(h[0].cost for h in hulls.values())
    if total > budget:
        return None
    moves: list[tuple[float, str]] = []

    def push(name: str) -> None:
        h, i = hulls[name], at[name]
        if i + 1 < len(h):
            gain = (h[i].error - h[i + 1].error) / (h[i + 1].cost - h[i].cost)
            heapq.heappush(moves, (-gain, name))

    for name in hulls:
        push(name)
    while moves:
        _, name = heapq.heappop(moves)
        h, i = hulls[name], at[name]
        step = h[i + 1].cost - h[i].cost
        if total + step <= budget:
            total += step
            at[name] = i + 1
            push(name)
    return {name: hulls[name][i] for name, i in at.items()}
