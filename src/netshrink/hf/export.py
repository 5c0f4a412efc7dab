"""``export --hf``: write a pruned transformers model as a folder ``from_pretrained`` loads.

Stock transformers configs describe every layer alike: BERT derives its head size from
``hidden_size / num_attention_heads``, and transformers 5 has no ``pruned_heads`` any more. So:

- when the model's structural changes fit stock config fields — layers dropped (the layer
  count), one FFN width for every layer (``intermediate_size``, ``d_ff``, ...), one head count
  where the config holds the head size separately (T5's ``d_kv``, ``head_dim``) — the folder is
  a stock one: ``AutoModel.from_pretrained(dir)`` loads it;
- otherwise the config also carries the per-module shapes (``netshrink_params``) and head-count
  attributes (``netshrink_attrs``), and the folder gets a generated, self-contained
  ``modeling_netshrink_<family>.py`` (it imports torch and transformers only) registered in the
  config's ``auto_map``: ``AutoModel.from_pretrained(dir, trust_remote_code=True)`` loads it.

Tokenizer files and sentence-transformers files (``modules.json``, the pooling folder) are
copied from the model's ``hf:`` folder, so ``SentenceTransformer(dir)`` works too (with
``trust_remote_code=True`` for the generated kind).
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from netshrink.errors import ConfigError
from netshrink.hf.blocks import (
    FFN_FIELDS,
    HEAD_COUNTS,
    HEAD_WIDTHS,
    find_attention,
    find_ffn,
)
from netshrink.hf.reference import reference_info, transformers_module
from netshrink.layers import CompressedLayer
from netshrink.layers.edits import recorded_edits
from netshrink.outdir import check_replaceable, make_dir_beside, swap_in

__all__ = ["HfExport", "export_hf"]

LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
"""Config fields holding the number of transformer layers."""
HEAD_SIZES = ("d_kv", "head_dim")
"""Config fields holding the head size apart from the head count (so heads can change)."""
SIZE_ATTRS = ("in_features", "out_features", "nf", "nx", "embedding_dim", "num_key_value_heads")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".onnx", ".ckpt")
_AUTO_BY_SUFFIX = (
    ("ForMaskedLM", "AutoModelForMaskedLM"),
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForImageClassification", "AutoModelForImageClassification"),
)


@dataclass(frozen=True)
class HfExport:
    """What :func:`export_hf` wrote: the folder, and whether it needs ``trust_remote_code``."""

    path: Path
    remote_code: bool
    """True when the folder holds generated modeling code (per-layer shapes)."""
    changes: tuple[str, ...]
    """The config fields set, e.g. ``intermediate_size=1536``."""

    def __str__(self) -> str:
        how = (
            "load with trust_remote_code=True (per-layer heads/FFN sizes: generated "
            "modeling_netshrink_*.py)"
            if self.remote_code
            else "stock transformers folder"
        )
        return f"{self.path} ({how}; config: {', '.join(self.changes) or 'unchanged'})"


def _pretrained(model: nn.Module) -> tuple[Any, str]:
    """The transformers model inside ``model`` and its path prefix under ``model``."""
    for prefix, module in model.named_modules():
        if hasattr(module, "save_pretrained") and hasattr(module, "config"):
            return module, f"{prefix}." if prefix else ""
    raise ConfigError(
        f"export --hf needs a transformers model (hf: reference), got {type(model).__name__}"
    )


def _layer_counts(model: nn.Module, prefix: str, hf_model: Any, config: Any) -> list[str]:
    """Set the layer count of ``config`` from the ``hf.drop_layers`` edits: the ModuleList each
    names has as many children as layers are left."""
    changes = []
    for edit in recorded_edits(model):
        if edit["kind"] != "hf.drop_layers":
            continue
        path = str(edit["args"]["module"]).removeprefix(prefix)
        count = len(hf_model.get_submodule(path))
        for name in LAYER_COUNTS:
            if isinstance(getattr(config, name, None), int):
                setattr(config, name, count)
                changes.append(f"{name}={count}")
                break
    return changes


def _stock_changes(hf_model: Any, config: Any) -> list[str] | None:
    """Set the stock config fields that express the pruned heads and FFNs; None when they
    cannot (per-layer sizes, or a head count without a separate head size)."""
    changes = []
    ffn_sizes = {f.size for f in find_ffn(hf_model)}
    if len(ffn_sizes) > 1:
        return None
    if ffn_sizes:
        size = ffn_sizes.pop()
        for name in FFN_FIELDS:
            current = getattr(config, name, None)
            if isinstance(current, int) or (name == "n_inner" and hasattr(config, "n_embd")):
                setattr(config, name, size)
                changes.append(f"{name}={size}")
                break
    attention = find_attention(hf_model)
    heads = {(a.heads, a.kv_heads) for a in attention}
    if len(heads) > 1:
        return None
    if heads:
        q, kv = heads.pop()
        count = next((n for n in HEAD_COUNTS if hasattr(config, n)), None)
        if count is None or getattr(config, count) != q:
            if count is None or not any(hasattr(config, n) for n in HEAD_SIZES):
                return None  # the head size is derived from the head count
            setattr(config, count, q)
            changes.append(f"{count}={q}")
        if getattr(config, "num_key_value_heads", kv) != kv:
            config.num_key_value_heads = kv
            changes.append(f"num_key_value_heads={kv}")
    return changes


def _shapes(hf_model: Any) -> tuple[dict[str, list[int]], dict[str, dict[str, int]]]:
    """Every pruned module's parameter shapes and size/head-count attributes."""
    paths = set()
    for a in find_attention(hf_model):
        paths.add(a.path)
        paths.update(s.module for s in (*a.q, *a.kv, a.out))
    for f in find_ffn(hf_model):
        paths.update(s.module for s in (*f.up, f.down))
    params, attrs = {}, {}
    for path in sorted(paths):
        module = hf_model.get_submodule(path)
        for name, p in module.named_parameters(recurse=False):
            params[f"{path}.{name}" if path else name] = list(p.shape)
        names = (*SIZE_ATTRS, *HEAD_COUNTS, *HEAD_WIDTHS)
        found = {n: getattr(module, n) for n in names if isinstance(getattr(module, n, None), int)}
        if found:
            attrs[path] = found
    return params, attrs


_CODE = '''"""Generated by netshrink: {base} with per-layer pruned attention heads and FFN sizes.

The config's ``netshrink_params`` gives each pruned parameter's shape and ``netshrink_attrs``
the module attributes the forward reads (head counts); the weights file holds the values.
Self-contained: it needs torch and transformers only.
"""

from torch import nn
from transformers import {base}
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)

# The weights are saved with the stock class's checkpoint key names; rename them as it does.
_MAPPING = get_checkpoint_conversion_mapping("{base}") or get_checkpoint_conversion_mapping(
    "{model_type}"
)
if _MAPPING:
    register_checkpoint_conversion_mapping("Netshrink{base}", _MAPPING, overwrite=True)


class Netshrink{base}({base}):
    """{base} whose listed parameters and attributes take the pruned shapes."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        for name, shape in getattr(config, "netshrink_params", {{}}).items():
            path, _, attr = name.rpartition(".")
            module = self.get_submodule(path)
            old = getattr(module, attr)
            setattr(module, attr, nn.Parameter(old.new_empty(shape), old.requires_grad))
        for path, values in getattr(config, "netshrink_attrs", {{}}).items():
            module = self.get_submodule(path)
            for attr, value in values.items():
                setattr(module, attr, value)
'''


def _auto_class(base: str) -> str:
    return next((auto for suffix, auto in _AUTO_BY_SUFFIX if base.endswith(suffix)), "AutoModel")


def _copy_side_files(source: Path, out: Path) -> None:
    """Copy the tokenizer and sentence-transformers files of ``source`` (not its weights or
    config) into ``out``."""
    modules = source / "modules.json"
    folders = set()
    if modules.is_file():
        listed = json.loads(modules.read_text())
        folders = {m["path"] for m in listed if isinstance(m, dict) and m.get("path")}
    for entry in source.iterdir():
        if entry.is_file() and entry.name != "config.json" and entry.suffix not in WEIGHT_SUFFIXES:
            shutil.copy2(entry, out / entry.name)
        elif entry.is_dir() and entry.name in folders:
            shutil.copytree(entry, out / entry.name)


def _family(config: Any) -> str:
    return str(getattr(config, "model_type", "model")).replace("-", "_")


def _exported_config(model: nn.Module, prefix: str, hf_model: Any) -> tuple[Any, list[str], bool]:
    """The config to write, the fields it changes, and whether it needs the generated code."""
    config = copy.deepcopy(hf_model.config)
    changes = _layer_counts(model, prefix, hf_model, config)
    stock = _stock_changes(hf_model, config)
    if stock is not None:
        return config, changes + stock, False
    config = copy.deepcopy(hf_model.config)  # undo the stock fields set before giving up
    changes = _layer_counts(model, prefix, hf_model, config)
    config.netshrink_params, config.netshrink_attrs = _shapes(hf_model)
    base = type(hf_model).__name__
    auto, code = _auto_class(base), f"modeling_netshrink_{_family(config)}.Netshrink{base}"
    config.auto_map = {auto: code, "AutoModel": code}  # AutoModel: what sentence-transformers uses
    return config, [*changes, "per-module shapes in netshrink_params"], True


def _check_float(model: nn.Module) -> None:
    packed = sorted({type(m).__name__ for m in model.modules() if isinstance(m, CompressedLayer)})
    if packed:
        raise ConfigError(
            f"export --hf writes float transformers models; this one holds {', '.join(packed)} "
            "layers: export before quantizing, or use export --onnx"
        )


def export_hf(model: nn.Module, folder: str | Path, source: str | Path | None = None) -> HfExport:
    """Write ``model`` (a pruned ``hf:`` model or a transformers model) to ``folder`` so that
    transformers ``from_pretrained`` loads it with its pruned shapes (see the module docstring).

    ``source``: the folder to copy tokenizer and sentence-transformers files from (default:
    the ``hf:`` folder the model was loaded from). ``folder`` must not exist or be empty; it is
    written beside and moved in place when complete. Raises :class:`ConfigError` for a model
    that is not a float transformers model.
    """
    _check_float(model)
    hf_model, prefix = _pretrained(model)
    base = type(hf_model).__name__
    if getattr(transformers_module(), base, None) is not type(hf_model):
        raise ConfigError(
            f"export --hf: {base} is not a transformers class from_pretrained loads (T5's "
            "encoder stack, loaded for the embedding task, is one); export a model loaded with "
            "its own class, e.g. T5EncoderModel"
        )
    config, changes, remote = _exported_config(model, prefix, hf_model)
    if source is None:
        info = reference_info(model)
        local = Path(info["ref"].removeprefix("hf:")) if info else None
        source = local if local is not None and local.is_dir() else None
    target = Path(folder)
    check_replaceable(target, (), "the export folder")
    stage = make_dir_beside(target, "export")
    try:
        saved = hf_model.config
        hf_model.config = config
        try:
            hf_model.save_pretrained(stage)
        finally:
            hf_model.config = saved
        if remote:
            (stage / f"modeling_netshrink_{_family(config)}.py").write_text(
                _CODE.format(base=base, model_type=config.model_type)
            )
        if source is not None:
            _copy_side_files(Path(source), stage)
        swap_in(stage, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return HfExport(target, remote, tuple(changes))
