"""quantize.dynamic, weight_only, half, binary, ternary: storage, outputs, rebuild from spec."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import netshrink as ns
from netshrink.artifact.modules import build, spec_of
from netshrink.errors import ConfigError
from netshrink.quantize.dynamic_int8 import DynamicInt8Linear, Int8Embedding
from netshrink.quantize.packed import PackedConv2d, PackedLinear


class Tiny(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear, plus a conv branch on an image input."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(40, 64)
        self.fc1, self.fc2 = nn.Linear(64, 96), nn.Linear(96, 64)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(64 + 8, 10)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.fc2(torch.relu(self.fc1(self.emb(ids)))).mean(1)
        return self.head(torch.cat([h, self.conv(img).mean((2, 3))], 1))


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 40, (4, 12), generator=g), torch.randn(4, 3, 6, 6, generator=g)


@pytest.fixture(scope="module")
def model() -> Tiny:
    torch.manual_seed(0)
    return Tiny().eval()


def nbytes(m: nn.Module) -> int:
    """Bytes of the state dict, the embedding table left out (only dynamic quantizes it)."""
    return sum(
        t.numel() * t.element_size() for k, t in m.state_dict().items() if not k.startswith("emb.")
    )


def rebuilt(q: nn.Module, fresh: nn.Module) -> nn.Module:
    """Replay every module spec of ``q`` onto ``fresh`` and load ``q``'s state dict."""
    for name, mod in q.named_modules():
        spec = spec_of(mod)
        if name and spec is not None and spec["type"].startswith("netshrink:"):
            parent, _, leaf = name.rpartition(".")
            setattr(fresh.get_submodule(parent) if parent else fresh, leaf, build(spec))
    fresh.load_state_dict(q.state_dict())
    return fresh


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max())


CASES = [
    ("dynamic", {}, 0.03, 3.3),
    ("weight_only", {}, 0.03, 3.3),
    ("weight_only", {"bits": 4, "group_size": 8}, 0.2, 3.5),  # a scale per 8 weights,
    ("half", {}, 0.01, 1.9),
    ("half", {"dtype": "bf16"}, 0.05, 1.9),
    ("binary", {"keep_first_last": False}, 2.0, 16.0),
    ("ternary", {"keep_first_last": False}, 2.0, 10.0),
]


@pytest.mark.parametrize(("name", "options", "tol", "shrink"), CASES)
def test_technique_shrinks_stays_close_and_rebuilds(model, name, options, tol, shrink) -> None:
    q = getattr(ns.quantize, name)(model, **options)
    x = inputs()
    assert q(*x).shape == model(*x).shape
    assert rel_err(q(*x), model(*x)) < tol
    assert nbytes(model) / nbytes(q) >= shrink
    torch.manual_seed(5)
    again = rebuilt(q, Tiny().eval())
    assert torch.equal(again(*x), q(*x))


def test_dynamic_runs_integer_matmul_exactly(model) -> None:
    q = ns.quantize.dynamic(model)
    layer = q.fc1
    assert isinstance(layer, DynamicInt8Linear) and isinstance(q.emb, Int8Embedding)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0)).relu()  # one-sided
    # reference: per-token affine int8 codes, exact int64 matmul, then the float rescale
    lo, hi = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True)
    s = (hi - lo) / 255
    z = torch.round(-128 - lo / s)
    qx = torch.clamp(torch.round(x / s + z), -128, 127).to(torch.int64)
    acc = (qx - z.to(torch.int64)) @ layer.weight_q.to(torch.int64).t()
    ref = acc.double() * s.double() * layer.weight_scale.double() + layer.bias.double()
    assert torch.allclose(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert int(qx.min()) == -128 and int(qx.max()) == 127  # all 256 codes in use
    assert torch.isfinite(layer(torch.zeros(2, 64))).all()  # all-zero rows


def test_dynamic_paths_agree_and_survive_copies(model) -> None:
    """oneDNN (uint8 x int8), the _int_mm fallback, a deep copy and torch.compile agree."""
    import copy

    layer = ns.quantize.dynamic(model).fc1
    x = torch.randn(7, 3, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = layer(x)
        clone = copy.deepcopy(layer)
        assert torch.equal(clone(x), y)
        clone._packed = None  # the int8 _int_mm path every other backend takes
        assert torch.allclose(clone(x), y, rtol=1e-5, atol=1e-5)
        compiled = torch.compile(layer)(x)
    assert torch.allclose(compiled, y, rtol=1e-5, atol=1e-5)


def test_dynamic_exports_integer_matmuls_to_onnx(model, tmp_path) -> None:
    import collections

    import onnx
    import onnxruntime as ort

    from netshrink.artifact.onnx import export_onnx

    q = ns.quantize.dynamic(model)
    x = inputs()
    path = export_onnx(q, tmp_path / "dyn.onnx", x)
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["MatMulInteger"] == 3 and ops["MatMul"] == ops["Gemm"] == 0  # every Linear
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (x, tuple(t[:3] for t in x)):  # the batch dimension stays dynamic
        feed = {i.name: t.numpy() for i, t in zip(sess.get_inputs(), batch, strict=True)}
        out = sess.run(None, feed)[0]
        with torch.no_grad():
            ref = q(*batch).numpy()
        assert abs(out - ref).max() <= 1e-5 * abs(ref).max()  # the same integer arithmetic


def test_int4_groups_and_signs_are_packed(model) -> None:
    q4 = ns.quantize.weight_only(model, bits=4, group_size=8)
    assert isinstance(q4.fc1, PackedLinear) and q4.fc1.codes.dtype == torch.uint8
    assert q4.fc1.codes.numel() == 96 * 64 // 2 and q4.fc1.scale.shape == (96, 8, 1)
    assert isinstance(q4.conv, PackedConv2d)
    qb = ns.quantize.binary(model, keep_first_last=False)
    assert qb.fc1.codes.numel() == math.ceil(96 * 64 / 8)
    w = qb.fc1.weight()
    assert torch.equal(w.abs(), qb.fc1.scale.reshape(-1, 1).expand_as(w))  # +-alpha per row
    qt = ns.quantize.ternary(model, keep_first_last=False)
    assert qt.fc1.codes.numel() == 96 * 64 // 4
    values = (qt.fc1.weight() / qt.fc1.scale.reshape(-1, 1)).round().unique()
    assert set(values.tolist()) <= {-1.0, 0.0, 1.0}


def test_binary_keeps_first_and_last_by_default(model) -> None:
    q = ns.quantize.binary(model)
    assert type(q.fc1) is nn.Linear and type(q.head) is nn.Linear
    assert isinstance(q.fc2, PackedLinear)


def test_group_size_that_does_not_divide_warns(model) -> None:
    with pytest.warns(UserWarning, match="group_size"):
        q = ns.quantize.weight_only(model, bits=4, group_size=48)
    assert q.fc1.group_size == 0


def test_bad_options_are_refused(model) -> None:
    with pytest.raises(ConfigError, match="bits"):
        ns.quantize.weight_only(model, bits=3)
    with pytest.raises(ConfigError, match="dtype"):
        ns.quantize.half(model, dtype="fp8")
    with pytest.raises(ConfigError, match="unknown option"):
        ns.quantize.dynamic(model, bits=8)
