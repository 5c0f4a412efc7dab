"""Structured Optimal Brain Surgeon: rank the units of a projection's input by the output error
their removal leaves after the best least-squares update of the remaining weights.

For a projection ``y = W x`` with input second moments ``H = sum x x^T`` over calibration tokens,
removing the input positions ``G`` of one unit and re-solving the remaining weights optimally
raises the summed squared output error by

    cost(G) = trace( W[:, G] (H^-1[G, G])^-1 W[:, G]^T ),

and the optimal update is ``W -= W[:, G] (H^-1[G, G])^-1 H^-1[G, :]`` (Hassibi & Stork 1993;
the structured form of ZipLM, Kurtic et al. 2023, sec. 3.1, and of Kwon et al. 2022's
layer-wise reconstruction, sec. 4.3). :func:`greedy_order` removes the cheapest unit, applies
the update to ``W`` and ``H^-1``, and repeats, so each cost is measured on what the earlier
removals left — what the ``refit`` after the cut then solves for on the pruned model's inputs.
"""

from __future__ import annotations

import torch

DAMP = 1e-4
"""Ridge term added to ``H``'s diagonal, as a fraction of its mean: units that never fire on the
calibration data must not make ``H`` singular."""


@torch.no_grad()
def greedy_order(weight: torch.Tensor, gram: torch.Tensor, width: int, floor: int) -> torch.Tensor:
    """Scores of the ``len(gram) // width`` units of a projection's input (higher = removed
    later): the cost at which greedy structured OBS removed each unit, made non-decreasing, and
    above every such cost for the ``floor`` units it keeps.

    ``weight``: ``(n, out)``, the projection's weight with its input positions first (unit ``u``
    holds rows ``u * width .. (u + 1) * width - 1``); ``gram``: ``(n, n)``, ``sum x x^T`` of its
    inputs. Costs are squared output error summed over the calibration tokens.
    """
    n = gram.shape[0]
    units = n // width
    w = weight.double().clone()
    h = gram.double().clone()
    h.diagonal().add_(DAMP * h.diagonal().mean().clamp_min(1e-12))
    hinv = torch.linalg.inv(h)
    alive = torch.ones(units, dtype=torch.bool)
    scores = torch.zeros(units, dtype=torch.float64)
    blocks = torch.arange(n).reshape(units, width)
    level = 0.0
    for _ in range(units - min(floor, units)):
        if width == 1:
            cost = w.pow(2).sum(1) / hinv.diagonal()
        else:
            diag = hinv[blocks[:, :, None], blocks[:, None, :]]  # (units, width, width)
            wg = w[blocks]  # (units, width, out)
            cost = (wg * torch.linalg.solve(diag, wg)).sum((1, 2))
        cost[~alive] = torch.inf
        u = int(cost.argmin())
        level = max(level, float(cost[u]))
        scores[u], alive[u] = level, False
        g = blocks[u]
        cols = hinv[:, g]  # (n, width)
        step = torch.linalg.solve(cols[g], cols.T)  # (width, n): H^-1[G, G]^-1 H^-1[G, :]
        w.addmm_(step.T, w[g], alpha=-1)  # in place: no n x n temporary per removal
        hinv.addmm_(cols, step, alpha=-1)
        w[g], hinv[g], hinv[:, g] = 0.0, 0.0, 0.0
        hinv[g, g] = 1.0  # removed: keeps the (ignored) diagonal blocks invertible
    kept = alive.nonzero().flatten()
    scores[kept] = level + 1.0 + torch.arange(len(kept), dtype=torch.float64)
    return scores.float()
