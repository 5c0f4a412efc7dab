"""Hostile recipes: every one is refused with a RecipeError/ConfigError and a bounded message."""

from __future__ import annotations

import pytest

from netshrink import recipe
from netshrink.errors import ConfigError, RecipeError
from netshrink.quote import MAX_CHARS, excerpt
from netshrink.recipe import builtin
from netshrink.recipe.schema import MAX_DESCRIPTION
from netshrink.recipe.yamlsafe import MAX_BYTES, MAX_DEPTH, MAX_NODES, load_yaml

STAGE = "stages:\n - prune.magnitude: {sparsity: 0.5}\n"


def laughs(levels: int) -> str:
    """A billion-laughs recipe: each anchor repeats the previous one ten times."""
    lines = ["version: 1", "stages:", " - prune.magnitude:", "     targets:", "       include:"]
    lines.append("        - &l0 [a, a, a, a, a, a, a, a, a, a]")
    for i in range(1, levels):
        lines.append(f"        - &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]")
    return "\n".join(lines) + "\n"


def refused(text: str, match: str, kind: type[Exception] = RecipeError) -> str:
    with pytest.raises(kind, match=match) as info:
        recipe.loads(text)
    message = str(info.value)
    assert len(message) < 1000, message
    return message


def test_duplicate_stages_key_is_refused_with_its_line() -> None:
    refused("version: 1\n" + STAGE + "stages:\n - prune.random: {}\n", "line 4: key 'stages'")


def test_duplicate_option_key_is_refused() -> None:
    refused("version: 1\nstages:\n - prune.magnitude: {sparsity: 0.5, sparsity: 0.3}\n", "twice")


def test_alias_bomb_is_refused_without_expanding() -> None:
    refused(laughs(9), f"more than {MAX_NODES} values")


def test_a_few_aliases_are_allowed() -> None:
    text = (
        "version: 1\nstages:\n - prune.magnitude: {sparsity: &s 0.5}\n"
        " - prune.random: {sparsity: *s}\n"
    )
    assert [s.config.sparsity for s in recipe.loads(text).stages] == [0.5, 0.5]


def test_recursive_alias_is_refused() -> None:
    refused("version: 1\nstages: &a [*a]\n", "recursive alias")


@pytest.mark.parametrize("opening", ["[", "{a: "])
def test_deep_nesting_is_refused_not_a_recursion_error(opening: str) -> None:
    closing = "]" if opening == "[" else "}"
    refused(
        f"version: 1\nstages: {opening * 50_000}{closing * 50_000}\n", f"deeper than {MAX_DEPTH}"
    )


def test_oversized_recipe_is_refused() -> None:
    refused("version: 1\n" + STAGE + "#" * (MAX_BYTES + 1) + "\n", "at most")


def test_oversized_recipe_file_is_read_only_up_to_the_bound(tmp_path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("version: 1\n" + STAGE + "#" * (4 * MAX_BYTES) + "\n")
    with pytest.raises(RecipeError, match=f"{MAX_BYTES + 1} characters"):
        builtin.load(path)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ("{sparsity: '0.5'}", "sparsity"),
        ("{sparsity: true}", "sparsity"),
        ("{sparsity: 0.5, finetune: {epochs: true}}", "finetune.epochs"),
        ("{sparsity: 0.5, finetune: {epochs: '2'}}", "finetune.epochs"),
        ("{sparsity: 0.5, finetune: {epochs: 1.5}}", "finetune.epochs"),
        ("{sparsity: 2020-01-01}", "sparsity"),
    ],
)
def test_no_coercion_of_scalars(options: str, key: str) -> None:
    refused(f"version: 1\nstages:\n - prune.magnitude: {options}\n", f"option '{key}'", ConfigError)


def test_integers_still_fill_float_options_and_lists_fill_tuples() -> None:
    text = "version: 1\nstages:\n - prune.magnitude: {sparsity: 0, targets: {include: ['*']}}\n"
    stage = recipe.loads(text).stages[0]
    assert stage.config.sparsity == 0.0
    assert stage.config.targets.include == ("*",)


def test_guard_is_strict_too() -> None:
    refused(
        "version: 1\nstages:\n - prune.magnitude: {sparsity: 0.5}\n   guard: {max_drop: '0.1'}\n",
        "guard option 'max_drop'",
        ConfigError,
    )


def test_long_description_is_refused() -> None:
    refused("version: 1\ndescription: " + "x" * (MAX_DESCRIPTION + 1) + "\n" + STAGE, "at most 500")


def test_huge_values_are_quoted_as_an_excerpt() -> None:
    message = refused("version: 1\nstages: '" + "y" * 100_000 + "'\n", "non-empty list")
    assert "yyy..." in message
    message = refused(
        "version: 1\nstages:\n - prune.magnitude: {sparsity: '" + "z" * 100_000 + "'}\n",
        "valid number",
        ConfigError,
    )
    assert len(message) < 400


def test_python_tags_stay_refused() -> None:
    refused("version: 1\nstages: !!python/object/apply:os.system [true]\n", "not valid YAML")


def test_excerpt_is_bounded_for_any_value() -> None:
    nested: list = []
    for _ in range(10_000):
        nested = [nested, "x" * 1000]
    assert len(excerpt(nested)) <= MAX_CHARS
    assert len(excerpt("q" * 10**6)) <= MAX_CHARS


def test_validators_that_rewrite_values_still_work() -> None:
    text = "version: 1\nstages:\n - distill.kd: {features: [a], student: {width: 1}}\n"
    stage = recipe.loads(text).stages[0]
    assert stage.config.features[0].student == "a" and stage.config.student.width == 1.0


def test_version_must_be_the_integer_one() -> None:
    refused("version: 1.0\n" + STAGE, "unsupported version 1.0")
    refused("version: true\n" + STAGE, "unsupported version True")


def test_control_characters_are_bad_input_not_a_failure() -> None:
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_yaml("version: 1\x00\nstages: []\n")
