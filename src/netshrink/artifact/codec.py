"""Tensor encodings inside an artifact: dense, bitmask and CSR.

A tensor whose elements are mostly zero is stored packed so the artifact shrinks with sparsity:

- ``bitmask``: one bit per element (1 = non-zero, ``numpy.packbits`` order) plus the non-zero
  values in row-major order. Costs ``numel/8 + nnz*itemsize`` bytes.
- ``csr``: the tensor viewed as ``(shape[0], -1)``; int32 row pointers and column indices plus
  the values. Costs ``4*(rows+1) + nnz*(4+itemsize)`` bytes; smaller than the bitmask only
  above ~97% sparsity for fp32.

Any dtype works (quantized int8 weights that are also pruned are packed the same way); "zero"
means the element equals 0. :func:`encode` picks the smallest encoding and keeps a tensor dense
unless packing saves at least 10%.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from netshrink.errors import ArtifactError

_KEEP_DENSE_ABOVE = 0.9
"""Pack only when the packed form is under 90% of the dense bytes."""


def _bitmask_bytes(numel: int, nnz: int, itemsize: int) -> int:
    return (numel + 7) // 8 + nnz * itemsize


def _csr_bytes(rows: int, nnz: int, itemsize: int) -> int:
    return 4 * (rows + 1) + nnz * (4 + itemsize)


def encode(name: str, tensor: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Encode ``tensor`` stored under ``name``; return the parts to store and the manifest entry.

    The parts are keyed ``name`` (dense) or ``name::mask``/``name::values`` (bitmask) or
    ``name::crow``/``name::col``/``name::values`` (CSR).
    """
    t = tensor.detach().cpu().contiguous()
    entry: dict[str, Any] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    numel, itemsize = t.numel(), t.element_size()
    if t.dim() == 0 or numel < 64 or t.dtype == torch.bool:
        return {name: t}, {**entry, "encoding": "dense"}
    nonzero = t != 0
    nnz = int(nonzero.sum())
    rows = t.shape[0]
    sizes = {
        "dense": numel * itemsize,
        "bitmask": _bitmask_bytes(numel, nnz, itemsize),
        "csr": _csr_bytes(rows, nnz, itemsize),
    }
    best = min(("bitmask", "csr"), key=sizes.__getitem__)
    if sizes[best] >= _KEEP_DENSE_ABOVE * sizes["dense"]:
        return {name: t}, {**entry, "encoding": "dense"}
    flat = t.reshape(-1)
    values = flat[nonzero.reshape(-1)].clone()
    if best == "bitmask":
        bits = np.packbits(nonzero.reshape(-1).numpy())
        parts = {f"{name}::mask": torch.from_numpy(bits), f"{name}::values": values}
    else:
        mask2d = nonzero.reshape(rows, -1)
        counts = mask2d.sum(dim=1, dtype=torch.int32)
        crow = torch.zeros(rows + 1, dtype=torch.int32)
        crow[1:] = torch.cumsum(counts, 0)
        col = mask2d.nonzero()[:, 1].to(torch.int32)
        parts = {f"{name}::crow": crow, f"{name}::col": col, f"{name}::values": values}
    return parts, {**entry, "encoding": best}


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ArtifactError(f"unknown dtype {name!r} in the manifest")
    return dtype


def decode(name: str, entry: dict[str, Any], parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rebuild the tensor stored under ``name`` from its manifest ``entry`` and stored ``parts``."""
    try:
        shape, encoding = [int(s) for s in entry["shape"]], entry["encoding"]
        dtype = _dtype(entry["dtype"])
        if encoding == "dense":
            out = parts[name]
        elif encoding == "bitmask":
            numel = int(np.prod(shape))
            bits = np.unpackbits(parts[f"{name}::mask"].numpy(), count=numel).astype(bool)
            out = torch.zeros(numel, dtype=dtype)
            out[torch.from_numpy(bits)] = parts[f"{name}::values"]
        elif encoding == "csr":
            rows = shape[0]
            cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
            crow = parts[f"{name}::crow"].long()
            row_index = torch.repeat_interleave(torch.arange(rows), crow.diff())
            out = torch.zeros(rows, cols, dtype=dtype)
            out[row_index, parts[f"{name}::col"].long()] = parts[f"{name}::values"]
        else:
            raise ArtifactError(f"tensor '{name}' has unknown encoding {encoding!r}")
        if out.dtype != dtype or out.numel() != int(np.prod(shape)):
            raise ArtifactError(
                f"tensor '{name}' does not match its manifest entry "
                f"(dtype {out.dtype} vs {dtype}, {out.numel()} elements vs shape {shape})"
            )
        return out.reshape(shape)
    except (KeyError, RuntimeError, ValueError, IndexError) as exc:
        raise ArtifactError(f"tensor '{name}' is corrupt or incomplete: {exc!r}") from exc
