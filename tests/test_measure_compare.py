"""measure() and compare(): rates computed from their own measurements, tables, errors."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from measure_models import MLP
from netshrink.errors import ConfigError, DataError, MissingInputError
from netshrink.measure import Timing, compare, measure, saved_bytes

X = (torch.randn(4, 512),)


def _linear_stack(n: int) -> nn.Module:
    torch.manual_seed(n)
    return nn.Sequential(*[nn.Linear(512, 512, bias=False) for _ in range(n)])


def _fixed_metric(scores: dict[int, float]):  # type: ignore[no-untyped-def]
    def score(model: nn.Module, batches: object) -> float:
        return scores[len(model)]

    return score


def test_compare_rates_come_from_its_own_measurements() -> None:
    base, half = _linear_stack(2), _linear_stack(1)  # 2 MB and 1 MB of fp32 weights
    data = [(X[0], torch.zeros(4, dtype=torch.long))]
    result = compare(
        base, half, X, evaluate=_fixed_metric({2: 0.9, 1: 0.75}), data=data, timing=Timing(runs=20)
    )
    b, c = result.baseline, result.candidate
    assert b.bytes == saved_bytes(base) and c.bytes == saved_bytes(half)
    assert result.compression_rate == b.bytes / c.bytes
    assert result.compression_rate == pytest.approx(2.0, rel=0.01)  # manifest overhead < 1%
    assert result.speedup_rate == b.latency_ms / c.latency_ms
    assert result.metric_drop == pytest.approx(0.15)
    assert (b.params, c.params) == (2 * 512 * 512, 512 * 512)
    assert b.macs == 2 * c.macs == 2 * 4 * 512 * 512
    assert b.runtime == c.runtime == "eager" and b.threads == c.threads == torch.get_num_threads()
    assert b.runs == c.runs == 20 and b.batch_size == 4
    table = str(result)
    assert "compression rate 2.00x" in table and "size on disk (bytes" in table
    as_json = json.loads(json.dumps(result.to_dict()))
    assert as_json["compression_rate"] == result.compression_rate
    assert as_json["candidate"]["bytes"] == c.bytes


def test_measure_records_threads_restores_state_and_prints_definitions() -> None:
    model = MLP().train()
    before = torch.get_num_threads()
    m = measure(model, (torch.randn(3, 1, 8, 8),), timing=Timing(threads=1, warmup=2))
    assert m.threads == 1 and torch.get_num_threads() == before
    assert model.training  # measured in eval mode, then restored
    assert m.metric is None and m.latency_p90_ms >= m.latency_ms > 0
    text = str(m)
    assert "MACs (multiply-accumulates per forward, batch 3)" in text
    assert "threads 1" in text and "not measured" in text  # no metric without data
    assert m.to_dict()["nonzero_params"] == m.nonzero_params


def test_default_metric_is_accuracy_on_the_timed_runtime(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = MLP().eval()
    x = torch.randn(6, 1, 8, 8)
    data = [(x, model(x).argmax(-1))]  # the model's own predictions: accuracy 1.0
    m = measure(model, (x,), data=data, timing=Timing("onnxruntime", threads=1, warmup=1))
    assert m.metric == 1.0 and m.metric_name == "accuracy" and m.runtime == "onnxruntime"


def test_models_with_different_output_shapes_are_not_compared() -> None:
    with pytest.raises(DataError, match=r"output shapes"):
        compare(nn.Linear(512, 10), nn.Linear(512, 5), X, timing=Timing(warmup=0))


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        (lambda: {"timing": Timing("tensorrt")}, ConfigError, "unknown runtime 'tensorrt'"),
        (lambda: {"timing": Timing(runs=19)}, ConfigError, "runs must be an integer >= 20"),
        (lambda: {"timing": Timing(warmup=-1)}, ConfigError, "warmup must be an integer >= 0"),
        (lambda: {"timing": Timing(threads=0)}, ConfigError, "threads must be a positive"),
        (lambda: {"evaluate": lambda m, b: 1.0}, MissingInputError, "evaluate needs data"),
    ],
)
def test_bad_settings_fail_before_measuring(settings, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        measure(MLP(), (torch.randn(2, 1, 8, 8),), **settings())
