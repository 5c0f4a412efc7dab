"""Latency timing: run counts, units, interleaving, timing in subprocesses, bad settings."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from netshrink.errors import ConfigError, NetshrinkError
from netshrink.measure import MIN_RUNS, Latencies, Timing, compare, time_interleaved, time_latency
from netshrink.measure.latency import time_in_subprocess, timed_how


def test_latency_has_runs_samples_in_milliseconds() -> None:
    timing = time_latency(lambda: time.sleep(0.002), runs=20, warmup=1)
    assert timing.runs == len(timing.samples_ms) == 20
    assert timing.median_ms >= 2.0  # sleep(2 ms) takes at least 2 ms


def test_median_and_p90_are_read_off_the_samples() -> None:
    samples = tuple(float(v) for v in range(1, 21))  # 1..20 ms
    timing = Latencies(samples[::-1])  # the order they were taken in does not matter
    assert timing.median_ms == 10.5  # mean of the 10th and 11th of 20
    assert timing.p90_ms == pytest.approx(18.1)  # linear interpolation at 0.9 * 19 = 17.1
    assert timing.runs == 20


def test_interleaved_rotates_the_order_and_warms_up_each() -> None:
    calls: list[str] = []
    fns = [lambda: calls.append("a"), lambda: calls.append("b"), lambda: calls.append("c")]
    timings = time_interleaved(fns, 20, 3)
    rotations = [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert calls == ["a", "b", "c"] * 3 + [x for r in range(20) for x in rotations[r % 3]]
    assert [t.runs for t in timings] == [20, 20, 20]
    assert all(t.median_ms > 0 for t in timings)


@pytest.mark.parametrize(("runs", "warmup"), [(MIN_RUNS - 1, 0), (0, 0), (20.5, 0), (20, -1)])
def test_bad_run_counts_are_config_errors(runs: object, warmup: object) -> None:
    with pytest.raises(ConfigError, match=r"runs|warmup"):
        time_latency(lambda: None, runs=runs, warmup=warmup)  # type: ignore[arg-type]


def test_each_runtime_and_thread_count_says_how_it_is_timed() -> None:
    assert timed_how("onnxruntime", 1) == timed_how("eager", 1) == "interleaved"
    assert timed_how("eager", 2) == "shared pool"
    assert timed_how("onnxruntime", 2) == timed_how("openvino", 4) == "subprocess"


def test_two_threads_on_onnx_runtime_time_each_model_in_its_own_process() -> None:
    torch.manual_seed(0)
    small = nn.Linear(16, 4).eval()
    big = nn.Sequential(nn.Linear(16, 512), nn.ReLU(), nn.Linear(512, 4)).eval()
    x = (torch.randn(64, 16),)
    both = compare(small, big, x, timing=Timing("onnxruntime", threads=2, runs=20, warmup=1))
    for m in (both.baseline, both.candidate):
        assert m.timed == "subprocess" and m.runs == 20 and m.latency_ms > 0


def test_a_failing_timing_subprocess_is_an_error_with_its_reason() -> None:
    with pytest.raises(NetshrinkError, match="subprocess failed"):
        time_in_subprocess(b"not onnx", "onnxruntime", 2, (torch.zeros(1),), runs=20, warmup=0)
