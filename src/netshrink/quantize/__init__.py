"""The quantize family: every technique is callable as ``netshrink.quantize.<name>(model, ...)``."""

from netshrink.quantize import dynamic_int8, halfprec, lowbit, ptq, qat_lsq  # noqa: F401
from netshrink.registry import export_family

export_family(globals(), "quantize")
