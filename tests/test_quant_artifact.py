"""Every quantize technique survives netshrink.artifact save -> load with identical outputs."""

from __future__ import annotations

import pytest
import torch

import netshrink as ns
from netshrink.artifact import artifact_bytes, load, save
from quant_fixtures import ResCNN, digits
from test_quant_weights import Tiny, inputs

# Ratios of whole artifacts (tensor file + JSON manifest) of tiny models, where per-tensor
# headers and scales weigh; on zoo:digits-cnn static int8 reaches 3.9x (docs/benchmarks).
CNN_CASES = [
    ("static", {"progress": False}, 3.0),
    ("static", {"weights": "int4", "progress": False}, 4.5),
    ("qat", {"bits": 4, "epochs": 1, "progress": False}, 4.5),
    ("qat", {"bits": 4, "activation_bits": 4, "epochs": 1, "progress": False}, 4.5),
]
TINY_CASES = [
    ("dynamic", {}, 2.9),
    ("weight_only", {}, 2.0),  # the embedding table stays float32
    ("weight_only", {"bits": 4, "group_size": 8}, 2.0),
    ("half", {"dtype": "bf16"}, 1.6),
    ("binary", {}, 1.05),  # first and last layers and the embedding stay float
    ("ternary", {"keep_first_last": False}, 2.5),
]


def cnn() -> ResCNN:
    torch.manual_seed(0)
    return ResCNN(32).eval()


@pytest.mark.parametrize(("name", "options", "ratio"), CNN_CASES)
def test_cnn_round_trip(tmp_path, name, options, ratio) -> None:
    model, data = cnn(), digits()[0][:2]
    q = getattr(ns.quantize, name)(model, calib_data=data, train_data=data, **options)
    save(model, tmp_path / "fp32")
    save(q, tmp_path / "q")
    back = load(tmp_path / "q", model=cnn())
    x = digits()[1][0][0]
    assert torch.equal(back(x), q(x))
    assert artifact_bytes(tmp_path / "fp32") / artifact_bytes(tmp_path / "q") >= ratio


@pytest.mark.parametrize(("name", "options", "ratio"), TINY_CASES)
def test_tiny_round_trip(tmp_path, name, options, ratio) -> None:
    torch.manual_seed(0)
    model = Tiny().eval()
    q = getattr(ns.quantize, name)(model, **options)
    save(model, tmp_path / "fp32")
    save(q, tmp_path / "q")
    torch.manual_seed(3)
    back = load(tmp_path / "q", model=Tiny())
    assert torch.equal(back(*inputs()), q(*inputs()))
    assert artifact_bytes(tmp_path / "fp32") / artifact_bytes(tmp_path / "q") >= ratio
