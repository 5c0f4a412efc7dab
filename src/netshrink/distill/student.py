"""Building a student from a teacher: fewer blocks (``depth``) and narrower layers (``width``).

Depth keeps every k-th block of each stack of identical blocks, initialised from the teacher's
blocks, as DistilBERT did with one transformer layer out of two (Sanh et al. 2019, sec. 3).
Width shrinks every hidden layer: with structured pruning (``prune.channels``, which keeps the
teacher's most important channels and their weights) or, for a zoo model, by building the same
architecture narrower.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import Field
from torch import nn

from netshrink import zoo
from netshrink.config import Options
from netshrink.context import Context
from netshrink.errors import ConfigError, UnsupportedModuleError
from netshrink.layers import replace_module


class StudentConfig(Options):
    """How to derive the student from the model given to ``distill.kd``."""

    width: float = Field(
        1.0, gt=0, le=1, description="fraction of every hidden layer's width to keep"
    )
    depth: float = Field(
        1.0, gt=0, le=1, description="fraction of the blocks of each stack of identical blocks"
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


def kept_indices(n: int, depth: float) -> list[int]:
    """Evenly spaced indices of ``max(1, round(n * depth))`` of ``n`` blocks, first one kept."""
    m = max(1, round(n * depth))
    return [i * n // m for i in range(m)]


def shrink_depth(model: nn.Module, depth: float) -> nn.Module:
    """Return a copy of ``model`` with only ``depth`` of the blocks of every stack, teacher-init."""
    student = copy.deepcopy(model)
    stacks = block_stacks(student)
    if not stacks:
        raise UnsupportedModuleError(
            f"depth={depth} needs a stack of identical blocks (an nn.Sequential or nn.ModuleList "
            f"of same-shaped modules) and {type(model).__name__} has none; give your own student"
        )
    for name, stack in stacks.items():
        blocks = list(stack.children())
        kept = [blocks[i] for i in kept_indices(len(blocks), depth)]
        smaller = nn.Sequential(*kept) if isinstance(stack, nn.Sequential) else nn.ModuleList(kept)
        if not name:
            return smaller
        replace_module(student, name, smaller)
    return student


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
    teacher's weights on the kept channels; needs ``example_inputs`` or ``train_data``).
    Depth then keeps evenly spaced blocks of every stack (:func:`shrink_depth`).
    """
    student, name = model, zoo.name_of(model)
    if config.width < 1 and name is not None:
        # A pruned or copied zoo model keeps its tag, so width stays relative to the zoo's
        # architecture.
        student = zoo.build(name, width=config.width)
    if config.depth < 1:
        student = shrink_depth(student, config.depth)
    if config.width < 1 and name is None:
        student = _pruned_narrower(student, config.width, ctx)
    if (config.width < 1 or config.depth < 1) and _params(student) >= _params(model):
        raise UnsupportedModuleError(
            f"the student asked for (width={config.width}, depth={config.depth}) has "
            f"{_params(student):,} parameters, as many as its teacher's {_params(model):,}: "
            f"nothing in {type(model).__name__} could be made smaller; give your own student"
        )
    return student
