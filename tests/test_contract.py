"""The technique contract, on models nobody here wrote: every registered technique x every
foreign model ends either working (forward runs with the original's output shapes, save -> load
gives identical outputs, the artifact is not bigger, the caller's model untouched) or with a
NetshrinkError raised by ``apply`` before anything is returned; never a raw exception, a model
that crashes later, or a silent no-op."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils import _pytree as pytree

import netshrink as ns
from foreign_models import Foreign
from netshrink import registry
from netshrink.artifact.store import TENSORS_FILE
from netshrink.batches import run
from netshrink.config import TechniqueConfig
from netshrink.context import Context
from netshrink.errors import NetshrinkError, UnsupportedModuleError
from netshrink.quantize.smoothed import SmoothedLinear
from netshrink.recipe.describe import describe, docs_with_options

SMALL: dict[str, dict[str, Any]] = {
    "distill.kd": {"epochs": 1, "student": {"width": 0.5}},
    "quantize.qat": {"epochs": 1},
    "prune.magnitude": {"kernel": "dense"},
    "prune.random": {"kernel": "dense"},
    "prune.nm": {"kernel": "dense"},
    "lowrank.svd": {"ratio": 0.5},
}
"""Options that keep each technique tiny (one epoch of training, no kernel timing)."""

TECHNIQUES = [t.name for t in registry.all_techniques()]


def snapshot(model: nn.Module) -> tuple[list[Any], dict[str, torch.Tensor]]:
    """The module tree and a copy of every parameter and buffer."""
    tree = [(n, type(m)) for n, m in model.named_modules()]
    return tree, {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_model(model: nn.Module, before: tuple[list[Any], dict[str, torch.Tensor]]):
    tree, state = snapshot(model)
    assert tree == before[0]
    assert list(state) == list(before[1])
    for key, value in state.items():
        assert torch.equal(value, before[1][key]), key


def payload_bytes(artifact: Path) -> int:
    """Bytes of the tensors an artifact stores (without the JSON headers, which on models this
    small outweigh what a technique saves)."""
    tensors = load_file(str(artifact / TENSORS_FILE))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def outputs(model: nn.Module, inputs: Any) -> list[Any]:
    with torch.no_grad():
        leaves, _ = pytree.tree_flatten(run(model.eval(), inputs))
    return leaves


def new_layer_types(model: nn.Module, out: nn.Module, creates: tuple[type, ...]) -> set[type]:
    """Types in ``out`` that ``model`` did not have, not counting the insides of the layers a
    technique declares it creates (a packed RNN keeps its own ModuleDict)."""
    original = {type(m) for m in model.modules()}
    inside = {
        id(sub)
        for m in out.modules()
        if isinstance(m, creates)
        for sub in m.modules()
        if sub is not m
    }
    return {type(m) for m in out.modules() if id(m) not in inside} - original


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", TECHNIQUES)
def test_technique_is_safe_on_foreign_model(name: str, foreign: Foreign, tmp_path):
    tech = registry.get(name)
    model = foreign.build()
    before = snapshot(model)
    inputs = foreign.example_inputs()
    data = foreign.batches()
    ctx = Context(
        example_inputs=inputs,
        calib_data=data,
        train_data=data,
        teacher=model,
        progress=False,
    )
    config = tech.make_config(SMALL.get(name, {}))
    try:
        out = tech.apply(model, config, ctx)
    except NetshrinkError as exc:
        assert str(exc)
        assert_same_model(model, before)
        return
    assert_same_model(model, before)
    assert new_layer_types(model, out, tech.creates) <= set(tech.creates)
    expected = outputs(model, inputs)
    got = outputs(out, inputs)
    assert [getattr(t, "shape", None) for t in got] == [getattr(t, "shape", None) for t in expected]
    ns.save(model, tmp_path / "baseline")
    ns.save(out, tmp_path / "compressed")
    reloaded = ns.load(tmp_path / "compressed", model=foreign.build())
    for a, b in zip(outputs(reloaded, inputs), got, strict=True):
        assert torch.equal(a, b) if torch.is_tensor(a) else type(a) is type(b)
    extra = sum(4 * m.in_features for m in out.modules() if isinstance(m, SmoothedLinear))
    # only quantize.smoothquant may store more: one float smoothing vector per smoothed Linear
    assert payload_bytes(tmp_path / "compressed") <= payload_bytes(tmp_path / "baseline") + extra


DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("family", registry.families())
def test_docs_option_tables_are_generated_from_the_configs(family: str) -> None:
    text = (DOCS / f"{family}.md").read_text()
    assert docs_with_options(text, family) == text, "run: python -m netshrink.recipe.describe"


def test_every_option_has_a_description() -> None:
    missing = [
        f"{t.name} {o.name}"
        for t in registry.all_techniques()
        for o in describe(t)
        if not o.description
    ]
    assert missing == []


class Opaque(nn.Module):
    """A layer with no ``.weight``: what a parent reading ``child.weight`` trips on."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.inner = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)


class ReadsChildWeight(nn.Module):
    """A parent whose forward reads its child's weight (as HF ViT reads projection.weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.to(self.proj.weight.dtype))


class EmptyOptions(TechniqueConfig):
    pass


def wrap_linears(model: nn.Module, config: EmptyOptions, ctx: Context) -> nn.Module:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Linear):
            setattr(model, name, Opaque(child))
    return model


def identity(model: nn.Module, config: EmptyOptions, ctx: Context) -> nn.Module:
    return model


def partial(model: nn.Module, config: EmptyOptions, ctx: Context) -> nn.Module:
    with torch.no_grad():
        model[0].weight[:1].zero_()
    warnings.warn("achieved 1 of 2 rows, because the second is protected", stacklevel=2)
    return model


def raw_failure(model: nn.Module, config: EmptyOptions, ctx: Context) -> nn.Module:
    return model(torch.zeros(1, 7))


class Stop(Exception):
    pass


def _stop(_module: nn.Module, _args: Any) -> None:
    raise Stop


def stopped_then_failure(model: nn.Module, config: EmptyOptions, ctx: Context) -> nn.Module:
    """Stops a forward inside layer 0 and catches it (as calibration does), then fails in
    plain code outside any forward."""
    handle = model[0].register_forward_pre_hook(_stop)
    try:
        model(torch.zeros(1, 4))
    except Stop:
        pass
    finally:
        handle.remove()
    raise RuntimeError("the solver's matrix is singular")


@pytest.fixture
def fake_techniques():
    registry.load_all()
    fakes = {"prune.test_wrap": wrap_linears, "prune.test_identity": identity,
             "prune.test_raw": raw_failure, "prune.test_partial": partial,
             "prune.test_stopped": stopped_then_failure}  # fmt: skip
    for name, fn in fakes.items():
        registry.technique(name, EmptyOptions)(fn)
    yield {name: registry.get(name) for name in fakes}
    for name in fakes:
        registry._REGISTRY.pop(name)


def test_a_model_that_no_longer_runs_is_refused_naming_the_layer(fake_techniques) -> None:
    model, x = ReadsChildWeight(), (torch.randn(2, 4),)
    tech = fake_techniques["prune.test_wrap"]
    with pytest.raises(
        UnsupportedModuleError,
        match=r"fails in the model's own forward \(ReadsChildWeight\).*AttributeError",
    ):
        tech.apply(model, tech.make_config({}), Context(example_inputs=x))
    assert isinstance(model.proj, nn.Linear)


def test_a_technique_that_changes_nothing_is_refused(fake_techniques) -> None:
    tech = fake_techniques["prune.test_identity"]
    with pytest.raises(UnsupportedModuleError, match="changed nothing in Sequential"):
        tech.apply(nn.Sequential(nn.Linear(4, 4)), tech.make_config({}), Context())


def test_a_raw_exception_becomes_an_unsupported_module_error_naming_the_layer(
    fake_techniques,
) -> None:
    tech = fake_techniques["prune.test_raw"]
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(
        UnsupportedModuleError,
        match=r"failed on Sequential in 0 \(Linear\); leave .*\(RuntimeError",
    ):
        tech.apply(model, tech.make_config({}), Context())


def test_an_error_outside_any_forward_is_not_blamed_on_a_forward_stopped_earlier(
    fake_techniques,
) -> None:
    tech = fake_techniques["prune.test_stopped"]
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(UnsupportedModuleError) as info:
        tech.apply(model, tech.make_config({}), Context())
    assert "failed on Sequential; the model's outputs or data" in str(info.value)
    assert "(Linear)" not in str(info.value) and "singular" in str(info.value)


def test_what_a_technique_left_undone_is_in_the_stage_record(fake_techniques) -> None:
    from recipe_fakes import context, tiny_model

    recipe = {"version": 1, "stages": [{"prune.test_partial": {}}]}
    with pytest.warns(UserWarning, match="achieved 1 of 2"):
        result = ns.compress(tiny_model(trained=False), recipe, **context())
    (stage,) = result.report.stages
    assert stage.status == "applied"
    assert stage.note == "achieved 1 of 2 rows, because the second is protected"
    assert "0 prune.test_partial: achieved 1 of 2 rows" in str(result.report)


def test_the_recipe_rolls_a_refused_stage_back_and_keeps_going(fake_techniques) -> None:
    from recipe_fakes import context, tiny_model

    model = tiny_model(trained=False)
    recipe = {
        "version": 1,
        "stages": [
            {"prune.test_identity": {}},
            {"prune.magnitude": {"sparsity": 0.5, "kernel": "dense"}},
        ],
    }
    result = ns.compress(model, recipe, **context())
    first, second = result.report.stages
    assert (
        first.status == "rolled back"
        and "failed: prune.test_identity changed nothing" in first.note
    )
    assert second.status == "applied" and result.report.final is second


def test_every_search_knob_gives_valid_options_for_each_of_its_settings() -> None:
    knobs = {t.name: t for t in registry.all_techniques() if t.knob is not None}
    assert set(knobs) >= {"prune.magnitude", "quantize.weight_only", "lowrank.svd"}
    for tech in knobs.values():
        assert tech.knob is not None and tech.knob.name in tech.config.model_fields
        for value in tech.knob.values:
            config = tech.make_config(tech.knob.options(value, {"include": ["fc"]}))
            assert getattr(config, tech.knob.name) == value
            assert config.targets.include == ("fc",)


def test_structured_pruning_keeps_every_output_of_a_dict_returning_model() -> None:
    from foreign_models import DictInput, _dict_inputs

    model = DictInput().eval()
    inputs = _dict_inputs(torch.Generator().manual_seed(0))
    pruned = ns.prune.channels(model, ratio=0.5, example_inputs=inputs)
    assert [pruned.body[0].out_features, pruned.body[2].out_features] == [12, 12]
    assert (pruned.logits.out_features, pruned.score.out_features) == (4, 1)
    out = pruned(**inputs)
    assert out["logits"].shape == (4, 4) and out["score"].shape == (4, 1)
