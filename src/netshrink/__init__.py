"""netshrink: make trained PyTorch models smaller and faster, and prove it by measuring."""

from netshrink import distill, hf, lowrank, prune, quantize, zoo
from netshrink.artifact import export_onnx, load, save
from netshrink.context import Context
from netshrink.errors import (
    ArtifactError,
    ConfigError,
    DataError,
    InputError,
    MissingInputError,
    NetshrinkError,
    RecipeError,
    TargetError,
    UnsupportedModuleError,
)
from netshrink.measure import compare, measure
from netshrink.recipe import compress
from netshrink.search import analyze, auto
from netshrink.settings import Inputs, Timing
from netshrink.targets import Targets
from netshrink.version import __version__

__all__ = [
    "ArtifactError",
    "ConfigError",
    "Context",
    "DataError",
    "InputError",
    "Inputs",
    "MissingInputError",
    "NetshrinkError",
    "RecipeError",
    "TargetError",
    "Targets",
    "Timing",
    "UnsupportedModuleError",
    "__version__",
    "analyze",
    "auto",
    "compare",
    "compress",
    "distill",
    "export_onnx",
    "hf",
    "load",
    "lowrank",
    "measure",
    "prune",
    "quantize",
    "save",
    "zoo",
]
