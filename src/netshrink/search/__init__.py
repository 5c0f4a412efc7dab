"""Sensitivity analysis and target-driven compression: ``analyze`` and ``auto``."""

from netshrink.search.allocate import Option, allocate
from netshrink.search.analysis import Sensitivity, analyze
from netshrink.search.auto import auto, to_recipe
from netshrink.search.front import AutoResult, Candidate
from netshrink.search.target import Target, parse_target

__all__ = [
    "AutoResult",
    "Candidate",
    "Option",
    "Sensitivity",
    "Target",
    "allocate",
    "analyze",
    "auto",
    "parse_target",
    "to_recipe",
]
