"""quantize.qat: LSQ training converted exactly like quantize.static."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import netshrink as ns
from netshrink.config import TrainConfig
from netshrink.errors import MissingInputError
from netshrink.quantize.layers import QuantConv2d, QuantLinear
from netshrink.train import fit
from quant_fixtures import ResCNN, digits


@pytest.fixture(scope="module")
def model() -> ResCNN:
    torch.manual_seed(0)
    return ResCNN(8).eval()


def loss(m: torch.nn.Module, batches: list) -> float:
    with torch.no_grad():
        return sum(float(F.cross_entropy(m(x), y)) for x, y in batches) / len(batches)


def test_zero_epochs_equals_static_int4(model) -> None:
    calib = digits()[0][:2]
    q = ns.quantize.qat(model, train_data=calib, bits=4, epochs=0, progress=False)
    p = ns.quantize.static(model, calib_data=calib, weights="int4", progress=False)
    assert isinstance(q.blocks[0].conv1, QuantConv2d) and q.blocks[0].conv1.bits == 4
    x = digits()[1][0][0]
    # the learned scale round-trips through log/exp: equal up to float rounding
    assert torch.allclose(q(x), p(x), rtol=1e-4, atol=1e-4)


def test_4bit_activations_use_16_codes_and_match_static(model) -> None:
    calib = digits()[0][:2]
    q = ns.quantize.qat(
        model, train_data=calib, bits=4, activation_bits=4, epochs=0, progress=False
    )
    p = ns.quantize.static(
        model, calib_data=calib, weights="int4", activations="int4", progress=False
    )
    x = digits()[1][0][0]
    assert torch.allclose(q(x), p(x), rtol=1e-4, atol=1e-4)
    kw = {"weights": "int4", "activations": "int4", "per_channel": False, "progress": False}
    per_tensor = ns.quantize.qat(
        model, train_data=calib, bits=4, activation_bits=4, per_channel=False, epochs=0,
        progress=False,
    )  # fmt: skip
    assert torch.allclose(per_tensor(x), ns.quantize.static(model, calib_data=calib, **kw)(x),
                          rtol=1e-4, atol=1e-4)  # fmt: skip
    assert per_tensor.blocks[0].conv2.weight_scale.unique().numel() == 1
    layer = q.blocks[0].conv2
    assert layer.act_bits == 4
    seen = []
    hook = layer.register_forward_hook(lambda _m, a, _y: seen.append(a[0]))
    q(x)
    hook.remove()
    codes = torch.round(seen[0] / layer.input_scale + layer.input_zero_point)
    assert 2 < codes.unique().numel() <= 16 and codes.min() >= 0 and codes.max() <= 15


def test_training_with_4bit_activations_lowers_the_loss() -> None:
    torch.manual_seed(0)
    model = ResCNN(8)
    train = digits()[0][:6]
    fit(model, train, TrainConfig(epochs=4, lr=1e-2), progress=False)
    kw = {"train_data": train, "bits": 4, "activation_bits": 4, "lr": 3e-3, "progress": False}
    p = ns.quantize.qat(model, epochs=0, **kw)
    q = ns.quantize.qat(model, epochs=3, **kw)
    # activation ranges stay as calibrated (one grid per tensor); the weights adapted to them
    assert torch.equal(p.blocks[1].conv1.input_scale, q.blocks[1].conv1.input_scale)
    assert loss(q, train) < loss(p, train) * 0.9


def test_training_lowers_the_loss_of_the_4bit_model() -> None:
    # briefly pre-trained: folding an untrained network's BatchNorm leaves it unnormalized,
    # and such a network barely trains in a few steps
    torch.manual_seed(0)
    model = ResCNN(8)
    train = digits()[0][:6]
    fit(model, train, TrainConfig(epochs=4, lr=1e-2), progress=False)
    p = ns.quantize.static(model, calib_data=train, weights="int4", progress=False)
    q = ns.quantize.qat(model, train_data=train, bits=4, epochs=3, lr=3e-3, progress=False)
    assert isinstance(q.fc, QuantLinear)
    codes = q.blocks[1].conv2.weight_codes()
    assert int(codes.abs().max()) <= 7
    assert loss(q, train) < loss(p, train) * 0.9


def test_mixed_precision_and_needs() -> None:
    torch.manual_seed(0)
    m = ResCNN(8).eval()
    q = ns.quantize.qat(
        m,
        train_data=digits()[0][:2],
        bits=3,
        epochs=0,
        overrides=[{"targets": {"include": ["stem.0", "fc"]}, "bits": 8}],
        progress=False,
    )
    assert q.stem[0].bits == 8 and q.fc.bits == 8 and q.blocks[0].conv1.bits == 3
    assert int(q.blocks[0].conv1.weight_codes().abs().max()) <= 3
    with pytest.raises(MissingInputError, match="train_data"):
        ns.quantize.qat(m, bits=4)


def test_qat_validates_each_epoch_and_keeps_the_start_when_training_only_hurts() -> None:
    torch.manual_seed(0)
    model = ResCNN(8)
    train, val = digits()[0][:6], digits()[1][:1]
    fit(model, train, TrainConfig(epochs=4, lr=1e-2), progress=False)
    calls: list[float] = []

    def evaluate(m: torch.nn.Module, batches: list) -> float:
        calls.append(-loss(m, batches))
        return calls[-1]

    kw = {"train_data": train[:2], "val_data": val, "evaluate": evaluate, "bits": 4}
    start = ns.quantize.qat(model, epochs=0, progress=False, **kw)
    assert calls == []  # nothing trained, nothing validated
    hurt = ns.quantize.qat(model, epochs=2, lr=1.0, keep_best=False, progress=False, **kw)
    assert len(calls) == 2  # after each epoch
    assert loss(hurt, val) > loss(start, val) * 1.5  # lr 1 only hurts
    calls.clear()
    kept = ns.quantize.qat(model, epochs=2, lr=1.0, progress=False, **kw)
    assert len(calls) == 3 and max(calls[1:]) < calls[0]  # the start, then each worse epoch
    x = val[0][0]
    assert torch.allclose(kept(x), start(x), rtol=0, atol=1e-6)  # the starting weights kept
