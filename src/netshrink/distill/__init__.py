"""The distill family: every technique is callable as ``netshrink.distill.<name>(model, ...)``."""

from netshrink.registry import export_family

export_family(globals(), "distill")
