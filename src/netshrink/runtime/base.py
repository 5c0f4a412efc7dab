"""What every runner offers, and choosing one by runtime name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch

from netshrink.errors import ConfigError
from netshrink.runtime.eager import EagerRunner
from netshrink.runtime.ort import CallInputs, OrtRunner
from netshrink.runtime.threads import resolve_threads

RUNTIMES = ("eager", "onnxruntime", "openvino", "openvino-f32")
"""Runtime names: eager PyTorch under ``torch.inference_mode``, ONNX Runtime on CPU, and
OpenVINO's CPU plugin (the optional extra ``netshrink[openvino]``) at its default compute
precision (bf16 on CPUs with bf16 instructions) or told to compute in fp32 (``openvino-f32``)."""


class Runner(Protocol):
    """A model made callable on one runtime with a fixed number of intra-op threads."""

    runtime: str
    threads: int

    def __call__(self, inputs: CallInputs) -> Any:
        """Run one forward pass on ``inputs`` (a tuple of positional tensors, or a dict of
        keyword tensors); torch tensors out."""
        ...

    def bind(self, inputs: CallInputs) -> Callable[[], Any]:
        """Return a zero-argument callable running the model on ``inputs``, for timing."""
        ...

    def describe(self) -> str:
        """What ran, for reports: the runtime name and any setting it chose (precision)."""
        ...


def check_runtime(runtime: str) -> str:
    """Return ``runtime`` when it names a known runtime, else raise :class:`ConfigError`."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")
    return runtime


def make_runner(
    model: Any, runtime: str, threads: int | None, example_inputs: CallInputs
) -> Runner:
    """Build the runner for ``model`` on ``runtime`` with ``threads`` intra-op threads.

    ``example_inputs`` are one forward call's inputs: a tuple of positional tensors, or a dict of
    keyword tensors (then the ONNX graph's inputs are named after the keys, and the runner is
    called with such a dict, or with the tensors in the order of the graph's inputs).

    ``model`` is an ``nn.Module``; for ``onnxruntime`` and ``openvino`` it may also be anything
    :func:`~netshrink.runtime.ort.onnx_bytes` accepts (an ONNX file path, bytes, a ModelProto).
    ``openvino`` runs at OpenVINO's default compute precision, ``openvino-f32`` in fp32.
    """
    check_runtime(runtime)
    n = resolve_threads(threads)
    if runtime == "eager":
        if not isinstance(model, torch.nn.Module):
            raise ConfigError(
                f"runtime 'eager' needs a torch.nn.Module, got {type(model).__name__}; "
                "use runtime='onnxruntime' for an ONNX file"
            )
        return EagerRunner(model, n)
    if runtime.startswith("openvino"):
        from netshrink.runtime.openvino import OpenVinoRunner

        precision = "f32" if runtime == "openvino-f32" else "default"
        return OpenVinoRunner(model, example_inputs, n, precision)
    return OrtRunner(model, example_inputs, n)
