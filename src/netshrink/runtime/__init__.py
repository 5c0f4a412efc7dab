"""Running a model for measurement: eager PyTorch, ONNX Runtime and OpenVINO behind one call
interface.

A runner takes the positional inputs of one forward call (a tuple) and returns the output;
``bind(inputs)`` returns a zero-argument callable that runs only the model, with any input
conversion done beforehand, so a timer sees the model and nothing else.
"""

from netshrink.runtime.base import RUNTIMES, Runner, check_runtime, make_runner
from netshrink.runtime.eager import EagerRunner
from netshrink.runtime.openvino import OpenVinoRunner, import_openvino, save_ir
from netshrink.runtime.ort import (
    CallInputs,
    OnnxSource,
    OrtModule,
    OrtRunner,
    graph_feeds,
    onnx_bytes,
    onnx_session,
)
from netshrink.runtime.threads import resolve_threads, torch_threads

__all__ = [
    "RUNTIMES",
    "CallInputs",
    "EagerRunner",
    "OnnxSource",
    "OpenVinoRunner",
    "OrtModule",
    "OrtRunner",
    "Runner",
    "check_runtime",
    "graph_feeds",
    "import_openvino",
    "make_runner",
    "onnx_bytes",
    "onnx_session",
    "resolve_threads",
    "save_ir",
    "torch_threads",
]
