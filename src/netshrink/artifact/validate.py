"""Checking an artifact folder before anything in it decides how much memory is taken.

An artifact comes from a disk or a download, so every number in it is checked before it is
used: the files must be regular files inside the folder (a symlink could point anywhere, a FIFO
named ``manifest.json`` would block the reader forever); the manifest is read only up to
:data:`MAX_MANIFEST_BYTES`; every tensor entry is checked against the safetensors header (read
alone, a few bytes) and the header against the file's size, so a declared 1e12-element bitmask
or a 20000x20000 layer whose tensors are not in the file is refused before a byte is allocated;
the modules the manifest asks to rebuild are built on the ``meta`` device (shapes, no memory)
and compared with the stored tensors; and :func:`checksum` covers the manifest together with the
tensor file's sha256, so neither can be edited unnoticed. Every failure is an ArtifactError.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
from pathlib import Path
from typing import Any

import torch

from netshrink.errors import ArtifactError
from netshrink.quote import excerpt

TENSORS_FILE = "model.safetensors"
"""The tensor file of an artifact folder (beside its ``manifest.json``)."""

MAX_MANIFEST_BYTES = 16 * 2**20
"""Largest manifest read (a 1,000-layer model's manifest is about 300 KB)."""
MAX_HEADER_BYTES = 100 * 2**20
"""Largest safetensors header read (the safetensors library's own limit)."""
MAX_INPUT_ELEMENTS = 2**26
"""Most elements of one recorded example input (256 MiB as float32)."""
CHECKSUM_KEY = "checksum"
ENCODINGS = ("dense", "bitmask", "csr")
_SAFETENSORS_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
    "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


def regular_file(path: Path) -> int:
    """Size in bytes of ``path``, refusing a symlink or anything but a regular file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise ArtifactError(f"{path.parent} has no {path.name}; not a netshrink artifact") from None
    if stat.S_ISLNK(info.st_mode):
        raise ArtifactError(f"{path} is a symbolic link; an artifact holds its own regular files")
    if not stat.S_ISREG(info.st_mode):
        raise ArtifactError(f"{path} is not a regular file (a pipe, device or folder)")
    return info.st_size


def read_json(path: Path) -> Any:
    """Parse the manifest at ``path`` after checking it is a regular file of bounded size."""
    size = regular_file(path)
    if size > MAX_MANIFEST_BYTES:
        raise ArtifactError(
            f"{path} has {size} bytes; a manifest holds at most {MAX_MANIFEST_BYTES}"
        )
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(MAX_MANIFEST_BYTES + 1))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{path} is corrupt or truncated: {excerpt(str(exc))}") from None


def checksum(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without its own checksum field.

    The manifest holds the tensor file's sha256, so this one value covers both files.
    """
    body = {k: v for k, v in manifest.items() if k != CHECKSUM_KEY}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of the file at ``path``, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _header(path: Path) -> dict[str, tuple[str, list[int], int]]:
    """Each stored tensor's (safetensors dtype, shape, bytes), checked against the file size."""
    size = regular_file(path)
    try:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise ArtifactError(f"{path} declares a {length}-byte header; it is corrupt")
            raw = json.loads(f.read(length))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{path} is corrupt or truncated: {excerpt(str(exc))}") from None
    data_bytes = size - 8 - length
    out: dict[str, tuple[str, list[int], int]] = {}
    for name, info in raw.items() if isinstance(raw, dict) else ():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            numel = math.prod(int(s) for s in shape)
            ok = (
                0 <= begin <= end <= data_bytes and end - begin == numel * _SAFETENSORS_BYTES[dtype]
            )
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ArtifactError(f"{path}: tensor {excerpt(name, 80)} has a corrupt header entry")
        out[name] = (dtype, [int(s) for s in shape], end - begin)
    return out


def _entry(name: str, entry: Any) -> tuple[torch.dtype, list[int], str]:
    if not isinstance(entry, dict):
        raise ArtifactError(f"the manifest's entry for tensor {excerpt(name, 80)} is malformed")
    dtype = getattr(torch, str(entry.get("dtype")), None)
    shape, encoding = entry.get("shape"), entry.get("encoding")
    if (
        not isinstance(dtype, torch.dtype)
        or not isinstance(shape, list)
        or len(shape) > 8
        or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
        or encoding not in ENCODINGS
    ):
        raise ArtifactError(
            f"the manifest's entry for tensor {excerpt(name, 80)} is malformed: {excerpt(entry)}"
        )
    return dtype, shape, encoding


def _stored(parts: dict[str, tuple[str, list[int], int]], key: str) -> tuple[str, list[int], int]:
    if key not in parts:
        raise ArtifactError(f"the tensor file lacks {excerpt(key, 80)}, which the manifest names")
    return parts[key]


def _check_tensor(name: str, entry: Any, parts: dict[str, tuple[str, list[int], int]]) -> None:
    """Check one manifest entry against the stored parts (the bytes they hold)."""
    dtype, shape, encoding = _entry(name, entry)
    numel = math.prod(shape)
    decoded = numel * dtype.itemsize
    if encoding == "dense":
        stored = _stored(parts, name)
        consistent = stored[1] == shape and stored[2] == decoded
    elif encoding == "bitmask":
        # one bit per element: the mask's size bounds the declared element count
        mask, values = _stored(parts, f"{name}::mask"), _stored(parts, f"{name}::values")
        consistent = mask[2] == (numel + 7) // 8 and values[2] <= decoded
    else:
        crow, col = _stored(parts, f"{name}::crow"), _stored(parts, f"{name}::col")
        values = _stored(parts, f"{name}::values")
        nnz = math.prod(values[1])
        consistent = (
            len(shape) >= 1 and crow[1] == [shape[0] + 1] and math.prod(col[1]) == nnz <= numel
        )
    if not consistent:
        raise ArtifactError(
            f"tensor {excerpt(name, 80)}: the manifest declares {dtype} {shape} ({encoding}) "
            "but the tensor file holds something else"
        )


def physical_memory() -> int:
    """Bytes of RAM this machine has (a cap on what one artifact may decode to)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**40


def check_entries(manifest: dict[str, Any]) -> None:
    """Check the manifest's tensor entries and aliases are well formed and decode to no more
    than this machine's memory (the manifest alone: run before :func:`check_modules`)."""
    tensors, aliases = manifest["tensors"], manifest["aliases"]
    if not isinstance(tensors, dict) or not isinstance(aliases, dict):
        raise ArtifactError("the manifest's 'tensors' and 'aliases' must be mappings")
    total = 0
    for name, entry in tensors.items():
        dtype, shape, _ = _entry(name, entry)
        total += math.prod(shape) * dtype.itemsize
    for alias, original in aliases.items():
        if not isinstance(original, str) or original not in tensors:
            raise ArtifactError(f"alias {excerpt(alias, 80)} names no stored tensor")
    if total > physical_memory():
        raise ArtifactError(
            f"the artifact decodes to {total / 2**30:.1f} GiB of tensors, more than this "
            f"machine's {physical_memory() / 2**30:.1f} GiB of memory"
        )


def check_stored(root: Path, manifest: dict[str, Any]) -> None:
    """Check every tensor entry against the tensor file's header (a few bytes read)."""
    parts = _header(root / TENSORS_FILE)
    for name, entry in manifest["tensors"].items():
        _check_tensor(name, entry, parts)


def check_checksum(root: Path, manifest: dict[str, Any]) -> None:
    """Refuse an artifact whose manifest or tensor file changed since it was saved."""
    regular_file(root / TENSORS_FILE)
    if manifest.get(CHECKSUM_KEY) != checksum(manifest):
        raise ArtifactError(
            f"{root}: the manifest does not match its checksum; it was edited or is corrupt"
        )
    if file_sha256(root / TENSORS_FILE) != manifest["sha256"]:
        raise ArtifactError(
            f"{root / TENSORS_FILE} does not match its manifest checksum: corrupt or truncated"
        )


def check_modules(manifest: dict[str, Any]) -> None:
    """Build each recorded module on the meta device and compare its tensors' shapes with the
    manifest's, so that rebuilding the real ones allocates only what the file holds."""
    from netshrink.artifact.modules import build

    modules, tensors = manifest["modules"], manifest["tensors"]
    if not isinstance(modules, dict):
        raise ArtifactError("the manifest's 'modules' must be a mapping")
    aliases = manifest["aliases"]
    for name, spec in modules.items():
        if not isinstance(name, str) or not isinstance(spec, dict):
            raise ArtifactError(f"the manifest's module {excerpt(name, 80)} is malformed")
        try:
            with torch.device("meta"):
                module = build(spec)
            state = module.state_dict()
        except ArtifactError:
            raise
        except NotImplementedError:
            continue  # a layer whose constructor needs real data: only rebuilding checks it
        except Exception as exc:  # a spec whose arguments the layer's constructor refuses
            if "meta" in str(exc):
                continue
            raise ArtifactError(
                f"the manifest's module {excerpt(name, 80)} cannot be built from "
                f"{excerpt(spec)}: {excerpt(str(exc))}"
            ) from None
        prefix = f"{name}." if name else ""
        for key, tensor in state.items():
            full = prefix + key
            if _replaced_below(name, full, modules):
                continue  # a recorded descendant replaces the default child this key is in
            entry = tensors.get(aliases.get(full, full))
            if not isinstance(entry, dict) or entry.get("shape") != list(tensor.shape):
                raise ArtifactError(
                    f"the manifest's module {excerpt(name, 80)} has a {key} of shape "
                    f"{list(tensor.shape)} that the stored tensors do not match"
                )


def _replaced_below(name: str, key: str, modules: dict[str, Any]) -> bool:
    """Whether a module recorded below ``name`` holds the state entry ``key``."""
    path = key.split(".")[:-1]
    depth = len(name.split(".")) if name else 0
    return any(".".join(path[:i]) in modules for i in range(depth + 1, len(path) + 1))


def check_input_specs(specs: Any) -> None:
    """Refuse recorded example inputs that are malformed or larger than
    :data:`MAX_INPUT_ELEMENTS` before a zero tensor of that shape is made."""
    if not isinstance(specs, list):
        raise ArtifactError(f"the manifest's recorded inputs {excerpt(specs)} are malformed")
    for spec in specs:
        shape = spec.get("shape") if isinstance(spec, dict) else None
        dtype = getattr(torch, str(spec.get("dtype")), None) if isinstance(spec, dict) else None
        if (
            not isinstance(shape, list)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape)
            or not isinstance(dtype, torch.dtype)
        ):
            raise ArtifactError(f"the manifest's recorded inputs {excerpt(specs)} are malformed")
        if math.prod(shape) > MAX_INPUT_ELEMENTS:
            raise ArtifactError(
                f"the manifest records an input of shape {excerpt(shape)}: more than "
                f"{MAX_INPUT_ELEMENTS} elements"
            )
