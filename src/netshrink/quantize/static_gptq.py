"""GPTQ-chosen weight codes for ``quantize.static`` (``weight_rounding: gptq``).

``quantize.static`` rounds each weight to the nearest code of its per-output-channel grid (the
row's min-max scale). GPTQ (Frantar et al. 2022, "GPTQ", Algorithm 1) keeps that grid but picks
the codes one input column at a time and spreads each column's rounding error onto the columns
not yet rounded, weighted by the inverse Hessian of the layer's calibration inputs, so the
output error ||X W^T - X Q^T||^2 is lower than nearest rounding's. It matters after SmoothQuant:
the weight columns of outlier channels are multiplied by s, and on MiniLM's FFN output
projections the int8 weight error then equals the activation error
(``docs/benchmarks/runtimes.md``).

The Hessian is of the input the layer's quantizer sees: x / s for a
:class:`~netshrink.quantize.smoothed.SmoothedLinear` (the Gram matrix of x divided by s s^T,
whose weight is W s). The kernel is ``quantize.gptq``'s
(:func:`~netshrink.quantize.gptq.gptq_codes`) on the same narrow symmetric grid
(-127..127 at 8 bits) ``quantize.static`` stores, with ``act_order``: the columns of largest
diag(H) (largest inputs) are rounded first, while the most columns are left to absorb their
error. On MiniLM after SmoothQuant (256 held-out sentences, eager torch) that gave cosine
0.99874 and top-5 0.954 against 0.99871 and 0.948 in input order, and 0.99827 / 0.941 for
nearest rounding.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from netshrink.calibrate import Gram, collect
from netshrink.context import Batch
from netshrink.quantize.gptq import gptq_codes
from netshrink.quantize.grid import Grid
from netshrink.quantize.smoothed import SmoothedLinear


def _solvable(module: nn.Module) -> bool:
    """Whether GPTQ can solve ``module``'s weight as one (out, in) matrix: Linears and
    ungrouped convolutions (a grouped one has separate inputs per group)."""
    return not isinstance(module, nn.Conv2d) or module.groups == 1


@torch.no_grad()
def _round(module: nn.Module, second_moment: torch.Tensor, bits: int) -> torch.Tensor:
    """Overwrite ``module``'s weight (W s when smoothed) with its GPTQ-rounded values on the
    per-row ``bits``-bit grid; return the grid's scales (out,)."""
    if isinstance(module, SmoothedLinear):
        weight = module.scaled_weight
        second_moment = second_moment / module.smooth.float().outer(module.smooth.float())
    else:
        weight = module.weight
    codes, scale, _ = gptq_codes(weight.flatten(1), second_moment, Grid(bits), act_order=True)
    rounded = codes.float() * scale.unsqueeze(1)
    weight.copy_(rounded.reshape(weight.shape).to(weight.dtype))
    return scale


def gptq_round(
    model: nn.Module, bits: dict[str, int], batches: list[Batch], show: bool
) -> dict[str, torch.Tensor]:
    """Round the weights of the layers in ``bits`` (name -> weight bits) onto their
    per-output-channel grids by GPTQ, in place, from their inputs on ``batches``.

    Returns each rounded layer's scales (one per output channel), for
    :func:`netshrink.quantize.ptq.convert` to store the codes exactly. Grouped convolutions and
    layers that never ran on ``batches`` keep nearest rounding, with a warning naming them.
    """
    names = [n for n in bits if _solvable(model.get_submodule(n))]
    grams = {n: Gram() for n in names}
    collect(model, {n: [g] for n, g in grams.items()}, batches, "gptq rounding", show=show)
    scales = {}
    for name in names:
        second_moment = grams[name].take_mean()
        if second_moment is not None:
            scales[name] = _round(model.get_submodule(name), second_moment.float(), bits[name])
    nearest = sorted(set(bits) - set(scales))
    if nearest:
        warnings.warn(
            f"quantize.static: weight_rounding gptq leaves {', '.join(nearest)} rounded to "
            "nearest (grouped convolutions, or layers that never ran on calib_data)",
            stacklevel=3,
        )
    return scales
