"""quantize.smoothquant: same float function, even activations, better static int8."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import netshrink as ns
from foreign_models import hugging_face
from netshrink.calibrate import Capture, collect
from netshrink.errors import ConfigError, MissingInputError, UnsupportedModuleError
from netshrink.quantize.smooth_observe import Producer, _note_output
from netshrink.quantize.smoothed import SmoothedLinear
from netshrink.quantize.smoothquant import (
    ALPHAS,
    cross_validated_alpha,
    int8_error,
    search_alpha,
    smoothing_scales,
)
from test_calibrate import tiny_bert

OUTLIER = 40.0
"""Gain of the one LayerNorm channel that carries activation outliers (as LLMs and BERTs do)."""


class PreNorm(nn.Module):
    """x + fc2(relu(fc1(norm(x)))) with Q/K/V-like siblings: three Linears read one norm."""

    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.side_a, self.side_b = (nn.Linear(dim, 2 * dim) for _ in range(3))
        self.fc2 = nn.Linear(2 * dim, dim)
        with torch.no_grad():
            self.norm.weight[3] = OUTLIER
            self.norm.bias.normal_(0, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        mixed = torch.relu(self.fc1(h)) + self.side_a(h) + self.side_b(h)
        return x + self.fc2(mixed)


def pre_norm() -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    return PreNorm().eval(), [(torch.randn(8, 16, 32), None), (torch.randn(8, 16, 32), None)]


def encoder(norm_first: bool) -> tuple[nn.Module, list]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        16, 2, 32, dropout=0.0, batch_first=True, norm_first=norm_first
    )
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    return model, [(torch.randn(4, 6, 16), None)]


def tiny_vit() -> tuple[nn.Module, list]:
    """The contract test's random 2-layer Hugging Face ViT (pre-LN blocks) and two batches."""
    pytest.importorskip("transformers")
    vit = next(f for f in hugging_face() if f.name == "hf_vit")
    return vit.build(), vit.batches()


def outputs(model: nn.Module, batches: list) -> torch.Tensor:
    with torch.no_grad():
        outs = [model(**x) if isinstance(x, dict) else model(x) for x, _ in batches]
    return torch.cat([getattr(o, "last_hidden_state", o).flatten() for o in outs])


def assert_same_function(before: nn.Module, after: nn.Module, batches: list) -> None:
    ref, got = outputs(before, batches), outputs(after, batches)
    assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("alpha", [0.5, "auto"])
@pytest.mark.parametrize("build", [pre_norm, tiny_vit, lambda: encoder(norm_first=True)])
def test_smoothing_leaves_the_float_function_unchanged(build, alpha) -> None:
    model, calib = build()
    smoothed = ns.quantize.smoothquant(model, alpha=alpha, calib_data=calib)
    assert_same_function(model, smoothed, calib)
    before = dict(model.named_parameters())  # a SmoothedLinear holds scaled_weight instead
    changed = [
        n
        for n, p in smoothed.named_parameters()
        if n not in before or not torch.equal(p, before[n])
    ]
    assert changed


def test_vit_smooths_each_norm_into_the_linears_that_read_it() -> None:
    model, calib = tiny_vit()
    smoothed = ns.quantize.smoothquant(model, calib_data=calib)
    for i in range(2):
        block = f"layers.{i}"  # transformers 5 names
        for name in ("layernorm_before", "layernorm_after"):
            assert not torch.equal(
                smoothed.get_parameter(f"{block}.{name}.weight"),
                model.get_parameter(f"{block}.{name}.weight"),
            )
        # q, k and v share one s: their columns are scaled alike
        ratios = [
            smoothed.get_parameter(f"{block}.attention.{p}.weight")
            / model.get_parameter(f"{block}.attention.{p}.weight")
            for p in ("q_proj", "k_proj", "v_proj")
        ]
        assert torch.allclose(ratios[0], ratios[1], rtol=1e-4)
        assert torch.allclose(ratios[0], ratios[2], rtol=1e-4)


@settings(max_examples=10, deadline=None)
@given(alpha=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_a_linear_feeding_linears_keeps_the_function_for_any_alpha(alpha: float, seed: int) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 12), nn.Linear(12, 4)).eval()
    with torch.no_grad():
        model[0].weight[5] *= 30  # an outlier output channel of the first layer
    calib = [(torch.randn(16, 8), None)]
    smoothed = ns.quantize.smoothquant(model, alpha=alpha, calib_data=calib)
    assert_same_function(model, smoothed, calib)


def channel_absmax(model: nn.Module, name: str, batches: list) -> torch.Tensor:
    seen = Capture(limit=len(batches))
    collect(model, {name: [seen]}, batches, "test", show=False)
    return torch.cat([t.flatten(0, -2) for t in seen.tensors]).abs().amax(0)


def spread(absmax: torch.Tensor) -> float:
    return float(absmax.max() / absmax.median())


def test_the_activation_channels_become_even() -> None:
    model, calib = pre_norm()
    smoothed = ns.quantize.smoothquant(model, calib_data=calib)
    before, after = channel_absmax(model, "fc1", calib), channel_absmax(smoothed, "fc1", calib)
    assert spread(before) > 10
    assert spread(after) < spread(before) / 3


def test_auto_alpha_is_on_the_grid_and_no_worse_than_one_half() -> None:
    model, calib = pre_norm()
    x = torch.cat([b.flatten(0, -2) for b in [model.norm(b) for b, _ in calib]]).detach()
    weights = [model.fc1.weight, model.side_a.weight, model.side_b.weight]
    absmax = x.abs().amax(0)
    alpha = search_alpha(x, absmax, weights)
    assert alpha in ALPHAS and 0 <= alpha <= 1
    best = int8_error(x, weights, smoothing_scales(absmax, weights, alpha))
    assert best <= int8_error(x, weights, smoothing_scales(absmax, weights, 0.5))
    assert best < int8_error(x, weights, torch.ones_like(absmax))  # smoothing helps here


def spiky_batches(seed: int, n: int = 8) -> list[torch.Tensor]:
    """Activation batches where each batch has one large value in a random channel: a channel's
    calibration maximum says little about the next batch's."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(64, 32, generator=g) * torch.linspace(0.5, 2, 32)
        channel, row = (
            int(torch.randint(32, (1,), generator=g)),
            int(torch.randint(64, (1,), generator=g)),
        )
        x[row, channel] = 25.0
        out.append(x)
    return out


def test_cross_validated_alpha_generalizes_where_the_fitted_search_overfits() -> None:
    torch.manual_seed(0)
    weights = [torch.randn(48, 32)]
    stats = Producer()
    for x in spiky_batches(0):
        _note_output(stats, x, 512)
    assert stats.calls == 8 and len(stats.halves[0].rows) == len(stats.halves[1].rows) == 4
    fitted = search_alpha(torch.cat(stats.rows), stats.absmax, weights, (stats.lo, stats.hi))
    chosen = cross_validated_alpha(stats, weights)
    new = torch.cat(spiky_batches(1))  # new data: its spikes fall in other channels

    def error(alpha: float) -> float:  # s and range from all calibration data, as applied
        s = smoothing_scales(stats.absmax, weights, alpha)
        return int8_error(new, weights, s, (stats.lo, stats.hi))

    assert chosen != fitted and error(chosen) < 0.2 * error(fitted)


def test_cross_validation_needs_two_calls_else_searches_every_row() -> None:
    weights = [torch.randn(48, 32)]
    stats = Producer()
    _note_output(stats, spiky_batches(0, 1)[0], 512)
    x = torch.cat(stats.rows)
    assert cross_validated_alpha(stats, weights) == search_alpha(
        x, stats.absmax, weights, (stats.lo, stats.hi)
    )


def static_errors(model: nn.Module, calib: list) -> tuple[float, float]:
    """Output error of static int8 without and with ``smoothquant(alpha=auto)`` before it."""
    plain = ns.quantize.static(model, calib_data=calib)
    smooth = ns.quantize.static(
        ns.quantize.smoothquant(model, alpha="auto", calib_data=calib), calib_data=calib
    )
    ref = outputs(model, calib)
    return float((outputs(plain, calib) - ref).norm()), float((outputs(smooth, calib) - ref).norm())


def test_smoothing_lowers_the_static_int8_error_on_outlier_channels() -> None:
    err_plain, err_smooth = static_errors(*pre_norm())
    assert err_smooth < 0.7 * err_plain, (err_smooth, err_plain)


def test_post_norm_blocks_are_refused_without_in_layer_smoothing() -> None:
    model, calib = tiny_bert()
    with pytest.raises(
        UnsupportedModuleError,
        match=r"nothing to smooth in BertModel.*intermediate\.dense \(after .*also feeds add",
    ):
        ns.quantize.smoothquant(model, calib_data=calib, in_layer=False)
    model, calib = encoder(norm_first=False)
    with pytest.raises(
        UnsupportedModuleError, match=r"layers\.0\.linear1 \(after layers\.0\.norm1"
    ):
        ns.quantize.smoothquant(model, calib_data=calib, in_layer=False)


@pytest.mark.parametrize("alpha", [0.5, "auto"])
def test_post_norm_bert_is_smoothed_in_the_layers_and_keeps_its_function(alpha) -> None:
    model, calib = tiny_bert()
    smoothed = ns.quantize.smoothquant(model, alpha=alpha, calib_data=calib)
    assert_same_function(model, smoothed, calib)
    kinds = {n: type(m) for n, m in smoothed.named_modules()}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert all(kinds[n] is SmoothedLinear for n in linears)  # the pooler's dense too
    norms = [n for n, _ in smoothed.named_parameters() if "LayerNorm" in n]
    assert norms  # nothing folded: every norm also feeds a residual
    assert all(torch.equal(smoothed.get_parameter(n), model.get_parameter(n)) for n in norms)
    for i in range(3):  # q, k and v read one LayerNorm output: one s
        attn = smoothed.get_submodule(f"encoder.layer.{i}.attention.self")
        assert torch.equal(attn.query.smooth, attn.key.smooth)
        assert torch.equal(attn.query.smooth, attn.value.smooth)
        out = smoothed.get_submodule(f"encoder.layer.{i}.output.dense")
        assert not torch.equal(out.smooth, torch.ones_like(out.smooth))


def test_post_norm_smoothing_then_static_beats_plain_static_on_outliers() -> None:
    model, calib = tiny_bert()
    with torch.no_grad():  # an outlier channel in every LayerNorm, as trained BERTs have
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight[3] = OUTLIER
    err_plain, err_smooth = static_errors(model, calib)
    assert err_smooth < 0.8 * err_plain, (err_smooth, err_plain)  # measured: 0.72


def test_a_pre_norm_encoder_smooths_the_norms_that_feed_only_linears() -> None:
    model, calib = encoder(norm_first=True)
    smoothed = ns.quantize.smoothquant(model, calib_data=calib)
    for i in range(2):
        # norm1 feeds MultiheadAttention's in-projection (a parameter, no Linear): untouched
        for p in ("norm1.weight", "self_attn.in_proj_weight", "self_attn.out_proj.weight"):
            assert torch.equal(
                smoothed.get_parameter(f"layers.{i}.{p}"), model.get_parameter(f"layers.{i}.{p}")
            )
        for p in ("norm2.weight", "linear1.weight"):
            assert not torch.equal(
                smoothed.get_parameter(f"layers.{i}.{p}"), model.get_parameter(f"layers.{i}.{p}")
            )


def test_a_linear_also_called_on_another_input_is_left_alone() -> None:
    class Shared(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 8)
            self.norm2, self.head = nn.LayerNorm(8), nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.norm(x)) + self.fc(x) + self.head(self.norm2(x))

    model, calib = Shared().eval(), [(torch.randn(4, 8), None)]
    with pytest.warns(UserWarning, match=r"fc \(after norm: fc .*other inputs"):
        smoothed = ns.quantize.smoothquant(model, calib_data=calib, in_layer=False)
    assert torch.equal(smoothed.fc.weight, model.fc.weight)
    assert torch.equal(smoothed.norm.weight, model.norm.weight)
    assert not torch.equal(smoothed.head.weight, model.head.weight)
    # in the layer, fc is smoothed on both of its inputs; the norm stays as it is
    smoothed = ns.quantize.smoothquant(model, calib_data=calib)
    assert isinstance(smoothed.fc, SmoothedLinear)
    assert torch.equal(smoothed.norm.weight, model.norm.weight)
    assert_same_function(model, smoothed, calib)


class Peek(nn.Module):
    """Returns a norm's output beside the Linear reading it, or changes it in place first."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.norm, self.fc, self.in_place = nn.LayerNorm(8), nn.Linear(8, 8), in_place

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(x)
        if self.in_place:
            h.add_(1.0)
            return self.fc(h), x
        return self.fc(h), h


@pytest.mark.parametrize(("in_place", "reader"), [(False, "model's outputs"), (True, "add_")])
def test_a_norm_output_read_by_anything_but_linears_is_refused(in_place: bool, reader: str) -> None:
    with pytest.raises(UnsupportedModuleError, match=f"also feeds (the )?{reader}"):
        ns.quantize.smoothquant(
            Peek(in_place).eval(), calib_data=[(torch.randn(4, 8), None)], in_layer=False
        )


def test_bad_options_and_missing_data_leave_the_model_alone() -> None:
    model, calib = pre_norm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(MissingInputError, match="calib_data"):
        ns.quantize.smoothquant(model)
    with pytest.raises(ConfigError, match="alpha"):
        ns.quantize.smoothquant(model, alpha=1.5, calib_data=calib)
    with pytest.raises(ConfigError, match="alpha"):
        ns.quantize.smoothquant(model, alpha="best", calib_data=calib)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
