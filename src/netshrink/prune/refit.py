"""Refit the output projections of pruned transformer blocks by least squares, without training.

Cutting heads or FFN neurons leaves a block's output projection (the consumer: BERT's
``output.dense``, ``o_proj``, ``fc2``, ...) with fewer inputs. Its weight ``W`` and bias ``b``
are then refit in closed form so that, on calibration tokens, it reproduces what the unpruned
model's projection produced:

    min over W', b' of  sum over tokens || W' x' + b' - y ||^2,

``x'`` the pruned model's input to the projection, ``y`` the unpruned model's output of it.
This is the layer-wise reconstruction by linear least squares of Kwon et al. 2022 ("A Fast
Post-Training Pruning Framework for Transformers", sec. 4.3), applied to the whole remaining
weight rather than only to a per-unit mask scale, as ZipLM (Kurtic et al. 2023, sec. 3.1)
updates the remaining weights after a structured removal. The projections are refit in model
order, each from the inputs the already-refit model gives it, so a fit also absorbs the error of
the blocks before it. The normal equations are solved in float64 with a small ridge term
(:data:`DAMP` times the mean diagonal) so that units that never fire on the calibration data
cannot make the system singular; it is kept small because a ridge shrinks the weights of
low-variance inputs (at 1e-2, SparseGPT's damping, the fit on a tiny BERT was 3x the optimum).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from netshrink.batches import run
from netshrink.calibrate import real_tokens, token_mask
from netshrink.context import Batch
from netshrink.errors import UnsupportedModuleError

DAMP = 1e-4
"""Ridge term of the normal equations, as a fraction of the mean diagonal of ``X^T X``."""


class _Reached(Exception):
    """Raised by the capture hook: the rest of the forward is not needed."""


def _capture(model: nn.Module, name: str, inputs: Any, want_input: bool) -> torch.Tensor:
    """The (tokens, features) input (or output) of ``model``'s module ``name`` on ``inputs``,
    padding tokens left out; the forward stops at that module."""
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        seen.append(args[0] if want_input else out)
        raise _Reached

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        run(model, inputs)
    except _Reached:
        pass
    finally:
        handle.remove()
    if not seen:
        raise UnsupportedModuleError(
            f"refit needs the inputs of {name}, but the model never called it on calib_data"
        )
    x = real_tokens(seen[0].detach(), token_mask(inputs))
    return x.reshape(-1, x.shape[-1]).double()


def _weight_layout(module: nn.Module) -> bool:
    """Whether ``module`` computes ``x @ weight.T`` (nn.Linear) rather than ``x @ weight``
    (GPT-2's Conv1D); anything else cannot be refit."""
    if isinstance(module, nn.Linear):
        return True
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return False
    raise UnsupportedModuleError(
        f"refit solves for nn.Linear or Conv1D output projections, not {type(module).__name__}"
    )


@torch.no_grad()
def refit_projection(
    model: nn.Module, original: nn.Module, name: str, data: Sequence[Batch]
) -> None:
    """Refit ``model``'s projection ``name`` (weight and bias) so that its output on ``data``
    matches ``original``'s projection of the same name, by damped least squares."""
    module = model.get_submodule(name)
    transposed = _weight_layout(module)
    with_bias = getattr(module, "bias", None) is not None
    gram: torch.Tensor | None = None
    cross: torch.Tensor | None = None
    for inputs, _ in data:
        y = _capture(original, name, inputs, want_input=False)
        x = _capture(model, name, inputs, want_input=True)
        if with_bias:
            x = torch.cat([x, x.new_ones(len(x), 1)], 1)
        gram = x.T @ x if gram is None else gram + x.T @ x
        cross = x.T @ y if cross is None else cross + x.T @ y
    assert gram is not None and cross is not None
    damp = DAMP * gram.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    solution = torch.linalg.solve(gram + damp * eye, cross)
    weight = solution[: module.weight.shape[1 if transposed else 0]]
    module.weight.copy_((weight.T if transposed else weight).to(module.weight.dtype))
    if with_bias:
        module.bias.copy_(solution[-1].to(module.bias.dtype))


def refit_projections(
    model: nn.Module, original: nn.Module, names: Sequence[str], data: Sequence[Batch]
) -> None:
    """Refit every projection of ``names`` in the order ``model`` holds them (see the module
    docstring); ``original`` is the model before pruning, with the same module names."""
    if not data:
        raise UnsupportedModuleError("refit needs calibration batches; calib_data gave none")
    was_training = (model.training, original.training)
    model.eval()
    original.eval()
    try:
        wanted = set(names)
        for name, _ in model.named_modules():
            if name in wanted:
                refit_projection(model, original, name, data)
    finally:
        model.train(was_training[0])
        original.train(was_training[1])
