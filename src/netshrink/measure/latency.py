"""Wall-clock latency: warm-up, then timed runs of one or several callables, interleaved.

Several callables are timed in rounds in one process, so drift in the machine's state
(frequency, other load) reaches all of them alike; their ratio is what is trustworthy. The order
within a round rotates (A B C, B C A, C A B, ...) because on a shared machine the position in a
round alone was seen to change one model's median up to 5x (cache and scheduler effects).
The garbage collector is paused while timing, as ``timeit`` does.

At several threads, models on ONNX Runtime or OpenVINO are timed each in its own subprocess
instead (:func:`time_in_subprocess`; see :data:`TIMED` for why and what is recorded).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.torch import save_file

from netshrink.errors import ConfigError, NetshrinkError
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


TIMED = ("interleaved", "shared pool", "subprocess")
"""How models measured together were timed (the ``timed`` field of a measurement):

- ``interleaved``: in one process, in rotating rounds, on one thread: no thread pool exists that
  could wait on or spin against another model's;
- ``shared pool``: interleaved in one process at several threads, eager PyTorch only, so every
  model runs on torch's one OpenMP pool;
- ``subprocess``: ONNX Runtime or OpenVINO at several threads: each model timed alone in a fresh
  Python process, so no other session's pool lives beside it (on a 2-core machine a second
  runtime's pool in the process made torch's and the runtimes' barriers wait: compiled int8
  MiniLM went from 438 ms at 1 thread to 1,284 ms at 2). Drift between the processes is not
  cancelled as interleaving cancels it."""


def timed_how(runtime: str, threads: int) -> str:
    """Which of :data:`TIMED` measures models on ``runtime`` with ``threads`` intra-op threads."""
    if threads <= 1:
        return "interleaved"
    return "shared pool" if runtime == "eager" else "subprocess"


def time_in_subprocess(
    onnx: bytes,
    runtime: str,
    threads: int,
    inputs: tuple[Any, ...] | Mapping[str, Any],
    runs: int = 50,
    warmup: int = 10,
) -> Latencies:
    """Time the ONNX model ``onnx`` on ``runtime`` alone in a fresh Python process.

    The child (:mod:`netshrink.measure.isolated`) builds its own runner with ``threads``
    intra-op threads on ``inputs`` (positional tensors, or keyword tensors by name), runs
    ``warmup`` untimed and ``runs`` timed calls and reports the samples, in milliseconds.
    """
    check_runs(runs, warmup)
    named = inputs if isinstance(inputs, Mapping) else {str(i): x for i, x in enumerate(inputs)}
    with tempfile.TemporaryDirectory() as tmp:
        model, tensors = Path(tmp) / "model.onnx", Path(tmp) / "inputs.safetensors"
        model.write_bytes(onnx)
        save_file({k: v.detach().cpu().contiguous() for k, v in named.items()}, str(tensors))
        # the child imports this same netshrink, however the parent found it
        root = str(Path(__file__).resolve().parents[2])
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))),
        }
        args = [str(model), str(tensors), runtime, str(threads), str(runs), str(warmup)]
        done = subprocess.run(
            [sys.executable, "-m", "netshrink.measure.isolated", *args],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
    if done.returncode != 0:
        raise NetshrinkError(
            f"timing {runtime} in a subprocess failed (exit {done.returncode}): "
            f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no message'}"
        )
    return Latencies(tuple(json.loads(done.stdout.strip().splitlines()[-1])["samples_ms"]))
