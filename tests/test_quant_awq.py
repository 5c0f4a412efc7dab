"""quantize.awq: round-to-nearest at s = 1, less output error with outlier channels, folding
into a pre-LN norm, explicit input scales elsewhere, zero points, artifacts, bad options."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import netshrink as ns
from netshrink.errors import ConfigError, MissingInputError
from netshrink.quantize.awq import AWQConfig, search_scale
from netshrink.quantize.packed import PackedLinear
from netshrink.zoo.models import DigitsTransformer
from test_calibrate import tiny_bert

MLP = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).eval()


def outlier_rows(n: int, width: int, seed: int) -> torch.Tensor:
    """Gaussian rows whose channels 0..3 are 20-50x larger (an LLM-style outlier pattern)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g)
    x[:, :4] *= torch.linspace(20, 50, 4)
    return x


def packed(model: nn.Module) -> dict[str, PackedLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}


def test_scales_of_one_equal_round_to_nearest() -> None:
    calib = [(outlier_rows(16, 64, 0), None)]
    options = {"bits": 4, "group_size": 32}
    awq = ns.quantize.awq(MLP, grid=1, clip=False, symmetric=True, calib_data=calib, **options)
    rtn = ns.quantize.weight_only(MLP, **options)
    for name, layer in packed(awq).items():
        assert layer.input_scale is None and layer.zero_point is None
        torch.testing.assert_close(layer.codes, rtn.get_submodule(name).codes, atol=0, rtol=0)
        torch.testing.assert_close(layer.weight, rtn.get_submodule(name).weight, atol=0, rtol=0)


def rtn_error(x: torch.Tensor, w: torch.Tensor, config: AWQConfig) -> float:
    return float((x @ config.fake_quantize(w, config.group_size).T - x @ w.T).pow(2).sum())


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    bits=st.sampled_from([3, 4]),
    symmetric=st.booleans(),
    group_size=st.sampled_from([0, 16, 32]),
)
def test_searched_scale_error_at_most_round_to_nearest(
    seed: int, bits: int, symmetric: bool, group_size: int
) -> None:
    torch.manual_seed(seed)
    x, w = outlier_rows(128, 64, seed), torch.randn(24, 64) * 0.1
    config = AWQConfig(bits=bits, symmetric=symmetric, group_size=group_size)
    s, alpha = search_scale(x, [w], x.abs().mean(0), config, group_size)
    err = float((x / s @ config.fake_quantize(w * s, group_size).T - x @ w.T).pow(2).sum())
    assert 0 <= alpha < 1 and s.shape == (64,)
    assert err <= rtn_error(x, w, config) * (1 + 1e-6)


def test_layer_output_error_below_round_to_nearest_with_outliers() -> None:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(64, 48)).eval()
    x = outlier_rows(256, 64, 1)
    calib = [(x[i : i + 64], None) for i in range(0, 256, 64)]
    rtn = ns.quantize.weight_only(layer, bits=4, group_size=32)
    awq = ns.quantize.awq(layer, bits=4, group_size=32, symmetric=True, calib_data=calib)
    with torch.no_grad():
        ref = layer(x)
        err_awq, err_rtn = ((m(x) - ref).pow(2).sum() for m in (awq, rtn))
    assert err_awq < 0.8 * err_rtn  # measured: about 0.3x
    assert packed(awq)["0"].input_scale is not None  # no norm before it: an explicit scale


def transformer_calib() -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(16, 1, 8, 8, generator=g), None) for _ in range(2)]


def test_pre_ln_norms_absorb_the_scales() -> None:
    torch.manual_seed(0)
    model = DigitsTransformer().eval()
    calib = transformer_calib()
    out = ns.quantize.awq(model, bits=4, group_size=16, calib_data=calib)
    layers = packed(out)
    assert len(layers) == len(packed(ns.quantize.weight_only(model, bits=4, embeddings=False)))
    for block in ("blocks.0", "blocks.1"):  # q, k, v after norm1 and mlp.0 after norm2: folded
        for reader in ("attn.q", "attn.k", "attn.v", "mlp.0"):
            assert layers[f"{block}.{reader}"].input_scale is None
        for after_op in ("attn.out", "mlp.2"):  # after attention / GELU: explicit
            assert layers[f"{block}.{after_op}"].input_scale is not None
        norm, before = out.get_submodule(f"{block}.norm1"), model.get_submodule(f"{block}.norm1")
        assert not torch.equal(norm.weight, before.weight)
    x = calib[0][0]
    with torch.no_grad():
        ref, got = model(x), out(x)
        rtn = ns.quantize.weight_only(model, bits=4, group_size=16, embeddings=False)(x)
    assert (got - ref).pow(2).sum() <= (rtn - ref).pow(2).sum()


def test_asymmetric_zero_points_sequential_bert_and_artifact(tmp_path: Path) -> None:
    model, calib = tiny_bert()
    out = ns.quantize.awq(model, bits=3, group_size=16, calib_data=calib)  # zero points: default
    layers = packed(out)
    assert len(layers) == 3 * 6 + 1  # six Linears a layer and the pooler
    for layer in layers.values():
        zeros = layer.zero_points()
        assert zeros is not None and int(zeros.min()) >= 0 and int(zeros.max()) <= 7
    ns.save(out, tmp_path / "a")
    loaded = ns.load(tmp_path / "a", model=tiny_bert()[0])
    (inputs, _) = calib[0]
    with torch.no_grad():
        a, b = out(**inputs).last_hidden_state, loaded(**inputs).last_hidden_state
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_bits_8_and_non_sequential() -> None:
    calib = [(outlier_rows(16, 64, 0), None)]
    out = ns.quantize.awq(MLP, bits=8, group_size=0, sequential=False, calib_data=calib)
    assert all(layer.codec == "int8" for layer in packed(out).values())
    x = calib[0][0]
    with torch.no_grad():
        torch.testing.assert_close(out(x), MLP(x), atol=0.05, rtol=0.02)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"bits": 8, "symmetric": False}, "symmetric: false"),
        ({"bits": 5}, "bits"),
        ({"grid": 0}, "grid"),
        ({"blocks": ["0"], "sequential": False}, "blocks applies with sequential"),
        ({"search_rows": 4}, "search_rows"),
    ],
)
def test_bad_options_are_named(options: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ns.quantize.awq(MLP, calib_data=[(torch.randn(4, 64), None)], **options)


def test_calibration_data_is_required_before_anything_runs() -> None:
    with pytest.raises(MissingInputError, match="calib_data"):
        ns.quantize.awq(MLP)
    with pytest.raises(Exception, match="calib_data is empty"):
        ns.quantize.awq(MLP, calib_data=[])
