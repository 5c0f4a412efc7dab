"""Mask selection and weight update for a pruned layer by ADMM (``prune.sparsegpt solver: admm``).

Boža 2024, "Fast and Effective Weight Update for Pruned Large Language Models", sec. 3. For a
layer with weight W (out, in) and inputs of Gram H = X^T X, pruning asks for the W' with the
chosen zeros that minimises ||X (W - W')^T||^2 = tr((W - W') H (W - W')^T). SparseGPT's OBS
update fixes each column once, left to right, and never revisits it; ADMM solves the same
problem for the whole matrix at once by alternating

- a ridge step towards the dense output: X_k = (W H + rho (Z - U)) (H + rho I)^-1,
- a projection onto the mask: Z = (X_k + U) masked,
- a dual step: U = U + X_k - Z,

with the penalty rho raised geometrically so that X_k and Z meet (sec. 3.1). The mask itself is
chosen gradually (sec. 3.2): during the first ``mask_iters`` iterations the sparsity rises on a
cubic schedule to its target and the mask is re-chosen each time as the largest |X_k + U|, so
weights the update has grown can come back. Everything runs on H scaled to unit diagonal
(inputs normalised by their norms, sec. 3.3), where |W| is Wanda's score and one rho schedule
fits every layer, and in H's eigenbasis, where (H + rho I)^-1 is a diagonal for every rho.
"""

from __future__ import annotations

import scipy.linalg
import torch

from netshrink.errors import ConfigError

RHO_START = 0.1
RHO_END = 10.0


def _normalised(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, ...]:
    """(scale, eigenvalues, eigenvectors, dead) of H scaled to unit diagonal,
    H_n = S^-1 H S^-1 with S = diag(sqrt(diag H)), then damped by ``damp`` on that unit
    diagonal: relative to each input's own energy, as the paper's code damps, so a quiet input
    is not damped more than a loud one. ``dead``: inputs that were always zero.

    Float32, as the paper's code computes: H_n's eigenvalues lie between ``damp`` and
    ``in + damp`` (unit diagonal), a condition number float32 holds, and a float64 H_n and its
    eigenvectors were 2 x 18 MiB at 1536 inputs, the peak of a whole calibration run. The
    eigenvectors come from LAPACK's MRRR driver (``ssyevr``, through SciPy), which may
    overwrite the normalised copy (freed after): ``torch.linalg.eigh``'s divide-and-conquer
    driver needs about 2 in^2 floats of workspace beside a copy of its input, MRRR a few
    in-long vectors."""
    h = hessian.to(torch.float32, copy=True)
    diag = h.diagonal()
    dead = diag == 0
    diag[dead] = 1.0
    scale = diag.sqrt()
    h /= scale.unsqueeze(0) * scale.unsqueeze(1)
    h.diagonal().add_(damp)
    if h.device.type == "cpu":
        eigen, basis = scipy.linalg.eigh(h.numpy(), overwrite_a=True, check_finite=False)
        values, vectors = torch.from_numpy(eigen), torch.from_numpy(basis)
    else:  # a GPU's H: SciPy cannot read it, and the device's own solver has its own workspace
        values, vectors = torch.linalg.eigh(h)
    del h
    if float(values.min()) <= 0:
        raise ConfigError(
            f"the damped Hessian is not positive definite with damp={damp}; raise damp "
            "(a fraction of its mean diagonal, e.g. 0.1), or calibrate on more tokens"
        )
    return scale, values, vectors, dead


def _keep(score: torch.Tensor, zeros: int, nm: tuple[int, int] | None) -> torch.Tensor:
    """Boolean mask keeping the largest ``score``: all but ``zeros`` entries of the matrix, or
    the n largest of every m consecutive entries of a row with ``nm = (n, m)``."""
    if nm is not None:
        n, m = nm
        groups = score.view(score.shape[0], -1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        return keep.scatter_(2, groups.topk(n, dim=2).indices, True).view_as(score)
    keep = torch.ones_like(score, dtype=torch.bool)
    keep.view(-1)[score.flatten().argsort(stable=True)[:zeros]] = False
    return keep


@torch.no_grad()
def admm_solve(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None = None,
    damp: float = 0.01,
    iters: int = 60,
    mask_iters: int = 20,
) -> torch.Tensor:
    """The pruned and reconstructed ``weight`` (rows, cols) for inputs of Gram ``hessian``.

    Exactly ``round(sparsity * weight.numel())`` zeros over the whole matrix, or with
    ``nm = (n, m)`` n kept in every m consecutive columns of each row (``sparsity`` ignored).
    ``iters`` ADMM iterations, the mask re-chosen in the first ``mask_iters`` of them (see the
    module docstring); the normalised H is damped by ``damp`` on its unit diagonal. Inputs
    that were always zero are pruned first. Never worse, in output error on H, than Wanda's
    mask without an update. Computed in float32, returned in ``weight``'s dtype.
    """
    if not 0 < mask_iters <= iters:
        raise ConfigError(f"need 0 < mask_iters <= iters, got mask_iters={mask_iters}, {iters=}")
    scale, values, vectors, dead = _normalised(hessian, damp)
    w = weight.float() * scale
    target = (w @ vectors) * values  # W H_n in the eigenbasis: fixed over the iterations
    zeros = round(sparsity * w.numel())
    z, u = w.clone(), torch.zeros_like(w)
    keep = torch.ones_like(w, dtype=torch.bool)
    rho = RHO_START
    for k in range(iters):
        rho_prev, rho = rho, RHO_START * (RHO_END / RHO_START) ** (k / max(iters - 1, 1))
        u *= rho_prev / rho  # u is the dual scaled by 1/rho (Boyd et al. 2011, sec. 3.4.1)
        # v = X_k + U with X_k = ((target + rho (Z - U) V) / (values + rho)) V^T, computed in
        # place: a few (out, in) matrices fewer at once (2.25 MiB each at 384 x 1536)
        ridge = ((z - u) @ vectors).mul_(rho).add_(target).div_(values + rho)
        v = ridge @ vectors.T
        del ridge
        v += u
        if k < mask_iters:
            # cubic schedule (Zhu & Gupta 2017), as the paper's gradual variant uses
            share = 1 - (1 - (k + 1) / mask_iters) ** 3
            keep = _keep(v.abs().masked_fill(dead, 0.0), round(share * zeros), nm)
        z = v * keep
        u = v.sub_(z)
    del target, u, v
    # On nearly uncorrelated inputs (H close to diagonal, where no update helps and Wanda's
    # one-shot mask is the optimum) the gradual schedule can end on a worse mask: 1.04x Wanda's
    # output error on such toy layers. Keep the better of the two.
    wanda = w * _keep(w.abs().masked_fill(dead, 0.0), zeros, nm)
    if _output_error(w - wanda, values, vectors) < _output_error(w - z, values, vectors):
        z = wanda
    return (z / scale).to(weight.dtype)


def _output_error(delta: torch.Tensor, values: torch.Tensor, vectors: torch.Tensor) -> float:
    """tr(delta H delta^T) for H = vectors diag(values) vectors^T: the summed squared output
    error of a weight change ``delta`` (in the normalised space)."""
    return float((delta @ vectors).square_().mul_(values).sum())
