"""Putting a layer in place of another: the one submodule replacement, and which layers may be
replaced without growing the model.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from netshrink.errors import TargetError


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module | None:
    """Put ``new`` at the dotted path ``name`` of ``model``; return the module it replaced.

    The parent must exist. A parent without a child called ``name``'s last part gets one (an
    artifact rebuilding an empty container's children); a path part that is not a child name
    (empty, private, or an attribute that is not a module) raises :class:`TargetError`.
    """
    parent_name, _, leaf = name.rpartition(".")
    if not (leaf.isidentifier() or leaf.isdigit()) or leaf.startswith("_"):
        raise TargetError(f"{name!r} is not a submodule path (e.g. 'encoder.layer.0.fc')")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError as exc:
        raise TargetError(
            f"{type(model).__name__} has no module '{parent_name}' to hold '{name}'"
        ) from exc
    old = parent._modules.get(leaf)
    if old is None and hasattr(parent, leaf) and leaf not in parent._modules:
        raise TargetError(f"'{name}' is a {type(getattr(parent, leaf)).__name__}, not a module")
    setattr(parent, leaf, new)
    return old


def _hf_conv1d() -> tuple[type[nn.Module], ...]:
    """Hugging Face's ``Conv1D`` (GPT-2) when transformers is loaded; a model using it loaded it."""
    if "transformers" not in sys.modules:
        return ()
    from transformers.pytorch_utils import Conv1D

    return (Conv1D,)


def linear_types() -> tuple[type[nn.Module], ...]:
    """Layer types the Linear techniques take: ``nn.Linear`` and Hugging Face ``Conv1D``."""
    return (nn.Linear, *_hf_conv1d())


def layer_types() -> tuple[type[nn.Module], ...]:
    """Layer types most techniques take: Linear, Hugging Face ``Conv1D`` and ``Conv2d``."""
    return (*linear_types(), nn.Conv2d)


FLOAT_ONLY: tuple[type[nn.Module], ...] = (nn.modules.conv._ConvTransposeNd, nn.RNNBase)
"""Weighted layer types the quantizers have no layer for (transposed convs, LSTM/GRU/RNN)."""


def as_linear(module: nn.Module) -> nn.Linear:
    """``module`` as an ``nn.Linear``: itself, or a Hugging Face ``Conv1D`` converted.

    ``Conv1D`` computes ``x @ W + b`` with W stored (in, out), the transpose of Linear's
    (out, in); the result holds a transposed copy on the same device and dtype.
    """
    if isinstance(module, nn.Linear):
        return module
    if not isinstance(module, _hf_conv1d()):
        raise TypeError(f"{type(module).__name__} is not a Linear layer")
    w = module.weight.detach()
    linear = nn.Linear(w.shape[0], w.shape[1], bias=module.bias is not None)
    linear.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        linear.weight.copy_(w.t())
        if module.bias is not None:
            linear.bias.copy_(module.bias)
    return linear


def linearize(model: nn.Module, names: Iterable[str]) -> None:
    """Replace each Hugging Face ``Conv1D`` among ``names`` by the ``nn.Linear`` it computes."""
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear) and isinstance(module, _hf_conv1d()):
            replace_module(model, name, as_linear(module))


def embedding_names(model: nn.Module) -> list[str]:
    """Names of the plain ``nn.Embedding`` tables of ``model`` (no ``max_norm`` renorming)."""
    return [n for n, m in model.named_modules() if type(m) is nn.Embedding and m.max_norm is None]


def with_tables(selected: Mapping[str, nn.Module], tables: bool, technique: str) -> list[str]:
    """The names of ``selected`` (a ``Targets.select`` over a technique's layer types and
    ``nn.Embedding``) that the technique changes: its layers, and its plain embedding tables
    when ``tables`` (the technique's ``embeddings`` option) is true.

    A table the targets do not select is left alone, whatever ``tables`` says. Raises
    :class:`TargetError` naming the tables when the targets select only tables it leaves.
    """
    names = [n for n, m in selected.items() if not isinstance(m, nn.Embedding)]
    plain = [n for n, m in selected.items() if type(m) is nn.Embedding and m.max_norm is None]
    names += plain if tables else []
    if not names:
        fix = (
            "embeddings is false; set embeddings: true"
            if plain
            else "it stores only plain nn.Embedding tables (no max_norm)"
        )
        raise TargetError(
            f"{technique}: the targets selected only embedding tables ({', '.join(selected)}), "
            f"which it leaves alone: {fix}, or target other layers"
        )
    return names


WEIGHT_READERS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)
"""Parents that compute with a child's weight instead of calling it (``out_proj``): the child's
``forward`` never runs, so nothing observes its inputs."""

FAST_PATH_READERS: tuple[type[nn.Module], ...] = (
    nn.MultiheadAttention,
    nn.TransformerEncoderLayer,
)
"""Parents that may compute with their children's weights in their own kernel (the inference
fast path), in the dtype of their activations."""


def children_of(model: nn.Module, parents: tuple[type[nn.Module], ...]) -> set[str]:
    """Names of the direct children of every module of a type in ``parents``."""
    return {
        f"{name}.{child}" if name else child
        for name, m in model.named_modules()
        if isinstance(m, parents)
        for child, _ in m.named_children()
    }


def tied_modules(model: nn.Module) -> set[str]:
    """Names of modules holding a parameter that another module holds too (tied weights)."""
    owners: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(name)
    return {name for names in owners.values() if len(names) > 1 for name in names}


def leave_alone(names: Iterable[str], excluded: set[str], technique: str, why: str) -> list[str]:
    """``names`` without those in ``excluded``, and a warning naming them and saying ``why``."""
    names = list(names)
    kept = [n for n in names if n not in excluded]
    if len(kept) < len(names):
        left = ", ".join(n for n in names if n in excluded)
        warnings.warn(f"{technique} leaves {left} as they are: {why}", stacklevel=3)
    return kept


def untied(model: nn.Module, names: Iterable[str], technique: str) -> list[str]:
    """``names`` without the layers whose weights are tied to another layer's, with a warning.

    Replacing one side of a tied pair would store the shared weight twice and grow the
    artifact; such a layer is left as it is.
    """
    why = "their weights are tied to another layer's; replacing one side would store it twice"
    return leave_alone(names, tied_modules(model), technique, why)


def warn_left_alone(
    model: nn.Module, technique: str, kinds: tuple[type[nn.Module], ...], why: str
) -> None:
    """Warn about every module of ``kinds`` in ``model``: ``technique`` leaves them as they are."""
    found = [f"{n} ({type(m).__name__})" for n, m in model.named_modules() if isinstance(m, kinds)]
    if found:
        warnings.warn(f"{technique} leaves {', '.join(found)} as they are: {why}", stacklevel=3)
