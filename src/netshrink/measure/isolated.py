"""The child side of :func:`netshrink.measure.latency.time_in_subprocess`: time one ONNX model
alone in this process and print its samples as one JSON line.

    python -m netshrink.measure.isolated MODEL.onnx INPUTS.safetensors RUNTIME THREADS RUNS WARMUP

``INPUTS`` holds the tensors of one forward call, keyed ``0, 1, ...`` when positional, else by
keyword name. Only files the parent wrote are read: safetensors, never a pickle.
"""

from __future__ import annotations

import json
import sys

from safetensors.torch import load_file

from netshrink.measure.latency import time_latency
from netshrink.runtime import make_runner, torch_threads


def main(argv: list[str]) -> None:
    """Time the model named in ``argv`` (see the module docstring) and print ``{"samples_ms"}``."""
    model, inputs_path, runtime, threads, runs, warmup = argv
    tensors = load_file(inputs_path)
    positional = all(k.isdigit() for k in tensors)
    inputs = tuple(tensors[str(i)] for i in range(len(tensors))) if positional else tensors
    n = int(threads)
    runner = make_runner(model, runtime, n, inputs)
    with torch_threads(n):
        found = time_latency(runner.bind(inputs), int(runs), int(warmup))
    print(json.dumps({"samples_ms": found.samples_ms}))


if __name__ == "__main__":
    main(sys.argv[1:])
