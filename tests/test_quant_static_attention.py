"""quantize.static's ``attention`` option: the query and key projections of self-attention
quantize their outputs to symmetric int8, on every tiny Hugging Face model of the contract, and
the result reloads, exports as int8 QDQ and runs alike in ONNX Runtime and OpenVINO."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
from torch import nn

import netshrink as ns
from foreign_models import Foreign, hugging_face
from netshrink.artifact.onnx import export_onnx
from netshrink.batches import run
from netshrink.errors import ConfigError
from netshrink.quantize.layers import QuantLinear
from netshrink.runtime import make_runner

PROJECTIONS = {
    "hf_bert": ("attention.self.query", "attention.self.key"),
    "hf_distilbert": ("attention.q_lin", "attention.k_lin"),
    "hf_vit": ("attention.q_proj", "attention.k_proj"),
    "hf_gpt2": ("attn.c_attn",),  # Q, K and V in one fused projection
    "hf_t5_encoder": ("SelfAttention.q", "SelfAttention.k"),
}
"""Name endings of each model's Q and K projections (two layers each)."""

MODELS = {f.name: f for f in hugging_face()}


def _first(output: Any) -> torch.Tensor:
    if callable(getattr(output, "to_tuple", None)):
        output = output.to_tuple()
    return output[0] if isinstance(output, tuple | list) else output


def _quantized(foreign: Foreign, **options: Any) -> nn.Module:
    calib = foreign.batches(4, seed=1)
    return ns.quantize.static(foreign.build(), calib_data=calib, progress=False, **options)


def _outputs(model: nn.Module, names: list[str], x: Any) -> dict[str, torch.Tensor]:
    """The output of each module of ``names`` in one forward of ``model`` on ``x``."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str) -> Any:
        return lambda _m, _a, out: seen.__setitem__(name, out)

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    with torch.no_grad():
        run(model, x)
    for handle in handles:
        handle.remove()
    return seen


def _signed(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QuantLinear) and m.signed_output]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(PROJECTIONS))
def test_exactly_the_query_and_key_projections_get_int8_outputs(name: str) -> None:
    foreign = MODELS[name]
    plain, model = _quantized(foreign), _quantized(foreign, attention=True)
    signed = _signed(model)
    assert len(signed) == 2 * len(PROJECTIONS[name])
    assert all(n.endswith(PROJECTIONS[name]) for n in signed)
    x = foreign.example_inputs()
    for n, out in _outputs(model, signed, x).items():
        layer = model.get_submodule(n)
        assert int(layer.output_zero_point) == 0
        codes = out / layer.output_scale  # on the int8 grid: whole numbers in [-128, 127]
        assert torch.allclose(codes, codes.round(), atol=1e-3)
        assert float(codes.abs().max()) <= 128
    with torch.no_grad():
        got, want = _first(run(model, x)).flatten(), _first(run(plain, x)).flatten()
    # the Q/K rounding adds little to static int8's own error (tolerance: cosine 0.999)
    assert float(nn.functional.cosine_similarity(got, want, dim=0)) > 0.999


@pytest.mark.usefixtures("one_thread")
def test_smoothed_projections_are_found_and_the_artifact_reloads(tmp_path: Path) -> None:
    foreign = MODELS["hf_bert"]
    calib = foreign.batches(4, seed=1)
    smoothed = ns.quantize.smoothquant(foreign.build(), calib_data=calib, progress=False)
    model = ns.quantize.static(smoothed, calib_data=calib, attention=True, progress=False)
    assert len(_signed(model)) == 4
    assert all(model.get_submodule(n).smoothed for n in _signed(model))
    loaded = ns.load(ns.save(model, tmp_path / "a"), model=foreign.build())
    assert _signed(loaded) == _signed(model)
    x = foreign.example_inputs()
    with torch.no_grad():
        assert torch.equal(_first(run(loaded, x)), _first(run(model, x)))


@pytest.mark.usefixtures("one_thread")
def test_export_holds_int8_qdq_and_the_runtimes_match_eager(tmp_path: Path) -> None:
    foreign = MODELS["hf_bert"]
    model = _quantized(foreign, attention=True)
    x = foreign.example_inputs()
    graph = onnx.load(export_onnx(model, tmp_path / "m.onnx", x)).graph
    held = {t.name: t for t in graph.initializer}
    int8_points = [
        n
        for n in graph.node
        if n.op_type == "QuantizeLinear"
        and len(n.input) > 2
        and n.input[2] in held
        and held[n.input[2]].data_type == onnx.TensorProto.INT8
    ]
    assert len(int8_points) == 4  # one per Q and K output (u8 ones quantize the inputs)
    with torch.no_grad():
        want = _first(run(model, x))
    for runtime in ("onnxruntime", "openvino-f32"):
        got = make_runner(model, runtime, 1, x)(x)
        # a float rounding may move one code by a step: 0.05 of the output's scale
        assert torch.allclose(_first(got), want, atol=0.05 * float(want.abs().max()))


def test_attention_with_int4_activations_is_rejected() -> None:
    foreign = MODELS["hf_bert"]
    with pytest.raises(ConfigError, match="activations: int4"):
        _quantized(foreign, attention=True, activations="int4")


def test_a_model_without_attention_is_told_and_still_quantized() -> None:
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    calib = [(torch.randn(16, 8), None) for _ in range(2)]
    with pytest.warns(UserWarning, match="no self-attention found"):
        model = ns.quantize.static(mlp, calib_data=calib, attention=True, progress=False)
    assert isinstance(model[0], QuantLinear) and not _signed(model)


def test_packed_multihead_attention_is_told_apart() -> None:
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0).eval()
    calib = [(torch.randn(4, 6, 16), None) for _ in range(2)]
    with pytest.warns(UserWarning, match="in_proj_weight"):
        model = ns.quantize.static(layer, calib_data=calib, attention=True, progress=False)
    assert not _signed(model) and isinstance(model.linear1, QuantLinear)
