"""Recipes: declared chains of techniques, validated in full, run stage by stage and measured."""

from netshrink.recipe.builtin import DEFAULT, DEMO_MODEL, DEMO_RUNTIME, load, names
from netshrink.recipe.deliver import save_run
from netshrink.recipe.result import Result
from netshrink.recipe.runner import compress
from netshrink.recipe.schema import GuardConfig, Recipe, Stage, json_schema, loads, parse
from netshrink.report.record import Report, StageRecord

__all__ = [
    "DEFAULT",
    "DEMO_MODEL",
    "DEMO_RUNTIME",
    "GuardConfig",
    "Recipe",
    "Report",
    "Result",
    "Stage",
    "StageRecord",
    "compress",
    "json_schema",
    "load",
    "loads",
    "names",
    "parse",
    "save_run",
]
