"""The prune family: every technique is callable as ``netshrink.prune.<name>(model, ...)``.

Besides the techniques: :func:`sparsity_report` (per-layer sparsity and kernel), the sparse
layers, and :func:`nm_layout_ok` (the N:M layout check).
"""

from netshrink.prune import structured, unstructured  # noqa: F401  (register the techniques)
from netshrink.prune.report import SparsityReport, sparsity_report
from netshrink.prune.sparse_layers import SparseConv2d, SparseLinear
from netshrink.prune.unstructured import nm_layout_ok
from netshrink.registry import export_family

export_family(globals(), "prune")

__all__ = [
    "SparseConv2d",
    "SparseLinear",
    "SparsityReport",
    "channels",  # exported by export_family
    "magnitude",
    "nm",
    "nm_layout_ok",
    "random",
    "sparsity_report",
]
