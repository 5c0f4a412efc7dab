"""The singular value decomposition of a layer, plain or whitened by its inputs.

A layer's weight is read as a matrix (rows x cols) in one of three ways, its *variants*:

- ``linear``: a Linear's weight (out x in);
- ``channel``: a Conv2d's weight reshaped to (Cout, Cin*kh*kw), factored into a kh x kw conv to
  k channels and a 1x1 conv;
- ``spatial``: a Conv2d's weight rearranged to (Cin*kh, Cout*kw), factored into a kh x 1 conv and
  a 1 x kw conv (Jaderberg et al. 2014, sec. 3).

Every variant holds the same numbers, so all have the same Frobenius norm and their errors are
comparable. Truncating the SVD at rank k gives the best rank-k approximation in the Frobenius
norm (Eckart-Young): the squared error is the sum of the discarded squared singular values.

Activation-aware (SVD-LLM, Wang et al. 2024, sec. 3.1): with C = XᵀX/N the covariance of the
layer's inputs (rows of X are input vectors, or conv patches) and C = LLᵀ its Cholesky factor,
||(W - W')Xᵀ||² = ||(W - W')L||² · N. So the SVD of WL, truncated, then multiplied back by
L⁻¹ on the right, gives the rank-k weight with the least error on the layer's real outputs, and
the discarded squared singular values of WL are exactly that error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from netshrink.errors import ConfigError, DataError
from netshrink.lowrank.caller import warn

MIN_RAISED_DAMPING = 1e-6
"""The first damping tried after a failed factorization when ``damping`` was smaller (or 0)."""
MAX_DAMPING = 1e3
"""The largest damping tried: beyond it the whitening would be a scaled identity."""


@dataclass(frozen=True, eq=False)  # holds tensors: compared by identity
class Spectrum:
    """The SVD of one variant of a layer's weight: ``Mᵀ @ matrix @ L = u @ diag(s) @ vh``.

    ``chol`` is the input whitening factor L (cols x cols) or None for the plain SVD;
    ``out_chol`` the output weighting factor M (rows x rows), None for the identity. ``s2`` holds
    the squared singular values in descending order (float64).
    """

    variant: str
    rows: int
    cols: int
    u: torch.Tensor
    s2: torch.Tensor
    vh: torch.Tensor
    chol: torch.Tensor | None
    out_chol: torch.Tensor | None = None

    @property
    def max_rank(self) -> int:
        """The full rank: min(rows, cols)."""
        return min(self.rows, self.cols)

    def params(self, rank: int) -> int:
        """Weights of the two factors at ``rank``: rank * (rows + cols)."""
        return rank * (self.rows + self.cols)

    @property
    def dense_params(self) -> int:
        """Weights of the unfactored matrix: rows * cols."""
        return self.rows * self.cols

    def energy(self, rank: int) -> float:
        """Fraction of the sum of squared singular values kept by the first ``rank``, in [0, 1]."""
        total = float(self.s2.sum())
        return 1.0 if total == 0.0 else float(self.s2[:rank].sum()) / total

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)``: a (rows x rank), b (rank x cols), a @ b the best rank-``rank`` matrix.

        The singular values are split evenly (sqrt into each factor) so both factors have the
        same scale, which keeps later quantization of either factor well conditioned.
        """
        root = self.s2[:rank].sqrt().sqrt()  # sqrt(sigma)
        a = self.u[:, :rank] * root
        if self.out_chol is not None:  # Mᵀ a = (truncated columns of u)  =>  a = M⁻ᵀ (...)
            a = torch.linalg.solve_triangular(self.out_chol.T, a, upper=True)
        b = root[:, None] * self.vh[:rank]
        if self.chol is not None:  # b L = (truncated rows of vh)  =>  b = (...) L^-1
            b = torch.linalg.solve_triangular(self.chol, b, upper=False, left=False)
        return a, b


def weight_matrix(module: nn.Module, variant: str) -> torch.Tensor:
    """The weight of ``module`` read as the matrix of ``variant`` (float64 copy)."""
    w = module.weight.detach().double()
    if variant == "linear":
        return w.clone()
    cout, cin, kh, kw = w.shape
    if variant == "channel":
        return w.reshape(cout, cin * kh * kw)
    if variant == "spatial":  # M[(cin, y), (cout, x)] = W[cout, cin, y, x]
        return w.permute(1, 2, 0, 3).reshape(cin * kh, cout * kw)
    raise ValueError(f"unknown variant {variant!r}")


def whitening(cov: torch.Tensor, damping: float) -> torch.Tensor:
    """Lower Cholesky factor L of ``cov + d * mean(diag(cov)) * I``, with d = ``damping`` when
    that matrix is positive definite.

    The damping keeps L invertible when some input directions never vary (SVD-LLM, sec. 3.1,
    adds to the diagonal for the same reason). When the Cholesky factorization fails, d grows
    tenfold from max(``damping``, 1e-6) until it succeeds (at most to 1000), with a warning
    that says the damping used. A covariance of zeros (inputs always 0) gives the identity;
    non-finite entries raise :class:`DataError`.
    """
    n = cov.shape[0]
    eye = torch.eye(n, dtype=cov.dtype, device=cov.device)
    if not bool(torch.isfinite(cov).all()):
        raise DataError(f"the layer inputs' covariance ({n} x {n}) has non-finite entries")
    scale = float(cov.diagonal().mean())
    if scale <= 0.0:
        return eye
    used = damping
    while used <= MAX_DAMPING:
        chol, info = torch.linalg.cholesky_ex(cov + used * scale * eye)
        if int(info) == 0:
            if used != damping:
                warn(
                    f"lowrank: an input covariance ({n} x {n}) is not positive definite with "
                    f"damping={damping:g}; whitened with damping={used:g} instead"
                )
            return chol
        used = max(10 * used, MIN_RAISED_DAMPING)
    raise ConfigError(
        f"lowrank: an input covariance ({n} x {n}) is not positive definite even with damping "
        f"{MAX_DAMPING:g} (given damping={damping}); check the calibration inputs"
    )


def spectrum(
    module: nn.Module,
    variant: str,
    cov: torch.Tensor | None = None,
    damping: float = 0.01,
    out_cov: torch.Tensor | None = None,
) -> Spectrum:
    """SVD of ``module``'s weight as ``variant``; whitened by ``cov`` (cols x cols) if given,
    its output directions weighted by ``out_cov`` (rows x rows) if given."""
    matrix = weight_matrix(module, variant)
    chol = None if cov is None else whitening(cov.double(), damping)
    return _decomposed(variant, matrix if chol is None else matrix @ chol, chol, out_cov, damping)


def _decomposed(
    variant: str,
    target: torch.Tensor,
    chol: torch.Tensor | None,
    out_cov: torch.Tensor | None,
    damping: float,
) -> Spectrum:
    """The :class:`Spectrum` of Mᵀ ``target`` (``target`` = the matrix to truncate @ ``chol``;
    M the Cholesky factor of ``out_cov``, see :mod:`~netshrink.lowrank.jacobian`)."""
    out_chol = None if out_cov is None else whitening(out_cov.double(), damping)
    weighted = target if out_chol is None else out_chol.T @ target
    u, s, vh = torch.linalg.svd(weighted, full_matrices=False)
    return Spectrum(variant, target.shape[0], target.shape[1], u, s.square(), vh, chol, out_chol)


def fitted_spectrum(
    matrix: torch.Tensor,
    cross: torch.Tensor,
    cov: torch.Tensor,
    variant: str,
    damping: float,
    out_cov: torch.Tensor | None = None,
) -> Spectrum:
    """The rank-k fits of ``matrix`` W (rows x cols) to the outputs W xo, on other inputs x.

    ``cov`` = E[x xᵀ] (cols x cols) over the inputs x the layer now gets, ``cross`` =
    E[xo xᵀ] pairing them with the inputs xo the original layer got. The least-squares weight
    is W* = W · cross · cov⁻¹, and for any W', E||W xo − W' x||² = E||W xo − W* x||² +
    ||(W* − W') L||² with cov = LLᵀ, so truncating the SVD of W* L = W · cross · L⁻ᵀ gives the
    rank-k weight of least output error (reduced-rank regression; with x = xo it is SVD-LLM's
    whitened truncation, Wang et al. 2024, sec. 3.1). ``damping`` is :func:`whitening`'s: it
    adds a ridge term to the least-squares fit.
    """
    chol = whitening(cov.double(), damping)
    target = torch.linalg.solve_triangular(chol.T, matrix @ cross.double(), upper=True, left=False)
    return _decomposed(variant, target, chol, out_cov, damping)


def variants(module: nn.Module, activation_aware: bool) -> tuple[str, ...]:
    """The variants that apply to ``module`` (empty for grouped or non-2-D convolutions).

    The spatial variant needs a kernel at least 2 wide on both axes, and is not offered when
    whitening: its rows mix channels with kernel rows, so the input covariance does not whiten
    it.
    """
    if isinstance(module, nn.Linear):
        return ("linear",)
    if isinstance(module, nn.Conv2d) and module.groups == 1:
        kh, kw = module.kernel_size
        spatial = kh > 1 and kw > 1 and not activation_aware
        return ("channel", "spatial") if spatial else ("channel",)
    return ()
