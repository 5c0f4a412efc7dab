"""Which layers ``lowrank.svd`` factorizes jointly, and their stacked whitened SVD.

``joint`` names groups of sibling layers, e.g. ``[["query", "key"]]``: under every parent
module that has all of them as selected Linears, they are one group when calibration shows
them reading the same input tensor. Their weights are stacked, W = [W1; W2; ...] (rows = the
members' outputs), and truncated together (:mod:`netshrink.lowrank.shared` builds the layers).

The stacked truncation weighs each member's output error by how much it moves the model's
output: SVD-LLM's whitening by the shared input covariance C = LLᵀ on the right (Wang et al.
2024, sec. 3.1), on the left the block-diagonal diag(√w_i M_i), M_i the member's output
weighting factor (:mod:`netshrink.lowrank.jacobian`, identity without ``output_aware``) and
w_i its measured output-error factor relative to the group's mean
(:mod:`netshrink.lowrank.sensitivity`): the gradient-based M_i alone undervalues a query or key
projection, whose error acts through the attention softmax, several times over against the
value projection's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from netshrink.batches import run
from netshrink.calibrate.collect import module_calls
from netshrink.context import Batch
from netshrink.lowrank.caller import warn
from netshrink.lowrank.decompose import Spectrum, weight_matrix, whitening


def unit_name(parent: str, members: Sequence[str]) -> str:
    """The name a group goes by in plans and warnings: ``parent.{a,b}``."""
    prefix = f"{parent}." if parent else ""
    return f"{prefix}{{{','.join(members)}}}"


def candidate_groups(layers: dict[str, nn.Module], joint: list[list[str]]) -> dict[str, list[str]]:
    """Group name -> member paths, for every parent holding all of a ``joint`` entry's names
    among ``layers`` as Linears (a layer in two entries joins the first). A parent holding only
    some of them (the others left out by ``targets``, or not Linears) is named in a warning:
    its selected members are factorized one by one."""
    parents = {name.rpartition(".")[0] for name in layers}
    groups: dict[str, list[str]] = {}
    taken: set[str] = set()
    partial: list[str] = []
    for entry in joint:
        for parent in sorted(parents):
            paths = [f"{parent}.{leaf}" if parent else leaf for leaf in entry]
            linear = [isinstance(layers.get(p), nn.Linear) for p in paths]
            if all(linear) and taken.isdisjoint(paths):
                groups[unit_name(parent, entry)] = paths
                taken.update(paths)
            elif any(linear) and not all(linear):
                missing = [leaf for leaf, ok in zip(entry, linear, strict=True) if not ok]
                partial.append(f"{unit_name(parent, entry)} (no selected Linear {missing})")
    if partial:
        warn(
            f"lowrank.svd: {len(partial)} joint group(s) incomplete, their members factorized "
            f"one by one, e.g. {partial[0]}"
        )
    return groups


def same_input(
    model: nn.Module, groups: dict[str, list[str]], batch: Batch
) -> dict[str, list[str]]:
    """The ``groups`` whose members all read the same input tensor on ``batch`` (first call);
    a warning names each group left out and why."""
    seen: dict[str, Any] = {}

    def keep(path: str):
        def hook(_m: nn.Module, args: tuple[Any, ...]) -> None:
            seen.setdefault(path, args[0] if args else None)

        return hook

    paths = [p for members in groups.values() for p in members]
    handles = [model.get_submodule(p).register_forward_pre_hook(keep(p)) for p in paths]
    try:
        with module_calls(model), torch.no_grad():
            run(model, batch[0])
    finally:
        for handle in handles:
            handle.remove()
    kept = {}
    for name, members in groups.items():
        first = seen.get(members[0])
        if first is not None and all(seen.get(p) is first for p in members[1:]):
            kept[name] = members
        else:
            warn(f"lowrank.svd: {name} do not read the same input; factorized one by one")
    return kept


def joint_spectrum(
    layers: list[nn.Module],
    cov: torch.Tensor,
    out_covs: list[torch.Tensor | None],
    factors: list[float],
    damping: float,
) -> Spectrum:
    """The whitened SVD of the stacked weights of ``layers`` (variant ``joint``).

    ``cov`` is their common input covariance, ``out_covs`` each member's output Gram matrix
    (None: identity), ``factors`` each member's output-error factor; see the module docstring.
    """
    chol = whitening(cov.double(), damping)
    target = torch.cat([weight_matrix(m, "linear") for m in layers]) @ chol
    mean = sum(factors) / len(factors)
    blocks = []
    for m, out_cov, factor in zip(layers, out_covs, factors, strict=True):
        rows = m.weight.shape[0]
        eye = torch.eye(rows, dtype=torch.float64)
        block = eye if out_cov is None else whitening(out_cov.double(), damping)
        blocks.append(block * (factor / mean if mean > 0 else 1.0) ** 0.5)
    out_chol = torch.block_diag(*blocks)
    u, s, vh = torch.linalg.svd(out_chol.T @ target, full_matrices=False)
    return Spectrum("joint", target.shape[0], target.shape[1], u, s.square(), vh, chol, out_chol)
