"""Built-in metrics: functions ``(model, batches) -> float``, higher is better."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from netshrink.batches import run
from netshrink.context import Batch
from netshrink.errors import DataError


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[Batch]) -> float:
    """Top-1 accuracy of ``model`` on ``batches``, as a fraction in [0, 1]."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for inputs, targets in batches:
        logits = run(model, inputs)
        correct += int((logits.argmax(dim=-1) == targets).sum())
        total += int(targets.numel())
    model.train(was_training)
    if total == 0:
        raise DataError("accuracy needs at least one labelled example; the batches were empty")
    return correct / total
