"""Parameter, non-zero, MAC and peak-memory counts against their formulas."""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from measure_models import tiny_models
from netshrink.layers import CompressedLayer
from netshrink.measure import count_macs, count_nonzero, count_params, peak_memory

FAST = settings(max_examples=15, deadline=None)


@FAST
@given(batch=st.integers(1, 5), fin=st.integers(1, 40), fout=st.integers(1, 40), bias=st.booleans())
def test_linear_macs_equal_batch_in_out(batch: int, fin: int, fout: int, bias: bool) -> None:
    layer = nn.Linear(fin, fout, bias=bias)
    assert count_macs(layer, (torch.randn(batch, fin),)) == batch * fin * fout


@FAST
@given(
    batch=st.integers(1, 3),
    groups=st.sampled_from([1, 2]),
    cin_per=st.integers(1, 3),
    cout_per=st.integers(1, 3),
    k=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    size=st.integers(5, 9),
)
def test_conv2d_macs_equal_formula(
    batch: int,
    groups: int,
    cin_per: int,
    cout_per: int,
    k: int,
    stride: int,
    padding: int,
    size: int,
) -> None:
    cin, cout = groups * cin_per, groups * cout_per
    conv = nn.Conv2d(cin, cout, (k, k + 1), stride=stride, padding=padding, groups=groups)
    x = torch.randn(batch, cin, size, size)
    hout, wout = conv(x).shape[2:]
    expected = batch * cout * hout * wout * cin * k * (k + 1) // groups
    assert count_macs(conv, (x,)) == expected


class IntMatmul(nn.Module):
    """An int8 layer with a custom forward: int8 weight buffer, torch._int_mm, rescale."""

    def __init__(self, fin: int, fout: int):
        super().__init__()
        self.register_buffer("weight", torch.randint(-127, 128, (fin, fout), dtype=torch.int8))
        self.register_buffer("scale", torch.tensor(0.01))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = (x / 0.05).round().clamp(-127, 127).to(torch.int8)
        return torch._int_mm(q, self.weight).float() * self.scale


def test_integer_layer_macs_are_counted() -> None:
    layer = IntMatmul(32, 24)  # _int_mm needs m > 16 and k, n multiples of 8
    assert count_macs(layer, (torch.randn(17, 32),)) == 17 * 32 * 24


def test_dynamic_int8_linear_macs_are_counted_without_warning() -> None:
    import netshrink as ns

    q = ns.quantize.dynamic(nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an op without a formula would warn
        macs = count_macs(q, (torch.randn(5, 32),))
    # each layer: the int8 GEMM plus its K=2 zero-point/bias correction (one addmm_)
    assert macs == 5 * (32 * 24 + 24 * 8) + 5 * 2 * (24 + 8)


def test_cpu_attention_macs_are_two_matmuls() -> None:
    class Attend(nn.Module):
        def forward(self, q: torch.Tensor) -> torch.Tensor:
            return nn.functional.scaled_dot_product_attention(q, q, q)

    b, h, s, d = 2, 3, 5, 4
    assert count_macs(Attend(), (torch.randn(b, h, s, d),)) == 2 * b * h * s * s * d


def test_uncounted_compute_op_is_warned_about() -> None:
    class Sparse(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sparse.mm(torch.eye(4).to_sparse(), x)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        count_macs(Sparse(), (torch.randn(4, 3),))
    assert any("no FLOP formula" in str(w.message) for w in caught)


def test_params_and_nonzero_are_exact_with_zeros_set() -> None:
    model = nn.Sequential(nn.Linear(10, 6), nn.BatchNorm1d(6), nn.Linear(6, 3, bias=False))
    with torch.no_grad():
        model[0].weight[:2] = 0  # 20 zeros
        model[0].bias.zero_()  # 6 zeros
        model[1].bias.fill_(0.5)  # BatchNorm's bias starts at zero; make it non-zero
        model[2].weight[0, :4] = 0  # 4 zeros
    total = 10 * 6 + 6 + 6 + 6 + 6 * 3  # BN running stats and its int64 counter are not weights
    assert count_params(model) == total
    assert count_nonzero(model) == total - 20 - 6 - 4


def test_compressed_layers_count_the_function_they_compute() -> None:
    class _PackedInt4(CompressedLayer):  # leading _: not registered for artifacts
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("packed", torch.zeros(8, 4, dtype=torch.uint8))
            self.inner = nn.Linear(3, 3)  # a part of the layer: counted by the layer alone

        @property
        def weight(self) -> torch.Tensor:
            w = torch.zeros(8, 8)
            w[0, :5] = 1.0
            return w

    model = nn.Sequential(_PackedInt4(), nn.Linear(2, 2))
    assert count_params(model) == 64 + 6  # two int4 per byte stand for 64 weights
    assert count_nonzero(model) == 5 + int(torch.count_nonzero(model[1].weight)) + 2


def test_peak_memory_counts_live_activations_not_weights() -> None:
    batch, hidden = 8, 256
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 32)).eval()
    # Linear out and ReLU out (not in place) are alive together; weights are excluded.
    assert peak_memory(model, (torch.randn(batch, 64),)) == 2 * batch * hidden * 4


@pytest.mark.parametrize("name", ["cnn", "mlp", "attention"])
def test_counts_run_on_every_test_model(name: str) -> None:
    model = tiny_models()[name]
    x = torch.randn(4, 1, 8, 8)
    assert count_macs(model, (x,)) > 0
    assert 0 < peak_memory(model, (x,)) < 1e6
    assert count_nonzero(model) <= count_params(model) == sum(p.numel() for p in model.parameters())
