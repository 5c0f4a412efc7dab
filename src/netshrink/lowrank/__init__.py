"""The lowrank family: every technique is callable as ``netshrink.lowrank.<name>(model, ...)``.

``lowrank.svd`` replaces Linear and Conv2d layers by two thinner layers from a truncated SVD of
their weights (plain, or whitened by the layers' inputs); :func:`report_of` reads what it did.
"""

from netshrink.lowrank import factorize
from netshrink.lowrank.layers import LowRankLinear
from netshrink.lowrank.summary import LayerRecord, LowRankReport, report_of
from netshrink.registry import export_family

__all__ = ["LayerRecord", "LowRankLinear", "LowRankReport", "factorize", "report_of"]

export_family(globals())  # imports every module of the package and exports its techniques
