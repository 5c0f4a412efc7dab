"""Smoothed static int8 layers and int8 embedding rows: saved, exported, run in ONNX Runtime and
OpenVINO like the simulated model in torch."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import netshrink as ns
from netshrink.artifact.onnx import export_onnx
from netshrink.cpu import SATURATING_INT8
from netshrink.quantize.dynamic_int8 import Int8Embedding
from netshrink.quantize.layers import QuantLinear
from netshrink.quantize.smoothed import SmoothedLinear
from netshrink.runtime import make_runner
from test_calibrate import tiny_bert


class Block(nn.Module):
    """LayerNorm with one outlier channel feeding a residual and two Linears (a post-LN read)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(32), nn.Linear(32, 64), nn.Linear(64, 32)
        with torch.no_grad():
            self.norm.weight[5] = 30.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return h + self.fc2(torch.relu(self.fc1(h)))


def smoothed_int8() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    calib = [(torch.randn(8, 10, 32), None) for _ in range(2)]
    model = ns.quantize.smoothquant(Block().eval(), alpha="auto", calib_data=calib)
    return ns.quantize.static(model, calib_data=calib), (calib[0][0],)


def test_smoothing_is_kept_in_the_quantized_layer() -> None:
    q, (x,) = smoothed_int8()
    assert isinstance(q.fc1, QuantLinear) and q.fc1.spec()["smooth"] is True
    s = 1 / q.fc1.input_smooth
    assert float(s.max() / s.min()) > 2  # the outlier channel got its own scale
    # weight is the function's W: the codes hold W s, the layer divides its input by s
    with torch.no_grad():
        h = q.norm(x)
        w, b = q.fc1.dequantized()
        manual = nn.functional.linear(h * q.fc1.input_smooth, w, b)
    assert torch.allclose(manual, nn.functional.linear(h, q.fc1.weight, b), atol=1e-4)


def test_smoothed_layers_save_and_load_identical(tmp_path) -> None:
    q, x = smoothed_int8()
    ns.save(q, tmp_path / "a")
    back = ns.load(tmp_path / "a", model=Block().eval())
    assert isinstance(back.fc1, QuantLinear) and back.fc1.smoothed
    with torch.no_grad():
        assert torch.equal(back(*x), q(*x))
    float_model = ns.quantize.smoothquant(
        Block().eval(), calib_data=[(x[0], None)], alpha=0.5, progress=False
    )
    ns.save(float_model, tmp_path / "f")
    back = ns.load(tmp_path / "f", model=Block().eval())
    assert isinstance(back.fc1, SmoothedLinear)
    with torch.no_grad():
        assert torch.equal(back(*x), float_model(*x))


def test_smoothed_int8_exports_as_mul_before_quantize_and_matches_onnx_runtime(tmp_path) -> None:
    q, x = smoothed_int8()
    path = export_onnx(q, tmp_path / "q.onnx", x)
    graph = onnx.load(str(path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantizers) == 2
    assert all(producer[n.input[0]].op_type == "Mul" for n in quantizers)
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    # this test is about the graph (same codes, same grid): on a CPU without VNNI, ORT's fast
    # u8 x s8 GEMM saturates int16 pair sums (0.86 off here), so take its exact path
    if SATURATING_INT8:
        options.add_session_config_entry("session.x64quantprecision", "1")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x[0].numpy()})[0]
    with torch.no_grad():
        ref = q(*x).numpy()
    # the same codes and grid; ORT's integer GEMM differs only by float rounding of the
    # requantized sums: far below one activation step
    assert np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["MatMul"] == 0 and ops["MatMulIntegerToFloat"] == 2  # u8 x s8 GEMMs


def test_smoothed_int8_runs_on_integer_kernels_in_openvino() -> None:
    pytest.importorskip("openvino")
    q, x = smoothed_int8()
    runner = make_runner(q, "openvino-f32", 1, x)
    with torch.no_grad():
        ref = q(*x)
    # OpenVINO's u8 FullyConnected requantizes in its own order: within one output step
    torch.testing.assert_close(runner(x), ref, atol=2e-2 * float(ref.abs().max()), rtol=0)
    prims = runner.primitives()
    assert prims.get("FullyConnected/u8", 0) == 2 and "FullyConnected/f32" not in prims


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 12),
    dim=st.integers(1, 24),
    seed=st.integers(0, 2**16),
    gain=st.floats(1e-3, 1e3),
)
def test_int8_embedding_rows_are_within_half_a_step(rows, dim, seed, gain) -> None:
    torch.manual_seed(seed)
    table = nn.Embedding(rows, dim)
    with torch.no_grad():
        table.weight.mul_(gain)
    q = Int8Embedding.from_float(table)
    step = table.weight.abs().amax(1, keepdim=True) / 127  # symmetric per-row scale
    err = (q.weight - table.weight).abs()
    assert bool((err <= step / 2 + 1e-6 * step).all())
    ids = torch.randint(0, rows, (3, 5))
    assert torch.equal(q(ids), nn.functional.embedding(ids, q.weight))
    assert q.weight_q.dtype == torch.int8 and q.stored_bits() == rows * dim * 8 + rows * 32


def test_static_stores_only_the_tables_the_targets_select() -> None:
    model, calib = tiny_bert()
    for targets in ({"include": ["encoder.*"]}, {"types": ["Linear"]}):
        q = ns.quantize.static(model, calib_data=calib, targets=targets)
        assert type(q.embeddings.word_embeddings) is nn.Embedding
        assert type(q.encoder.layer[0].attention.self.query) is not nn.Linear
    q = ns.quantize.static(model, calib_data=calib, targets={"exclude": ["*position*"]})
    assert type(q.embeddings.position_embeddings) is nn.Embedding
    assert isinstance(q.embeddings.word_embeddings, Int8Embedding)


@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_smoothed_static_bert_has_int8_embeddings_and_runtimes_match_eager(
    tmp_path, rounding: str
) -> None:
    model, calib = tiny_bert()
    smoothed = ns.quantize.smoothquant(model, alpha="auto", calib_data=calib)
    q = ns.quantize.static(smoothed, calib_data=calib, weight_rounding=rounding)
    for name in ("word", "position", "token_type"):
        assert isinstance(q.get_submodule(f"embeddings.{name}_embeddings"), Int8Embedding)
    inputs = calib[0][0]
    ns.save(q, tmp_path / "q")
    back = ns.load(tmp_path / "q", model=tiny_bert()[0])
    with torch.no_grad():
        ref = q(**inputs).last_hidden_state
        assert torch.equal(back(**inputs).last_hidden_state, ref)
    path = export_onnx(q, tmp_path / "q.onnx", inputs)
    graph = onnx.load(str(path)).graph
    int8 = {i.name for i in graph.initializer if i.data_type == onnx.TensorProto.INT8}
    assert len([n for n in graph.node if n.op_type == "Gather" and n.input[0] in int8]) == 3
    for runtime in ("onnxruntime", "openvino-f32"):
        got = make_runner(path, runtime, 1, inputs)(tuple(inputs.values()))
        got = torch.as_tensor(got[0] if isinstance(got, tuple) else got)
        # integer kernels vs simulated int8: rounding of requantized activations, a few
        # output steps at most after three blocks (LayerNorm outputs reach about 3)
        assert float((got - ref).abs().max()) <= 5e-2 * float(ref.abs().max()), runtime
