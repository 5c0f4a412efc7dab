"""Goal strings of ``netshrink compress --target`` and ``ns.search.auto``."""

import pytest
import torch
from torch import nn

from netshrink.errors import ConfigError
from netshrink.search import Goal, auto, parse_target


def test_parses_rates_numbers_and_drop():
    t = parse_target("size=20x,max_drop=0.01")
    assert t == Goal(size=20.0, max_drop=0.01)
    assert (t.kind, t.resource) == ("size", "bytes")
    assert parse_target("speedup=3").speedup == 3.0
    assert parse_target(" latency_ms = 1.5 ").resource == "macs"
    assert parse_target("size_mb=0.2").kind == "size_mb"
    assert str(t) == "size=20x,max_drop=0.01"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "exactly one of"),
        ("max_drop=0.01", "exactly one of"),
        ("size=2x,speedup=2x", "exactly one of"),
        ("size=abc", "not a number"),
        ("size=1x", "above 1"),
        ("size=-3", "> 0"),
        ("latency_ms=0", "> 0"),
        ("size=4x,max_drop=1.5", "in (0, 1)"),
        ("sise=4x", "key among"),
        ("size4x", "key=value"),
        ("size=4x,size=5x", "twice"),
        ("size=nan", "> 0"),
    ],
)
def test_bad_targets_raise_config_error_naming_the_problem(text, says):
    with pytest.raises(ConfigError) as info:
        parse_target(text)
    assert says in str(info.value)


def test_auto_checks_target_and_rounds_before_touching_the_model():
    model = nn.Linear(2, 2)
    kwargs = {"example_inputs": (torch.zeros(1, 2),), "val_data": []}
    with pytest.raises(ConfigError, match="exactly one of"):
        auto(model, "max_drop=0.1", **kwargs)
    with pytest.raises(ConfigError, match="at least one round"):
        auto(model, "size=2x", rounds=0, **kwargs)
