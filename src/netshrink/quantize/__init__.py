"""The quantize family: every technique is callable as ``netshrink.quantize.<name>(model, ...)``.

Besides the techniques: :data:`COMPILE_OPTIONS`, the ``torch.compile`` options measured fastest
for models quantized with ``quantize.dynamic``.
"""

from netshrink.quantize import dynamic_int8, halfprec, lowbit, ptq, qat_lsq  # noqa: F401
from netshrink.quantize.dynamic_int8 import COMPILE_OPTIONS
from netshrink.registry import export_family

export_family(globals(), "quantize")

__all__ = [
    "COMPILE_OPTIONS",
    "binary",  # exported by export_family
    "dynamic",
    "half",
    "qat",
    "static",
    "ternary",
    "weight_only",
]
