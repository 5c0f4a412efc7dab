"""The one training loop: fine-tuning after a technique, distillation and QAT all run through it.

``fit`` trains ``model`` on ``(inputs, targets)`` batches with AdamW and a cosine learning-rate
schedule, seeded, with a progress bar. ``loss_fn(model, batch) -> scalar tensor`` lets callers
(distillation, QAT) define the objective; the default is cross-entropy on the logits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.batches import materialize, run
from netshrink.config import FinetuneConfig
from netshrink.context import Batch, Context
from netshrink.progress import track

LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def cross_entropy(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of ``model``'s logits against the batch's integer targets."""
    inputs, targets = batch
    return F.cross_entropy(run(model, inputs), targets)


@dataclass
class FitResult:
    """What a training run did: the loss of every epoch (mean over its batches)."""

    epoch_losses: list[float] = field(default_factory=list)


def fit(
    model: nn.Module,
    train_data: Iterable[Batch],
    *,
    epochs: int,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    loss_fn: LossFn = cross_entropy,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> FitResult:
    """Train ``model`` in place for ``epochs`` passes over ``train_data``; return the losses.

    The batch order is reshuffled every epoch with a generator seeded by ``seed`` so the run is
    deterministic on CPU. The learning rate follows a cosine decay from ``lr`` to 0.
    """
    batches = materialize(train_data, "train_data")
    params = [p for p in model.parameters() if p.requires_grad]
    result = FitResult()
    if epochs == 0 or not params:
        return result
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * len(batches))
    model.train()
    for _ in range(epochs):
        total = 0.0
        order = torch.randperm(len(batches), generator=generator).tolist()
        for i in track(order, desc, show=progress):
            loss = loss_fn(model, batches[i])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += float(loss.detach())
        result.epoch_losses.append(total / len(batches))
    model.eval()
    return result


def finetune(model: nn.Module, config: FinetuneConfig, ctx: Context, desc: str) -> nn.Module:
    """Fine-tune ``model`` on ``ctx.train_data`` as ``config`` says; return it in eval mode."""
    assert ctx.train_data is not None
    fit(
        model,
        ctx.train_data,
        epochs=config.epochs,
        lr=config.lr,
        seed=ctx.seed,
        progress=ctx.progress,
        desc=desc,
    )
    return model
