"""Sensitivity analysis and target-driven compression: ``analyze`` and ``auto``."""

from netshrink.search.allocate import Option, allocate
from netshrink.search.analysis import Sensitivity, analyze
from netshrink.search.auto import auto, to_recipe
from netshrink.search.front import AutoResult, Candidate
from netshrink.search.target import Goal, parse_target

__all__ = [
    "AutoResult",
    "Candidate",
    "Goal",
    "Option",
    "Sensitivity",
    "allocate",
    "analyze",
    "auto",
    "parse_target",
    "to_recipe",
]
