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
from netshrink.quantize.smoothquant import ALPHAS, int8_error, search_alpha, smoothing_scales
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
    changed = [
        n for n, p in smoothed.named_parameters() if not torch.equal(p, model.get_parameter(n))
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


def test_smoothing_lowers_the_static_int8_error_on_outlier_channels() -> None:
    model, calib = pre_norm()
    plain = ns.quantize.static(model, calib_data=calib)
    smooth = ns.quantize.static(
        ns.quantize.smoothquant(model, alpha="auto", calib_data=calib), calib_data=calib
    )
    ref = outputs(model, calib)
    err_plain = float((outputs(plain, calib) - ref).norm())
    err_smooth = float((outputs(smooth, calib) - ref).norm())
    assert err_smooth < 0.7 * err_plain, (err_smooth, err_plain)


def test_post_norm_blocks_are_refused_because_the_norm_feeds_a_residual() -> None:
    model, calib = tiny_bert()
    with pytest.raises(
        UnsupportedModuleError,
        match=r"nothing to smooth in BertModel.*intermediate\.dense \(after .*also feeds add",
    ):
        ns.quantize.smoothquant(model, calib_data=calib)
    model, calib = encoder(norm_first=False)
    with pytest.raises(
        UnsupportedModuleError, match=r"layers\.0\.linear1 \(after layers\.0\.norm1"
    ):
        ns.quantize.smoothquant(model, calib_data=calib)


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
        smoothed = ns.quantize.smoothquant(model, calib_data=calib)
    assert torch.equal(smoothed.fc.weight, model.fc.weight)
    assert torch.equal(smoothed.norm.weight, model.norm.weight)
    assert not torch.equal(smoothed.head.weight, model.head.weight)


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
        ns.quantize.smoothquant(Peek(in_place).eval(), calib_data=[(torch.randn(4, 8), None)])


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
