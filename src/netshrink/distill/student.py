"""Building a student from a teacher: fewer blocks (``depth``) and narrower layers (``width``).

Depth keeps some blocks of each stack, initialised from the teacher's, as DistilBERT did with
one transformer layer out of two (Sanh et al. 2019, sec. 3). In a transformer (a transformers
model or ``nn.TransformerEncoder``) the stacks are its layer lists and the others are dropped
with the ``hf.drop_layers`` edit, so the config stays in sync and the artifact reloads.
:func:`depth_matches` pairs each student layer with the teacher layer whose hidden states it
learns to reproduce (TinyBERT's uniform map, Jiao et al. 2020, sec. 3.2); by default each
student layer also starts as that teacher layer (``layers: mapped``). The kept layers can
instead be evenly spread, every other one from the first, or those of highest Block Influence
(ShortGPT, see :mod:`netshrink.prune.layers`). In other models the stacks are
``nn.Sequential``/``nn.ModuleList``s of identical blocks.

Width shrinks every hidden layer: with structured pruning (``prune.channels``, which keeps the
teacher's most important channels and their weights) or, for a zoo model, by building the same
architecture narrower. A transformers model is made narrower by pruning heads and FFN neurons
instead, which torch.fx cannot trace for ``prune.channels``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import Field
from torch import nn

from netshrink import zoo
from netshrink.config import Options
from netshrink.context import Batch, Context
from netshrink.distill.features import FeatureMatch
from netshrink.errors import ConfigError, UnsupportedModuleError
from netshrink.hf.depth import drop_layers, holds_pretrained, is_transformer, layer_stacks
from netshrink.layers import replace_module
from netshrink.prune.layers import Selection, alternate, keep_layers, spread


def mapped(n: int, m: int) -> list[int]:
    """``m`` of the indices ``0..n-1``: the teacher layers TinyBERT's uniform map pairs with
    ``m`` student layers, ``(j + 1) * n // m - 1`` (every ``n / m``-th, the last included)."""
    return [(j + 1) * n // m - 1 for j in range(m)]


class StudentConfig(Options):
    """How to derive the student from the model given to ``distill.kd``."""

    width: float = Field(
        1.0, gt=0, le=1, description="fraction of every hidden layer's width to keep"
    )
    depth: Annotated[int, Field(ge=1, le=10_000)] | Annotated[float, Field(gt=0, le=1)] = Field(
        1.0,
        description="blocks kept of each stack: a fraction in (0, 1], or a number (int) of layers",
    )
    layers: Selection | Literal["mapped"] = Field(
        "mapped",
        description="blocks a depth student keeps: mapped (those whose outputs its layers learn, "
        "TinyBERT's map, last included), spread (evenly, first and last), alternate (every "
        "other from the first), importance (Block Influence on train_data; transformers)",
    )


def _signature(module: nn.Module) -> tuple[Any, ...]:
    shapes = tuple((k, tuple(v.shape)) for k, v in module.state_dict().items())
    return type(module), shapes


def block_stacks(model: nn.Module) -> dict[str, nn.Module]:
    """Outermost ``nn.Sequential``/``nn.ModuleList`` containers of two or more identical blocks
    (same class, same tensor names and shapes), by qualified name."""
    stacks: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if type(module) not in (nn.Sequential, nn.ModuleList) or len(module) < 2:
            continue
        if any(name.startswith(f"{outer}.") for outer in stacks if outer) or "" in stacks:
            continue
        blocks = list(module.children())
        if len(blocks) == len(module) and len({_signature(b) for b in blocks}) == 1:
            stacks[name] = module
    return stacks


def kept_count(n: int, depth: float | int, stack: str) -> int:
    """Blocks of the ``n`` in ``stack`` a student of ``depth`` keeps: ``depth`` itself when it
    is an int (below ``n``, else :class:`ConfigError`), else ``max(1, round(n * depth))``."""
    if isinstance(depth, float):
        return max(1, round(n * depth))
    if depth >= n:
        raise ConfigError(
            f"student depth={depth} layers is not fewer than the {n} of {stack!r}; give 1..{n - 1}"
            " or a fraction such as 0.5",
            key="student.depth",
        )
    return depth


def _shrink_transformer(
    student: nn.Module, config: StudentConfig, batches: Iterable[Batch] | None
) -> nn.Module:
    stacks = layer_stacks(student)
    counts = {path: kept_count(len(s), config.depth, path) for path, s in stacks.items()}
    if config.layers == "mapped":
        kept = {path: mapped(len(stacks[path]), m) for path, m in counts.items()}
    else:
        kept = keep_layers(student, counts, config.layers, batches)
    for path, keep in kept.items():
        drop_layers(student, path, keep)
    return student


def shrink_depth(
    model: nn.Module, config: StudentConfig, batches: Iterable[Batch] | None = None
) -> nn.Module:
    """Return a copy of ``model`` with only ``config.depth`` of the blocks of every stack,
    initialised from the teacher's; ``batches`` rank transformer layers for
    ``layers: importance``."""
    student = copy.deepcopy(model)
    if is_transformer(student) and layer_stacks(student):
        return _shrink_transformer(student, config, batches)
    stacks = block_stacks(student)
    if not stacks:
        raise UnsupportedModuleError(
            f"depth={config.depth} needs a transformer or a stack of identical blocks (an "
            f"nn.Sequential or nn.ModuleList of same-shaped modules) and "
            f"{type(model).__name__} has neither; give your own student"
        )
    if config.layers == "importance":
        raise ConfigError(
            "student layers='importance' ranks transformer layers by Block Influence; "
            f"{type(model).__name__} is no transformer: use 'mapped', 'spread' or 'alternate'",
            key="student.layers",
        )
    pick = {"mapped": mapped, "spread": spread, "alternate": alternate}[config.layers]
    for name, stack in stacks.items():
        blocks = list(stack.children())
        kept = [blocks[i] for i in pick(len(blocks), kept_count(len(blocks), config.depth, name))]
        smaller = nn.Sequential(*kept) if isinstance(stack, nn.Sequential) else nn.ModuleList(kept)
        if not name:
            return smaller
        replace_module(student, name, smaller)
    return student


def depth_matches(
    teacher: nn.Module, student: nn.Module, loss: str, weight: float
) -> list[FeatureMatch]:
    """The hidden-state pairs of a transformer student with fewer layers than its teacher.

    Student layer ``j`` of ``m`` learns the output of teacher layer ``(j + 1) * n / m - 1`` of
    ``n`` (0-based): TinyBERT's uniform map ``g(m) = m * N / M`` (Jiao et al. 2020, sec. 3.2),
    so the last layers pair up. Empty for other models and for stacks of equal depth.
    """
    if not is_transformer(teacher):
        return []
    matches = []
    for path, stack in layer_stacks(teacher).items():
        try:
            layers = student.get_submodule(path)
        except AttributeError:
            continue
        n, m = len(stack), len(layers)
        if type(layers) is nn.ModuleList and m < n:
            matches += [
                FeatureMatch(
                    student=f"{path}.{j}",
                    teacher=f"{path}.{i}",
                    loss=loss,  # type: ignore[arg-type]
                    weight=weight,
                )
                for j, i in enumerate(mapped(n, m))
            ]
    return matches


def _pruned_narrower(model: nn.Module, width: float, ctx: Context) -> nn.Module:
    from netshrink import registry

    try:
        channels = registry.get("prune.channels")
    except ConfigError:
        raise UnsupportedModuleError(
            f"width={width} needs structured pruning (prune.channels) or a zoo model, and "
            f"{type(model).__name__} is not from the zoo; give your own student instead"
        ) from None
    example = ctx.example_inputs
    if example is None and ctx.train_data is not None:
        example = (next(iter(ctx.train_data))[0],)
    config = channels.make_config({"ratio": 1.0 - width})
    try:
        return channels.apply(model, config, ctx.with_(example_inputs=example))
    except UnsupportedModuleError as exc:
        raise UnsupportedModuleError(
            f"student width={width} is built by prune.channels, which failed: {exc}. "
            "Give your own student (teacher=... with the student as the model), or use depth"
        ) from exc


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_student(model: nn.Module, config: StudentConfig, ctx: Context) -> nn.Module:
    """``model`` itself when ``config`` keeps everything, else a smaller student derived from it.

    Width: a zoo model is rebuilt narrower by ``netshrink.zoo.build(name, width=width)`` (fresh
    weights); any other model goes through ``prune.channels`` with ratio ``1 - width`` (the
    teacher's weights on the kept channels; needs ``example_inputs`` or ``train_data``); a
    transformers model raises :class:`UnsupportedModuleError` pointing to head and FFN pruning.
    Depth then keeps some blocks of every stack (:func:`shrink_depth`).
    """
    student, name = model, zoo.name_of(model)
    if config.width < 1 and name is None and holds_pretrained(model):
        raise UnsupportedModuleError(
            f"student width={config.width}: a transformers model is made narrower by pruning "
            "attention heads (prune.heads) and FFN neurons (prune.ffn), then distilling into it "
            "(distill.kd with the pruned model); use student depth here"
        )
    if config.width < 1 and name is not None:
        # A pruned or copied zoo model keeps its tag, so width stays relative to the zoo's
        # architecture.
        student = zoo.build(name, width=config.width)
    if isinstance(config.depth, int) or config.depth < 1:
        student = shrink_depth(student, config, ctx.train_data)
    if config.width < 1 and name is None:
        student = _pruned_narrower(student, config.width, ctx)
    if student is not model and _params(student) >= _params(model):
        raise UnsupportedModuleError(
            f"the student asked for (width={config.width}, depth={config.depth}) has "
            f"{_params(student):,} parameters, as many as its teacher's {_params(model):,}: "
            f"nothing in {type(model).__name__} could be made smaller; give your own student"
        )
    return student
