"""Runners on keyword inputs: a tiny random-init HF BERT (hidden 32) called with ``input_ids``,
``token_type_ids`` and ``attention_mask`` gives eager's embeddings in ONNX Runtime and OpenVINO,
whether the inputs come as a dict or as a tuple in the keys' order, and is measured and scored
there."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import hf_fixtures
from netshrink import hf
from netshrink.artifact.onnx import export_onnx
from netshrink.errors import DataError
from netshrink.measure import measure
from netshrink.runtime import make_runner
from netshrink.settings import Timing

FP32_ATOL = 1e-5
"""Largest |difference| accepted from eager for fp32 runtimes, on unit-norm embeddings (seen:
1e-7): the same float math in another order."""


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The tiny BERT as an embedding model that brings its own ONNX (exported once, with the
    fast TorchScript exporter), and keyword inputs for 6 texts padded to 24 tokens."""
    folder = hf_fixtures.model_dir(tmp_path_factory.mktemp("bert"), "bert")
    model = hf.load_model(f"hf:{folder}")
    tokens = hf.load_tokenizer(f"hf:{folder}")(
        hf_fixtures.TEXTS, padding="max_length", max_length=24, return_tensors="pt"
    )
    x = dict(tokens)
    path = export_onnx(model, folder / "model.onnx", x, exporter="torchscript")
    model.netshrink_onnx = lambda example_inputs: path
    return model, x


def eager(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**x)


@pytest.mark.parametrize("runtime", ["eager", "onnxruntime", "openvino-f32"])
def test_a_runner_takes_keyword_inputs_and_matches_eager(bert, runtime: str) -> None:
    model, x = bert
    runner = make_runner(model, runtime, 1, x)
    expected = eager(model, x)
    out = runner(x)
    assert isinstance(out, torch.Tensor) and out.shape == (len(hf_fixtures.TEXTS), 32)
    torch.testing.assert_close(out, expected, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(runner.bind(x)(), expected, atol=FP32_ATOL, rtol=0)
    if runtime != "eager":  # the graph's inputs are named after the keys
        assert sorted(runner.input_names) == sorted(x)
        positional = tuple(x[name] for name in runner.input_names)
        torch.testing.assert_close(runner(positional), expected, atol=FP32_ATOL, rtol=0)


def test_openvino_at_its_default_precision_keeps_the_embeddings(bert) -> None:
    model, x = bert
    out = make_runner(model, "openvino", 1, x)(x)
    cosine = torch.nn.functional.cosine_similarity(out, eager(model, x))
    assert cosine.min() > 0.999  # bf16 compute on CPUs that have it, else fp32


def test_a_missing_keyword_is_named(bert) -> None:
    model, x = bert
    runner = make_runner(model, "onnxruntime", 1, x)
    partial = {k: v for k, v in x.items() if k != "attention_mask"}
    with pytest.raises(DataError, match=r"missing \['attention_mask'\]"):
        runner(partial)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino-f32"])
def test_measure_times_and_scores_keyword_inputs_on_the_runtime(bert, runtime: str) -> None:
    model, x = bert
    evaluate = hf.metric_for("embedding", model)
    measured = measure(
        model, x, evaluate=evaluate, data=[(x, None)], timing=Timing(runtime, 1, 20, 1)
    )
    assert measured.runtime.startswith(runtime.removesuffix("-f32"))
    assert measured.batch_size == len(hf_fixtures.TEXTS) and measured.latency_ms > 0
    assert measured.metric == 1.0  # the runtime's embeddings have eager's neighbours


def test_an_ir_file_takes_keyword_inputs(bert, tmp_path: Path) -> None:
    from netshrink.runtime import save_ir

    model, x = bert
    ir = save_ir(model, tmp_path / "model.xml", x)
    out = make_runner(ir, "openvino-f32", 1, x)(x)
    torch.testing.assert_close(out, eager(model, x), atol=FP32_ATOL, rtol=0)
