"""Artifacts: compressed models saved as safetensors + a JSON manifest, and ONNX export."""

from netshrink.artifact.onnx import export_onnx
from netshrink.artifact.store import artifact_bytes, load, read_manifest, save

__all__ = ["artifact_bytes", "export_onnx", "load", "read_manifest", "save"]
