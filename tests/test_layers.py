"""The compressed-layer contract, on every layer class netshrink creates.

Each layer is built from a dense layer and checked against it: ``.weight``/``.bias`` shape,
dtype and device, the function the weight describes, logical parameter counts, stored bits,
registration for artifacts and save -> load identical outputs.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netshrink as ns
from netshrink.artifact.modules import spec_of
from netshrink.errors import TargetError
from netshrink.layers import CompressedLayer, ConvGeometry, replace_module, tied_modules
from netshrink.lowrank.decompose import spectrum
from netshrink.lowrank.layers import conv_from_factors, linear_from_factors, spatial_from_factors
from netshrink.measure import count_nonzero, count_params, count_stored_bits
from netshrink.prune.sparse_layers import make_sparse
from netshrink.quantize.dynamic_int8 import DynamicInt8Linear, Int8Embedding
from netshrink.quantize.halfprec import half_layer
from netshrink.quantize.layers import QuantConv2d, QuantLinear
from netshrink.quantize.packed import PackedConv2d, PackedEmbedding, PackedLinear

torch.manual_seed(0)
QPARAMS = (torch.tensor(0.05), torch.tensor(128, dtype=torch.int32))


def _half(m: nn.Module) -> nn.Module:
    return half_layer(m, "fp16")


def _sparse(m: nn.Module) -> nn.Module:
    layer = make_sparse(m)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(layer.weight.shape) > 0.5)
    layer.refresh_mask()
    return layer.eval()


def _lowrank(m: nn.Module, variant: str = "linear") -> nn.Module:
    spec = spectrum(m, variant)
    build = {"linear": linear_from_factors, "channel": conv_from_factors}
    build["spatial"] = spatial_from_factors
    return build[variant](m, *spec.factors(2))


LINEAR: dict[str, Callable[[nn.Linear], nn.Module]] = {
    "static": lambda m: QuantLinear.from_float(m, 8, True, QPARAMS, None),
    "static-int4": lambda m: QuantLinear.from_float(m, 4, True, QPARAMS, None),
    "int8": lambda m: PackedLinear.from_float(m, "int8"),
    "int4": lambda m: PackedLinear.from_float(m, "int4", 8),
    "binary": lambda m: PackedLinear.from_float(m, "binary"),
    "ternary": lambda m: PackedLinear.from_float(m, "ternary"),
    "dynamic": DynamicInt8Linear.from_float,
    "half": _half,
    "sparse": _sparse,
    "lowrank": _lowrank,
}
CONV: dict[str, Callable[[nn.Conv2d], nn.Module]] = {
    "static": lambda m: QuantConv2d.from_float(m, 8, True, QPARAMS, None),
    "int4": lambda m: PackedConv2d.from_float(m, "int4"),
    "half": _half,
    "sparse": _sparse,
    "lowrank-channel": lambda m: _lowrank(m, "channel"),
    "lowrank-spatial": lambda m: _lowrank(m, "spatial"),
}
CONV_TRANSPOSE: dict[str, Callable[[nn.ConvTranspose2d], nn.Module]] = {
    "int8": lambda m: PackedConv2d.from_float(m, "int8"),
    "binary": lambda m: PackedConv2d.from_float(m, "binary"),
}
EMBEDDING: dict[str, Callable[[nn.Embedding], nn.Module]] = {
    "int8-rows": Int8Embedding.from_float,
    "int4": lambda m: PackedEmbedding.from_float(m, "int4", 8),
    "half": _half,
}
CASES = (
    [("linear", k, f) for k, f in LINEAR.items()]
    + [("conv", k, f) for k, f in CONV.items()]
    + [("conv-transpose", k, f) for k, f in CONV_TRANSPOSE.items()]
    + [("embedding", k, f) for k, f in EMBEDDING.items()]
)


def _dense(kind: str) -> tuple[nn.Module, torch.Tensor]:
    if kind == "linear":
        return nn.Linear(16, 12), torch.randn(5, 16)
    if kind == "conv":
        return nn.Conv2d(4, 6, 3, padding=1, stride=2), torch.randn(2, 4, 9, 9)
    if kind == "conv-transpose":
        conv = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1)
        return conv, torch.randn(2, 4, 5, 5)
    return nn.Embedding(20, 16, padding_idx=0), torch.randint(0, 20, (3, 7))


def _with(dense: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor):
    """The op of the dense layer, run with the given weight and bias."""
    if isinstance(dense, nn.Embedding):
        return F.embedding(x, weight)
    if isinstance(dense, nn.Linear):
        return F.linear(x, weight, bias)
    return ConvGeometry.of(dense).conv2d(x, weight, bias)


@pytest.mark.parametrize(("kind", "name", "make"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_layer_contract(kind: str, name: str, make: Callable, tmp_path) -> None:
    dense, x = _dense(kind)
    layer = make(dense).eval()
    assert isinstance(layer, CompressedLayer) and spec_of(layer) is not None
    w = layer.weight
    assert w.shape == dense.weight.shape and w.device == dense.weight.device
    assert w.is_floating_point()
    bias = getattr(layer, "bias", None)
    assert (bias is None) == (getattr(dense, "bias", None) is None)
    # the weight is the one the layer computes with (static and dynamic quantize the input too)
    with torch.no_grad():
        want = _with(dense, w.float(), None if bias is None else bias.float(), x)
        got = layer(x)
    tol = {"static": 0.2, "static-int4": 0.2, "dynamic": 0.1, "half": 2e-2}.get(name, 1e-5)
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=0)
    # storage-only layers count as the dense layer; low-rank counts its factors
    dense_params = sum(p.numel() for p in dense.parameters())
    if name.startswith("lowrank"):
        assert layer.num_params() == sum(p.numel() for p in layer.parameters()) < dense_params
    else:
        assert layer.num_params() == dense_params
    assert layer.stored_bits() < 32 * dense_params
    assert layer.stored_params() == sum(t.numel() for t in layer.state_dict().values()) or (
        name == "sparse"
    )
    # artifact: saved and rebuilt on a fresh dense model, identical outputs
    model = nn.Sequential(layer)
    ns.save(model, tmp_path / "a")
    back = ns.load(tmp_path / "a", model=nn.Sequential(_dense(kind)[0]))
    assert type(back[0]) is type(layer)
    with torch.no_grad():
        assert torch.equal(back(x), got)


def _mlp() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 24), nn.ReLU(), nn.Linear(24, 10)
    )


@pytest.mark.parametrize(
    ("technique", "options"),
    [
        ("weight_only", {"bits": 8}),
        ("weight_only", {"bits": 4, "group_size": 8}),
        ("binary", {}),
        ("ternary", {}),
        ("half", {}),
        ("dynamic", {}),
        ("static", {}),
    ],
)
def test_count_params_does_not_change_with_storage(technique: str, options: dict) -> None:
    model = _mlp()
    calib = [(torch.randn(8, 64), None)]
    before = count_params(model)
    assert before == 64 * 96 + 96 + 96 * 24 + 24 + 24 * 10 + 10  # 8,818
    fn = getattr(ns.quantize, technique)
    out = fn(model, calib_data=calib, **options) if technique == "static" else fn(model, **options)
    assert count_params(out) == before
    assert count_stored_bits(out) < count_stored_bits(model) == 32 * before


def test_count_params_of_a_pruned_model_is_unchanged() -> None:
    model = _mlp()
    out = ns.prune.magnitude(model, sparsity=0.5, kernel="dense")
    assert count_params(out) == count_params(model)
    assert count_nonzero(out) < count_params(model)


def test_replace_module_puts_the_new_layer_and_returns_the_old() -> None:
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 3)), nn.ReLU())
    old = model[0][0]
    assert replace_module(model, "0.0", nn.Identity()) is old
    assert isinstance(model[0][0], nn.Identity)
    with pytest.raises(TargetError, match="no module 'x'"):
        replace_module(model, "x.fc", nn.Identity())
    with pytest.raises(TargetError, match="not a submodule path"):
        replace_module(model, "0._modules", nn.Identity())
    with pytest.raises(TargetError, match="not a module"):
        replace_module(model, "training", nn.Identity())


def test_conv_geometry_round_trips_through_its_spec() -> None:
    conv = nn.Conv2d(4, 8, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2), groups=2)
    geometry = ConvGeometry.of(conv)
    assert ConvGeometry.from_spec(geometry.spec()) == geometry
    assert geometry.weight_shape == tuple(conv.weight.shape)
    x = torch.randn(1, 4, 10, 10)
    torch.testing.assert_close(geometry.conv2d(x, conv.weight, conv.bias), conv(x))


def test_tied_modules_finds_both_sides() -> None:
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4), "head": nn.Linear(4, 10, bias=False)})
    model["head"].weight = model["emb"].weight
    assert tied_modules(model) == {"emb", "head"}
