"""Wall-clock latency: warm-up, then timed runs of one or several callables, interleaved.

Several callables are timed in rounds in one process, so drift in the machine's state
(frequency, other load) reaches all of them alike; their ratio is what is trustworthy. The order
within a round rotates (A B C, B C A, C A B, ...) because on a shared machine the position in a
round alone was seen to change one model's median up to 5x (cache and scheduler effects).
The garbage collector is paused while timing, as ``timeit`` does.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from netshrink.errors import ConfigError
from netshrink.settings import check_runs


@dataclass(frozen=True)
class Latencies:
    """Timed runs of one callable, in milliseconds."""

    samples_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        """Median latency of one call, in milliseconds."""
        return float(np.median(self.samples_ms))

    @property
    def p90_ms(self) -> float:
        """90th percentile latency of one call, in milliseconds (linear interpolation)."""
        return float(np.percentile(self.samples_ms, 90))

    @property
    def runs(self) -> int:
        """Number of timed runs."""
        return len(self.samples_ms)


def time_interleaved(
    fns: Sequence[Callable[[], Any]], runs: int = 50, warmup: int = 10
) -> list[Latencies]:
    """Time each zero-argument callable ``runs`` times, interleaved, rotating the order.

    Every callable first runs ``warmup`` untimed times (also interleaved). Returns one
    :class:`Latencies` per callable, in order.
    """
    check_runs(runs, warmup)
    if not fns:
        raise ConfigError("time_interleaved needs at least one callable")
    for _ in range(warmup):
        for fn in fns:
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    gc_was_on = gc.isenabled()
    gc.disable()
    try:
        for r in range(runs):
            for k in range(len(fns)):
                i = (r + k) % len(fns)
                start = time.perf_counter_ns()
                fns[i]()
                samples[i].append((time.perf_counter_ns() - start) / 1e6)
    finally:
        if gc_was_on:
            gc.enable()
    return [Latencies(tuple(s)) for s in samples]


def time_latency(fn: Callable[[], Any], runs: int = 50, warmup: int = 10) -> Latencies:
    """Time one zero-argument callable: ``warmup`` untimed calls, then ``runs`` timed ones."""
    return time_interleaved([fn], runs, warmup)[0]
