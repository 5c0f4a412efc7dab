"""``measure`` one model or ``compare`` two, timing them interleaved in one process."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from netshrink.batches import example_args, positional
from netshrink.context import Batch, Evaluate
from netshrink.errors import DataError, MissingInputError
from netshrink.measure.counts import count_macs, count_nonzero, count_params
from netshrink.measure.latency import time_in_subprocess, time_interleaved, timed_how
from netshrink.measure.memory import peak_memory
from netshrink.measure.results import Comparison, Measurement
from netshrink.runtime import (
    OrtModule,
    Runner,
    check_runtime,
    make_runner,
    onnx_bytes,
    resolve_threads,
    torch_threads,
)
from netshrink.settings import Timing

Measurable = nn.Module | str | Path | bytes
"""A torch module, or (for onnxruntime and openvino) an ONNX file path or ONNX bytes."""


def saved_bytes(model: nn.Module) -> int:
    """Bytes on disk of ``model`` saved with ``netshrink.artifact.save`` (tensors + manifest)."""
    from netshrink.artifact import artifact_bytes, save

    with tempfile.TemporaryDirectory() as tmp:
        return artifact_bytes(save(model, Path(tmp) / "artifact"))


@contextmanager
def _eval_mode(models: Iterable[Any]) -> Iterator[None]:
    modules = [m for m in models if isinstance(m, nn.Module)]
    flags = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(modules, flags, strict=True):
            m.train(flag)


def _static(model: Any, called: Any, args: tuple[Any, ...]) -> dict[str, Any]:
    """Counts, bytes and memory of ``model`` (run as ``called(*args)``); a bare ONNX model has
    only its file size."""
    if not isinstance(model, nn.Module):
        return {
            "params": None,
            "nonzero_params": None,
            "macs": None,
            "peak_memory_bytes": None,
            "bytes": len(onnx_bytes(model)),
            "bytes_of": "ONNX file",
        }
    return {
        "params": count_params(model),
        "nonzero_params": count_nonzero(model),
        "macs": count_macs(called, args),
        "peak_memory_bytes": peak_memory(called, args),
        "bytes": saved_bytes(model),
        "bytes_of": "netshrink artifact",
    }


def _check_same_shapes(outputs: list[Any]) -> None:
    """Raise :class:`DataError` when the models' outputs differ in shape: not comparable."""
    shapes = [[tuple(o.shape) for o in tree_leaves(out)] for out in outputs]
    if any(s != shapes[0] for s in shapes[1:]):
        raise DataError(
            f"the baseline's outputs have shapes {shapes[0]} but the candidate's {shapes[1]}; "
            "a compressed model must keep the original's output shapes"
        )


def _score(
    model: Any, runner: Runner, evaluate: Evaluate | None, data: list[Batch] | None
) -> float | None:
    """``evaluate`` on what the runtime computes: the module itself, or the runtime's outputs."""
    if evaluate is None or data is None:
        return None
    target = model if runner.runtime == "eager" else OrtModule(runner)
    with torch_threads(runner.threads):
        return float(evaluate(target, data))


def _runtime_source(model: Any, runtime: str, call: Any) -> Any:
    """What ``runtime`` runs: an eager model as it is; for the other runtimes its ONNX bytes
    (OpenVINO's form of the layers that offer one), made once for the runner and for a timing
    subprocess alike."""
    if runtime == "eager":
        return model
    if runtime.startswith("openvino") and isinstance(model, nn.Module):
        from netshrink.runtime.openvino import openvino_form

        model = openvino_form(model)
    return onnx_bytes(model, call)


def _measure_all(
    models: list[Any],
    example_inputs: Any,
    evaluate: Evaluate | None,
    data: Iterable[Batch] | None,
    timing: Timing,
) -> list[Measurement]:
    check_runtime(timing.runtime)
    n = resolve_threads(timing.threads)
    args = example_args(example_inputs)
    if not args or not all(torch.is_tensor(a) for a in args):
        raise DataError("example_inputs must be a tuple of tensors, e.g. (x,), or a dict of them")
    if evaluate is not None and data is None:
        raise MissingInputError("evaluate needs data: an iterable of (inputs, targets) batches")
    if data is not None and evaluate is None:
        from netshrink.metrics import accuracy

        evaluate = accuracy
    batches = list(data) if data is not None else None
    # each runtime takes keyword inputs as they are (an ONNX graph's inputs get their names);
    # MACs and memory are counted through a positional wrapper (batches.Keywords)
    call = example_inputs if isinstance(example_inputs, Mapping) else args
    how = timed_how(timing.runtime, n)
    with _eval_mode(models):
        called = [positional(m, example_inputs) for m in models]
        sources = [_runtime_source(m, timing.runtime, call) for m in models]
        runners = [make_runner(s, timing.runtime, n, call) for s in sources]
        with torch_threads(n):
            fns = [r.bind(call) for r in runners]
            _check_same_shapes([fn() for fn in fns])
            if how == "subprocess":
                timings = [
                    time_in_subprocess(s, timing.runtime, n, call, timing.runs, timing.warmup)
                    for s in sources
                ]
            else:
                timings = time_interleaved(fns, timing.runs, timing.warmup)
            static = [_static(m, c, args) for m, c in zip(models, called, strict=True)]
        metrics = [_score(m, r, evaluate, batches) for m, r in zip(models, runners, strict=True)]
    name = getattr(evaluate, "__name__", "metric") if evaluate is not None else None
    return [
        Measurement(
            **s,
            latency_ms=t.median_ms,
            latency_p90_ms=t.p90_ms,
            runtime=r.describe(),
            threads=n,
            batch_size=int(args[0].shape[0]) if args[0].dim() else 1,
            runs=t.runs,
            metric=metric,
            metric_name=name,
            timed=how,
        )
        for s, t, metric, r in zip(static, timings, metrics, runners, strict=True)
    ]


MEASURE_TIMING = Timing(runs=50)
"""The default of :func:`measure` and :func:`compare`: eager, torch's threads, 50 timed runs."""


def measure(
    model: Measurable,
    example_inputs: Any,
    *,
    evaluate: Evaluate | None = None,
    data: Iterable[Batch] | None = None,
    timing: Timing = MEASURE_TIMING,
) -> Measurement:
    """Measure ``model`` on ``example_inputs`` (a tuple of positional tensors, or a dict of
    keyword tensors).

    Latency: ``timing.warmup`` untimed then ``timing.runs`` timed forwards on
    ``timing.runtime`` (eager, onnxruntime, openvino or openvino-f32) with ``timing.threads``
    intra-op threads (None: torch's current count). With ``data``, ``evaluate(model, data)``
    (default: top-1 accuracy) scores what that runtime computes. The model is measured in eval
    mode; its training flag is restored after.
    """
    return _measure_all([model], example_inputs, evaluate, data, timing)[0]


def compare(
    baseline: Measurable,
    candidate: Measurable,
    example_inputs: Any,
    *,
    evaluate: Evaluate | None = None,
    data: Iterable[Batch] | None = None,
    timing: Timing = MEASURE_TIMING,
) -> Comparison:
    """Measure ``baseline`` and ``candidate`` alike, timing them interleaved in one process.

    Same runtime, thread count and input for both (see :func:`measure` for the options); the
    result holds both measurements and the compression rate, speedup rate and metric drop.
    """
    base, cand = _measure_all([baseline, candidate], example_inputs, evaluate, data, timing)
    return Comparison(base, cand)
