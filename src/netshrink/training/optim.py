"""Optimizers and learning-rate schedules of the training loop, chosen by name.

The schedule is a :class:`torch.optim.lr_scheduler.LambdaLR` over a pure function of the step,
so its state is two integers and a few floats: checkpoints store it as JSON and a resumed run
continues on exactly the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import nn

from netshrink.errors import ConfigError

OptimizerName = Literal["adamw", "adam", "sgd"]
ScheduleName = Literal["cosine", "linear", "constant"]
OPTIMIZERS: tuple[str, ...] = ("adamw", "adam", "sgd")
SCHEDULES: tuple[str, ...] = ("cosine", "linear", "constant")


def make_optimizer(
    params: Iterable[nn.Parameter],
    name: str,
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """Build optimizer ``name`` (adamw, adam or sgd with ``momentum``) over ``params``."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def lr_factor(name: str, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """Return ``step -> multiplier of the base learning rate``.

    A linear warm-up from ``1/(warmup_steps+1)`` to 1 over ``warmup_steps`` steps, then
    ``cosine`` (half a cosine down to 0 at ``total_steps``), ``linear`` (straight down to 0) or
    ``constant``.
    """
    if name not in SCHEDULES:
        raise ConfigError(f"unknown schedule {name!r}; choose one of {', '.join(SCHEDULES)}")
    if warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0, got {warmup_steps}")
    decay_steps = max(1, total_steps - warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        if name == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if name == "linear":
            return 1.0 - progress
        return 1.0

    return factor


def make_schedule(
    optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step scheduler following :func:`lr_factor`."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(name, total_steps, warmup_steps))
