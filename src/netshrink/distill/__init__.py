"""The distill family: every technique is callable as ``netshrink.distill.<name>(model, ...)``.

``distill.kd`` trains a student on a teacher's soft targets, intermediate features and the
hard labels; see :mod:`netshrink.distill.technique`.
"""

from netshrink.registry import export_family

__all__: list[str] = []

export_family(globals())  # imports every module of the package and exports its techniques
