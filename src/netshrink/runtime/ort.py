"""ONNX Runtime runner (CPUExecutionProvider, all graph optimizations, explicit thread count).

A model reaches ONNX Runtime as ONNX bytes, from (first match wins):

1. a path to an ``.onnx`` file, ``bytes``, or an ``onnx.ModelProto``;
2. a module with a method ``netshrink_onnx(example_inputs)`` returning one of those — the hook
   that lets a model bring its own graph (e.g. a quantized model exported as QDQ);
3. any other ``nn.Module``: :func:`netshrink.artifact.onnx.export_onnx` on ``example_inputs``.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from netshrink.cpu import SATURATING_INT8
from netshrink.errors import ArtifactError, DataError
from netshrink.runtime.threads import resolve_threads

OnnxSource = str | Path | bytes | onnx.ModelProto | nn.Module
"""Anything :func:`onnx_bytes` turns into a serialized ONNX model."""

CallInputs = tuple[Any, ...] | Mapping[str, Any]
"""The inputs of one forward call: positional tensors, or keyword tensors by name (as a Hugging
Face model takes ``input_ids``, ``attention_mask``, ``token_type_ids``)."""


def onnx_bytes(source: OnnxSource, example_inputs: CallInputs | None = None) -> bytes:
    """Serialized ONNX model for ``source`` (see the module docstring for what is accepted)."""
    if isinstance(source, bytes):
        return source
    if isinstance(source, onnx.ModelProto):
        return source.SerializeToString()
    if isinstance(source, str | Path):
        path = Path(source)
        if not path.is_file():
            raise ArtifactError(f"no ONNX file at {path}; give the path of an exported .onnx")
        # onnx.load pulls in external-data files, so the bytes hold the whole model.
        return onnx.load(str(path)).SerializeToString()
    if not isinstance(source, nn.Module):
        raise ArtifactError(
            f"cannot run a {type(source).__name__} in ONNX Runtime; give an nn.Module, an ONNX "
            "file path, ONNX bytes or an onnx.ModelProto"
        )
    hook = getattr(source, "netshrink_onnx", None)
    if callable(hook):
        own = hook(example_inputs)
        if isinstance(own, nn.Module):
            raise ArtifactError("netshrink_onnx() must return a path, bytes or a ModelProto")
        return onnx_bytes(own)
    if example_inputs is None:
        raise DataError("exporting a module to ONNX needs example_inputs, e.g. (x,)")
    from netshrink.artifact.onnx import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        return export_onnx(source, Path(tmp) / "model.onnx", example_inputs).read_bytes()


def onnx_session(
    source: OnnxSource, example_inputs: CallInputs | None = None, threads: int | None = None
) -> ort.InferenceSession:
    """An ORT CPU session for ``source`` with ``threads`` intra-op threads and one inter-op.

    Graph optimizations are all on (``ORT_ENABLE_ALL``: constant folding, fusions such as
    QDQ -> QLinearConv/QGemm); execution is sequential so ``threads`` is the whole budget.
    Worker threads sleep instead of spinning between runs: with spinning on, the idle pool of
    one session kept the cores busy while another session ran, and an fp32 baseline timed
    interleaved with its int8 candidate measured 9-13 ms in one process against 4.7 ms alone
    (2 cores, digits-cnn, batch 64).

    On x86 CPUs without VNNI (:data:`netshrink.cpu.SATURATING_INT8`) the session asks for
    ``session.x64quantprecision``: ORT's u8 x s8 GEMM adds pairs of products in saturating
    int16 there, which 8-bit weights overflow (a smoothed static int8 Linear: 1% of its output
    range off); the option rewrites such weights to uint8 for an exact u8 x u8 GEMM, and the
    graph's per-channel int8 weights get explicit zero points first, without which that
    rewrite fails (:func:`netshrink.artifact.onnx.explicit_zero_points`; any ONNX source,
    not only netshrink's exports).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = resolve_threads(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 4  # fatal only: errors are raised anyway; stderr stays clean
    data = onnx_bytes(source, example_inputs)
    if SATURATING_INT8:
        options.add_session_config_entry("session.x64quantprecision", "1")
        data = _with_zero_points(data)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _with_zero_points(data: bytes) -> bytes:
    """``data`` with explicit per-channel int8 zero points (unchanged when none were missing)."""
    from netshrink.artifact.onnx import explicit_zero_points

    model = onnx.load_from_string(data)
    return model.SerializeToString() if explicit_zero_points(model) else data


def _numpy(x: Any) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().cpu().contiguous().numpy()
    return np.asarray(x)


def graph_feeds(names: list[str], inputs: CallInputs, what: str) -> dict[str, np.ndarray]:
    """``inputs`` as numpy arrays keyed by the graph's input ``names``: positional inputs in
    order, keyword inputs by name. A keyword the graph has no input for is left out (an
    exporter drops the inputs a model never reads); a missing one, or a positional count that
    differs, is a :class:`DataError` naming ``what`` takes what."""
    if isinstance(inputs, Mapping):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise DataError(
                f"{what} takes inputs {names}; got keywords {list(inputs)}, missing {missing}"
            )
        return {name: _numpy(inputs[name]) for name in names}
    if len(inputs) != len(names):
        raise DataError(f"{what} takes {len(names)} inputs ({', '.join(names)}), got {len(inputs)}")
    return {name: _numpy(x) for name, x in zip(names, inputs, strict=True)}


class OrtRunner:
    """Runs an ONNX model in ONNX Runtime; outputs are torch tensors (one, or a tuple)."""

    runtime = "onnxruntime"

    def __init__(
        self,
        source: OnnxSource,
        example_inputs: CallInputs | None = None,
        threads: int | None = None,
    ):
        self.threads = resolve_threads(threads)
        self.session = onnx_session(source, example_inputs, self.threads)
        self.input_names = [i.name for i in self.session.get_inputs()]

    def feeds(self, inputs: CallInputs) -> dict[str, np.ndarray]:
        """Map positional ``inputs`` (or a name -> tensor dict) onto the graph's inputs."""
        return graph_feeds(self.input_names, inputs, "the ONNX graph")

    def describe(self) -> str:
        """The runtime name (nothing else to record)."""
        return self.runtime

    def __call__(self, inputs: CallInputs) -> Any:
        """Run one forward pass on ``inputs``; torch tensors out."""
        return self.bind(inputs)()

    def bind(self, inputs: CallInputs) -> Callable[[], Any]:
        """Zero-argument run on ``inputs``, converted to numpy once, outside the timed call."""
        session, feeds = self.session, self.feeds(inputs)

        def run() -> Any:
            out = tuple(torch.from_numpy(o) for o in session.run(None, feeds))
            return out[0] if len(out) == 1 else out

        return run


class OrtModule(nn.Module):
    """An ``nn.Module`` face on an ONNX Runtime or OpenVINO runner: tensors in, tensors out.

    It lets an ``evaluate(model, batches)`` function score exactly what the runtime computes.
    """

    def __init__(self, runner: Any):
        super().__init__()
        self.runner = runner

    def forward(self, *inputs: Any, **keywords: Any) -> Any:
        if inputs and keywords:
            raise DataError("call a runtime's model with positional or keyword inputs, not both")
        out = self.runner(keywords or inputs)
        if isinstance(out, tuple):
            return tuple(torch.as_tensor(o) for o in out)
        return torch.as_tensor(out)
