"""Runners: the same interface and outputs on eager torch and ONNX Runtime, thread control."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import netshrink as ns
from measure_models import tiny_models
from netshrink.artifact.onnx import export_onnx
from netshrink.errors import ConfigError, DataError
from netshrink.measure import Timing, measure
from netshrink.metrics import accuracy
from netshrink.runtime import EagerRunner, OrtModule, OrtRunner, make_runner, torch_threads
from netshrink.runtime import ort as ort_runtime
from test_calibrate import tiny_bert

X = (torch.randn(3, 1, 8, 8),)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each test model as ONNX, via the fast TorchScript exporter (dynamo is tested elsewhere)."""
    folder = tmp_path_factory.mktemp("onnx")
    return {
        name: export_onnx(m, folder / f"{name}.onnx", X, exporter="torchscript")
        for name, m in tiny_models().items()
    }


def test_eager_and_ort_runners_agree_and_keep_threads() -> None:
    model = tiny_models()["cnn"]
    x = (torch.randn(5, 1, 8, 8),)
    eager = make_runner(model, "eager", 1, x)
    ort = make_runner(model, "onnxruntime", 1, x)
    assert isinstance(eager, EagerRunner) and isinstance(ort, OrtRunner)
    assert eager.threads == ort.threads == 1
    assert ort.session.get_session_options().intra_op_num_threads == 1
    np.testing.assert_allclose(ort(x), eager(x).numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(ort.bind(x)(), eager.bind(x)().numpy(), atol=1e-4, rtol=0)


def test_ort_module_scores_like_the_torch_model(exported: dict[str, Path]) -> None:
    model = tiny_models()["attention"]
    x = torch.randn(16, 1, 8, 8)
    batches = [(x, torch.arange(16) % 10)]
    wrapped = OrtModule(OrtRunner(exported["attention"], threads=1))
    assert accuracy(wrapped, batches) == accuracy(model, batches)


def test_a_model_can_bring_its_own_onnx(exported: dict[str, Path]) -> None:
    models = tiny_models()
    own = exported["mlp"]

    class BringsGraph(type(models["cnn"])):  # type: ignore[misc]
        def netshrink_onnx(self, example_inputs: tuple) -> Path:
            return own

    model = BringsGraph().eval()
    np.testing.assert_allclose(
        OrtRunner(model, X)(X), models["mlp"](*X).detach().numpy(), atol=1e-4, rtol=0
    )
    from_file = measure(own, X, timing=Timing("onnxruntime", threads=1, warmup=1))
    assert from_file.bytes == own.stat().st_size and from_file.bytes_of == "ONNX file"
    assert from_file.params is None and from_file.macs is None


def test_runner_errors(exported: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="unknown runtime 'tvm'"):
        make_runner(tiny_models()["mlp"], "tvm", 1, X)
    with pytest.raises(ConfigError, match=r"needs a torch\.nn\.Module"):
        make_runner(b"onnx bytes", "eager", 1, X)
    with pytest.raises(DataError, match="takes 1 inputs"):
        OrtRunner(exported["mlp"], threads=1)((X[0], X[0]))


def test_torch_threads_restores_the_count() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("saturating", [True, False])
def test_static_bert_runs_in_ort_with_and_without_exact_int8_gemms(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, saturating: bool
) -> None:
    # CPUs without VNNI get ORT's exact int8 path (session.x64quantprecision, int8 weights
    # rewritten to uint8). Its rewrite failed the whole session on a per-channel
    # DequantizeLinear without a zero point: export writes the zeros out, and the session
    # adds them to any other source (here the same graph with them taken out again, with its
    # weights as initializers and as Constant nodes).
    monkeypatch.setattr(ort_runtime, "SATURATING_INT8", saturating)
    model, calib = tiny_bert()
    q = ns.quantize.static(model, calib_data=calib, progress=False)
    inputs = calib[0][0]
    path = export_onnx(q, tmp_path / "q.onnx", inputs)
    graph = onnx.load(str(path))
    nodes = graph.graph.node
    added = [n for n in nodes if len(n.input) == 3 and n.input[2].endswith("_zero_point")]
    assert added  # the per-channel int8 weights' zero points are in the file
    for node in added:
        zero = node.input[2]
        del node.input[2]
        graph.graph.initializer.remove(next(t for t in graph.graph.initializer if t.name == zero))
    constants = onnx.ModelProto()
    constants.CopyFrom(graph)
    read = {i for n in constants.graph.node if n.op_type == "DequantizeLinear" for i in n.input}
    for tensor in [t for t in constants.graph.initializer if t.name in read]:
        constants.graph.initializer.remove(tensor)
        constants.graph.node.insert(
            0, onnx.helper.make_node("Constant", [], [tensor.name], value=tensor)
        )
    with torch.no_grad():
        ref = q(**inputs).last_hidden_state
    for source in (path, graph.SerializeToString(), constants.SerializeToString()):
        runner = OrtRunner(source, threads=1)
        options = runner.session.get_session_options()
        if saturating:
            assert options.get_session_config_entry("session.x64quantprecision") == "1"
        else:
            with pytest.raises(RuntimeError, match="does not have configuration"):
                options.get_session_config_entry("session.x64quantprecision")
        out = runner(inputs)
        out = out[0] if isinstance(out, tuple) else out
        # the same codes and grids; ORT requantizes in its own float order: within 1% of range
        torch.testing.assert_close(out, ref, atol=1e-2 * float(ref.abs().max()), rtol=0)
