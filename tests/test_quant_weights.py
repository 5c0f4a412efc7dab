"""quantize.dynamic, weight_only, half, binary, ternary: storage, outputs, rebuild from spec."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import netshrink as ns
from netshrink.artifact.modules import build, spec_of
from netshrink.errors import ConfigError, TargetError
from netshrink.quantize import dynamic_int8
from netshrink.quantize.dynamic_int8 import DynamicInt8Linear, Int8Embedding
from netshrink.quantize.halfprec import HalfEmbedding
from netshrink.quantize.packed import PackedConv2d, PackedEmbedding, PackedLinear


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


def exact(layer: DynamicInt8Linear, x: torch.Tensor) -> torch.Tensor:
    """Per-token affine codes, an exact int64 matmul, then the float rescale (float64)."""
    qmax = dynamic_int8._code_max(x.device)
    lo, hi = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True).clamp(min=0)
    s = (hi - lo) / qmax
    z = torch.round(-lo / s)
    qx = torch.clamp(torch.round(x / s + z), 0, qmax).to(torch.int64)
    acc = (qx - z.to(torch.int64)) @ layer.weight_q.to(torch.int64).t()
    bias = layer.bias.double() if layer.bias is not None else 0.0
    return acc.double() * s.double() * layer.weight_scale.double() + bias


def test_dynamic_runs_integer_matmul_exactly(model) -> None:
    q = ns.quantize.dynamic(model)
    layer = q.fc1
    assert isinstance(layer, DynamicInt8Linear) and isinstance(q.emb, Int8Embedding)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0)).relu()  # one-sided
    assert torch.allclose(layer(x).double(), exact(layer, x), rtol=1e-5, atol=1e-5)
    # The layer's own per-token range: a one-sided row gets zero point 0 and spans every code
    # (0..255 on VNNI CPUs), not the half a symmetric range would leave it.
    qmax = dynamic_int8._code_max(x.device)
    s, z = dynamic_int8._token_qparams(x, qmax)
    codes = torch.round(x / s + z)
    assert torch.equal(z, torch.zeros_like(z))
    assert int(codes.min()) == 0 and int(codes.max()) == qmax
    assert torch.isfinite(layer(torch.zeros(2, 64))).all()  # all-zero rows


def test_dynamic_paths_agree_and_survive_copies(model) -> None:
    """oneDNN (uint8 x int8), the _int_mm fallback, a deep copy, torch.compile (default and
    with COMPILE_OPTIONS) agree."""
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
        tuned = torch.compile(copy.deepcopy(layer), options=ns.quantize.COMPILE_OPTIONS)(x)
    assert torch.allclose(compiled, y, rtol=1e-5, atol=1e-5)
    assert torch.allclose(tuned, y, rtol=1e-5, atol=1e-5)


def test_dynamic_layer_survives_dtype_moves_and_compiled_copies(model) -> None:
    import copy

    with torch.inference_mode():  # buffers made here cannot be written in place later
        layer = ns.quantize.dynamic(model).fc1
    x = torch.randn(9, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = layer(x)
        for moved in (copy.deepcopy(layer).to("cpu"), copy.deepcopy(layer).double()):
            assert torch.equal(moved(x), y)
        half = copy.deepcopy(layer).half()
        assert half.weight_scale.dtype == torch.float32
        out = half(x.half())
        assert out.dtype == torch.float16
        assert torch.allclose(out.float(), y, rtol=1e-2, atol=1e-2)
        compiled = copy.deepcopy(layer)
        compiled.compile()
        clone = copy.deepcopy(compiled)
        clone.bias.fill_(100.0)
        clone.refresh()
        assert torch.allclose(clone(x), exact(clone, x).float(), rtol=1e-5, atol=1e-4)


def test_codes_stop_at_127_on_cpus_without_vnni() -> None:
    import os
    import subprocess
    import sys

    # oneDNN limited to AVX2 adds u8 x s8 product pairs in saturating int16, as on pre-VNNI x86
    script = """
import torch
from netshrink.quantize import dynamic_int8
dynamic_int8._SATURATING_CPU = not {vnni}
torch.manual_seed(0)
lin = torch.nn.Linear(64, 32)
layer = dynamic_int8.DynamicInt8Linear.from_float(lin)
x = torch.rand(20, 64) * 10  # one-sided: the top codes are used
q = 127 if not {vnni} else 255
s = x.amax(1, keepdim=True) / q
ref = torch.round(x / s).double() @ layer.weight_q.double().t() * s.double()
ref = ref * layer.weight_scale.double() + lin.bias.double()
with torch.no_grad():
    print(float((layer(x).double() - ref).abs().max() / ref.abs().max()))
"""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}

    def error(vnni: bool) -> float:
        out = subprocess.run([sys.executable, "-c", script.format(vnni=vnni)], env=env,
                             capture_output=True, text=True, check=True)  # fmt: skip
        return float(out.stdout.strip().splitlines()[-1])

    assert error(False) < 1e-5  # 7-bit codes: exact even with a saturating kernel
    assert error(True) > 1e-3  # what full-range codes would suffer there


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
    w = qb.fc1.weight
    assert torch.equal(w.abs(), qb.fc1.scale.reshape(-1, 1).expand_as(w))  # +-alpha per row
    qt = ns.quantize.ternary(model, keep_first_last=False)
    assert qt.fc1.codes.numel() == 96 * 64 // 4
    values = (qt.fc1.weight / qt.fc1.scale.reshape(-1, 1)).round().unique()
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


TABLE_TYPES = {"weight_only": PackedEmbedding, "half": HalfEmbedding, "dynamic": Int8Embedding}


@pytest.mark.parametrize("name", sorted(TABLE_TYPES))
def test_embeddings_true_stores_only_the_tables_the_targets_select(model, name) -> None:
    quantize = getattr(ns.quantize, name)
    layers_only = quantize(model, targets={"include": ["fc*"]})
    assert type(layers_only.emb) is nn.Embedding and type(layers_only.head) is nn.Linear
    assert type(layers_only.fc1) is not nn.Linear
    by_type = quantize(model, targets={"types": ["Linear"]})
    assert type(by_type.emb) is nn.Embedding
    table_only = quantize(model, targets={"include": ["emb"]})
    assert isinstance(table_only.emb, TABLE_TYPES[name])
    assert type(table_only.fc1) is nn.Linear
    everything = quantize(model)
    assert isinstance(everything.emb, TABLE_TYPES[name])


@pytest.mark.parametrize("name", sorted(TABLE_TYPES))
def test_tables_selected_with_embeddings_false_are_named_in_the_error(model, name) -> None:
    with pytest.raises(TargetError, match=r"selected only embedding tables \(emb\).*embeddings"):
        getattr(ns.quantize, name)(model, targets={"include": ["emb"]}, embeddings=False)
    kept = getattr(ns.quantize, name)(model, embeddings=False)
    assert type(kept.emb) is nn.Embedding
