"""Real int4 execution: packed int4 Linear layers export to com.microsoft::MatMulNBits, which
ONNX Runtime runs on its int4 kernels and OpenVINO reads as u4 weights."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import netshrink as ns
from netshrink.quantize.nbits import matmul_nbits
from netshrink.quantize.packed import PackedLinear
from netshrink.runtime import make_runner


def zero_point_layer(
    in_features: int, out_features: int, group_size: int, seed: int, input_scale: bool = False
) -> PackedLinear:
    """An int4 layer of random unsigned codes, zero points and scales (asymmetric)."""
    g = torch.Generator().manual_seed(seed)
    groups = in_features // group_size
    return PackedLinear.from_codes(
        torch.randint(0, 16, (out_features, in_features), generator=g),
        torch.rand(out_features, groups, generator=g) * 0.02 + 1e-3,
        "int4",
        group_size,
        torch.randn(out_features, generator=g),
        zero_point=torch.randint(0, 16, (out_features, groups), generator=g),
        input_scale=torch.rand(in_features, generator=g) + 0.5 if input_scale else None,
    )


def symmetric_layer(in_features: int, out_features: int, group_size: int) -> PackedLinear:
    torch.manual_seed(group_size)
    return PackedLinear.from_float(nn.Linear(in_features, out_features), "int4", group_size)


class Branches(nn.Module):
    """Several layers reading one input, each output returned: one export covers them all."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(layer(x) for layer in self.layers)


def export(model: nn.Module, x: torch.Tensor, tmp_path: Path) -> tuple[Path, list[str]]:
    path = ns.export_onnx(model.eval(), tmp_path / "m.onnx", (x,))
    return path, [node.op_type for node in onnx.load(str(path)).graph.node]


GROUPS = (16, 32, 64, 128)


@pytest.fixture(scope="module")
def nbits_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, Path, list[str]]:
    """Symmetric layers and layers with zero points for each group size, one with an input
    scale, exported once."""
    layers = [symmetric_layer(256, 40, g) for g in GROUPS]
    layers += [zero_point_layer(256, 40, g, g) for g in GROUPS]
    layers.append(zero_point_layer(256, 24, 32, 2, input_scale=True))
    model = Branches(*layers).eval()
    return model, *export(model, torch.randn(3, 5, 256), tmp_path_factory.mktemp("nbits"))


def test_matmulnbits_matches_torch(nbits_model: tuple[nn.Module, Path, list[str]]) -> None:
    model, path, ops = nbits_model
    # one MatMulNBits per layer (the bias inside it), no float MatMul; the input scale is a Mul
    assert sorted(ops) == ["MatMulNBits"] * 9 + ["Mul"]
    x = torch.randn(4, 5, 256)  # 3-D input: batch (dynamic), tokens, features
    got = make_runner(path, "onnxruntime", 1, ())((x,))
    with torch.no_grad():
        want = model(x)
    for g, w in zip(got, want, strict=True):  # accuracy_level 0: float compute, rounding only
        torch.testing.assert_close(torch.as_tensor(g), w, atol=1e-4, rtol=1e-5)


def test_openvino_runs_u4_weights(nbits_model: tuple[nn.Module, Path, list[str]]) -> None:
    pytest.importorskip("openvino")
    model, path, _ = nbits_model
    runner = make_runner(path, "openvino-f32", 1, ())
    assert runner.primitives().get("FullyConnected/u4") == 9
    x = torch.randn(4, 5, 256)
    with torch.no_grad():
        want = model(x)
    for g, w in zip(runner((x,)), want, strict=True):
        # OpenVINO quantizes the activations to int8 per token and group of 32 features
        torch.testing.assert_close(g, w, atol=0.05 * float(w.abs().max()), rtol=0)


def test_other_layouts_keep_the_float_graph(tmp_path: Path) -> None:
    torch.manual_seed(0)
    linear = nn.Linear(48, 16)
    layouts = [("int4", 24), ("int4", 0), ("int8", 16)]
    layers = [PackedLinear.from_float(linear, c, g) for c, g in layouts]  # type: ignore[arg-type]
    assert [layer.nbits_block() for layer in layers] == [0, 0, 0]
    model, x = Branches(*layers), torch.randn(4, 48)
    path, ops = export(model, x, tmp_path)
    assert "MatMulNBits" not in ops
    with torch.no_grad():
        want = model(x)
    for g, w in zip(make_runner(path, "onnxruntime", 1, ())((x,)), want, strict=True):
        torch.testing.assert_close(torch.as_tensor(g), w, atol=1e-4, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(1, 9),
    blocks=st.integers(1, 5),
    block=st.sampled_from([16, 32]),
    zero_point=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_reference_kernel_equals_the_layer(
    rows: int, blocks: int, block: int, zero_point: bool, seed: int
) -> None:
    """The op's own kernel (MatMulNBits' formula on its input layout) equals the layer's decode,
    and zero points survive packing (each row padded to whole bytes)."""
    cols = blocks * block
    if zero_point:
        layer = zero_point_layer(cols, rows, block, seed)
    else:
        torch.manual_seed(seed)
        layer = PackedLinear.from_float(nn.Linear(cols, rows), "int4", block)
    x = torch.randn(3, cols)
    got = matmul_nbits(x, layer.nbits_b, layer.nbits_scales, layer.zero_point, layer.bias,
                       cols, rows, block)  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(got, layer(x), atol=1e-5, rtol=1e-5)


def test_views_follow_loads_and_copies() -> None:
    layer = zero_point_layer(64, 8, 32, 4)
    fresh = PackedLinear(**layer.spec())
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.nbits_b.flatten(), layer.codes)
    moved = fresh.to(torch.float64)
    assert moved.nbits_b.data_ptr() == moved.codes.data_ptr()
    assert moved.nbits_scales.data_ptr() == moved.scale.data_ptr()
    assert set(layer.state_dict()) == {"codes", "scale", "bias", "zero_point"}


def test_zero_points_decode_exactly_per_channel_and_odd_sizes() -> None:
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (3, 5), generator=g)  # 15 codes: the last byte is half padding
    zeros, scale = torch.randint(0, 16, (3, 1), generator=g), torch.rand(3, 1, generator=g)
    layer = PackedLinear.from_codes(codes, scale, "int4", 0, None, zero_point=zeros)
    assert layer.nbits_block() == 0 and torch.equal(layer.zero_points(), zeros.int())
    torch.testing.assert_close(layer.weight, (codes - zeros).float() * scale, atol=0, rtol=0)
