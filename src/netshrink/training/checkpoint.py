"""Training checkpoints: one safetensors file, written atomically, read without unpickling.

A checkpoint holds nested state (model, optimizer and scheduler state dicts, RNG states, loop
counters). :func:`flatten` splits such a tree into its tensors, stored as safetensors, and a JSON
skeleton that points at them, stored in the file's metadata. The file is written to a temporary
name in the same folder, flushed to disk and renamed over the old one
(:func:`netshrink.outdir.write_atomic`), so a crash at any moment
leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as save_tensors
from torch import nn

from netshrink.errors import ArtifactError
from netshrink.outdir import write_atomic

_META_KEY = "netshrink_checkpoint"


def flatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Return a JSON-able copy of ``tree`` with every tensor moved into ``tensors``.

    Dicts become ``{"__items__": [[key, value], ...]}`` so integer keys (optimizer state) and
    tuples (``{"__tuple__": [...]}``) survive the trip through JSON.
    """
    if torch.is_tensor(tree):
        key = f"t{len(tensors)}"
        tensors[key] = tree.detach().cpu().contiguous().clone()
        return {"__tensor__": key}
    if isinstance(tree, dict):
        return {"__items__": [[k, flatten(v, tensors)] for k, v in tree.items()]}
    if isinstance(tree, tuple):
        return {"__tuple__": [flatten(v, tensors) for v in tree]}
    if isinstance(tree, list):
        return [flatten(v, tensors) for v in tree]
    if tree is None or isinstance(tree, bool | int | float | str):
        return tree
    raise TypeError(f"cannot checkpoint a {type(tree).__name__}: {tree!r}")


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__tuple__" in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in skeleton["__items__"]}
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    return skeleton


def _digest_tensor(digest: Any, key: str, tensor: torch.Tensor) -> None:
    t = tensor.detach().cpu().contiguous()
    digest.update(f"{key}:{t.dtype}:{list(t.shape)};".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def weights_hash(module: nn.Module) -> str:
    """sha256 of ``module``'s state dict: names, dtypes, shapes and values."""
    digest = hashlib.sha256()
    for key, tensor in module.state_dict().items():
        _digest_tensor(digest, key, tensor)
    return digest.hexdigest()


def data_hash(batches: Iterable[Any]) -> str:
    """sha256 of every tensor in ``batches`` (nested tuples, lists and dicts), in order."""
    digest = hashlib.sha256()
    tensors: dict[str, torch.Tensor] = {}
    flatten(list(batches), tensors)
    for key, tensor in tensors.items():
        _digest_tensor(digest, key, tensor)
    return digest.hexdigest()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Store the nested ``state`` at ``path`` (safetensors + JSON metadata), atomically."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = flatten(state, tensors)
    write_atomic(path, save_tensors(tensors, metadata={_META_KEY: json.dumps(skeleton)}))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; raise ArtifactError if unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        skeleton = json.loads(meta[_META_KEY])
    except (OSError, KeyError, ValueError, SafetensorError) as exc:
        raise ArtifactError(
            f"checkpoint {path} is not a readable netshrink checkpoint ({exc}); "
            "delete it to start the run afresh"
        ) from exc
    return unflatten(skeleton, tensors)
