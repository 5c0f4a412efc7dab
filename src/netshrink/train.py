"""The one training loop, under its historical name: see :mod:`netshrink.training.loop`.

``fit`` trains a model on ``(inputs, targets)`` batches (optimizer and schedule options,
evaluation, best-weights keeping, early stopping, checkpoint/resume, ``torchrun`` DDP);
``finetune`` runs it for a technique's ``finetune: {epochs, lr}`` options.
"""

from netshrink.training import (
    FitResult,
    LossFn,
    cross_entropy,
    finetune,
    fit,
    is_main_process,
    objective,
)

__all__ = [
    "FitResult",
    "LossFn",
    "cross_entropy",
    "finetune",
    "fit",
    "is_main_process",
    "objective",
]
