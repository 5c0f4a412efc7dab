"""quantize.gptq: round-to-nearest under an identity Hessian, smaller output error otherwise."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import netshrink as ns
from netshrink.errors import ConfigError, MissingInputError
from netshrink.layers import tied_modules
from netshrink.quantize.affine import Granularity, qrange, quantize_weight
from netshrink.quantize.gptq import gptq_codes
from netshrink.quantize.grid import Grid, search_range
from netshrink.quantize.packed import PackedConv2d, PackedLinear
from netshrink.quantize.packing import unpack
from test_calibrate import tiny_bert
from test_layers_models import _conv1d_names, _gpt2


def packed(model: nn.Module) -> dict[str, PackedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def rtn_codes(w: torch.Tensor, bits: int, group_size: int, symmetric: bool) -> torch.Tensor:
    """Round-to-nearest codes minus zero point, shaped like ``w``."""
    q, _, zero = quantize_weight(w, bits, symmetric, Granularity(True, group_size))
    return (q - zero).reshape(w.shape)


PLAIN = {"symmetric": True, "awq": False, "act_order": False, "clip": False, "damp": 0.01}
"""Options of GPTQ as the paper states it (the technique defaults to its best MiniLM setting)."""

GRIDS = [Grid(2), Grid(3), Grid(4), Grid(8), Grid(2, False), Grid(3, False), Grid(4, False)]
GRIDS += [Grid(3, full=True), Grid(4, full=True), Grid(8, full=True)]


def rtn_on(w: torch.Tensor, grid: Grid, group_size: int) -> torch.Tensor:
    """Round-to-nearest grid indices of ``w`` with each group's min-max range on ``grid``."""
    groups = w.reshape(w.shape[0], -1, group_size or w.shape[1])
    scale, zero = grid.params(groups.amin(2, keepdim=True), groups.amax(2, keepdim=True))
    return grid.codes(groups, scale, zero).reshape(w.shape)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 12),
    groups=st.integers(1, 4),
    group_size=st.sampled_from([0, 4, 8, 64]),
    grid=st.sampled_from(GRIDS),
    act_order=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_an_identity_hessian_gives_round_to_nearest_codes_exactly(
    rows: int, groups: int, group_size: int, grid: Grid, act_order: bool, seed: int
) -> None:
    cols = groups * (group_size or 16)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    gram = 3.0 * torch.eye(cols, dtype=torch.float64)  # X = sqrt(3) I: no column sees another
    codes, scale, zero = gptq_codes(w, gram, grid, group_size, act_order)
    assert torch.equal(codes, rtn_on(w, grid, group_size))
    if not grid.full:  # the narrow and asymmetric grids are quantize.weight_only's
        q, rtn_scale, rtn_zero = quantize_weight(
            w, grid.bits, grid.symmetric, Granularity(True, group_size)
        )
        assert torch.equal(codes, q.reshape(w.shape))
        assert torch.equal(scale, rtn_scale.reshape(scale.shape))
        assert torch.equal(zero, rtn_zero.reshape(zero.shape))


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 8), cols=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_the_full_grid_keeps_both_ends_and_never_rounds_worse_than_the_narrow_one(
    rows: int, cols: int, seed: int
) -> None:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    full, narrow = Grid(4, full=True), Grid(4)
    lo, hi = w.amin(1), w.amax(1)
    scale, zero = full.params(lo, hi)
    assert bool((zero == 0).all())
    assert bool((lo.clamp_max(0) >= -8 * scale * (1 + 1e-6)).all())
    assert bool((hi.clamp_min(0) <= 7 * scale * (1 + 1e-6)).all())
    assert bool((scale <= narrow.params(lo, hi)[0]).all())  # never coarser than max|w| / 7


@pytest.mark.parametrize(("bits", "group_size"), [(4, 8), (4, 0), (8, 0), (8, 16)])
def test_on_identity_inputs_the_layer_stored_is_the_weight_only_one(
    bits: int, group_size: int
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 8)).eval()
    eye = [(2.0 * torch.eye(32), None)]
    got = ns.quantize.gptq(model, bits=bits, group_size=group_size, calib_data=eye, **PLAIN)[0]
    want = ns.quantize.weight_only(model, bits=bits, group_size=group_size)[0]
    assert isinstance(got, PackedLinear) and isinstance(want, PackedLinear)
    assert got.spec() == want.spec()
    for key, value in want.state_dict().items():
        assert torch.equal(got.state_dict()[key], value), key


def correlated(seed: int, rows: int = 512, width: int = 128) -> torch.Tensor:
    """Inputs whose features are mixed and of unequal size (as a transformer's are)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(width) + torch.randn(width, width, generator=gen) / width**0.5
    scales = 10 ** torch.empty(width).uniform_(-1, 1, generator=gen)
    return (torch.randn(rows, width, generator=gen) * scales) @ mix


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    ("bits", "group_size", "act_order"),
    [(4, 32, False), (4, 32, True), (3, 0, True), (8, 0, False)],
)
def test_output_error_is_at_most_round_to_nearest_on_correlated_inputs(
    seed: int, bits: int, group_size: int, act_order: bool
) -> None:
    torch.manual_seed(seed)
    layer = nn.Linear(128, 48, bias=False)
    x = correlated(seed)
    w = layer.weight.detach()
    gram = (x.T.double() @ x.double()) / x.shape[0]
    codes, scale, _ = gptq_codes(w, gram, Grid(bits), group_size, act_order)
    per = group_size or 128
    w_gptq = (codes.reshape(48, -1, per) * scale.reshape(48, -1, 1)).reshape(w.shape)
    _, rtn_scale, _ = quantize_weight(w, bits, True, Granularity(True, group_size))
    w_rtn = (rtn_codes(w, bits, group_size, True).reshape(48, -1, per) * rtn_scale.reshape(
        48, -1, 1
    )).reshape(w.shape)  # fmt: skip
    err_gptq = float((x @ (w - w_gptq).T).norm())
    err_rtn = float((x @ (w - w_rtn).T).norm())
    assert err_gptq <= err_rtn, (err_gptq, err_rtn)


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 8),
    cols=st.integers(2, 40),
    grid=st.sampled_from(GRIDS),
    seed=st.integers(0, 2**16),
)
def test_the_searched_range_never_rounds_worse_than_min_max(
    rows: int, cols: int, grid: Grid, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen) ** 3  # heavy tails: clipping pays off somewhere
    importance = torch.rand(cols, generator=gen) + 0.1

    def error(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        s, z = scale.unsqueeze(1), zero.unsqueeze(1)
        return ((w - (grid.codes(w, s, z) - z) * s).square() * importance).sum(1)

    minmax = error(*grid.params(w.amin(1), w.amax(1)))
    searched = error(*search_range(w, importance, grid))
    assert bool((searched <= minmax + 1e-6).all()), (searched, minmax)


def test_clip_lowers_the_output_error_of_gptq_on_heavy_tailed_weights() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 128, generator=gen) ** 3
    x = correlated(0)
    gram = (x.T.double() @ x.double()) / x.shape[0]
    errors = []
    for clip in (False, True):
        codes, scale, _ = gptq_codes(w, gram, Grid(4), 32, clip=clip)
        w_q = (codes.reshape(48, -1, 32) * scale.reshape(48, -1, 1)).reshape(w.shape)
        errors.append(float((x @ (w - w_q).T).norm()))
    assert errors[1] < errors[0], errors


def test_act_order_with_groups_gives_a_valid_packed_layer() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 4)).eval()
    x = correlated(3)
    options = {**PLAIN, "act_order": True}
    out = ns.quantize.gptq(model, bits=4, group_size=32, calib_data=[(x, None)], **options).eval()
    layer = out[0]
    assert isinstance(layer, PackedLinear)
    assert layer.scale.shape == (64, 4, 1)  # groups of 32 consecutive inputs, as RTN stores
    lo, hi = qrange(4, True)
    codes = unpack(layer.codes, 4, 64 * 128).to(torch.int32) - 8
    assert lo <= int(codes.min()) and int(codes.max()) <= hi
    decoded = (codes.reshape(64, 4, 32) * layer.scale).reshape(64, 128)
    assert torch.equal(layer.weight, decoded)
    rtn = ns.quantize.weight_only(model, bits=4, group_size=32)
    with torch.no_grad():
        ref = model[0](x)
        assert (out[0](x) - ref).norm() <= (rtn[0](x) - ref).norm()
        assert out(x).shape == (512, 4) and bool(out(x).isfinite().all())


def test_without_calibration_data_the_model_is_not_touched() -> None:
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MissingInputError, match="calib_data"):
        ns.quantize.gptq(model, bits=4, group_size=0)
    assert isinstance(model[0], nn.Linear)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    "options",
    [
        {"bits": 8, "symmetric": False},
        {"symmetric": False, "full_range": True},
        {"bits": 5},
        {"damp": 0},
        {"blocks": ["0"]},
    ],
)
def test_options_that_cannot_be_honoured_are_config_errors(options: dict) -> None:
    model = nn.Sequential(nn.Linear(8, 4)).eval()
    with pytest.raises(ConfigError):
        ns.quantize.gptq(model, calib_data=[(torch.randn(4, 8), None)], **options)


def test_save_load_gives_identical_outputs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    calib = [(torch.randn(16, 64), None)]
    out = ns.quantize.gptq(model, bits=3, symmetric=False, group_size=16, calib_data=calib)
    assert len(packed(out)) == 2
    ns.save(out, tmp_path / "a")
    loaded = ns.load(tmp_path / "a", model=model)
    x = calib[0][0]
    with torch.no_grad():
        assert torch.equal(loaded(x), out(x))


def test_sequential_bert_quantizes_every_block_layer_on_quantized_inputs() -> None:
    model, calib = tiny_bert()
    options = {"bits": 4, "group_size": 8, "calib_data": calib, **PLAIN}
    plain = packed(ns.quantize.gptq(model, **options))
    seq = packed(ns.quantize.gptq(model, sequential=True, **options))
    assert len(seq) == 3 * 6 + 1  # q, k, v, attention output, intermediate, output; the pooler
    assert seq.keys() == plain.keys()
    # block 0 sees the float inputs either way; the later ones see quantized ones only in seq
    for name, layer in seq.items():
        same = torch.equal(layer.weight, plain[name].weight)
        assert same == (not name.startswith(("encoder.layer.1.", "encoder.layer.2."))), name


def test_gpt2_conv1d_is_quantized_as_linear_and_tied_weights_stay_tied() -> None:
    torch.manual_seed(0)
    model, x = _gpt2(), torch.randint(0, 40, (2, 6))
    before = _conv1d_names(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tied lm_head is named and left alone
        out = ns.quantize.gptq(model, bits=8, group_size=0, calib_data=[(x, None)])
    assert all(isinstance(out.get_submodule(n), PackedLinear) for n in before)
    assert {"lm_head", "transformer.wte"} <= tied_modules(out)
    assert out.lm_head.weight is out.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(out(x).logits, model(x).logits, atol=0.1, rtol=0)


def test_convolutions_are_solved_on_their_patches_and_grouped_ones_left_float() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1, groups=2)
    ).eval()
    x = torch.randn(16, 3, 8, 8)
    with pytest.warns(UserWarning, match="leaves 2 as they are: grouped"):
        q = ns.quantize.gptq(model, bits=3, calib_data=[(x, None)])
    assert isinstance(q[0], PackedConv2d) and isinstance(q[2], nn.Conv2d)
    rtn = ns.quantize.weight_only(model, bits=4, targets={"include": ["0"]})
    gptq4 = ns.quantize.gptq(model, bits=4, calib_data=[(x, None)], targets={"include": ["0"]})
    with torch.no_grad():
        ref = model[0](x)
        err_gptq, err_rtn = (float((m[0](x) - ref).norm()) for m in (gptq4, rtn))
    assert err_gptq < err_rtn, (err_gptq, err_rtn)


def test_asymmetric_int4_stores_a_zero_point_per_group_and_survives_save_load(
    tmp_path: Path,
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = correlated(4, rows=256, width=64)
    out = ns.quantize.gptq(
        model, bits=4, symmetric=False, awq=False, group_size=16, calib_data=[(x, None)]
    )
    layer = out[0]
    assert isinstance(layer, PackedLinear)
    zeros = layer.zero_points()
    assert zeros is not None and zeros.shape == (32, 4)
    codes = unpack(layer.codes, 4, 32 * 64).to(torch.int32).reshape(32, 4, 16)
    decoded = ((codes - zeros.unsqueeze(2)) * layer.scale.reshape(32, 4, 1)).reshape(32, 64)
    assert torch.equal(layer.weight, decoded)
    assert int(codes.min()) >= 0 and int(codes.max()) == 15  # the whole 0..15 range is used
    ns.save(out, tmp_path / "a")
    loaded = ns.load(tmp_path / "a", model=model)
    with torch.no_grad():
        assert torch.equal(loaded(x), out(x))


def test_asymmetric_int4_on_a_convolution_is_refused_before_touching_the_model() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 2)).eval()
    with pytest.raises(ConfigError, match="symmetric"):
        ns.quantize.gptq(
            model, bits=4, symmetric=False, calib_data=[(torch.randn(2, 3, 4, 4), None)]
        )
    assert isinstance(model[0], nn.Conv2d)


def test_the_full_range_grid_uses_the_extra_negative_code() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16)).eval()
    out = ns.quantize.gptq(model, bits=4, group_size=16, full_range=True,
                           calib_data=[(torch.randn(256, 64), None)])  # fmt: skip
    codes = unpack(out[0].codes, 4, 16 * 64).to(torch.int32) - 8
    assert int(codes.min()) == -8 and int(codes.max()) <= 7


def test_awq_scales_inputs_only_where_their_sizes_differ() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 32)).eval()
    even = [(torch.randn(512, 128), None)]
    plain = ns.quantize.gptq(model, bits=4, group_size=32, awq=False, calib_data=even)[0]
    assert isinstance(plain, PackedLinear) and plain.input_scale is None
    x = correlated(5)
    scaled = ns.quantize.gptq(model, bits=4, group_size=32, awq=True, calib_data=[(x, None)])[0]
    assert isinstance(scaled, PackedLinear) and scaled.input_scale is not None
    with torch.no_grad():
        assert torch.allclose(
            scaled(x),
            F.linear(x * scaled.input_scale, scaled.weight / scaled.input_scale, scaled.bias),
            atol=1e-4,
        )


@pytest.mark.parametrize(("bits", "linear_zero_points"), [(4, True), (3, False), (8, False)])
def test_by_default_linears_get_zero_points_and_convolutions_a_symmetric_grid(
    bits: int, linear_zero_points: bool
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4)).eval()
    out = ns.quantize.gptq(model, bits=bits, calib_data=[(torch.randn(32, 3, 6, 6), None)])
    conv, linear = out[0], out[2]
    assert isinstance(conv, PackedConv2d) and isinstance(linear, PackedLinear)
    # int4 stores asymmetric codes with a zero point; 2-3 bits store code minus zero point
    assert (linear.zero_points() is not None) == linear_zero_points
    if bits == 8:  # asymmetric 8-bit codes do not fit int8: the grid stays symmetric
        codes = linear.codes.to(torch.int32)
        assert int(codes.min()) >= -127 and int(codes.max()) <= 127
    with torch.no_grad():
        x = torch.randn(4, 3, 6, 6)
        assert torch.allclose(out(x), model(x), atol=0.5)
