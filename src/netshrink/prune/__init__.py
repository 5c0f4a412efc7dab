"""The prune family: every technique is callable as ``netshrink.prune.<name>(model, ...)``.

Besides the techniques: :func:`sparsity_report` (per-layer sparsity and kernel), the sparse
layers, and :func:`nm_layout_ok` (the N:M layout check).
"""

from netshrink.prune.report import SparsityReport, sparsity_report
from netshrink.prune.sparse_layers import SparseConv2d, SparseLinear
from netshrink.prune.unstructured import nm_layout_ok
from netshrink.registry import export_family

__all__ = ["SparseConv2d", "SparseLinear", "SparsityReport", "nm_layout_ok", "sparsity_report"]

export_family(globals())  # imports every module of the package and exports its techniques
