"""The layer stacks of transformers, and dropping whole layers from them as a replayable edit.

A transformer's depth lives in one ``nn.ModuleList`` of identical-class layers per stack:
``encoder.layer`` (BERT, ViT), ``transformer.layer`` (DistilBERT), ``h`` (GPT-2),
``encoder.block`` / ``decoder.block`` (T5), ``layers`` (``nn.TransformerEncoder``, Llama).
:func:`layer_stacks` finds them by shape alone, so transformers is never imported here.

The edit ``hf.drop_layers`` (``{"module": <dotted path of the ModuleList>, "keep": [original
indices kept, ascending]}``) removes the other layers and keeps what depends on the layer count
in sync, so the smaller model computes exactly what the kept layers of the original compute in
sequence, saves, reloads (``ns.load`` replays the edit) and exports:

- the config's layer count (``num_hidden_layers``, which transformers maps onto each family's
  own name: ``n_layer`` for GPT-2, ``n_layers`` for DistilBERT, ``num_layers`` for T5), and its
  per-layer ``layer_types`` list where a family has one; a T5 decoder's count is the outer
  config's ``num_decoder_layers``;
- a parent module's own count (``nn.TransformerEncoder.num_layers``, DistilBERT's
  ``Transformer.n_layers``);
- each kept layer's ``layer_idx`` attributes (cache slots), renumbered from 0;
- T5's relative position bias, which only the first block owns and every later block reuses:
  when block 0 is dropped, its bias table moves to the new first block.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from netshrink.errors import TargetError
from netshrink.layers.edits import apply_edit, edit_kind

__all__ = ["DROP_LAYERS", "drop_layers", "holds_pretrained", "is_transformer", "layer_stacks"]

DROP_LAYERS = "hf.drop_layers"
"""The kind of the edit that drops layers (args: ``module``, ``keep``)."""

COUNT_NAMES = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
"""Attributes that hold a layer count, in transformers configs and in torch/HF modules."""

_LAYER_SUFFIXES = ("Layer", "Block")


def _is_layer_list(module: nn.Module) -> bool:
    """A ModuleList of two or more layers of one class named like a transformer layer."""
    if type(module) is not nn.ModuleList or len(module) < 2:
        return False
    classes = {type(child) for child in module}
    return len(classes) == 1 and next(iter(classes)).__name__.endswith(_LAYER_SUFFIXES)


def layer_stacks(model: nn.Module) -> dict[str, nn.ModuleList]:
    """The outermost ModuleLists of transformer layers in ``model`` (two or more layers of one
    class whose name ends in ``Layer`` or ``Block``), by dotted path, in module order."""
    stacks: dict[str, nn.ModuleList] = {}
    for name, module in model.named_modules():
        if any(name.startswith(f"{outer}.") for outer in stacks):
            continue
        if _is_layer_list(module):
            stacks[name] = module  # type: ignore[assignment]
    return stacks


def holds_pretrained(model: nn.Module) -> bool:
    """Whether ``model`` is or holds a transformers ``PreTrainedModel`` (checked by class name,
    without importing transformers)."""
    return any(
        any(c.__name__ == "PreTrainedModel" for c in type(m).__mro__) for m in model.modules()
    )


def is_transformer(model: nn.Module) -> bool:
    """Whether ``model`` holds a transformers model or a torch ``nn.TransformerEncoder`` /
    ``nn.TransformerDecoder``."""
    torch_stacks = (nn.TransformerEncoder, nn.TransformerDecoder)
    return holds_pretrained(model) or any(isinstance(m, torch_stacks) for m in model.modules())


def _check(model: nn.Module, args: dict[str, Any]) -> tuple[nn.ModuleList, list[int]]:
    """The ModuleList and kept indices ``args`` name; :class:`TargetError` when they do not fit."""
    if sorted(args) != ["keep", "module"]:
        raise TargetError(f"{DROP_LAYERS} takes exactly {{module, keep}}, got {sorted(args)}")
    path, keep = args["module"], args["keep"]
    if not isinstance(path, str):
        raise TargetError(f"{DROP_LAYERS}: module must be a dotted path, got {path!r}")
    try:
        layers = model.get_submodule(path)
    except AttributeError:
        raise TargetError(f"{DROP_LAYERS}: the model has no module {path!r}") from None
    if type(layers) is not nn.ModuleList:
        raise TargetError(
            f"{DROP_LAYERS}: {path!r} is a {type(layers).__name__}, not the nn.ModuleList of "
            "a transformer's layers"
        )
    n = len(layers)
    ints = isinstance(keep, list) and all(type(i) is int for i in keep)
    if not (ints and keep and keep == sorted(set(keep)) and keep[0] >= 0 and keep[-1] < n):
        raise TargetError(
            f"{DROP_LAYERS}: keep must list 1..{n} distinct indices of {path!r}'s {n} layers "
            f"in ascending order, got {keep!r}"
        )
    return layers, keep


def _configs(model: nn.Module, path: str) -> list[Any]:
    """The distinct layer-counting configs of the modules from the root down to ``path``'s
    parent, outermost first."""
    parts = path.split(".")[:-1]
    owners = [model] + [model.get_submodule(".".join(parts[: i + 1])) for i in range(len(parts))]
    configs: list[Any] = []
    for owner in owners:
        config = getattr(owner, "config", None)
        count = getattr(config, "num_hidden_layers", None)
        if type(count) is int and all(config is not c for c in configs):
            configs.append(config)
    return configs


def _sync_configs(configs: list[Any], old: int, keep: list[int]) -> None:
    """Set the layer count of every config that counted these layers to ``len(keep)``."""
    if not configs:
        return
    inner = configs[-1]
    decoder = bool(getattr(inner, "is_decoder", False))
    for config in configs:
        name = "num_hidden_layers"
        if config is not inner and decoder and hasattr(config, "num_decoder_layers"):
            name = "num_decoder_layers"  # T5: the outer config counts decoder blocks apart
        if getattr(config, name) == old:
            setattr(config, name, len(keep))
        types = getattr(config, "layer_types", None)
        if isinstance(types, list) and len(types) == old:
            config.layer_types = [types[i] for i in keep]


def _sync_parent(model: nn.Module, path: str, old: int, new: int) -> None:
    """A parent module's own layer count (nn.TransformerEncoder.num_layers, DistilBERT's
    n_layers), where it holds one equal to the old count."""
    parent = model.get_submodule(path.rpartition(".")[0])
    for name in COUNT_NAMES:
        value = getattr(parent, name, None)
        if type(value) is int and value == old:
            setattr(parent, name, new)


def _move_position_bias(first: nn.Module, new_first: nn.Module) -> None:
    """Give ``new_first`` the relative position bias tables ``first`` owns (T5: only block 0
    computes the bias, from its own table, and every later block reuses it)."""
    for name, sub in first.named_modules():
        if getattr(sub, "has_relative_attention_bias", False):
            target = new_first.get_submodule(name)
            target.relative_attention_bias = sub.relative_attention_bias
            target.has_relative_attention_bias = True


def _renumber(layer: nn.Module, old: int, new: int) -> None:
    for sub in layer.modules():
        if type(getattr(sub, "layer_idx", None)) is int and sub.layer_idx == old:
            sub.layer_idx = new


@edit_kind(DROP_LAYERS)
def _drop_layers(model: nn.Module, args: dict[str, Any]) -> None:
    """Keep only ``args["keep"]`` of the layers in the ModuleList ``args["module"]``."""
    layers, keep = _check(model, args)
    path, old = args["module"], len(layers)
    configs = _configs(model, path)
    if keep[0] != 0:
        _move_position_bias(layers[0], layers[keep[0]])
    for new, index in enumerate(keep):
        _renumber(layers[index], index, new)
    for index in reversed(range(old)):
        if index not in keep:
            del layers[index]  # ModuleList renumbers the remaining children 0..len-1
    _sync_configs(configs, old, keep)
    _sync_parent(model, path, old, len(keep))


def drop_layers(model: nn.Module, module: str, keep: list[int]) -> None:
    """Keep only the layers ``keep`` (original indices, ascending) of the ModuleList at dotted
    path ``module`` of ``model`` (the root, so the edit is recorded for ``ns.save``).

    Raises :class:`TargetError` when ``module`` is not a ModuleList of ``model`` or ``keep`` is
    not a non-empty ascending list of its indices.
    """
    apply_edit(model, DROP_LAYERS, module=module, keep=list(keep))
