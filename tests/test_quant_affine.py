"""Affine math, observers and bit packing of netshrink.quantize."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from netshrink.errors import ConfigError, DataError
from netshrink.quantize.affine import (
    Granularity,
    choose_qparams,
    dequantize,
    fake_quantize_weight,
    qrange,
    quantize,
    quantize_weight,
)
from netshrink.quantize.layers import fake_quant as layer_fake_quant
from netshrink.quantize.observers import make_observer
from netshrink.quantize.packing import pack, to_signed, to_unsigned, unpack

floats = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)
schemes = st.sampled_from([(b, s) for b in range(1, 9) for s in (False, True) if b > 1 or not s])


@settings(max_examples=200, deadline=None)
@given(values=st.lists(floats, min_size=1, max_size=64), scheme=schemes)
def test_error_at_most_half_a_step_inside_the_range(values: list[float], scheme) -> None:
    bits, symmetric = scheme
    x = torch.tensor(values, dtype=torch.float32)
    scale, zp = choose_qparams(x.amin(), x.amax(), bits, symmetric)
    qmin, qmax = qrange(bits, symmetric)
    q = quantize(x, scale, zp, qmin, qmax)
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    err = (dequantize(q, scale, zp) - x).abs().max()
    # half a step, plus float32 rounding of x / scale relative to the largest magnitude
    assert float(err) <= float(scale) / 2 * (1 + 1e-4) + float(x.abs().max()) * 1e-6


@settings(max_examples=50, deadline=None)
@given(c=floats, n=st.integers(1, 20), scheme=schemes)
def test_constant_tensors_do_not_divide_by_zero(c: float, n: int, scheme) -> None:
    bits, symmetric = scheme
    x = torch.full((n,), c)
    scale, zp = choose_qparams(x.amin(), x.amax(), bits, symmetric)
    assert torch.isfinite(scale) and float(scale) > 0
    qmin, qmax = qrange(bits, symmetric)
    x_hat = dequantize(quantize(x, scale, zp, qmin, qmax), scale, zp)
    assert torch.isfinite(x_hat).all()
    assert float((x_hat - x).abs().max()) <= float(scale) / 2 * (1 + 1e-4) + abs(c) * 1e-6


def test_zero_tensor_is_exact_with_scale_one() -> None:
    scale, zp = choose_qparams(torch.tensor(0.0), torch.tensor(0.0), 8, False)
    assert float(scale) == 1.0 and int(zp) == 0


@settings(max_examples=100, deadline=None)
@given(
    bits=st.sampled_from([1, 2, 4]),
    codes=st.lists(st.integers(0, 255), min_size=0, max_size=67),
)
def test_packing_round_trips(bits: int, codes: list[int]) -> None:
    q = torch.tensor([c % (2**bits) for c in codes], dtype=torch.int32)
    packed = pack(q, bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-len(codes) * bits // 8)
    assert torch.equal(unpack(packed, bits, len(codes)).to(torch.int32), q)


@settings(max_examples=50, deadline=None)
@given(bits=st.sampled_from([2, 4]), codes=st.lists(st.integers(-8, 7), max_size=40))
def test_signed_offset_round_trips(bits: int, codes: list[int]) -> None:
    half = 2 ** (bits - 1)
    q = torch.tensor([max(-half, min(half - 1, c)) for c in codes], dtype=torch.int32)
    back = to_signed(unpack(pack(to_unsigned(q, bits), bits), bits, q.numel()), bits)
    assert torch.equal(back.to(torch.int32), q)


def test_packing_rejects_bad_input() -> None:
    with pytest.raises(ConfigError):
        pack(torch.zeros(4, dtype=torch.int32), 3)
    with pytest.raises(ValueError):
        pack(torch.tensor([16]), 4)


def test_symmetric_one_bit_is_refused() -> None:
    with pytest.raises(ConfigError, match="binary"):
        qrange(1, True)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    groups=st.integers(1, 4),
    group_size=st.sampled_from([2, 4, 8]),
    bits=st.sampled_from([2, 4, 8]),
    seed=st.integers(0, 1000),
)
def test_per_group_and_per_channel_error_bound(rows, groups, group_size, bits, seed) -> None:
    w = torch.randn(rows, groups * group_size, generator=torch.Generator().manual_seed(seed))
    for gran in (Granularity(group_size=group_size), Granularity(True), Granularity(False)):
        q, scale, zp = quantize_weight(w, bits, True, gran)
        w_hat = dequantize(q, scale, zp).reshape(w.shape)
        step = scale.expand(q.shape).reshape(w.shape)
        assert bool(((w_hat - w).abs() <= step / 2 * (1 + 1e-4) + 1e-6).all())
    assert scale.numel() == 1  # the last granularity is per tensor


def test_per_channel_beats_per_tensor_on_uneven_channels() -> None:
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    w = w * torch.logspace(-3, 0, 8).unsqueeze(1)
    small = slice(0, 4)  # the small channels are the ones a shared scale rounds to zero
    per_t = (fake_quantize_weight(w, 4, True, Granularity(False)) - w)[small].pow(2).mean()
    per_c = (fake_quantize_weight(w, 4, True, Granularity(True)) - w)[small].pow(2).mean()
    assert per_c < per_t / 50


def test_group_size_must_divide() -> None:
    with pytest.raises(ConfigError, match="group_size"):
        quantize_weight(torch.randn(4, 10), 4, True, Granularity(group_size=4))


def _outlier_data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4096, generator=g) for _ in range(4)]
    batches[2][7] = 60.0  # one rare outlier
    return batches


def test_observers_ranges() -> None:
    ranges = {}
    for kind in ("minmax", "moving_average", "percentile", "mse", "entropy"):
        obs = make_observer(kind, "layer", bits=8)
        for b in _outlier_data():
            obs.update(b)
        lo, hi = obs.range()
        assert float(lo) < 0 < float(hi)
        ranges[kind] = float(hi)
    assert ranges["minmax"] == 60.0
    # the moving average dilutes the outlier batch; percentile and entropy clip it away; MSE
    # keeps most of it, because clipping one value at 60 costs more than coarser rounding
    assert ranges["moving_average"] < 60.0
    assert 10.0 < ranges["mse"] < 60.0
    for kind in ("percentile", "entropy"):
        assert ranges[kind] < 10.0, kind


def test_clipping_observers_lower_the_error_on_outliers() -> None:
    data = torch.cat(_outlier_data())
    errs = {}
    for kind in ("minmax", "mse"):
        obs = make_observer(kind, "t")
        for b in _outlier_data():
            obs.update(b)
        lo, hi = obs.range()
        scale, zp = choose_qparams(lo, hi, 8, False)
        x_hat = dequantize(quantize(data, scale, zp, 0, 255), scale, zp)
        errs[kind] = float((x_hat - data).pow(2).mean())
    assert errs["mse"] < errs["minmax"] * 0.99


def test_observer_errors_name_the_layer() -> None:
    obs = make_observer("minmax", "blocks.0.conv")
    with pytest.raises(DataError, match=r"blocks\.0\.conv"):
        obs.range()
    with pytest.raises(DataError, match=r"blocks\.0\.conv"):
        obs.update(torch.tensor([1.0, float("nan")]))


@settings(max_examples=150, deadline=None)
@given(values=st.lists(floats, min_size=1, max_size=64), signed=st.booleans())
def test_activation_fake_quant_paths_agree_and_stay_within_half_a_step(
    values: list[float], signed: bool
) -> None:
    # the frozen path (decomposed ops, what exports as QDQ) and the autograd one must give the
    # same numbers, signed (int8 Q/K of attention: true) or unsigned (uint8 activations)
    x = torch.tensor(values, dtype=torch.float32)
    scale, zp = choose_qparams(x.amin(), x.amax(), 8, signed)
    frozen = layer_fake_quant(x, scale, zp, (float(scale), int(zp)), signed=signed)
    trained = layer_fake_quant(x.requires_grad_(), scale, zp, signed=signed)
    assert torch.equal(frozen, trained.detach())
    codes = torch.round(frozen / scale) + zp
    assert int(codes.min()) >= (-128 if signed else 0) and int(codes.max()) <= (
        127 if signed else 255
    )
    err = (frozen - x.detach()).abs().max()
    assert float(err) <= float(scale) / 2 * (1 + 1e-4) + float(x.abs().max()) * 1e-6
