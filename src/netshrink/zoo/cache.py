"""The on-disk cache of trained zoo weights.

A cache file is ``<name>-seed<seed>-<code hash>-torch<major.minor>.safetensors`` in
``platformdirs.user_cache_dir("netshrink")`` (or ``$NETSHRINK_CACHE``). The code hash covers the
source of the zoo, the data and the training loop, so editing any of them retrains instead of
loading stale weights. Files are safetensors (never pickle), written atomically, and carry a
SHA-256 of their tensors in the metadata so a corrupt file is detected rather than loaded.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from functools import lru_cache
from pathlib import Path

import platformdirs
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from netshrink.errors import ArtifactError
from netshrink.outdir import file_mode

CACHE_ENV = "NETSHRINK_CACHE"
_PACKAGE = Path(__file__).resolve().parents[1]
_SOURCES = ("zoo", "data", "train.py", "training")


def cache_dir() -> Path:
    """Folder of cached weights: ``$NETSHRINK_CACHE`` when set, else the user cache dir."""
    return Path(os.environ.get(CACHE_ENV) or platformdirs.user_cache_dir("netshrink"))


@lru_cache(maxsize=1)
def code_hash() -> str:
    """First 12 hex digits of a SHA-256 over the source files that decide the trained weights."""
    digest = hashlib.sha256()
    for source in _SOURCES:
        path = _PACKAGE / source
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for file in files:
            digest.update(file.relative_to(_PACKAGE).as_posix().encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def cache_path(name: str, seed: int) -> Path:
    """Where the weights of zoo model ``name`` trained with ``seed`` are cached."""
    major, minor = torch.__version__.split(".")[:2]
    return cache_dir() / f"{name}-seed{seed}-{code_hash()}-torch{major}.{minor}.safetensors"


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        digest.update(f"{key}:{tensor.dtype}:{list(tensor.shape)}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``tensors`` to ``path`` as safetensors, atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"sha256": _checksum(tensors)})
        os.chmod(tmp, file_mode())  # mkstemp and safetensors both make it 0o600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> dict[str, torch.Tensor]:
    """Read tensors saved by :func:`save`; raise ArtifactError when the file is corrupt."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"cached weights {path} are unreadable: {exc}") from exc
    if metadata.get("sha256") != _checksum(tensors):
        raise ArtifactError(f"cached weights {path} fail their checksum; the file is corrupt")
    return tensors
