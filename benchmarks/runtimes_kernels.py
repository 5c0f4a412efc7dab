"""Which integer kernels a runtime really ran: node types of ONNX Runtime's optimized graph,
and the OpenVINO primitives (``layerType/runtimePrecision``) worth listing in a table."""

from __future__ import annotations

import collections
from pathlib import Path

ORT_INTEGER = (
    "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul", "QGemm",
    "QAttention", "ConvInteger", "QLinearConv", "QLinearAdd",
)  # fmt: skip


def ort_integer_nodes(path: Path) -> dict[str, int]:
    """Integer node types in ONNX Runtime's optimized graph of ``path`` (what really runs)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(path.with_suffix(".ort-opt.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    graph = onnx.load(options.optimized_model_filepath).graph
    counts = collections.Counter(n.op_type for n in graph.node if n.op_type in ORT_INTEGER)
    return dict(sorted(counts.items()))


def int8_primitives(prims: dict[str, int] | None) -> str:
    """The executed primitives that matter for speed: matmuls/convs by precision, attention
    (OpenVINO; its fused attention kernel runs as a Snippets ``Subgraph``: ``Subgraph/i8`` is
    int8 attention), or ORT's integer nodes."""
    if not prims:
        return ""
    keep = ("FullyConnected", "MatMul", "Convolution", "ScaledDotProductAttention", "MHA")
    keep += ("Subgraph",)
    keep += ORT_INTEGER
    return ", ".join(f"{k} x{v}" for k, v in prims.items() if k.split("/")[0] in keep)
