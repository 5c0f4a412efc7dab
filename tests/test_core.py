"""Registry, option validation, Targets and Context: the contracts every technique relies on."""

from __future__ import annotations

import pytest
import torch
from pydantic import Field
from torch import nn

import netshrink as ns
from netshrink import registry
from netshrink.config import TechniqueConfig
from netshrink.context import Context
from netshrink.errors import ConfigError, DataError, MissingInputError, TargetError
from netshrink.targets import Targets


class ScaleConfig(TechniqueConfig):
    factor: float = Field(0.5, gt=0, le=1, description="multiply every weight by this")
    targets: Targets = Field(default_factory=Targets, description="layers to scale")


@pytest.fixture
def scale(monkeypatch):
    """Register a tiny technique, prune.scale_test, for the duration of a test."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @registry.technique("prune.scale_test", ScaleConfig, needs=("example_inputs",))
    def scale_fn(model: nn.Module, config: ScaleConfig, ctx: Context) -> nn.Module:
        """Scale the selected layers' weights."""
        for layer in config.targets.select(model, default_types=(nn.Linear,)).values():
            layer.weight.data.mul_(config.factor)
        return model

    return registry.python_api("prune.scale_test")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_technique_runs_on_a_copy(scale):
    model = mlp()
    before = model[0].weight.clone()
    out = scale(model, factor=0.5, example_inputs=(torch.randn(1, 4),))
    assert torch.equal(model[0].weight, before)
    assert torch.allclose(out[0].weight, before * 0.5)


@pytest.mark.parametrize(
    ("options", "key", "fragment"),
    [
        ({"factr": 0.5}, "factr", "did you mean 'factor'"),
        ({"factor": 2.0}, "factor", "less than or equal to 1"),
        ({"factor": "big"}, "factor", "valid number"),
        ({"targets": {"include": ["nope*"], "bogus": 1}}, "targets.bogus", "unknown option"),
        ({"finetune": {"epochs": -1}}, "finetune.epochs", "greater than or equal to 0"),
    ],
)
def test_bad_options_name_the_key(scale, options, key, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        scale(mlp(), example_inputs=(torch.randn(1, 4),), **options)
    assert info.value.key == key
    assert "prune.scale_test" in str(info.value)


def test_options_must_be_a_mapping(scale):
    with pytest.raises(ConfigError, match="mapping"):
        registry.get("prune.scale_test").make_config([1, 2])


def test_missing_context_is_reported_before_touching_the_model(scale):
    with pytest.raises(MissingInputError, match="example_inputs"):
        scale(mlp())


def test_finetune_adds_train_data_need(scale):
    with pytest.raises(MissingInputError, match="train_data"):
        scale(mlp(), example_inputs=(torch.randn(1, 4),), finetune={"epochs": 1})


def test_finetune_runs_the_training_loop(scale):
    model = mlp()
    data = [(torch.randn(8, 4), torch.randint(0, 2, (8,))) for _ in range(4)]
    out = scale(
        model,
        example_inputs=(torch.randn(1, 4),),
        train_data=data,
        finetune={"epochs": 2, "lr": 0.1},
        progress=False,
    )
    assert not torch.allclose(out[2].weight, model[2].weight * 0.5)
    assert not out.training


def test_nan_weights_are_rejected(scale):
    model = mlp()
    model[0].weight.data[0, 0] = float("nan")
    with pytest.raises(DataError, match=r"0\.weight"):
        scale(model, example_inputs=(torch.randn(1, 4),))


def test_unknown_technique_suggests_and_lists():
    with pytest.raises(ConfigError, match="unknown technique"):
        registry.get("prune.magnitud_zz")


def test_technique_names_are_checked():
    with pytest.raises(ValueError, match="technique name must be"):
        registry.technique("compress_thing", ScaleConfig)


def test_family_namespace_exposes_registered_techniques():
    for tech in registry.all_techniques():
        family, name = tech.name.split(".")
        assert callable(getattr(getattr(ns, family), name))


class TestTargets:
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 8), nn.Linear(8, 2)
    )

    def test_default_types_and_exclude_wins(self):
        sel = Targets(exclude=("4",)).select(self.model, default_types=(nn.Linear, nn.Conv2d))
        assert list(sel) == ["0", "3"]

    def test_regex_and_type_names(self):
        assert list(Targets(include=("re:[34]",), types=("Linear",)).select(self.model)) == [
            "3",
            "4",
        ]

    @pytest.mark.parametrize(
        ("targets", "fragment"),
        [
            (Targets(include=("encoder.*",)), "matches no module"),
            (Targets(exclude=("re:9+",)), "matches no module"),
            (Targets(types=("LSTM",)), "type 'LSTM' is not in the model"),
            (Targets(include=("re:[",)), "bad regular expression"),
            (Targets(include=("1",)), "no module selected"),
        ],
    )
    def test_errors(self, targets, fragment):
        with pytest.raises(TargetError, match=fragment):
            targets.select(self.model, default_types=(nn.Linear,))


def test_context_require_lists_every_missing_item():
    with pytest.raises(MissingInputError, match="calib_data, teacher"):
        Context().require(["calib_data", "teacher"], "quantize.static")
    Context(teacher=nn.Linear(1, 1)).require(["teacher"], "distill.kd")
