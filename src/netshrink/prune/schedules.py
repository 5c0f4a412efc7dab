"""When to prune: all at once, in k equal steps, or on the polynomial schedule of Zhu & Gupta.

A schedule turns a final pruning fraction into the cumulative fraction reached after each step;
between steps the model is fine-tuned with the project's one training loop
(:func:`netshrink.train.fit`), so later steps rank weights that have adapted to earlier ones.

- ``oneshot``: one step straight to the final fraction.
- ``iterative``: k equal steps, s_j = s * j / k.
- ``gradual``: s_j = s * (1 - (1 - j/k)^3) (Zhu & Gupta 2017, "To prune, or not to prune",
  sec. 3, eq. 1 with s_i = 0): prunes fast while redundancy is plentiful and slowly near the
  end. For unstructured pruning the mask is raised inside one training run, every ``epochs``
  epochs' worth of optimizer steps (their delta t); structured pruning, which replaces tensors,
  fine-tunes between steps like ``iterative``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from netshrink.batches import materialize
from netshrink.config import Options, TrainConfig
from netshrink.context import Batch, Context
from netshrink.train import LossFn, cross_entropy, fit


class Schedule(Options):
    """How a pruning technique reaches its final fraction."""

    kind: Literal["oneshot", "iterative", "gradual"] = Field(
        "oneshot", description="oneshot, iterative (k equal steps) or gradual (Zhu & Gupta)"
    )
    steps: int = Field(4, ge=1, le=100, description="pruning steps of iterative and gradual")
    epochs: int = Field(1, ge=0, le=1000, description="fine-tuning epochs between steps")
    lr: float = Field(
        1e-3, gt=0, le=10, description="learning rate of the fine-tuning between steps"
    )


def fractions(schedule: Schedule, final: float) -> list[float]:
    """Cumulative fraction pruned after each step, ending at ``final``."""
    if schedule.kind == "oneshot":
        return [final]
    k = schedule.steps
    if schedule.kind == "iterative":
        return [final * j / k for j in range(1, k + 1)]
    return [final * (1 - (1 - j / k) ** 3) for j in range(1, k + 1)]


def schedule_needs(schedule: Schedule) -> tuple[str, ...]:
    """Context items a schedule needs: training data when it fine-tunes between steps."""
    trains = schedule.kind != "oneshot" and schedule.steps > 1 and schedule.epochs > 0
    return ("train_data",) if trains else ()


def run_schedule(
    model: nn.Module,
    schedule: Schedule,
    final: float,
    step: Callable[[nn.Module, float, float], None],
    ctx: Context,
    desc: str,
    in_training: bool = False,
) -> None:
    """Call ``step(model, previous, target)`` for each step, fine-tuning between steps.

    With ``in_training`` (the step only re-masks weights, never replaces tensors), a gradual
    schedule prunes inside one training run instead, as Zhu & Gupta do.
    """
    if schedule.kind == "gradual" and in_training and schedule_needs(schedule):
        _gradual_in_training(model, schedule, final, step, ctx, desc)
        return
    previous = 0.0
    targets = fractions(schedule, final)
    for j, target in enumerate(targets):
        step(model, previous, target)
        previous = target
        if j < len(targets) - 1 and schedule.epochs > 0:
            assert ctx.train_data is not None
            _train(model, ctx.train_data, schedule.epochs, schedule, ctx.with_(seed=ctx.seed + j),
                   f"{desc} step {j + 1}/{len(targets)}")  # fmt: skip


def _train(
    model: nn.Module,
    data: Iterable[Batch],
    epochs: int,
    schedule: Schedule,
    ctx: Context,
    desc: str,
    loss_fn: LossFn = cross_entropy,
) -> None:
    config = TrainConfig(epochs=epochs, lr=schedule.lr)
    fit(model, data, config, loss_fn=loss_fn, seed=ctx.seed, progress=ctx.progress, desc=desc)


def _gradual_in_training(
    model: nn.Module,
    schedule: Schedule,
    final: float,
    step: Callable[[nn.Module, float, float], None],
    ctx: Context,
    desc: str,
) -> None:
    """Train ``steps * epochs`` epochs; every ``epochs`` epochs' worth of optimizer steps (Zhu &
    Gupta's delta t), raise the sparsity to the next target before the batch's forward. The last
    interval trains at the final sparsity."""
    assert ctx.train_data is not None
    batches = materialize(ctx.train_data, "train_data")
    every = schedule.epochs * len(batches)
    targets = fractions(schedule, final)
    done = {"steps": 0, "previous": 0.0}

    def loss(m: nn.Module, batch: Batch) -> torch.Tensor:
        j, at = divmod(done["steps"], every)
        if at == 0 and j < len(targets):
            step(m, done["previous"], targets[j])
            done["previous"] = targets[j]
        done["steps"] += 1
        return cross_entropy(m, batch)

    _train(model, batches, schedule.epochs * schedule.steps, schedule, ctx, f"{desc} gradual", loss)
