"""Recipe parsing and validation: every malformed recipe gets its intended error, no traceback."""

from __future__ import annotations

import json

import pytest

import recipe_fakes
from netshrink.errors import ConfigError, MissingInputError, RecipeError
from netshrink.recipe import GuardConfig, json_schema, loads
from netshrink.recipe.runner import compress


@pytest.fixture(scope="module", autouse=True)
def fakes():
    with recipe_fakes.registered():
        yield


def stages(*lines: str) -> str:
    return "version: 1\nstages:\n" + "".join(f"  - {line}\n" for line in lines)


MALFORMED = [
    ("", RecipeError, "a recipe is a mapping"),
    ("[1, 2]", RecipeError, "a recipe is a mapping"),
    ("version: 1\nstages: [\n", RecipeError, "not valid YAML"),
    ("!!python/object/apply:os.system ['echo hi']", RecipeError, "not valid YAML"),
    ("stages:\n  - prune.fake_zero: {}\n", RecipeError, "missing 'version'"),
    ("version: 2\nstages:\n  - prune.fake_zero: {}\n", RecipeError, "unsupported version 2"),
    ("version: '1'\nstages:\n  - prune.fake_zero: {}\n", RecipeError, "unsupported version '1'"),
    ("version: true\nstages:\n  - prune.fake_zero: {}\n", RecipeError, "unsupported version"),
    ("version: 1\nstage: []\n", RecipeError, "unknown top-level key(s) ['stage']; valid keys"),
    ("version: 1\n", RecipeError, "'stages' must be a non-empty list"),
    ("version: 1\nstages: []\n", RecipeError, "'stages' must be a non-empty list"),
    ("version: 1\nstages: {prune.fake_zero: {}}\n", RecipeError, "must be a non-empty list"),
    ("version: 1\ndescription: 5\nstages: [x]\n", RecipeError, "'description' must be a string"),
    (stages("prune.fake_zero"), RecipeError, "stage 0: a stage is a mapping"),
    (
        stages("{prune.fake_zero: {}, prune.fake_noise: {}}"),
        RecipeError,
        "stage 0: a stage names exactly one technique",
    ),
    (stages("guard: {max_drop: 0.1}"), RecipeError, "names exactly one technique"),
    (stages("{1: {}}"), RecipeError, "names exactly one technique"),
    (
        stages("prune.fake_zero: {}", "prune.fake_zer: {}"),
        RecipeError,
        "stage 1: unknown technique 'prune.fake_zer' (did you mean 'prune.fake_zero'?)",
    ),
    (stages("os:system: {}"), RecipeError, "unknown technique 'os:system'"),
    (
        stages("prune.fake_zero: {fracton: 0.5}"),
        ConfigError,
        "stage 0 (prune.fake_zero) option 'fracton': unknown option (did you mean 'fraction'?)",
    ),
    (
        stages("prune.fake_zero: {fraction: lots}"),
        ConfigError,
        "stage 0 (prune.fake_zero) option 'fraction': Input should be a valid number",
    ),
    (
        stages("prune.fake_zero: {}", "prune.fake_zero: {fraction: 1.5}"),
        ConfigError,
        "stage 1 (prune.fake_zero) option 'fraction': Input should be less than or equal to 1",
    ),
    (stages("prune.fake_zero: [0.5]"), ConfigError, "options must be a mapping"),
    (
        stages("prune.fake_zero: {finetune: {epochs: -1}}"),
        ConfigError,
        "option 'finetune.epochs': Input should be greater than or equal to 0",
    ),
    (
        stages("prune.fake_zero: {finetune: {epoch: 1}}"),
        ConfigError,
        "option 'finetune.epoch': unknown option (did you mean 'epochs'?)",
    ),
    (
        stages("lowrank.fake_shrink: {hidden: 2.5}"),
        ConfigError,
        "option 'hidden': Input should be a valid integer",
    ),
    (
        stages("{prune.fake_zero: {}, guard: {}}"),
        ConfigError,
        "stage 0 (prune.fake_zero) guard: Value error, a guard needs max_drop or max_total_drop",
    ),
    (
        stages("{prune.fake_zero: {}, guard: {max_drop: 2}}"),
        ConfigError,
        "stage 0 (prune.fake_zero) guard option 'max_drop'",
    ),
    (
        stages("{prune.fake_zero: {}, guard: {max_drop: 0.1, on_fail: explode}}"),
        ConfigError,
        "guard option 'on_fail': Input should be 'rollback' or 'stop'",
    ),
    (
        stages("{prune.fake_zero: {}, guard: {max_dorp: 0.1}}"),
        ConfigError,
        "guard option 'max_dorp': unknown option (did you mean 'max_drop'?)",
    ),
]


@pytest.mark.parametrize(("text", "error", "fragment"), MALFORMED)
def test_malformed_recipe_raises_intended_error(text: str, error: type, fragment: str) -> None:
    with pytest.raises(error) as info:
        loads(text)
    assert fragment in str(info.value)
    if error is ConfigError:
        assert not isinstance(info.value, RecipeError) or "unknown" not in fragment


def test_unknown_technique_lists_the_registered_ones() -> None:
    with pytest.raises(RecipeError) as info:
        loads(stages("prune.nothing: {}"))
    assert "registered:" in str(info.value) and "lowrank.fake_shrink" in str(info.value)


def test_unknown_option_lists_valid_options() -> None:
    with pytest.raises(ConfigError, match="valid options: finetune, scale") as info:
        loads(stages("prune.fake_noise: {sigma: 1}"))
    assert info.value.stage == "stage 0 (prune.fake_noise)" and info.value.key == "sigma"


def test_valid_recipe_resolves_defaults_and_keeps_order() -> None:
    recipe = loads(
        stages(
            "lowrank.fake_shrink: {hidden: 4}",
            "prune.fake_zero:",
            "{prune.fake_zero: {fraction: 0.9}, guard: {max_total_drop: 0.05, on_fail: stop}}",
        )
    )
    assert [s.name for s in recipe.stages] == [
        "lowrank.fake_shrink",
        "prune.fake_zero",
        "prune.fake_zero",
    ]
    resolved = recipe.resolved()
    assert resolved["stages"][1] == {"prune.fake_zero": {"finetune": None, "fraction": 0.5}}
    assert resolved["stages"][2]["guard"] == {
        "max_drop": None,
        "max_total_drop": 0.05,
        "on_fail": "stop",
    }
    assert loads(json.dumps(resolved)).resolved() == resolved  # resolved recipes round-trip


def test_unmet_need_is_reported_before_any_technique_runs() -> None:
    recipe_fakes.CALLS.clear()
    ctx = recipe_fakes.context()
    del ctx["calib_data"]
    text = stages("prune.fake_zero: {}", "quantize.fake_calib: {}")
    with pytest.raises(MissingInputError, match=r"stage 1 \(quantize.fake_calib\) needs calib"):
        compress(recipe_fakes.tiny_model(trained=False), loads(text), **ctx)
    assert recipe_fakes.CALLS == []


def test_finetune_needs_train_data_before_anything_runs() -> None:
    recipe_fakes.CALLS.clear()
    ctx = recipe_fakes.context()
    del ctx["train_data"]
    text = stages("prune.fake_zero: {finetune: {epochs: 1}}")
    with pytest.raises(MissingInputError, match=r"stage 0 \(prune.fake_zero\) needs train_data"):
        compress(recipe_fakes.tiny_model(trained=False), loads(text), **ctx)
    assert recipe_fakes.CALLS == []


def test_unknown_context_item_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"unknown context item\(s\) \['calibration'\]"):
        compress(
            recipe_fakes.tiny_model(trained=False),
            loads(stages("prune.fake_zero:")),
            calibration=[],
        )


def test_json_schema_covers_every_technique_and_the_guard() -> None:
    schema = json_schema()
    json.dumps(schema)
    items = schema["properties"]["stages"]["items"]["oneOf"]
    titles = {s["title"] for s in items}
    assert {"prune.fake_zero", "lowrank.fake_shrink", "quantize.fake_calib"} <= titles
    zero = next(s for s in items if s["title"] == "prune.fake_zero")
    ref = zero["properties"]["prune.fake_zero"]["anyOf"][0]["$ref"].split("/")[-1]
    fraction = schema["$defs"][ref]["properties"]["fraction"]
    assert (fraction["minimum"], fraction["maximum"], fraction["default"]) == (0, 1, 0.5)
    assert zero["additionalProperties"] is False
    assert "GuardConfig" in schema["$defs"]


def test_guard_limits() -> None:
    assert GuardConfig(max_drop=0.0).on_fail == "rollback"


def test_option_docs_expand_nested_models_and_mark_required_fields() -> None:
    from pydantic import BaseModel, Field

    from netshrink.recipe.describe import options

    class Inner(BaseModel):
        name: str = Field(description="required name")

    class Outer(BaseModel):
        inner: Inner | None = Field(None, description="optional nested")
        level: int = Field(3, ge=1, lt=10, description="a level")

    rows = {o.name: o for o in options(Outer)}
    assert list(rows) == ["inner", "inner.name", "level"]
    assert (rows["inner.name"].default, rows["inner"].type) == ("(required)", "mapping | None")
    assert (rows["level"].range, rows["level"].default) == (">= 1, < 10", "3")
