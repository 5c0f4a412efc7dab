"""How much each layer's truncation moves the model's output: the weights of the global budget.

A layer's (whitened) truncation error is its own output error, but layers matter unequally to
the model's output: on all-MiniLM-L6-v2, truncating one feed-forward matrix to half its weights
moves the sentence embeddings about ten times as much as truncating a query projection to half
of its weights, although the query projection loses the larger share of its own output. So the
global budget can weigh each layer's error curve by a measured factor: every layer in turn is
truncated alone at a probe rank, the model runs on calibration batches, and the factor is

    w = (mean squared change of the model's output) / (the layer's discarded Σσ² at the probe)

so that ``w * discarded Σσ²(k)`` estimates, at every rank k, the output error truncating that
layer causes. Summing these over layers (the errors of different layers taken as independent)
gives the total the allocation minimises. This is a secant estimate at the probe: it captures
what a first-order (gradient) sensitivity misses through the attention softmax, at one forward
pass per layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from netshrink.batches import run
from netshrink.calibrate import first_tensor, real_tokens, token_mask
from netshrink.calibrate.collect import module_calls
from netshrink.context import Batch
from netshrink.layers import replace_module
from netshrink.lowrank.decompose import Spectrum
from netshrink.progress import track

Build = Callable[[str, Spectrum, int], dict[str, nn.Module]]
"""Makes the factorized layers of the unit named by the first argument (a layer, or a group
factorized jointly) from its spectrum at a rank: path -> module."""


def _rows(out: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The model's output as (examples or real tokens, features), float64."""
    out = real_tokens(out, mask)
    return out.reshape(out.shape[0], -1).double()


def _outputs(
    model: nn.Module, batches: Sequence[Batch], masks: list[torch.Tensor | None]
) -> list[torch.Tensor]:
    return [
        _rows(first_tensor(run(model, inputs), "the model's output"), mask)
        for (inputs, _), mask in zip(batches, masks, strict=True)
    ]


def output_weights(
    model: nn.Module,
    probes: dict[str, tuple[Spectrum, int]],
    build: Build,
    batches: Sequence[Batch],
    show: bool = True,
) -> dict[str, float]:
    """Each probed layer's factor w (see the module docstring), from ``batches``.

    ``probes`` maps a unit's name to its spectrum and probe rank; ``build`` makes the
    truncated layers. The model runs in eval mode without gradients (as calibration does) and
    is restored after each probe, even on error. A layer whose probe discards nothing gets 0.
    The output change is summed over features and averaged over examples (over real tokens
    when the output has a token axis and the batch an attention mask).
    """
    masks = [token_mask(inputs) for inputs, _ in batches]
    weights: dict[str, float] = {}
    with module_calls(model):
        reference = _outputs(model, batches, masks)
        count = sum(r.shape[0] for r in reference)
        for name, (spec, rank) in track(list(probes.items()), "lowrank: sensitivity", show=show):
            discarded = float(spec.s2[rank:].sum())
            if discarded <= 0.0:
                weights[name] = 0.0
                continue
            originals = {
                path: replace_module(model, path, new)
                for path, new in build(name, spec, rank).items()
            }
            try:
                now = _outputs(model, batches, masks)
            finally:
                for path, original in originals.items():
                    replace_module(model, path, original)
            change = sum(float((a - b).square().sum()) for a, b in zip(now, reference, strict=True))
            weights[name] = change / count / discarded
    return weights
