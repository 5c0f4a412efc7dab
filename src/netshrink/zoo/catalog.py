"""The zoo's catalog: reference models by name, their data, training plans and cached weights."""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from netshrink.context import Evaluate
from netshrink.data import DataSplits, digits
from netshrink.errors import ArtifactError, ConfigError, ModelReferenceError
from netshrink.metrics import accuracy
from netshrink.zoo import cache
from netshrink.zoo.models import DigitsCNN, DigitsMLP, DigitsTransformer
from netshrink.zoo.training import TrainPlan, train


@dataclass(frozen=True)
class Entry:
    """A zoo model: how to build it at a given width, and how to train it."""

    build: Callable[[float], nn.Module]
    plan: TrainPlan
    summary: str


MODELS: dict[str, Entry] = {
    "digits-cnn": Entry(
        DigitsCNN,
        TrainPlan(epochs=20, lr=3e-3, weight_decay=1e-4),
        "residual CNN with BatchNorm, 64 -> 128 channels",
    ),
    "digits-mlp": Entry(
        DigitsMLP,
        TrainPlan(epochs=60, lr=1e-3, weight_decay=1e-2, batch_size=32),
        "MLP 64 -> 512 -> 512 -> 10",
    ),
    "digits-transformer": Entry(
        DigitsTransformer,
        TrainPlan(epochs=80, lr=2e-3, weight_decay=5e-2),
        "2-block transformer encoder, image rows as 8 tokens",
    ),
}


def names() -> list[str]:
    """Names of every zoo model, sorted."""
    return sorted(MODELS)


def _entry(name: str) -> Entry:
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ModelReferenceError(
            f"unknown zoo model '{name}'{hint}; zoo models: {', '.join(names())}"
        )
    return MODELS[name]


def describe(name: str) -> str:
    """One line saying what zoo model ``name`` is (for listings)."""
    return _entry(name).summary


def build(name: str, *, width: float = 1.0) -> nn.Module:
    """An untrained zoo model; ``width`` scales every hidden width (multiples of 8, at least 8)."""
    entry = _entry(name)
    if not 0 < width <= 16:
        raise ConfigError(f"width must be in (0, 16], got {width}; 0.5 halves every hidden width")
    model = entry.build(width)
    # Artifacts record this as architecture "zoo:<name>", so loading needs no model argument.
    model.netshrink_zoo = name
    return model


def name_of(model: nn.Module) -> str | None:
    """The zoo name of a model :func:`build` made (its ``netshrink_zoo`` tag), else None.

    A pruned or copied zoo model keeps the tag. (A ``zoo:<name>`` *reference* typed by a user is
    read by :func:`netshrink.refs.zoo_name`.)
    """
    name = getattr(model, "netshrink_zoo", None)
    return name if isinstance(name, str) else None


def data(name: str, batch_size: int = 64) -> DataSplits:
    """The data zoo model ``name`` was trained and is evaluated on (all are digits models)."""
    _entry(name)
    return digits(batch_size=batch_size)


def example_inputs(name: str, batch: int = 1) -> tuple[torch.Tensor, ...]:
    """Positional inputs for one forward call: the first ``batch`` test images.

    The tuple holds one ``(batch, 1, 8, 8)`` tensor; beyond the test split's size images repeat.
    """
    if batch < 1:
        raise ConfigError(f"batch must be a positive integer, got {batch}")
    images = torch.cat([x for x, _ in data(name).test])
    repeats = -(-batch // len(images))
    return (images.repeat(repeats, 1, 1, 1)[:batch].clone(),)


def evaluate(name: str) -> Evaluate:
    """The metric of zoo model ``name``: ``fn(model, batches) -> float``, higher is better."""
    _entry(name)
    return accuracy


def train_from_scratch(name: str, seed: int = 0, progress: bool = True) -> nn.Module:
    """Build zoo model ``name`` (initialised with ``seed``) and train it; the cache is untouched."""
    entry = _entry(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(name)
    train_data = digits(batch_size=entry.plan.batch_size).train
    train(model, train_data, entry.plan, seed=seed, progress=progress, desc=f"train zoo:{name}")
    return model


def load(name: str, seed: int = 0, progress: bool = True) -> nn.Module:
    """Zoo model ``name`` trained with ``seed``, in eval mode.

    The first call trains it (seconds; a progress bar shows) and caches the weights (see
    :mod:`netshrink.zoo.cache`); later calls load them. A corrupt cache file is retrained with a
    warning.
    """
    path = cache.cache_path(name, seed)
    if path.exists():
        model = build(name)
        try:
            model.load_state_dict(cache.load(path))
            return model.eval()
        except (ArtifactError, RuntimeError) as exc:
            warnings.warn(f"retraining zoo:{name}: {exc}", RuntimeWarning, stacklevel=2)
    model = train_from_scratch(name, seed, progress)
    try:
        cache.save(model.state_dict(), path)
    except OSError as exc:
        warnings.warn(
            f"could not cache zoo:{name} at {path} ({exc}); the next load trains again. "
            f"Set {cache.CACHE_ENV} to a writable folder.",
            RuntimeWarning,
            stacklevel=2,
        )
    return model.eval()
