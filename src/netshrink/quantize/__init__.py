"""The quantize family: every technique is callable as ``netshrink.quantize.<name>(model, ...)``.

Besides the techniques: :data:`COMPILE_OPTIONS`, the ``torch.compile`` options measured fastest
for models quantized with ``quantize.dynamic``.
"""

from netshrink.quantize.dynamic_int8 import COMPILE_OPTIONS
from netshrink.registry import export_family

__all__ = ["COMPILE_OPTIONS"]

export_family(globals())  # imports every module of the package and exports its techniques
