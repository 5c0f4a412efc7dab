"""Recipes: an ordered list of technique stages, parsed from YAML and validated in full.

A recipe looks like this::

    version: 1
    description: optional one line
    stages:
      - prune.channels: {ratio: 0.3, finetune: {epochs: 3}}
        guard: {max_drop: 0.01}
      - quantize.static: {weights: int8}

Each stage is a mapping with exactly one technique key (a name from the registry) whose value is
that technique's options, plus an optional ``guard``. Parsing checks everything that can be
checked without the model: the layout, the version, every technique name and every option
(through the technique's own config model). :meth:`Recipe.check_needs` then checks the context.
A recipe never names an import path, so reading one cannot run code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from netshrink import registry
from netshrink.config import Options
from netshrink.context import Context
from netshrink.errors import ConfigError, RecipeError
from netshrink.quote import excerpt
from netshrink.recipe.yamlsafe import load_yaml

VERSION = 1
TOP_LEVEL_KEYS = ("version", "description", "stages")
STAGE_KEYS = ("guard",)
MAX_DESCRIPTION = 500
"""Longest recipe description, in characters (it is recorded in the artifact's manifest)."""
MAX_STAGES = 64
"""Most stages one recipe may hold."""


class GuardConfig(Options):
    """A limit on the metric a stage may cost; the runner checks it after the stage."""

    max_drop: float | None = Field(
        None, ge=0, le=1, description="most the metric may fall in this stage (0.01 = 1 point)"
    )
    max_total_drop: float | None = Field(
        None, ge=0, le=1, description="most the metric may fall from the baseline after this stage"
    )
    on_fail: Literal["rollback", "stop"] = Field(
        "rollback",
        description="rollback: undo this stage and go on; stop: undo it and skip the rest",
    )

    @model_validator(mode="after")
    def _one_limit(self) -> GuardConfig:
        if self.max_drop is None and self.max_total_drop is None:
            raise ValueError("a guard needs max_drop or max_total_drop")
        return self


@dataclass(frozen=True)
class Stage:
    """One validated stage: its position, technique, options and optional guard."""

    index: int
    technique: registry.Technique
    config: Any
    guard: GuardConfig | None = None

    @property
    def name(self) -> str:
        """The technique's registered name, e.g. ``prune.channels``."""
        return self.technique.name

    @property
    def label(self) -> str:
        """How errors and reports name this stage: ``stage 0 (prune.channels)``."""
        return f"stage {self.index} ({self.name})"

    def resolved(self) -> dict[str, Any]:
        """The stage as a recipe mapping with every option spelled out, defaults included."""
        out: dict[str, Any] = {self.name: self.config.model_dump(mode="json")}
        if self.guard is not None:
            out["guard"] = self.guard.model_dump(mode="json")
        return out


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: the ordered stages and an optional description."""

    stages: tuple[Stage, ...]
    description: str = ""
    source: str = "<recipe>"

    def resolved(self) -> dict[str, Any]:
        """The recipe with every option spelled out, as recorded in the artifact manifest."""
        out: dict[str, Any] = {"version": VERSION}
        if self.description:
            out["description"] = self.description
        out["stages"] = [s.resolved() for s in self.stages]
        return out

    def needs(self) -> dict[str, tuple[str, ...]]:
        """Context items each stage needs, keyed by the stage's label."""
        return {s.label: s.technique.needs(s.config) for s in self.stages}

    def check_needs(self, ctx: Context, extra: Iterable[str] = ()) -> None:
        """Raise :class:`MissingInputError` for the first stage whose needs ``ctx`` cannot meet.

        ``extra`` names items every stage needs anyway (the runner's own, e.g. example_inputs).
        """
        for stage in self.stages:
            ctx.require((*extra, *stage.technique.needs(stage.config)), stage.label)


def _where(index: int | None) -> str | None:
    return None if index is None else f"stage {index}"


_SCALAR_TYPE_ERRORS = ("int_type", "float_type", "bool_type", "string_type")
"""Strict-mode errors of scalars; containers are left to the lax pass (a YAML list fills a
tuple option, and validators that rewrite a value before checking it work as in Python)."""


def _check_strict(config: type[Options], options: Any, label: str) -> None:
    """Refuse what pydantic's lax mode would coerce: ``"0.5"`` for a number, ``true`` for 1.

    Options are validated as the JSON they are, in strict mode; only scalar type errors count.
    A value JSON cannot hold (a YAML date) is given as its text, which no number accepts.
    """
    if not isinstance(options, Mapping):
        return  # the technique's own validation says what a stage's options must be
    try:
        config.model_validate_json(json.dumps(options, default=str), strict=True)
    except ValidationError as exc:
        scalar = [e for e in exc.errors() if e["type"] in _SCALAR_TYPE_ERRORS]
        if scalar:
            strict = ValidationError.from_exception_data(exc.title, scalar)  # type: ignore[arg-type]
            raise registry.config_error(strict, config, label) from None


def parse_stage(index: int, raw: Any) -> Stage:
    """Validate one raw stage mapping (as YAML gives it) into a :class:`Stage`."""
    where = f"stage {index}"
    if not isinstance(raw, Mapping):
        raise RecipeError(
            f"a stage is a mapping like '- prune.magnitude: {{sparsity: 0.5}}', "
            f"got {type(raw).__name__} {excerpt(raw)}",
            stage=where,
        )
    names = [k for k in raw if k not in STAGE_KEYS]
    if len(names) != 1 or not all(isinstance(k, str) for k in raw):
        raise RecipeError(
            f"a stage names exactly one technique (plus optional {', '.join(STAGE_KEYS)}), "
            f"got keys {excerpt(list(raw))}",
            stage=where,
        )
    name = names[0]
    try:
        tech = registry.get(name)
    except ConfigError as exc:
        raise RecipeError(str(exc), stage=where) from None
    label = f"{where} ({name})"
    _check_strict(tech.config, raw[name], label)
    config = tech.make_config(raw[name], stage=label)
    guard = None
    if "guard" in raw:
        _check_strict(GuardConfig, raw["guard"], f"{label} guard")
        try:
            guard = GuardConfig.model_validate(raw["guard"])
        except ValidationError as exc:
            raise registry.config_error(exc, GuardConfig, f"{label} guard") from None
    return Stage(index, tech, config, guard)


def parse(data: Any, source: str = "<recipe>") -> Recipe:
    """Validate a recipe given as plain data (the result of ``yaml.safe_load``)."""
    if not isinstance(data, Mapping):
        raise RecipeError(
            f"{source}: a recipe is a mapping with 'version: {VERSION}' and 'stages', "
            f"got {type(data).__name__}"
        )
    unknown = [k for k in data if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise RecipeError(
            f"{source}: unknown top-level key(s) {excerpt(unknown)}; "
            f"valid keys: {', '.join(TOP_LEVEL_KEYS)}"
        )
    version = data.get("version")
    if version is None:
        raise RecipeError(f"{source}: missing 'version'; write 'version: {VERSION}'")
    if type(version) is not int or version != VERSION:  # not 1.0, not true
        raise RecipeError(f"{source}: unsupported version {excerpt(version)}; supported: {VERSION}")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise RecipeError(f"{source}: 'description' must be a string, got {excerpt(description)}")
    if len(description) > MAX_DESCRIPTION:
        raise RecipeError(
            f"{source}: 'description' has {len(description)} characters; "
            f"at most {MAX_DESCRIPTION} (it is stored in the artifact and counts in its size)"
        )
    stages = data.get("stages")
    if not isinstance(stages, list) or not stages:
        raise RecipeError(
            f"{source}: 'stages' must be a non-empty list of stages, got {excerpt(stages)}"
        )
    if len(stages) > MAX_STAGES:
        raise RecipeError(f"{source}: {len(stages)} stages; a recipe holds at most {MAX_STAGES}")
    return Recipe(tuple(parse_stage(i, s) for i, s in enumerate(stages)), description, source)


def loads(text: str, source: str = "<recipe>") -> Recipe:
    """Parse and validate recipe YAML text: plain data only, duplicate keys, alias bombs and
    deep nesting refused (:func:`~netshrink.recipe.yamlsafe.load_yaml`)."""
    return parse(load_yaml(text, source), source)


def stage_schema(tech: registry.Technique, ref: str, guard_ref: str) -> dict[str, Any]:
    """JSON schema of one stage of technique ``tech`` whose options schema is at ``ref``."""
    return {
        "type": "object",
        "title": tech.name,
        "description": tech.summary,
        "properties": {
            tech.name: {"anyOf": [{"$ref": ref}, {"type": "null"}]},
            "guard": {"$ref": guard_ref},
        },
        "required": [tech.name],
        "additionalProperties": False,
    }


def json_schema() -> dict[str, Any]:
    """The recipe JSON schema (draft 2020-12), generated from every registered config model."""
    from pydantic.json_schema import models_json_schema

    techniques = registry.all_techniques()
    models = [(t.config, "validation") for t in techniques] + [(GuardConfig, "validation")]
    refs, defs = models_json_schema(models, ref_template="#/$defs/{model}")
    guard_ref = refs[(GuardConfig, "validation")]["$ref"]
    stages = [
        stage_schema(t, refs[(t.config, "validation")]["$ref"], guard_ref) for t in techniques
    ]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "netshrink recipe",
        "type": "object",
        "properties": {
            "version": {"const": VERSION},
            "description": {"type": "string"},
            "stages": {"type": "array", "minItems": 1, "items": {"oneOf": stages}},
        },
        "required": ["version", "stages"],
        "additionalProperties": False,
        **defs,
    }
