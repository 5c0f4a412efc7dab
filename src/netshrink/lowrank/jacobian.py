"""Which output directions of a layer the model's output depends on: E[g gᵀ] of its output.

A layer's whitened truncation (SVD-LLM, sec. 3.1) minimises its own output error, every output
direction weighing the same. But the model's output moves with some directions far more than
with others. To first order, an error e in a layer's output at one token moves the model's
output by J e (J the Jacobian from that output to the model's), so the model's error is
E||J e||² = E[eᵀ JᵀJ e]. Approximating JᵀJ by its mean G = E[JᵀJ] over tokens, independent of
the error (the Kronecker factorization of K-FAC, Martens & Grosse 2015, sec. 3, and of
EigenDamage, Wang et al. 2019), the model's error is ||Mᵀ (W − W') L||² with G = MMᵀ and
C = LLᵀ the input covariance: the SVD of Mᵀ W L truncated gives the rank-k weight of least
model-output error under that approximation.

G is estimated without forming J (Hutchinson, 1989): for a random r ~ N(0, I) shaped like the
model's output, the gradient of rᵀ·output with respect to the layer's output at a token is
g = Jᵀ r, and E_r[g gᵀ] = JᵀJ. Each probe costs one forward and one backward pass per batch,
for all layers at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from netshrink.batches import run
from netshrink.calibrate import first_tensor, real_tokens, token_mask
from netshrink.calibrate.collect import module_calls
from netshrink.context import Batch
from netshrink.progress import track


def _rows(layer: nn.Module, grad: torch.Tensor) -> torch.Tensor:
    """A layer output's gradient as (positions, output features): a conv's channels are dim 1."""
    if isinstance(layer, nn.Conv2d):
        grad = grad.movedim(1, -1)
    return grad.reshape(-1, grad.shape[-1]).double()


def output_grams(
    model: nn.Module,
    layers: dict[str, nn.Module],
    batches: Sequence[Batch],
    probes: int = 2,
    seed: int = 0,
    show: bool = True,
) -> dict[str, torch.Tensor]:
    """Per layer, G = E[g gᵀ] (out x out, float64) over its output positions (real tokens).

    ``probes`` random vectors per batch (see the module docstring); the model runs in eval mode
    and its parameters' ``requires_grad`` and ``.grad`` are left as they were. Layers whose
    output the model's output does not depend on are left out.
    """
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_m: nn.Module, _args: Any, out: Any) -> torch.Tensor | None:
            if name in outputs or not torch.is_tensor(out):
                return None
            outputs[name] = out
            # the model goes on with a copy: an in-place op after the layer (ReLU(inplace=True))
            # would otherwise change the tensor the gradient is taken with respect to
            return out.clone()

        return hook

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = dict.fromkeys(layers, 0)
    generator = torch.Generator().manual_seed(seed)
    flags = [(p, p.requires_grad) for p in model.parameters()]
    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in layers]
    try:
        for p, _ in flags:
            p.requires_grad_(True)  # so every layer's output is on the autograd graph
        with module_calls(model), torch.enable_grad():
            for inputs, _ in track(list(batches) * probes, "lowrank: output weights", show=show):
                outputs.clear()
                out = first_tensor(run(model, inputs), "the model's output")
                r = torch.randn(out.shape, generator=generator).to(out)
                names = [n for n, o in outputs.items() if o.requires_grad]
                grads = torch.autograd.grad(
                    (out * r).sum(), [outputs[n] for n in names], allow_unused=True
                )
                mask = token_mask(inputs)
                for name, grad in zip(names, grads, strict=True):
                    if grad is None:
                        continue
                    rows = _rows(layers[name], real_tokens(grad, mask))
                    sums[name] = sums.get(name, 0) + rows.T @ rows
                    counts[name] += rows.shape[0]
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    return {name: total / counts[name] for name, total in sums.items()}
