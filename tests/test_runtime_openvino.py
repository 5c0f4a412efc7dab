"""The OpenVINO runner: same outputs as eager for fp32 and netshrink's integer layers, threads and
precision recorded, IR export, the CLI's --runtime openvino, and a clear error without the extra.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import netshrink as ns
import netshrink.quantize.layers as qlayers
import recipe_fakes
from netshrink.cli import app
from netshrink.errors import ConfigError, DataError, MissingExtraError
from netshrink.measure import measure
from netshrink.runtime import OpenVinoRunner, make_runner, save_ir
from netshrink.settings import Timing
from quant_fixtures import ResCNN, digits

torch.manual_seed(0)
CNN = ResCNN().eval()
MLP = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 10)).eval()
X = (digits()[1][0][0],)  # (64, 1, 8, 8) digits in [0, 1]
XF = (X[0].flatten(1),)


def eager(model: nn.Module, args: tuple) -> torch.Tensor:
    with torch.inference_mode():
        return model(*args)


@pytest.mark.parametrize(
    ("name", "tolerance"),
    [
        # fp32 compute in both: float rounding only
        ("fp32", 1e-4),
        # QDQ in OpenVINO's u8 kernels vs the simulated int8 in torch: rounding of the
        # requantized activations, well under one output quantization step (about 0.05)
        ("static", 1e-2),
        # the same int8 weights; activations quantized per token by netshrink in eager, per
        # token and group of 32 features by OpenVINO's FullyConnected: two 8-bit roundings
        # of outputs that reach 0.3
        ("dynamic", 1e-2),
        # int4 weights exported as MatMulNBits: OpenVINO keeps them u4 and quantizes the
        # activations per token and group of 32 features on the fly, as for "dynamic"
        ("int4", 1e-2),
    ],
)
def test_runner_matches_eager(name: str, tolerance: float) -> None:
    models = {
        "fp32": (CNN, X),
        "static": (ns.quantize.static(CNN, calib_data=digits()[0][:4], example_inputs=X), X),
        "dynamic": (ns.quantize.dynamic(MLP), XF),
        "int4": (ns.quantize.weight_only(MLP, bits=4, group_size=32), XF),
    }
    model, args = models[name]
    runner = make_runner(model, "openvino-f32", 1, args)
    out = runner(args)
    assert torch.is_tensor(out) and out.shape == (64, 10)
    torch.testing.assert_close(out, eager(model, args), atol=tolerance, rtol=0)
    assert runner.precision == "f32" and runner.describe() == "openvino (f32)"
    assert runner.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    prims = runner.primitives()
    if name == "static":  # the QDQ graph runs on integer convolutions, not float ones
        assert prims.get("Convolution/u8", 0) >= 5 and "Convolution/f32" not in prims
    if name == "dynamic":  # int8 weights kept, both GEMMs on OpenVINO's int8 kernel
        assert prims.get("FullyConnected/i8") == 2 and "FullyConnected/f32" not in prims
        assert type(model[0]).__name__ == "DynamicInt8Linear"  # the caller's model untouched
    if name == "int4":  # both GEMMs on OpenVINO's compressed-weight int4 kernel
        assert prims.get("FullyConnected/u4") == 2 and "FullyConnected/f32" not in prims


@pytest.mark.parametrize("saturating", [False, True])
def test_static_layers_give_openvino_7_bit_weights_where_int8_kernels_saturate(
    monkeypatch: pytest.MonkeyPatch, saturating: bool
) -> None:
    # without VNNI OpenVINO's u8 x i8 kernels saturate pairs of products in int16 (the "static"
    # case above was 0.037 off on such a CPU with 8-bit weights)
    monkeypatch.setattr(qlayers, "SATURATING_INT8", saturating)
    calib = [(XF[0][i : i + 16], None) for i in range(0, 64, 16)]
    model = ns.quantize.static(MLP, calib_data=calib, progress=False)
    layer = model[0]
    form = layer.netshrink_openvino()
    if not saturating:
        assert form is layer
        return
    assert form is not layer and layer.weight_q.abs().max() > 64  # the caller's layer kept
    assert form.weight_q.abs().max() <= 64  # 255 * 64 * 2 fits int16
    torch.testing.assert_close(form.weight_scale, 2 * layer.weight_scale)
    # each weight moves by at most one step of the original grid, the bias by rounding only
    assert bool(((form.weight - layer.weight).abs() <= layer.weight_scale[:, None] * 1.0001).all())
    step = (form.weight_scale * form.input_scale).max()
    torch.testing.assert_close(form.bias, layer.bias, atol=float(step), rtol=0)


def test_static_model_with_dynamic_layers_runs_them_in_groups_of_256(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 10)).eval()
    calib = [(XF[0][i : i + 16], None) for i in range(0, 64, 16)]
    model = ns.quantize.static(mlp, calib_data=calib, dynamic={"include": ["2"]}, progress=False)
    runner = make_runner(model, "openvino-f32", 1, XF)
    # static u8 as in "static" above; the dynamic layer's input quantized per token in eager,
    # per token and group of 256 features (all of them here) by OpenVINO
    torch.testing.assert_close(runner(XF), eager(model, XF), atol=1e-2, rtol=0)
    assert runner.compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == 256
    prims = runner.primitives()
    assert prims.get("FullyConnected/u8") == 1 and prims.get("FullyConnected/i8") == 1
    xml = save_ir(model, tmp_path / "mixed.xml", XF)  # the IR carries the group size
    assert (
        OpenVinoRunner(xml, threads=1).compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE")
        == 256
    )
    # an all-dynamic model keeps OpenVINO's default groups (its inputs need them)
    dynamic = make_runner(ns.quantize.dynamic(mlp), "openvino", 1, XF)
    assert dynamic.compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == 32
    # so does a dynamic layer of 100 inputs: no power-of-two group above 32 divides them
    odd = nn.Sequential(nn.Linear(64, 100), nn.GELU(), nn.Linear(100, 10)).eval()
    model = ns.quantize.static(odd, calib_data=calib, dynamic={"include": ["2"]}, progress=False)
    runner = make_runner(model, "openvino-f32", 1, XF)
    assert runner.compiled.get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == 32
    torch.testing.assert_close(runner(XF), eager(model, XF), atol=1e-2, rtol=0)


def test_default_precision_is_recorded_and_measure_reports_it() -> None:
    runner = make_runner(CNN, "openvino", 1, X)
    assert runner.precision in ("f32", "bf16", "f16")
    assert runner.describe() == f"openvino ({runner.precision})"
    timing = Timing(runtime="openvino", threads=1, runs=20, warmup=1)
    m = measure(CNN, X, timing=timing, data=[(X[0], None)],
                evaluate=lambda model, batches: float(model(*X).shape[0]))  # fmt: skip
    assert m.runtime == runner.describe() and m.threads == 1 and m.metric == 64.0


def test_keyword_inputs_and_input_errors() -> None:
    runner = OpenVinoRunner(MLP, XF, threads=1, precision="f32")
    (name,) = runner.input_names
    torch.testing.assert_close(runner({name: XF[0]}), runner(XF), atol=0, rtol=0)
    with pytest.raises(DataError, match="takes 1 inputs"):
        runner((XF[0], XF[0]))
    with pytest.raises(DataError, match="unknown \\['y'\\]"):
        runner({name: XF[0], "y": XF[0]})
    with pytest.raises(ConfigError, match="unknown precision 'int3'"):
        OpenVinoRunner(MLP, XF, threads=1, precision="int3")  # type: ignore[arg-type]


def test_save_ir_writes_xml_and_bin_that_run_alike(tmp_path: Path) -> None:
    model = ns.quantize.dynamic(MLP)
    xml = save_ir(model, tmp_path / "ir" / "model.xml", XF)
    assert sorted(p.name for p in xml.parent.iterdir()) == ["model.bin", "model.xml"]
    from_ir = OpenVinoRunner(str(xml), threads=1, precision="f32")
    torch.testing.assert_close(from_ir(XF), eager(model, XF), atol=1e-2, rtol=0)  # as above
    with pytest.raises(ConfigError, match=r"ends in \.xml"):
        save_ir(model, tmp_path / "model.bin", XF)


def test_missing_openvino_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` fail
    with pytest.raises(MissingExtraError, match=r"pip install netshrink\[openvino\]"):
        make_runner(MLP, "openvino", 1, XF)


def test_cli_measures_on_openvino_and_exports_ir(tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("version: 1\nstages:\n  - prune.fake_zero: {fraction: 0.9}\n")
    cli = CliRunner()
    model = ["--model", "recipe_fakes:tiny_model"]
    data = ["--data", "recipe_fakes:cli_data"]
    artifact = str(tmp_path / "out" / "model")
    with recipe_fakes.registered():
        run = cli.invoke(
            app, ["compress", str(recipe), *model, *data,
                  "--out", str(tmp_path / "out"), "--json", "--threads", "1"],
        )  # fmt: skip
        assert run.exit_code == 0, run.output
        measured = cli.invoke(
            app, ["measure", artifact, *model, *data, "--runtime", "openvino-f32",
                  "--threads", "1", "--json"],
        )  # fmt: skip
        assert measured.exit_code == 0, measured.output
        assert json.loads(measured.stdout.strip().splitlines()[-1])["runtime"] == "openvino (f32)"
        export = cli.invoke(app, ["export", artifact, "--openvino", str(tmp_path / "ir"), *model])
        assert export.exit_code == 0, export.output
        assert {p.name for p in (tmp_path / "ir").iterdir()} == {"model.xml", "model.bin"}
        neither = cli.invoke(app, ["export", artifact])
        assert neither.exit_code == 2 and "--openvino DIR" in neither.output
