"""The layer-wise Hessian of a reconstruction loss, shared by GPTQ and SparseGPT.

A Linear layer's output error on calibration inputs X (tokens, in) after its weight W (out, in)
becomes W' is ||X (W - W')^T||^2; its Hessian with respect to each weight row is H = 2 X^T X,
the same for every row (Frantar et al. 2022, GPTQ, sec. 3; Frantar & Alistarh 2023, SparseGPT,
sec. 3.2). Both methods walk the inputs in order and need the rows of H^-1 restricted to the
inputs not yet processed, which the upper Cholesky factor of H^-1 gives at once (GPTQ sec. 4,
step 3). The constant 2 and the number of tokens scale H^-1 without changing either algorithm,
so the Gram sum X^T X or its mean E[x x^T] may be given alike.
"""

from __future__ import annotations

import torch

from netshrink.errors import ConfigError


def damped_inverse_cholesky(
    gram: torch.Tensor, damp: float, dtype: torch.dtype = torch.float64, overwrite: bool = False
) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 (so U^T U is that inverse),
    for H = ``gram`` (in, in), computed in ``dtype``. ``overwrite``: when ``gram`` already has
    ``dtype``, it is damped in place instead of copied (the caller gives it up: pass a
    temporary, so that it is freed as soon as it is factored).

    Damping by a fraction of the mean diagonal keeps the inverse well conditioned when few
    tokens were seen (GPTQ sec. 4, "Cholesky reformulation"). An input that was always zero
    (zero diagonal) has no curvature: its diagonal is set to 1 first, so H stays invertible and
    that input's weights are handled by the plain rule (rounding, or magnitude). Raises
    :class:`ConfigError` when the damped matrix is still not positive definite.
    """
    h = gram.to(dtype, copy=not overwrite)
    del gram  # an overwritten temporary is freed with h below
    diag = h.diagonal()
    diag[diag == 0] = 1.0
    diag += damp * float(diag.mean())
    # three (in, in) matrices in turn (18 MiB each in float64 at in = 1536): each is freed as
    # soon as the next exists, so no more than two are held at once
    factor, info = torch.linalg.cholesky_ex(h)
    del h
    if int(info):
        raise ConfigError(
            f"the damped Hessian is not positive definite with damp={damp}; raise damp "
            "(a fraction of its mean diagonal, e.g. 0.1), or calibrate on more tokens"
        )
    inverse = torch.cholesky_inverse(factor)
    del factor
    return torch.linalg.cholesky(inverse, upper=True)


def relative_output_error(before: torch.Tensor, after: torch.Tensor, gram: torch.Tensor) -> float:
    """||X (W - W')^T||^2 / ||X W^T||^2 on the calibration inputs, from their Gram X^T X alone:
    tr(D G D^T) / tr(W G W^T) with D = W - W' (both (out, in)); 0 when W maps X to zero.
    Computed in ``gram``'s dtype (no copy of it)."""
    w = before.detach().to(gram.dtype).flatten(1)
    d = w - after.detach().to(gram.dtype).flatten(1)
    signal = float(((w @ gram) * w).sum())
    return float(((d @ gram) * d).sum()) / signal if signal > 0 else 0.0
