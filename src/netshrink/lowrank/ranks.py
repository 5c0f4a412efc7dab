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


def frontier(points: list[Point]) -> list[Point]:
    """The points that no other point beats on both cost and error, cheapest first."""
    out: list[Point] = []
    for p in sorted(points, key=lambda p: (p.cost, p.error)):
        if not out or p.error < out[-1].error:
            out.append(p)
    return out


def _best_step(front: list[Point], at: int, room: float) -> tuple[float, int] | None:
    """From ``front[at]``, the affordable point (extra cost <= ``room``) with the largest error
    decrease per unit of extra cost, as ``(gain, index)``; None when nothing further fits."""
    here, best = front[at], None
    for j in range(at + 1, len(front)):
        extra = front[j].cost - here.cost
        if extra > room:
            break
        gain = (here.error - front[j].error) / extra
        if best is None or gain > best[0]:
            best = (gain, j)
    return best


def allocate(curves: dict[str, list[Point]], budget: float) -> dict[str, Point] | None:
    """One point per layer with total cost <= ``budget`` and (near) the least total error.

    Every layer starts at its cheapest point; then, over all layers, the move with the largest
    error decrease per unit of cost that still fits the budget is taken, until none fits. On
    convex per-layer curves the moves are the steps along each lower convex hull, and taking
    them in order of decreasing gain solves the continuous relaxation of this multiple-choice
    knapsack exactly (Sinha & Zoltners 1979, "The multiple-choice knapsack problem", sec. 2).
    Real curves are not convex (keeping a layer dense is a jump), so a move is recomputed over
    the points still affordable whenever the budget left shrinks below it. Returns None when
    even the cheapest points exceed ``budget``.
    """
    fronts = {name: frontier(points) for name, points in curves.items()}
    at = dict.fromkeys(fronts, 0)
    total = sum(f[0].cost for f in fronts.values())
    if total > budget:
        return None
    moves: list[tuple[float, str, int]] = []

    def push(name: str) -> None:
        step = _best_step(fronts[name], at[name], budget - total)
        if step is not None:
            heapq.heappush(moves, (-step[0], name, step[1]))

    for name in fronts:
        push(name)
    # A recomputed move is never better than the stale one (less room, fewer choices), so the
    # top of the heap is always the best move once it is checked to still fit.
    while moves:
        _, name, j = heapq.heappop(moves)
        extra = fronts[name][j].cost - fronts[name][at[name]].cost
        if total + extra <= budget:
            total += extra
            at[name] = j
        push(name)
    return {name: fronts[name][i] for name, i in at.items()}
