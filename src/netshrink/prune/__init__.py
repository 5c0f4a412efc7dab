"""The prune family: every technique is callable as ``netshrink.prune.<name>(model, ...)``.

Besides the techniques: :func:`sparsity_report` (per-layer sparsity and kernel), the sparse
layers, and :func:`nm_layout_ok` (the N:M layout check).
"""

import importlib
import pkgutil

from netshrink.prune.report import SparsityReport, sparsity_report
from netshrink.prune.sparse_layers import SparseConv2d, SparseLinear
from netshrink.prune.unstructured import nm_layout_ok
from netshrink.registry import export_family

# Every module of the package is imported, so a new technique file registers itself: adding one
# is one source file and one test file, with no list here to update.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["SparseConv2d", "SparseLinear", "SparsityReport", "nm_layout_ok", "sparsity_report"]
_before = set(globals())
export_family(globals(), "prune")
__all__ += sorted(n for n in set(globals()) - _before if not n.startswith("_"))
