"""Independent latency cross-check: time a model with plain ``timeit``, not netshrink.measure.

Use it to confirm a latency netshrink reported (same runtime, threads and batch) within ~15%:

    python benchmarks/latency_check.py zoo:digits-cnn --batch 64 --threads 2
    python benchmarks/latency_check.py runs/r1/artifact --shape 1,8,8 --runtime eager
    python benchmarks/latency_check.py m.onnx --runtime onnxruntime --shape 1,8,8 --expect-ms 0.4

A source is ``zoo:<name>`` (trained zoo model), an artifact directory (``netshrink.artifact
.load``; a non-zoo one needs ``--build package.module:function`` for a fresh instance and
``--shape``), or an ``.onnx`` file (ONNX Runtime only). The input is seeded standard-normal
noise of shape (batch, *shape), or the zoo's example input.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import tempfile
import timeit
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _load(source: str, build: str | None) -> tuple[Any, str | None]:
    """The model (a torch module, or a path for an ONNX file) and its zoo name if known."""
    if source.endswith(".onnx"):
        return Path(source), None
    if source.startswith("zoo:"):
        from netshrink import zoo

        return zoo.load(source[4:]), source[4:]
    from netshrink.artifact import load, read_manifest

    arch = str(read_manifest(source).get("architecture", ""))
    fresh = None
    if build:  # the user's own architecture: package.module:function returning an nn.Module
        module, _, function = build.partition(":")
        fresh = getattr(importlib.import_module(module), function)()
    return load(source, model=fresh), (arch[4:] if arch.startswith("zoo:") else None)


def _input(zoo_name: str | None, shape: str | None, batch: int) -> torch.Tensor:
    if shape:
        torch.manual_seed(0)
        return torch.randn(batch, *(int(d) for d in shape.split(",")))
    if zoo_name is None:
        sys.exit("give --shape (the input shape without the batch dimension, e.g. 1,8,8)")
    from netshrink import zoo

    return zoo.example_inputs(zoo_name, batch)[0]


def _callable(model: Any, x: torch.Tensor, runtime: str, threads: int) -> Any:
    """A zero-argument forward on ``x``, inputs converted beforehand."""
    if runtime == "eager":
        if isinstance(model, Path):
            sys.exit("an .onnx file runs only with --runtime onnxruntime")
        model.eval()

        def eager() -> Any:
            with torch.inference_mode():
                return model(x)

        return eager
    import onnxruntime as ort

    if not isinstance(model, Path):
        path = Path(tempfile.mkdtemp()) / "model.onnx"
        batch = torch.export.Dim("batch")
        torch.onnx.export(
            model.eval(),
            (x,),
            str(path),
            dynamo=True,
            external_data=False,
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
        model = path
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="zoo:<name>, an artifact directory or a .onnx file")
    parser.add_argument("--runtime", choices=["eager", "onnxruntime"], default="eager")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shape", help="input shape without batch, e.g. 1,8,8")
    parser.add_argument("--build", help="package.module:function building a non-zoo artifact")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--expect-ms", type=float, help="a reported median to check (15%%)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    model, zoo_name = _load(args.source, args.build)
    x = _input(zoo_name, args.shape, args.batch)
    fn = _callable(model, x, args.runtime, args.threads)
    for _ in range(args.warmup):
        fn()
    # timeit's repeat with number=1: one call per sample, garbage collection off while timing.
    samples = [s * 1e3 for s in timeit.Timer(fn).repeat(repeat=args.runs, number=1)]
    median = statistics.median(samples)
    print(
        f"{args.source} runtime={args.runtime} threads={args.threads} batch={args.batch} "
        f"runs={args.runs}: median {median:.4f} ms, p90 {np.percentile(samples, 90):.4f} ms"
    )
    if args.expect_ms is not None:
        off = median / args.expect_ms - 1
        verdict = "agrees" if abs(off) <= 0.15 else "DISAGREES"
        print(f"reported {args.expect_ms:.4f} ms: {verdict} ({off:+.1%})")
        sys.exit(0 if abs(off) <= 0.15 else 1)


if __name__ == "__main__":
    main()
