"""quantize.static: BN folding, calibration, integer storage, ONNX QDQ that ORT fuses."""

from __future__ import annotations

import collections
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import netshrink as ns
from netshrink.artifact.modules import build, spec_of
from netshrink.errors import ConfigError, DataError, TargetError
from netshrink.quantize.layers import QuantConv2d, QuantLinear, QuantReLU
from netshrink.quantize.ptq import fold_batchnorms
from quant_fixtures import ResCNN, digits


def random_cnn(c: int = 16) -> ResCNN:
    """An untrained ResCNN whose BatchNorms hold non-trivial statistics."""
    torch.manual_seed(0)
    model = ResCNN(c)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model.eval()


def calib() -> list:
    return digits()[0][:4]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


@pytest.fixture(scope="module")
def quantized() -> tuple[ResCNN, nn.Module]:
    model = random_cnn()
    return model, ns.quantize.static(model, calib_data=calib(), progress=False)


def test_static_swaps_layers_and_stores_integers(quantized) -> None:
    model, q = quantized
    assert isinstance(q.stem[0], QuantConv2d) and isinstance(q.fc, QuantLinear)
    assert isinstance(q.stem[1], nn.Identity)  # BN folded
    assert isinstance(q.blocks[0].relu2, QuantReLU)
    assert q.blocks[0].conv2.quant_output and not q.blocks[0].conv1.quant_output
    assert q.blocks[0].conv1.weight_q.dtype == torch.int8
    assert q.blocks[0].conv1.bias_q.dtype == torch.int32  # BN folded into a bias
    assert not any(isinstance(m, nn.BatchNorm2d) for m in q.modules())
    assert isinstance(model.stem[1], nn.BatchNorm2d)  # the caller's model is untouched
    fp = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    qb = sum(t.numel() * t.element_size() for t in q.state_dict().values())
    assert fp / qb >= 3.8


def test_static_output_close_to_float(quantized) -> None:
    model, q = quantized
    x = digits()[1][0][0]
    assert rel_err(q(x), model(x)) < 0.05


def test_int4_weights_are_packed_and_mixed_precision_overrides() -> None:
    model = random_cnn()
    q = ns.quantize.static(
        model,
        calib_data=calib(),
        weights="int4",
        overrides=[{"targets": {"include": ["stem.0", "fc"]}, "bits": 8}],
        progress=False,
    )
    conv = q.blocks[0].conv1
    assert conv.bits == 4 and conv.weight_packed.numel() == 16 * 16 * 9 // 2
    assert q.stem[0].bits == 8 and q.fc.bits == 8
    codes = conv.weight_codes()
    assert int(codes.min()) >= -7 and int(codes.max()) <= 7
    x = digits()[1][0][0]
    assert rel_err(q(x), model(x)) < 0.3


@pytest.mark.parametrize("observer", ["moving_average", "percentile", "mse", "entropy"])
def test_every_observer_gives_a_close_model(observer: str) -> None:
    model = random_cnn(8)
    q = ns.quantize.static(model, calib_data=calib()[:2], observer=observer, progress=False)
    x = digits()[1][0][0]
    assert rel_err(q(x), model(x)) < 0.1


def test_spec_rebuild_gives_identical_outputs(quantized) -> None:
    _, q = quantized
    fresh = random_cnn()
    for name, mod in q.named_modules():
        spec = spec_of(mod)
        if (spec is not None and spec["type"].startswith("netshrink:")) or isinstance(
            mod, nn.Identity
        ):
            parent, _, leaf = name.rpartition(".")
            setattr(fresh.get_submodule(parent) if parent else fresh, leaf, build(spec_of(mod)))
    fresh.load_state_dict(q.state_dict())
    x = digits()[1][0][0]
    assert torch.equal(fresh(x), q(x))


def test_onnx_qdq_is_fused_into_integer_kernels(quantized, tmp_path) -> None:
    _, q = quantized
    x = digits()[1][0][0]
    path = tmp_path / "q.onnx"
    batch = torch.export.Dim("batch", min=1, max=1024)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(q, (x,), str(path), dynamo=True, dynamic_shapes=({0: batch},))
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    for xb in (x, x[:5]):  # the batch dimension stays dynamic
        out = sess.run(None, {sess.get_inputs()[0].name: xb.numpy()})[0]
        ref = q(xb).detach().numpy()
        assert np.abs(out - ref).max() / np.abs(ref).max() < 0.05
    ops = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node)
    assert ops["QLinearConv"] == 5 and ops["QLinearAdd"] == 2
    assert ops["Conv"] == 0


LOW_BIT = [
    ("static", {"weights": "int4"}),
    ("static", {"weights": "int4", "activations": "int4"}),
    ("qat", {"bits": 2, "epochs": 0}),  # 2-bit codes, packed four per byte
]


@pytest.mark.parametrize(("name", "options"), LOW_BIT)
def test_low_bit_models_export_and_match_onnx_runtime(tmp_path, name, options) -> None:
    from netshrink.artifact.onnx import export_onnx

    q = getattr(ns.quantize, name)(
        random_cnn(8), calib_data=calib(), train_data=calib(), progress=False, **options
    )
    x = digits()[1][0][0]
    path = export_onnx(q, tmp_path / "q.onnx", (x,))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    ref = q(x).detach().numpy()
    assert np.abs(out - ref).max() <= 1e-5 * np.abs(ref).max()  # same codes, same grid
    if options.get("activations") == "int4":
        assert q.blocks[0].relu1.act_bits == 4 and q.fc.act_bits == 4


def test_specs_saved_before_activation_bits_still_build(quantized) -> None:
    """Artifacts written before ``act_bits`` existed have specs without it: 8-bit layers."""
    _, q = quantized
    for name in ("stem.0", "fc", "stem.2"):
        spec = spec_of(q.get_submodule(name))
        old = {**spec, "args": {k: v for k, v in spec["args"].items() if k != "act_bits"}}
        assert "act_bits" in spec["args"] and build(old).act_bits == 8


def test_bad_options_and_data_are_refused() -> None:
    model = random_cnn(8)
    with pytest.raises(ConfigError, match="observer"):
        ns.quantize.static(model, calib_data=calib(), observer="median")
    with pytest.raises(ConfigError, match="weights"):
        ns.quantize.static(model, calib_data=calib(), weights="int3")
    with pytest.raises(DataError, match="calib_data"):
        ns.quantize.static(model, calib_data=[])
    with pytest.raises(TargetError):
        ns.quantize.static(model, calib_data=calib(), targets={"include": ["nope*"]})
    bad = [(torch.full((2, 1, 8, 8), float("nan")), torch.zeros(2))]
    with pytest.raises(DataError):
        ns.quantize.static(model, calib_data=bad, progress=False)


def test_bn_folding_keeps_the_float_function() -> None:
    model, folded = random_cnn(8), random_cnn(8)

    feeds_add = fold_batchnorms(folded, ["stem.0", "blocks.0.conv1", "blocks.0.conv2"])
    assert {"blocks.0.conv2", "blocks.1.conv2"} <= feeds_add  # conv -> BN -> add
    assert "blocks.0.conv1" not in feeds_add
    assert isinstance(folded.stem[1], nn.Identity) and isinstance(
        folded.blocks[1].bn1, nn.BatchNorm2d
    )
    x = digits()[1][0][0]
    assert torch.allclose(folded(x), model(x), atol=1e-5, rtol=1e-4)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Linear(144, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = x * 1.0
        return self.fc(torch.flatten(self.bn(self.conv(x)), 1))


def test_untraceable_model_is_quantized_without_folding() -> None:
    torch.manual_seed(0)
    model = Untraceable().eval()
    with pytest.warns(UserWarning, match="cannot trace"):
        q = ns.quantize.static(model, calib_data=calib(), progress=False)
    assert isinstance(q.conv, QuantConv2d) and isinstance(q.bn, nn.BatchNorm2d)
    x = digits()[1][0][0]
    assert rel_err(q(x), model(x)) < 0.05


def test_per_tensor_weights_share_one_scale() -> None:
    model = random_cnn(8)
    q = ns.quantize.static(model, calib_data=calib()[:1], per_channel=False, progress=False)
    scale = q.blocks[0].conv1.weight_scale
    assert torch.all(scale == scale[0])
    x = digits()[1][0][0]
    assert rel_err(q(x), model(x)) < 0.1


def test_unsupported_padding_stays_float_with_a_warning() -> None:
    model = random_cnn(8)
    model.blocks[0].conv1 = nn.Conv2d(8, 8, 3, padding="same", bias=False)
    with pytest.warns(UserWarning, match="blocks.0.conv1"):
        q = ns.quantize.static(model, calib_data=calib()[:1], progress=False)
    assert type(q.blocks[0].conv1) is nn.Conv2d and isinstance(q.blocks[0].conv2, QuantConv2d)
