"""Structural edits that no module spec shows, recorded on the model so an artifact replays them.

Most structural changes are visible in the module tree (a narrower ``Linear``, a packed layer),
and loading replays them from each module's recorded spec. Some are not: a transformer layer
dropped from a ``ModuleList`` (the list's remaining children look like the first ones), or an
attention module whose head-count attributes must shrink with its projections. A technique makes
such a change with :func:`apply_edit`: the edit's replay function (registered by
:func:`edit_kind`) changes the model, and the edit — its kind and JSON arguments — is appended
to the model's edit list. Saving writes that list into the manifest; loading replays it, in
order, on the fresh model before the module specs (:func:`replay_edits`), through the same
function that made the change the first time.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from netshrink.errors import ArtifactError, NetshrinkError, TargetError

__all__ = ["EDITS_ATTR", "MAX_EDITS", "apply_edit", "edit_kind", "recorded_edits", "replay_edits"]

EDITS_ATTR = "netshrink_edits"
"""The root-module attribute holding the list of edits applied so far."""

MAX_EDITS = 10_000
"""Most edits an artifact may ask to replay (a model has far fewer structural parts)."""

Replay = Callable[[nn.Module, dict[str, Any]], None]
_F = TypeVar("_F", bound=Replay)
_REPLAYS: dict[str, Replay] = {}


def edit_kind(kind: str) -> Callable[[_F], _F]:
    """Register the decorated ``fn(model, args)`` as the function that performs edits of
    ``kind``; it must raise (not half-apply) when ``args`` do not fit the model."""

    def register(fn: _F) -> _F:
        if _REPLAYS.get(kind, fn) is not fn:
            raise ValueError(f"edit kind {kind!r} is registered twice")
        _REPLAYS[kind] = fn
        return fn

    return register


def recorded_edits(model: nn.Module) -> list[dict[str, Any]]:
    """The edits applied to ``model`` so far, oldest first (a copy; empty for most models)."""
    return [dict(edit) for edit in getattr(model, EDITS_ATTR, ())]


def apply_edit(model: nn.Module, kind: str, **args: Any) -> None:
    """Perform the edit ``kind`` with ``args`` on ``model`` (its root) and record it.

    ``args`` must be JSON data (an artifact stores them). Raises :class:`TargetError` for an
    unregistered kind or arguments that are not JSON.
    """
    if kind not in _REPLAYS:
        raise TargetError(f"no structural edit called {kind!r}; known: {sorted(_REPLAYS)}")
    try:
        args = json.loads(json.dumps(args, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TargetError(f"the {kind!r} edit's arguments are not JSON data: {exc}") from exc
    _REPLAYS[kind](model, args)
    edits = [*recorded_edits(model), {"kind": kind, "args": args}]
    # A new list each time: a deep copy of the model taken before this edit keeps its own.
    setattr(model, EDITS_ATTR, edits)


def replay_edits(model: nn.Module, edits: Any) -> None:
    """Perform a manifest's ``edits`` on ``model``, in order; :class:`ArtifactError` for a list
    of the wrong shape, an unknown kind, or an edit that does not fit the model."""
    if not isinstance(edits, list) or len(edits) > MAX_EDITS:
        raise ArtifactError(f"the manifest's 'edits' must be a list of at most {MAX_EDITS}")
    for i, edit in enumerate(edits):
        if not (
            isinstance(edit, dict)
            and sorted(edit) == ["args", "kind"]
            and isinstance(edit["args"], dict)
            and edit["kind"] in _REPLAYS
        ):
            raise ArtifactError(
                f"the manifest's edit {i} is not {{kind, args}} with a known kind "
                f"({sorted(_REPLAYS)})"
            )
        try:
            apply_edit(model, edit["kind"], **edit["args"])
        except (NetshrinkError, AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
            raise ArtifactError(
                f"the manifest's edit {i} ({edit['kind']}) does not fit the model: {exc}"
            ) from exc
