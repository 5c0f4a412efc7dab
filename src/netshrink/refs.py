"""Resolving what the command line names: ``--model``, ``--weights``, ``--data`` and ``--eval``.

A model reference is ``zoo:<name>`` (a built-in model and its data), ``hf:<folder or hub id>``
(a transformers model, :mod:`netshrink.hf`; its data is ``text:<file>`` or the built-in corpus)
or ``package.module:function`` (the user's own code, imported and called with no arguments).
Only references the user typed are imported: a recipe or an artifact never makes netshrink
import a module it names.
"""

from __future__ import annotations

import functools
import importlib
import itertools
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from torch import nn

from netshrink.batches import materialize
from netshrink.context import Batch, Evaluate
from netshrink.data import DataSplits
from netshrink.errors import ConfigError, DataError, ModelReferenceError
from netshrink.quote import excerpt
from netshrink.usercode import check_batch, check_reference, guarded

ZOO = "zoo:"
HF = "hf:"
TEXT = "text:"
DATA_SPLITS = ("train", "val", "calib")
MAX_BATCHES = 100_000
"""Most batches a split may hold: an endless generator is refused instead of filling memory."""


def zoo_name(ref: object) -> str | None:
    """The model name of a ``zoo:<name>`` reference, else None (also for a non-string)."""
    return ref[len(ZOO) :] if isinstance(ref, str) and ref.startswith(ZOO) else None


def is_hf(ref: object) -> bool:
    """Whether ``ref`` is an ``hf:`` model reference."""
    return isinstance(ref, str) and ref.startswith(HF)


def is_text(ref: object) -> bool:
    """Whether ``ref`` is a ``text:<file>`` data reference."""
    return isinstance(ref, str) and ref.startswith(TEXT)


def hf_baseline(model: nn.Module) -> nn.Module | None:
    """For a model built from an ``hf:`` reference (as ``load`` rebuilds an hf artifact), the
    pretrained model that reference names: what its default metric compares with. Else None."""
    from netshrink import hf

    info = hf.reference_info(model)
    return None if info is None else hf.load_model(info["ref"], info["task"])


def _import(module_name: str, what: str, ref: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelReferenceError(f"{what} {ref!r}: cannot import {module_name!r}: {exc}") from None


def load_object(ref: str, what: str) -> Any:
    """Import ``package.module:attribute`` and return the attribute.

    The current directory is put on ``sys.path`` (as ``python -m`` does) so a user's own modules
    next to their data are found.
    """
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ModelReferenceError(
            f"{what} {ref!r} is not a reference; write zoo:<name> or package.module:function"
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    module = guarded(f"{what} {ref}", f"import {module_name}", _import, module_name, what, ref)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ModelReferenceError(f"{what} {ref!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def _call(ref: str, what: str) -> Any:
    factory = load_object(ref, what)
    check_reference(factory, ref, what)
    return guarded(f"{what} {ref}", f"{ref.partition(':')[2]}()", factory)


def build_model(
    ref: str, seed: int = 0, trained: bool = True, task: str | None = None
) -> nn.Module:
    """The model ``ref`` names: a zoo or hf model (trained, or pretrained, unless
    ``trained=False``) or a factory's. ``task`` is the hf model's (None: inferred); any other
    model takes none (:class:`ConfigError`)."""
    if is_hf(ref):
        from netshrink import hf

        return hf.load_model(ref, task) if trained else hf.fresh_model(ref, task)
    if task is not None:
        raise ConfigError(f"--task {task} applies to hf: models only, not --model {ref}")
    name = zoo_name(ref)
    if name is not None:
        from netshrink import zoo

        return zoo.load(name, seed=seed) if trained else zoo.build(name)
    model = _call(ref, "--model")
    if not isinstance(model, nn.Module):
        raise ModelReferenceError(
            f"--model {ref!r} returned {type(model).__name__} {excerpt(model, 80)}; "
            "it must return a torch.nn.Module"
        )
    return model


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a safetensors state dict into ``model`` (strict); DataError when it does not fit."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        what = "is not a regular file" if path.exists() else "does not exist"
        raise DataError(f"--weights {str(path)!r} {what}")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise DataError(
            f"--weights {str(path)!r} is not a safetensors file ({exc}); save one with "
            "safetensors.torch.save_file(model.state_dict(), path)"
        ) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DataError(f"--weights {str(path)!r} does not fit the model: {exc}") from None
    return model


def model_from(
    ref: str, weights: str | Path | None = None, seed: int = 0, task: str | None = None
) -> nn.Module:
    """The model for ``--model ref [--weights file] [--task task]``, in eval mode."""
    model = build_model(ref, seed=seed, trained=weights is None, task=task)
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def _first(batches: Any, count: int) -> list[Any]:
    """The first ``count`` items of the iterable ``batches``."""
    return list(itertools.islice(batches, count))


def _split(data: Any, key: str, ref: str) -> list[Batch] | None:
    value = data.get(key) if isinstance(data, Mapping) else getattr(data, key, None)
    if value is None:
        return None
    what = f"--data {ref} split '{key}'"
    batches = guarded(f"--data {ref}", f"iterating split '{key}'", _first, value, MAX_BATCHES + 1)
    if len(batches) > MAX_BATCHES:
        raise DataError(
            f"{what} yields more than {MAX_BATCHES} batches (an endless generator?); give a "
            "finite list of batches"
        )
    for i, batch in enumerate(batches):
        check_batch(batch, f"{what} batch {i}")
    return materialize(batches, what)


def data_from(ref: str | None, model: nn.Module | None = None, seed: int = 0) -> DataSplits:
    """The batches ``--data ref`` names: ``zoo:<name>``, a function returning a mapping, or for
    an hf ``model``, ``text:<file>`` tokenized with its tokenizer (``ref`` None: the built-in
    corpus; ``seed`` salts the split).

    The mapping needs ``train``, ``val`` and ``calib`` (iterables of ``(inputs, targets)``
    batches) and may hold ``test``, where the reported metric is then measured.
    """
    if ref is None or is_text(ref):
        from netshrink import hf

        if model is None or hf.reference_info(model) is None:
            shown = "--data text:<file>" if ref is None else f"--data {ref}"
            raise DataError(
                f"{shown} is tokenized with an hf: model's tokenizer, and the model is not one;"
                " give --model hf:<folder>, or --data package.module:function for this model"
            )
        return hf.data_for(model, ref, seed)  # type: ignore[arg-type]
    name = zoo_name(ref)
    if name is not None:
        from netshrink import zoo

        raw: Any = zoo.data(name)
    else:
        raw = _call(ref, "--data")
    splits = {k: _split(raw, k, ref) for k in (*DATA_SPLITS, "test")}
    missing = [k for k in DATA_SPLITS if splits[k] is None]
    if missing:
        raise DataError(
            f"--data {ref!r} gave no {', '.join(missing)}; it must return a mapping with "
            f"{', '.join(DATA_SPLITS)} (and optionally test), each a list of (inputs, targets)"
        )
    val = splits["val"]
    assert val is not None and splits["train"] is not None and splits["calib"] is not None
    return DataSplits(
        train=splits["train"], val=val, test=splits["test"] or val, calib=splits["calib"]
    )


def evaluate_from(
    ref: str | None,
    model_ref: str = "",
    baseline: nn.Module | None = None,
    data: DataSplits | None = None,
) -> Evaluate:
    """The metric ``--eval ref`` names (``fn(model, batches) -> float``, higher is better).

    Without ``ref``: for an hf ``baseline`` (the uncompressed model) its task's fidelity to it
    on ``data``'s test split; the zoo model's own metric for a ``zoo:`` model; else top-1
    accuracy.
    """
    if ref is None and baseline is not None and data is not None:
        from netshrink import hf

        if hf.reference_info(baseline) is not None:
            return hf.evaluate_for(baseline, data)  # type: ignore[arg-type]
    if ref is None:
        from netshrink.metrics import accuracy

        name = zoo_name(model_ref)
        if name is None:
            return accuracy
        from netshrink import zoo

        return zoo.evaluate(name)
    fn = load_object(ref, "--eval")
    check_reference(fn, ref, "--eval")
    return checked_metric(fn, ref)


def checked_metric(fn: Callable[..., Any], ref: str) -> Evaluate:
    """Wrap ``fn`` so that a result that is not a finite number raises DataError; the wrapper
    keeps ``fn``'s name, which the report shows as the metric's."""

    @functools.wraps(fn)
    def evaluate(model: nn.Module, batches: Any) -> float:
        value = guarded(
            f"--eval {ref}", f"{ref.partition(':')[2]}(model, batches)", fn, model, batches
        )
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise DataError(
                f"--eval {ref!r} returned {excerpt(value, 80)}; it must return a float"
            ) from None
        if number != number or number in (float("inf"), float("-inf")):
            raise DataError(f"--eval {ref!r} returned {number}; it must be finite")
        return number

    return evaluate
