"""quantize.static's ``dynamic`` layers: int8 weights with per-token run-time input
quantization beside static layers, GPTQ codes kept, smoothing undone, options validated."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import netshrink as ns
from netshrink.context import Context
from netshrink.errors import ConfigError, TargetError
from netshrink.quantize import ptq
from netshrink.quantize.dynamic_int8 import DynamicInt8Linear
from netshrink.quantize.layers import QuantLinear

DOWN = {"include": ["down"]}


class Ffn(nn.Module):
    """Linear -> GELU -> Linear, the FFN whose second input one per-tensor range fits badly."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.act, self.down = nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


def outlier_batches(n: int, seed: int) -> list:
    """``n`` batches of 64 rows; one row in 16 is 30x larger (BERT's outlier tokens)."""
    g = torch.Generator().manual_seed(seed)
    gain = torch.ones(64, 1)
    gain[::16] = 30.0
    return [(torch.randn(64, 32, generator=g) * gain, None) for _ in range(n)]


@pytest.fixture(scope="module")
def ffn() -> Ffn:
    torch.manual_seed(0)
    return Ffn().eval()


def quantized(model: nn.Module, **options) -> nn.Module:
    return ns.quantize.static(model, calib_data=outlier_batches(4, 1), progress=False, **options)


def test_dynamic_layers_run_per_token_and_beat_a_static_range_on_outlier_tokens(ffn) -> None:
    static = quantized(ffn)
    mixed = quantized(ffn, dynamic=DOWN)
    assert isinstance(mixed.up, QuantLinear) and isinstance(mixed.down, DynamicInt8Linear)
    (x,) = [b for b, _ in outlier_batches(1, 7)]
    typical = torch.ones(64, dtype=torch.bool)
    typical[::16] = False  # the rows a per-tensor range set by the outliers serves worst
    with torch.no_grad():
        h = ffn.act(ffn.up(x))  # the same float input to both second layers
        ref = ffn.down(h)
        err_static = (static.down(h) - ref)[typical].pow(2).mean()
        err_mixed = (mixed.down(h) - ref)[typical].pow(2).mean()
    assert float(err_mixed) < 0.05 * float(err_static)


def test_gptq_rounding_gives_the_dynamic_layer_the_static_layers_codes(ffn) -> None:
    static = quantized(ffn, weight_rounding="gptq")
    mixed = quantized(ffn, weight_rounding="gptq", dynamic=DOWN)
    near = quantized(ffn, dynamic=DOWN)
    # the same Hessian (the float model's inputs) and grid, so the same codes as static
    assert torch.equal(mixed.down.weight_q, static.down.weight_q)
    assert torch.equal(mixed.down.weight_scale, static.down.weight_scale)
    assert not torch.equal(mixed.down.weight_q, near.down.weight_q)
    assert torch.equal(mixed.up.weight_q, static.up.weight_q)


def test_a_smoothed_layer_made_dynamic_computes_its_unsmoothed_weight(ffn) -> None:
    calib = outlier_batches(4, 1)
    smoothed = ns.quantize.smoothquant(ffn, alpha=0.5, calib_data=calib, progress=False)
    mixed = ns.quantize.static(smoothed, calib_data=calib, progress=False, dynamic=DOWN)
    layer = mixed.down
    assert isinstance(layer, DynamicInt8Linear)
    step = layer.weight_scale.unsqueeze(1)  # within half an int8 step of the float W
    assert bool(((layer.weight - ffn.down.weight).abs() <= step / 2 + 1e-6).all())
    assert mixed.up.smoothed  # the static layer keeps its smoothing


def test_mixed_model_saves_and_loads_with_identical_outputs(ffn, tmp_path: Path) -> None:
    mixed = quantized(ffn, weight_rounding="gptq", dynamic=DOWN)
    loaded = ns.load(ns.save(mixed, tmp_path / "mixed"), model=Ffn())
    (x,) = [b for b, _ in outlier_batches(1, 3)]
    with torch.no_grad():
        assert torch.equal(loaded(x), mixed(x))


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"targets": {"include": ["up"]}}, ConfigError, r"selects down \(stays float: outside"),
        ({"weights": "int4"}, ConfigError, r"down \(4-bit weights\)"),
        ({"overrides": [{"targets": {"include": ["down"]}, "bits": 4}]}, ConfigError, "down"),
        ({"dynamic": {"include": ["nothing*"]}}, TargetError, "nothing"),
    ],
)
def test_dynamic_must_name_8_bit_layers_static_quantizes(options, error, match) -> None:
    model = Ffn().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = ptq.StaticConfig.model_validate({"dynamic": DOWN, **options})
    ctx = Context(calib_data=outlier_batches(2, 1), progress=False)
    with pytest.raises(error, match=match):
        ptq.static(model, config, ctx)  # not via Technique.apply, which works on a copy
    assert [type(m) for m in model.children()] == [nn.Linear, nn.GELU, nn.Linear]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_dynamic_with_int4_activations_is_rejected(ffn) -> None:
    with pytest.raises(ConfigError, match="activations: int4"):
        quantized(ffn, activations="int4", dynamic=DOWN)
