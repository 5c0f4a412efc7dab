"""Training machinery: the loop (:func:`fit`), optimizers and schedules, checkpoints, DDP."""

from netshrink.training.distributed import is_main_process
from netshrink.training.loop import FitResult, LossFn, cross_entropy, finetune, fit, objective

__all__ = [
    "FitResult",
    "LossFn",
    "cross_entropy",
    "finetune",
    "fit",
    "is_main_process",
    "objective",
]
