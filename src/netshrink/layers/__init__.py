"""The compressed-layer contract shared by every family, and the one way to swap a layer in."""

from netshrink.layers.base import (
    CompressedLayer,
    onnx_translation,
    onnx_translations,
    rebuildable,
    rebuildable_types,
)
from netshrink.layers.dequant import DequantLinear
from netshrink.layers.geometry import ConvGeometry
from netshrink.layers.surgery import (
    FAST_PATH_READERS,
    FLOAT_ONLY,
    WEIGHT_READERS,
    as_linear,
    children_of,
    embedding_names,
    layer_types,
    leave_alone,
    linear_types,
    linearize,
    replace_module,
    tied_modules,
    untied,
    warn_left_alone,
    with_tables,
)

__all__ = [
    "FAST_PATH_READERS",
    "FLOAT_ONLY",
    "WEIGHT_READERS",
    "CompressedLayer",
    "ConvGeometry",
    "DequantLinear",
    "as_linear",
    "children_of",
    "embedding_names",
    "layer_types",
    "leave_alone",
    "linear_types",
    "linearize",
    "onnx_translation",
    "onnx_translations",
    "rebuildable",
    "rebuildable_types",
    "replace_module",
    "tied_modules",
    "untied",
    "warn_left_alone",
    "with_tables",
]
