"""Artifacts: compressed models saved as safetensors + a JSON manifest, and ONNX export."""

from netshrink.artifact.store import artifact_bytes, load, read_manifest, save

__all__ = ["artifact_bytes", "load", "read_manifest", "save"]
