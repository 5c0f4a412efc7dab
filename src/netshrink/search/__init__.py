"""Sensitivity analysis and target-driven compression (``analyze``, ``auto``)."""

from netshrink.search.analysis import Sensitivity, analyze

__all__ = ["Sensitivity", "analyze"]
