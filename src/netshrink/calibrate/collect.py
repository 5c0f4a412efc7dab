"""One statistics pass: reducers hooked on named modules, streamed over calibration batches.

An algorithm declares its *statistic points* up front, as a mapping from a module's qualified
name to the reducers to feed (learned from NNCF's statistic points: algorithms say what they
need, one pass collects it). :class:`Hooks` attaches them and always detaches them again (a
context manager); :func:`collect` runs the model over the batches under them, in eval mode and
without gradients, with a progress bar. Memory stays bounded: only the reducers' summaries are
kept, never the activations.

Padding: a text batch given as keyword inputs with an ``attention_mask`` (batch, tokens) pads its
shorter sequences with tokens the model's output ignores. Reducers whose summary is over token
vectors (``tokens_only``: the Gram matrices of GPTQ/SparseGPT, Wanda's input norms) see only the
real tokens: :func:`token_mask` finds the mask, and the reducers drop the padded rows of every
(batch, tokens, dim) tensor with :func:`~netshrink.calibrate.reducers.real_tokens`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from netshrink.batches import run
from netshrink.calibrate.reducers import Reducer
from netshrink.context import Batch
from netshrink.errors import TargetError
from netshrink.progress import track

Points = Mapping[str, Sequence[Reducer]]
"""Statistic points: module qualified name -> the reducers that watch it."""


def first_tensor(value: Any, what: str) -> torch.Tensor:
    """The tensor in ``value``: itself, the first item of a tuple/list, or the first set field
    of a Hugging Face ``ModelOutput`` (what ``output[0]`` gives: ``last_hidden_state`` or
    ``logits``). A plain dict is refused: which of its values is the output is not defined.

    ``what`` names the value in the :class:`TargetError` raised when there is no tensor.
    """
    if callable(getattr(value, "to_tuple", None)):  # a ModelOutput, without importing them
        value = value.to_tuple()
    if isinstance(value, tuple | list) and value:
        value = value[0]
    if not torch.is_tensor(value):
        raise TargetError(f"{what} is a {type(value).__name__}, not a tensor")
    return value


def token_mask(inputs: Any) -> torch.Tensor | None:
    """The (batch, tokens) boolean mask of real tokens of a keyword-inputs batch with an
    ``attention_mask`` of that shape; None for any other batch (every position counts)."""
    if not isinstance(inputs, Mapping):
        return None
    mask = inputs.get("attention_mask")
    return mask.bool() if torch.is_tensor(mask) and mask.dim() == 2 else None


def _listing(names: Sequence[str], most: int = 60) -> str:
    shown = ", ".join(names[:most])
    return shown + (f", ... ({len(names) - most} more)" if len(names) > most else "")


class Hooks:
    """Forward hooks feeding each point's reducers, removed by :meth:`remove` or on exit.

    ``role`` names the model in error messages ("the student has no module named ...").
    ``tokens`` is the current batch's :func:`token_mask` (None: no padding); the caller sets it
    before each batch, and ``tokens_only`` reducers then see only the real tokens.
    """

    def __init__(self, model: nn.Module, points: Points, role: str = "model") -> None:
        self.tokens: torch.Tensor | None = None
        modules = dict(model.named_modules())
        for name in points:
            if name not in modules:
                raise TargetError(
                    f"the {role} has no module named {name!r}; its modules are: "
                    f"{_listing([n for n in modules if n])}"
                )
        self._handles: list[RemovableHandle] = []
        for name, reducers in points.items():
            where = f"{role} module {name!r}'s"
            ins = [r for r in reducers if r.on == "input"]
            outs = [r for r in reducers if r.on == "output"]
            if ins:
                self._handles.append(
                    modules[name].register_forward_pre_hook(
                        self._feed_inputs(ins, where), with_kwargs=True
                    )
                )
            if outs:
                self._handles.append(
                    modules[name].register_forward_hook(self._feed_outputs(outs, where))
                )

    def _fold(self, reducers: list[Reducer], module: nn.Module, x: torch.Tensor) -> None:
        for r in reducers:
            if r.tokens_only:
                r.update_tokens(module, x, self.tokens)
            else:
                r.update(module, x)

    def _feed_inputs(self, reducers: list[Reducer], where: str):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else next(iter(kwargs.values()), None)
            self._fold(reducers, module, first_tensor(x, f"{where} input"))

        return hook

    def _feed_outputs(self, reducers: list[Reducer], where: str):
        def hook(module: nn.Module, _args: tuple[Any, ...], output: Any) -> None:
            self._fold(reducers, module, first_tensor(output, f"{where} output"))

        return hook

    def remove(self) -> None:
        """Detach every hook; the model runs as before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


@contextmanager
def module_calls(model: nn.Module) -> Iterator[None]:
    """Eval mode without gradients, every submodule called as a module, no key/value caches;
    restored afterwards.

    torch's fused fast path of ``nn.TransformerEncoderLayer`` / ``nn.MultiheadAttention`` (taken
    in eval mode without gradients) reads the weights directly and never calls ``linear1``,
    ``linear2`` or ``out_proj``, so their hooks would see nothing: it is turned off meanwhile.
    A Hugging Face model whose config has ``use_cache`` hands each layer a cache object that
    every call appends its keys and values to; the sequential engines call a block several
    times on the same arguments, so the second call saw twice the keys (GPT-2: "The size of
    tensor a (44) must match the size of tensor b (22)"). Calibration needs no cache: it is off
    meanwhile.
    """
    was_training, fastpath = model.training, torch.backends.mha.get_fastpath_enabled()
    caching = {
        id(c): c
        for m in model.modules()
        if getattr(c := getattr(m, "config", None), "use_cache", False) is True
    }
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    for config in caching.values():
        config.use_cache = False
    try:
        with torch.no_grad():
            yield
    finally:
        for config in caching.values():
            config.use_cache = True
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)


def collect(
    model: nn.Module, points: Points, batches: Iterable[Batch], desc: str, show: bool = True
) -> None:
    """Run ``model`` (in eval mode) on every batch's inputs, feeding the reducers of ``points``.

    Inputs may be a tensor, a tuple of positional tensors or a dict of keyword tensors (whose
    ``attention_mask`` keeps padding out of ``tokens_only`` reducers). The model's train/eval
    mode is restored and the hooks removed afterwards, even on error.
    """
    with module_calls(model), Hooks(model, points) as hooks:
        for inputs, _ in track(batches, desc, show=show):
            hooks.tokens = token_mask(inputs)
            run(model, inputs)
