"""export_onnx: ORT matches torch, dynamic batch, QDQ from both quantization idioms, atomicity."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed ops
from torch import nn

from measure_models import tiny_models
from netshrink.artifact.onnx import export_onnx
from netshrink.errors import ArtifactError, ConfigError, DataError
from netshrink.runtime import OrtRunner

TOL = 1e-4


def _ort(path: Path, x: torch.Tensor) -> torch.Tensor:
    return OrtRunner(path, threads=1)((x,))


@pytest.mark.parametrize("name", ["cnn", "mlp", "attention"])
def test_ort_matches_torch_at_any_batch(name: str, tmp_path: Path) -> None:
    model = tiny_models()[name]
    path = export_onnx(model, tmp_path / f"{name}.onnx", (torch.randn(1, 1, 8, 8),))
    onnx.checker.check_model(str(path))
    for batch in (1, 7):
        x = torch.randn(batch, 1, 8, 8)
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(_ort(path, x), expected, atol=TOL, rtol=0)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


class FakeQuantLinear(nn.Module):
    """The QAT idiom: fake-quantized activations and per-channel weights (float storage)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.register_buffer("scale", self.fc.weight.detach().abs().amax(1) / 127)
        self.register_buffer("zero", torch.zeros(10, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.fake_quantize_per_tensor_affine(x.flatten(1), 0.05, 0, -128, 127)
        w = torch.fake_quantize_per_channel_affine(
            self.fc.weight, self.scale, self.zero, 0, -128, 127
        )
        return nn.functional.linear(x, w, self.fc.bias)


class Int8Linear(nn.Module):
    """The quantized idiom: int8 weight storage, dequantized with quantized_decomposed ops."""

    def __init__(self) -> None:
        super().__init__()
        w = torch.randn(10, 64)
        scale = w.abs().amax(1) / 127
        self.register_buffer("qweight", (w / scale[:, None]).round().to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("zero", torch.zeros(10, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = torch.ops.quantized_decomposed
        x = qd.quantize_per_tensor(x.flatten(1), 0.05, 0, -128, 127, torch.int8)
        x = qd.dequantize_per_tensor(x, 0.05, 0, -128, 127, torch.int8)
        w = qd.dequantize_per_channel(self.qweight, self.scale, self.zero, 0, -128, 127, torch.int8)
        return nn.functional.linear(x, w)


@pytest.mark.parametrize(("model", "int8_file"), [(FakeQuantLinear(), False), (Int8Linear(), True)])
def test_quantization_idioms_become_qdq(model: nn.Module, int8_file: bool, tmp_path: Path) -> None:
    x = torch.randn(6, 1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a fallback to torchscript would warn
        path = export_onnx(model, tmp_path / "q.onnx", (x[:1],))  # batch 1: traced as dynamic
    graph = onnx.load(str(path)).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    int8 = [list(t.dims) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert ([10, 64] in int8) == int8_file  # quantized_decomposed keeps the weight as int8
    with torch.no_grad():
        np.testing.assert_allclose(_ort(path, x), model(x).numpy(), atol=TOL, rtol=0)


class DataDependent(nn.Module):
    """A Python branch on tensor values: torch.export refuses it, TorchScript tracing bakes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x - 1


def test_auto_falls_back_to_torchscript_with_a_warning(tmp_path: Path) -> None:
    x = torch.rand(3, 4)  # positive: the branch traced is x * 2
    with pytest.warns(UserWarning, match="fell back to torchscript"):
        path = export_onnx(DataDependent(), tmp_path / "d.onnx", (x,))
    np.testing.assert_allclose(_ort(path, x), (x * 2).numpy(), atol=TOL, rtol=0)
    with pytest.raises(ArtifactError, match="dynamo"):
        export_onnx(DataDependent(), tmp_path / "e.onnx", (x,), exporter="dynamo")


def test_fixed_batch_export_rejects_other_batches(tmp_path: Path) -> None:
    model = tiny_models()["mlp"]
    x = (torch.randn(3, 1, 8, 8),)
    path = export_onnx(model, tmp_path / "m.onnx", x, dynamic_batch=False, exporter="torchscript")
    assert _ort(path, torch.randn(3, 1, 8, 8)).shape == (3, 10)
    with pytest.raises(Exception, match=r"(?i)dimension|shape"):
        _ort(path, torch.randn(4, 1, 8, 8))


def test_failed_export_keeps_the_old_file(tmp_path: Path) -> None:
    class Broken(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no forward today")

    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(ArtifactError, match="ONNX export of Broken failed"):
        export_onnx(Broken(), target, (torch.randn(2, 3),))
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.parametrize(
    ("inputs", "kwargs", "error"),
    [
        ((torch.randn(2, 1, 8, 8),), {"exporter": "tflite"}, ConfigError),
        ((torch.randn(2, 1, 8, 8),), {"opset": 9}, ConfigError),
        ((), {}, DataError),
        (([1, 2],), {}, DataError),
    ],
)
def test_bad_arguments(inputs: tuple, kwargs: dict, error: type, tmp_path: Path) -> None:
    with pytest.raises(error):
        export_onnx(tiny_models()["mlp"], tmp_path / "m.onnx", inputs, **kwargs)


def test_a_baked_in_batch_is_caught_and_not_written(tmp_path: Path) -> None:
    class Baked(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(4, -1).sum(1)  # the tracer records the literal 4

    with pytest.raises(ArtifactError, match="batch is not dynamic"):
        export_onnx(Baked(), tmp_path / "b.onnx", (torch.randn(4, 3),), exporter="torchscript")
    assert not list(tmp_path.iterdir())


def test_a_bf16_model_gets_a_netshrink_error_saying_what_to_do(tmp_path: Path) -> None:
    from netshrink.quantize import half

    x = torch.randn(2, 1, 8, 8)
    model = half(tiny_models()["mlp"], dtype="bf16", example_inputs=(x,))
    with pytest.raises(ArtifactError, match=r"bfloat16 weights.*dtype: fp16") as caught:
        export_onnx(model, tmp_path / "m.onnx", (x,))
    assert "ONNXRuntimeError" not in str(caught.value)
    assert not (tmp_path / "m.onnx").exists()
    fp16 = half(tiny_models()["mlp"], dtype="fp16", example_inputs=(x,))
    assert export_onnx(fp16, tmp_path / "m.onnx", (x,)).is_file()  # what the error advises


def test_exporter_log_records_go_to_debug_not_the_terminal(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    from netshrink.artifact.onnx import _quiet

    folder = logging.getLogger("onnxscript.optimizer._constant_folding")
    torch_onnx = logging.getLogger("torch.onnx")
    before = (list(torch_onnx.handlers), torch_onnx.propagate)
    with caplog.at_level(logging.DEBUG, logger="netshrink.artifact.onnx"), _quiet():
        folder.warning("Evaluation failed: cannot reshape array of size 1 into shape (1,8)")
        torch_onnx.warning("torchvision is not installed")
    assert "Evaluation failed" not in capfd.readouterr().err
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert any("Evaluation failed: cannot reshape" in m for m in debug)
    assert (torch_onnx.handlers, torch_onnx.propagate) == before  # restored after the export


def test_an_onnx_path_that_is_a_folder_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is a folder"):
        export_onnx(nn.Linear(3, 2), tmp_path, (torch.randn(2, 3),))
    assert list(tmp_path.iterdir()) == []
