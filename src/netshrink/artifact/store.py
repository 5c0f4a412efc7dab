"""Save and load compressed models: a directory of ``model.safetensors`` + ``manifest.json``.

The manifest (format version 1) records:

- ``architecture``: ``zoo:<name>`` for built-in models, else the model class's qualified name
  (information only: ``load`` never imports what a manifest names);
- ``hf`` (models built from an ``hf:`` reference only): ``{"ref", "task"}``, from which ``load``
  builds the fresh model with :func:`netshrink.hf.fresh_model` (transformers' own classes from
  the folder's config, no code the folder or manifest names);
- ``modules``: for every submodule netshrink can rebuild, its type and the constructor arguments
  that fix its shapes (:mod:`netshrink.artifact.modules`). ``load`` replays these on a freshly
  built model, so pruned, factorized and quantized layers come back with the right structure;
- ``tensors``: each state-dict entry's dtype, shape and encoding (dense, bitmask or CSR, see
  :mod:`netshrink.artifact.codec`); ``aliases`` for tied tensors stored once;
- ``shared_modules`` (only when the model has any): ``{path: first path}`` for every module
  object that sits at more than one path (layers factorized jointly hold one first factor),
  so that ``load`` puts one module at all of them again rather than equal copies;
- ``sha256`` of the tensor file, ``checksum`` (the sha256 of the rest of the manifest, so one
  value covers both files; :mod:`netshrink.artifact.validate` checks it and every declared size
  before ``load`` allocates), provenance (versions) and ``extra`` (the recipe, seed,
  measurements a caller passes).

Every file is written atomically: the directory is assembled under a temporary name beside the
target and renamed into place, so a crash never leaves a half-written artifact.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from netshrink.artifact.codec import decode, encode
from netshrink.artifact.modules import build, spec_of
from netshrink.artifact.validate import (
    CHECKSUM_KEY,
    TENSORS_FILE,
    check_checksum,
    check_entries,
    check_modules,
    check_stored,
    checksum,
    file_sha256,
    read_json,
)
from netshrink.errors import ArtifactError, InputError, TargetError
from netshrink.hf.reference import fresh_model, reference_info
from netshrink.layers import replace_module
from netshrink.layers.edits import recorded_edits, replay_edits
from netshrink.outdir import check_replaceable, file_mode, make_dir_beside, swap_in
from netshrink.quote import excerpt

FORMAT = "netshrink-artifact"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
ARTIFACT_FILES = (TENSORS_FILE, MANIFEST_FILE)


def architecture_of(model: nn.Module) -> str:
    """``zoo:<name>`` for a built-in model (attribute ``netshrink_zoo``), else the class path."""
    zoo_name = getattr(model, "netshrink_zoo", None)
    if zoo_name:
        return f"zoo:{zoo_name}"
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def _split_aliases(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Store tied tensors (same storage, offset, shape and strides) once; map the rest to it."""
    seen: dict[tuple, str] = {}
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for name, t in state.items():
        if not torch.is_tensor(t):
            raise ArtifactError(f"state entry '{name}' is a {type(t).__name__}, not a tensor")
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
            unique[name] = t
    return unique, aliases


def _shared_modules(model: nn.Module) -> dict[str, str]:
    """Each path at which a module seen at an earlier path sits again -> that earlier path."""
    first: dict[int, str] = {}
    shared = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if id(module) in first:
            shared[name] = first[id(module)]
        else:
            first[id(module)] = name
    return shared


def _restore_shared(model: nn.Module, shared: Any) -> None:
    """Put the module at each ``shared`` value's path at its key's path as well."""
    if not isinstance(shared, dict):
        raise ArtifactError("the manifest's 'shared_modules' must be a mapping")
    for alias, original in shared.items():
        try:
            source, target = model.get_submodule(str(original)), model.get_submodule(str(alias))
        except AttributeError as exc:
            raise ArtifactError(
                f"the manifest shares module {excerpt(original, 80)} at {excerpt(alias, 80)}, "
                f"which the model lacks: {exc}"
            ) from exc
        mine = {k: v.shape for k, v in target.state_dict().items()}
        if mine != {k: v.shape for k, v in source.state_dict().items()}:
            raise ArtifactError(
                f"the manifest shares module {excerpt(original, 80)} at {excerpt(alias, 80)}, "
                "whose tensors differ in shape"
            )
        replace_module(model, alias, source)


def _versions() -> dict[str, str]:
    from netshrink.version import __version__

    return {
        "netshrink": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def save(model: nn.Module, path: str | os.PathLike, *, manifest_extra: dict | None = None) -> Path:
    """Write ``model`` as an artifact directory at ``path`` (replaced if present); return it.

    ``manifest_extra`` (JSON-serialisable) is stored under the manifest's ``extra`` key.
    """
    target = Path(path)
    check_replaceable(target, ARTIFACT_FILES)
    target.parent.mkdir(parents=True, exist_ok=True)
    unique, aliases = _split_aliases(model.state_dict())
    stored: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    for name, tensor in unique.items():
        parts, entries[name] = encode(name, tensor)
        stored.update(parts)
    modules = {name: spec for name, m in model.named_modules() if (spec := spec_of(m))}
    hf_info = reference_info(model)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "architecture": architecture_of(model),
        "modules": modules,
        "tensors": entries,
        "aliases": aliases,
        "versions": _versions(),
        "extra": manifest_extra or {},
    }
    if hf_info is not None:
        manifest["hf"] = hf_info
    if edits := recorded_edits(model):
        manifest["edits"] = edits
    if shared := _shared_modules(model):
        manifest["shared_modules"] = shared
    tmp = make_dir_beside(target, "tmp")
    try:
        save_file(stored, str(tmp / TENSORS_FILE))
        os.chmod(tmp / TENSORS_FILE, file_mode())  # safetensors writes 0o600 whatever the umask
        manifest["sha256"] = file_sha256(tmp / TENSORS_FILE)
        try:
            manifest[CHECKSUM_KEY] = checksum(manifest)
            text = json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ArtifactError(f"manifest_extra is not JSON-serialisable: {exc}") from exc
        (tmp / MANIFEST_FILE).write_text(text)
        swap_in(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def artifact_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of the artifact at ``path``: its tensor file plus its manifest."""
    return sum((Path(path) / f).stat().st_size for f in ARTIFACT_FILES)


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check an artifact's manifest; raise ArtifactError for anything else."""
    root = Path(path)
    file = root / MANIFEST_FILE
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an artifact directory (expected {ARTIFACT_FILES})")
    manifest = read_json(file)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{file} is not a netshrink manifest (no format: {FORMAT})")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(
            f"{root} has format version {version!r}; this netshrink reads up to {FORMAT_VERSION}"
            " — upgrade netshrink"
        )
    for key in ("modules", "tensors", "aliases", "sha256", CHECKSUM_KEY):
        if key not in manifest:
            raise ArtifactError(f"{file} lacks '{key}'; the artifact is incomplete")
    return manifest


def _fresh_model(manifest: dict[str, Any]) -> nn.Module:
    hf_info = manifest.get("hf")
    if hf_info is not None:
        return _fresh_hf_model(hf_info)
    arch = str(manifest.get("architecture", ""))
    if not arch.startswith("zoo:"):
        raise ArtifactError(
            f"this artifact holds a {arch}; pass model= a freshly built instance of it "
            "(load never imports code named by a file)"
        )
    from netshrink import zoo

    return zoo.build(arch.removeprefix("zoo:"))


def _fresh_hf_model(info: Any) -> nn.Module:
    """The model an ``hf`` manifest entry ``{"ref": "hf:...", "task": ...}`` names, freshly
    built; :class:`ArtifactError` for an entry of another shape or a model that cannot be built."""
    fields = ("ref", "task")
    if not (
        isinstance(info, dict)
        and sorted(info) == sorted(fields)
        and all(isinstance(info[k], str) for k in fields)
        and info["ref"].startswith("hf:")
    ):
        raise ArtifactError(f"the manifest's hf entry {excerpt(info, 120)} is not {{ref, task}}")
    try:
        return fresh_model(info["ref"], info["task"])
    except InputError as exc:
        raise ArtifactError(
            f"cannot rebuild the artifact's model {info['ref']} ({info['task']}): {exc}; pass "
            "model= a fresh instance, e.g. netshrink.hf.fresh_model(ref, task)"
        ) from exc


def _replay_structure(model: nn.Module, modules: dict[str, Any]) -> nn.Module:
    """Rebuild every recorded module whose type or shape differs from ``model``'s, parents first.

    Returns the model, which is itself rebuilt when the root module's record differs.
    """
    for name in sorted(modules, key=lambda n: (n != "", n.count("."))):
        if name == "":
            if spec_of(model) != modules[name]:
                model = build(modules[name])
            continue
        try:
            current: nn.Module | None = model.get_submodule(name)
        except AttributeError:
            current = None
        if current is None or spec_of(current) != modules[name]:
            try:
                replace_module(model, name, build(modules[name]))
            except TargetError as exc:
                raise ArtifactError(f"the manifest's module '{name}' does not fit: {exc}") from exc
    return model


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Load the artifact at ``path`` into ``model`` (a fresh instance of the original
    architecture; may be omitted for zoo models) and return it in eval mode.

    The manifest's structural changes are replayed on ``model`` before the weights are loaded.
    Raises :class:`ArtifactError` for a missing, corrupt, truncated or foreign artifact, or one
    that does not fit ``model``.
    """
    from netshrink.registry import load_all

    root = Path(path)
    manifest = read_manifest(root)
    tensors_file = root / TENSORS_FILE
    load_all()  # registers netshrink's own rebuildable layers
    check_entries(manifest)  # the manifest, the modules on the meta device, then the files:
    check_modules(manifest)  # every size is checked before anything is allocated
    check_checksum(root, manifest)
    check_stored(root, manifest)
    try:
        parts = load_file(str(tensors_file))
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"{tensors_file} is corrupt or truncated: {exc}") from exc
    model = model if model is not None else _fresh_model(manifest)
    replay_edits(model, manifest.get("edits", []))
    model = _replay_structure(model, manifest["modules"])
    _restore_shared(model, manifest.get("shared_modules", {}))
    state = {name: decode(name, entry, parts) for name, entry in manifest["tensors"].items()}
    for alias, original in manifest["aliases"].items():
        state[alias] = state[original]
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ArtifactError(
            f"the artifact at {root} does not fit the given {type(model).__name__}: {exc}"
        ) from exc
    return model.eval()
