"""The distill family: every technique is callable as ``netshrink.distill.<name>(model, ...)``.

``distill.kd`` trains a student on a teacher's soft targets, intermediate features and the
hard labels; see :mod:`netshrink.distill.technique`.
"""

from netshrink.distill import technique  # noqa: F401  (registers distill.kd)
from netshrink.registry import export_family

export_family(globals(), "distill")
