"""The checks :meth:`netshrink.registry.Technique.apply` runs around every technique.

- :func:`signature`: the structure of a forward's output (its pytree: tuples, dicts, Hugging Face
  ``ModelOutput``) and the shape of every tensor in it, so a compressed model can be held to
  the outputs of the original.
- :class:`InFlight`: which module was running when a forward raised. Forward pre-hooks push a
  module, forward hooks pop it; a module whose forward raised is never popped, so the innermost
  one still on the stack is the layer to name (often a parent that read ``child.weight``).
- :func:`changed`: whether a technique changed anything at all (module types, tensor names,
  shapes, dtypes or values), so a stage that did nothing is never reported as applied.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import (
    register_module_forward_hook,
    register_module_forward_pre_hook,
)
from torch.utils import _pytree as pytree

from netshrink.batches import run
from netshrink.errors import UnsupportedModuleError

Signature = tuple[Any, list[Any]]
"""``(pytree spec, per-leaf shape or type name)`` of a forward's output."""


def signature(output: Any) -> Signature:
    """The output's pytree structure and each leaf's shape (tensors) or type name (others)."""
    leaves, spec = pytree.tree_flatten(output)
    shapes = [tuple(v.shape) if torch.is_tensor(v) else type(v).__name__ for v in leaves]
    return spec, shapes


def describe(sig: Signature) -> str:
    """A short text of a signature for error messages: the container type and leaf shapes."""
    spec, shapes = sig
    return f"{getattr(spec.type, '__name__', spec.type)} of {shapes}"


class InFlight:
    """The stack of modules whose forward is running, on this thread.

    Entries are weak references: a forward stopped by an exception that something caught (the
    calibration engine stops forwards early that way) never leaves its modules, and a strong
    reference would keep a layer a technique has since replaced, and its weights, alive until
    the technique ends."""

    def __init__(self) -> None:
        self._local = threading.local()

    @property
    def stack(self) -> list[weakref.ref[nn.Module]]:
        """Modules entered and not yet left, outermost first."""
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def enter(self, module: nn.Module, _args: Any) -> None:
        self.stack.append(weakref.ref(module))

    def leave(self, module: nn.Module, _args: Any, _out: Any) -> None:
        # Pop up to ``module``: a child that raised inside a parent's try/except never left.
        stack = self.stack
        while stack and stack.pop()() is not module:
            pass

    def culprit(self, model: nn.Module, exc: BaseException) -> str:
        """``name (Type)`` of the innermost module of ``model`` still running whose forward
        ``exc`` passed through, or ''.

        Only modules on ``exc``'s traceback count: a forward an earlier, caught exception
        stopped (the calibration engine's early stops) is still on the stack, but an error
        raised later outside it, e.g. in a solver, is not its fault."""
        names = {id(m): n for n, m in model.named_modules()}
        raised = _modules_on(exc)
        for ref in reversed(self.stack):
            module = ref()
            if module is not None and id(module) in names and id(module) in raised:
                name = names[id(module)] or "the model's own forward"
                return f"{name} ({type(module).__name__})"
        return ""


def _modules_on(exc: BaseException) -> set[int]:
    """Ids of the modules whose frames (their ``forward`` or torch's call of it) ``exc``'s
    traceback passes through."""
    ids: set[int] = set()
    tb = exc.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module):
            ids.add(id(owner))
        tb = tb.tb_next
    return ids


@contextmanager
def watch() -> Iterator[InFlight]:
    """Track which modules are running while the block runs.

    The hooks are global (every module, including those a technique creates on the way) and
    the stack is per thread, so nothing is attached to, or left on, the model itself.
    """
    tracker = InFlight()
    handles = [
        register_module_forward_pre_hook(tracker.enter),
        register_module_forward_hook(tracker.leave),
    ]
    try:
        yield tracker
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def forward_signature(model: nn.Module, inputs: Any) -> Signature:
    """Run ``model`` once in eval mode on ``inputs`` and return its output signature.

    Raises :class:`UnsupportedModuleError` naming the innermost layer that raised. The model's
    training flag is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        with watch() as flight:
            try:
                return signature(run(model, inputs))
            except Exception as exc:
                where = flight.culprit(model, exc) or type(model).__name__
                raise UnsupportedModuleError(
                    f"the forward fails in {where} ({type(exc).__name__}: {exc})"
                ) from exc
    finally:
        model.train(was_training)


def check_outputs(model: nn.Module, inputs: Any, expected: Signature, technique: str) -> None:
    """Raise :class:`UnsupportedModuleError` unless one forward of ``model`` on ``inputs`` runs
    and gives outputs of ``expected``'s structure and shapes."""
    try:
        got = forward_signature(model, inputs)
    except UnsupportedModuleError as exc:
        raise UnsupportedModuleError(
            f"{technique} returned a model that no longer runs: {exc}; leave that layer out "
            "with targets.exclude"
        ) from exc.__cause__
    if got != expected:
        raise UnsupportedModuleError(
            f"{technique} changed the model's outputs from {describe(expected)} to "
            f"{describe(got)}; a layer was not understood: leave it out with targets.exclude"
        )


def changed(before: nn.Module, after: nn.Module) -> bool:
    """True when ``after`` differs from ``before`` in a module type, a parameter or buffer name,
    shape, dtype or value."""
    if after is before:
        return False
    kinds = [(n, type(m)) for n, m in before.named_modules()]
    if kinds != [(n, type(m)) for n, m in after.named_modules()]:
        return True
    old, new = before.state_dict(), after.state_dict()
    if list(old) != list(new):
        return True
    return any(_differ(old[k], new[k]) for k in old)


def _differ(a: Any, b: Any) -> bool:
    if not (torch.is_tensor(a) and torch.is_tensor(b)):
        return type(a) is not type(b) or bool(a != b)
    return a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b)


def tied(model: nn.Module) -> list[tuple[str, ...]]:
    """Names of parameters that are one tensor shared by several modules (tied weights)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return [tuple(group) for group in names.values() if len(group) > 1]


def check_ties(before: nn.Module, after: nn.Module, technique: str) -> None:
    """Raise :class:`UnsupportedModuleError` when weights tied in ``before`` are no longer one
    tensor in ``after``: the copy would be stored, and trained, separately."""
    params = dict(after.named_parameters(remove_duplicate=False))
    for group in tied(before):
        kept = [params.get(n) for n in group]
        if any(p is None or p is not kept[0] for p in kept):
            owners = [n.rpartition(".")[0] or n for n in group]
            raise UnsupportedModuleError(
                f"{technique} untied the shared weight {' = '.join(group)}: the model would "
                f"store and train two copies; leave one of {owners} out with targets.exclude"
            )
