"""The quantize family: every technique is callable as ``netshrink.quantize.<name>(model, ...)``."""

from netshrink.registry import export_family

export_family(globals(), "quantize")
