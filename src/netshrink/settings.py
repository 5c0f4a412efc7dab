"""Run settings as values, built once (by the CLI, or by the caller) and passed whole.

:class:`Inputs` is what a run is given: the references ``--model``, ``--weights``, ``--data``
and ``--eval`` and the seed, not yet resolved (:mod:`netshrink.refs` resolves them).
:class:`Timing` is how latency is measured: the runtime, its intra-op threads, the timed runs
and the warm-up. Both are frozen: a stage cannot change what the next one is measured with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from netshrink.errors import ConfigError

MIN_RUNS = 20
"""Fewest timed runs accepted: a median of fewer is too noisy to report."""


def check_runs(runs: int, warmup: int) -> None:
    """Raise :class:`ConfigError` unless ``runs >= MIN_RUNS`` and ``warmup >= 0``."""
    if isinstance(runs, bool) or not isinstance(runs, int) or runs < MIN_RUNS:
        raise ConfigError(f"runs must be an integer >= {MIN_RUNS} timed runs, got {runs!r}")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ConfigError(f"warmup must be an integer >= 0, got {warmup!r}")


@dataclass(frozen=True)
class Inputs:
    """What a run is given, as the user named it:
    ``--model/--weights/--data/--eval/--seed/--task``.

    ``model_ref`` is ``zoo:<name>``, ``hf:<folder or hub id>`` or ``package.module:factory``
    (None: not given, as when ``measure`` or ``export`` rebuild the model an artifact records);
    ``weights`` a safetensors state dict for it; ``data_ref`` a ``package.module:function``
    returning the data splits, or ``text:<file>`` for an hf model (None: a zoo model's own data,
    an hf model's built-in corpus); ``eval_ref`` a ``package.module:metric`` (None: the zoo
    model's metric, an hf model's fidelity to the uncompressed model, else top-1 accuracy);
    ``seed`` seeds every random choice of the run; ``task`` an hf model's task (``embedding``,
    ``classification``, ``causal-lm``, ``masked-lm``; None: inferred).
    """

    model_ref: str | None = None
    weights: Path | None = None
    data_ref: str | None = None
    eval_ref: str | None = None
    seed: int = 0
    task: str | None = None


@dataclass(frozen=True)
class Timing:
    """How latency is measured: ``warmup`` untimed then ``runs`` timed forward passes on
    ``runtime`` with ``threads`` intra-op threads (None: torch's current count).

    ``runs`` below :data:`MIN_RUNS` or a negative ``warmup`` is a :class:`ConfigError` here;
    the runtime name is checked by :mod:`netshrink.runtime`, which knows the runtimes.
    """

    runtime: str = "eager"
    threads: int | None = None
    runs: int = MIN_RUNS
    warmup: int = 10

    def __post_init__(self) -> None:
        check_runs(self.runs, self.warmup)


DEFAULT_TIMING = Timing()
"""Eager PyTorch, torch's thread count, 20 timed runs after 10 warm-up ones."""
