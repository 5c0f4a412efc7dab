"""The quantize family: every technique is callable as ``netshrink.quantize.<name>(model, ...)``."""

from netshrink.quantize import ptq  # noqa: F401  (registers quantize.static)
from netshrink.registry import export_family

export_family(globals(), "quantize")
