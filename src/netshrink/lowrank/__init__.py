"""The lowrank family: every technique is callable as ``netshrink.lowrank.<name>(model, ...)``."""

from netshrink.registry import export_family

export_family(globals(), "lowrank")
