"""Running the user's own code (``--model``, ``--data``, ``--eval`` functions) behind one guard.

Whatever the user's function raises — an exception, ``SystemExit`` from ``sys.exit()`` or
``quit()`` — becomes a :class:`UserCodeError` (exit code 2) that names the reference, the call
and the user's own message, instead of a traceback through netshrink's internals (``--debug``
shows the traceback). References are checked before anything is called: a reference into the
standard library or to a compiled builtin is refused, since no model factory lives there and
some (``os:abort``, ``os:_exit``) end the process before any message could be printed.

:func:`check_data` then runs one batch of every split through the model, before any stage: the
batch's structure, its shapes against the model, finiteness, and integer labels against the
model's number of outputs.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from netshrink.errors import DataError, InputError, ModelReferenceError, NetshrinkError
from netshrink.quote import excerpt
from netshrink.supervisor import user_call

T = TypeVar("T")


class UserCodeError(InputError):
    """The user's factory, data, metric or model raised; the message quotes what it said."""


def guarded(what: str, call: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Return ``fn(*args, **kwargs)``; turn anything it raises into :class:`UserCodeError`.

    The call is announced to the supervising parent (:func:`netshrink.supervisor.user_call`), so
    that a call ending the whole process (``os._exit``) is still reported by name.

    ``what`` names the reference (``--data mypkg.data:loaders``), ``call`` the call made
    (``loaders()``). netshrink's own errors raised inside (a metric calling netshrink) pass
    unchanged; ``KeyboardInterrupt`` stays an interrupt.
    """
    try:
        with user_call(f"{what}: {call}"):
            return fn(*args, **kwargs)
    except NetshrinkError:
        raise
    except (Exception, SystemExit) as exc:
        said = excerpt(exc.code if isinstance(exc, SystemExit) else str(exc)).strip("'\"")
        raise UserCodeError(
            f"{what}: {call} raised {type(exc).__name__}: {said or '(no message)'}"
        ) from exc


def check_reference(obj: Any, ref: str, what: str) -> None:
    """Refuse a reference netshrink must not call: not callable, a compiled builtin, or an
    object of the standard library (``builtins:quit``, ``os:abort``, ``sys:exit``)."""
    if not callable(obj):
        raise ModelReferenceError(f"{what} {ref!r} is not callable: {type(obj).__name__}")
    module = (getattr(obj, "__module__", None) or type(obj).__module__ or "").split(".")[0]
    stdlib = module in sys.stdlib_module_names or module.lstrip("_") in sys.stdlib_module_names
    if stdlib or inspect.isbuiltin(obj):
        raise ModelReferenceError(
            f"{what} {ref!r} names a part of Python itself ({module or 'builtin'}), not your "
            "own code; give package.module:function of a function you wrote"
        )


def _args(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    return (tuple(inputs) if isinstance(inputs, tuple | list) else (inputs,)), {}


def _tensors(value: Any) -> list[Any]:
    if isinstance(value, Mapping):
        return list(value.values())
    return list(value) if isinstance(value, tuple | list) else [value]


def _describe(value: Any, depth: int = 2) -> str:
    """A short description of a batch's part: tensors with their shape, containers two deep."""
    if torch.is_tensor(value):
        return f"tensor{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, tuple | list) and depth > 0:
        inner = ", ".join(_describe(v, depth - 1) for v in value[:4])
        return f"{type(value).__name__} of {len(value)}: [{inner}]"
    if isinstance(value, Mapping):
        return f"dict with keys {excerpt(list(value))}"
    return type(value).__name__


def check_batch(batch: Any, where: str) -> None:
    """Raise :class:`DataError` unless ``batch`` is ``(inputs, targets)`` of finite tensors."""
    if not isinstance(batch, Sequence) or isinstance(batch, str | bytes) or len(batch) != 2:
        raise DataError(
            f"{where} is a {_describe(batch)}; a batch is a pair (inputs, targets): inputs a "
            "tensor, a tuple of tensors or a dict of tensors, targets a tensor or None"
        )
    inputs, targets = batch
    for t in _tensors(inputs):
        if not torch.is_tensor(t):
            raise DataError(f"{where} inputs hold a {_describe(t)}; inputs must be tensors")
        if t.numel() == 0:
            raise DataError(f"{where} inputs hold an empty {_describe(t)}")
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise DataError(f"{where} inputs contain NaN or Inf")
    if targets is not None and not torch.is_tensor(targets):
        raise DataError(f"{where} targets are a {_describe(targets)}; give a tensor or None")


def _check_labels(output: Any, batch: Sequence[Any], where: str) -> None:
    targets = batch[1]
    if not (torch.is_tensor(output) and torch.is_tensor(targets)) or output.dim() != 2:
        return  # not a classifier's (batch, classes) logits: the metric judges the targets
    if targets.shape[0] != output.shape[0]:
        raise DataError(
            f"{where}: the model gave {output.shape[0]} outputs for {targets.shape[0]} targets"
        )
    integer = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
    if targets.dtype in integer and targets.numel():
        classes = output.shape[1]
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= classes:
            raise DataError(
                f"{where}: labels range over [{low}, {high}] but the model has {classes} "
                f"outputs; labels must lie in [0, {classes - 1}]"
            )


def check_data(model: nn.Module, splits: Mapping[str, Sequence[Any]], ref: str) -> None:
    """Run the first batch of each split through ``model`` (no gradients) and check it.

    Raises :class:`DataError` for a malformed batch or labels out of the model's range and
    :class:`UserCodeError` when the forward pass itself fails (shapes that do not fit).
    """
    was_training = model.training
    model.eval()
    try:
        for split, batches in splits.items():
            where = f"--data {ref} split '{split}' batch 0"
            batch = batches[0]
            check_batch(batch, where)
            args, kwargs = _args(batch[0])
            with torch.no_grad():
                output = guarded(f"--model on {where}", "forward", model, *args, **kwargs)
            _check_labels(output, batch, where)
    finally:
        model.train(was_training)
