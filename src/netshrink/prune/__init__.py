"""The prune family: every technique is callable as ``netshrink.prune.<name>(model, ...)``."""

from netshrink.prune import structured  # noqa: F401  (registers prune.channels)
from netshrink.registry import export_family

export_family(globals(), "prune")
