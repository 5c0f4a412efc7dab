"""Training losses by task, for fine-tuning, QAT and distillation: ``loss_fn(model, batch)``.

Names (``loss:`` in a recipe):

- ``ce``: cross-entropy of the logits against the batch's integer labels (classification);
- ``lm``: the language-modelling loss on the batch's own text: next-token cross-entropy
  (causal-lm) or cross-entropy on 15% masked tokens (masked-lm, BERT's objective);
- ``mse``: mean squared error between the model's and the teacher's outputs;
- ``cosine``: 1 - cosine between the model's and the teacher's outputs (embedding);
- ``kl``: KL(teacher || model) of the softmaxes, scaled by temperature^2 (Hinton et al. 2015).

The default recovers by distilling from the uncompressed model (the teacher) when the data has
no labels: ``cosine`` for embeddings, ``kl`` for language models, and for classification ``ce``
on batches with labels and ``kl`` on batches without.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.batches import run
from netshrink.context import Batch, LossFn
from netshrink.distill.losses import soft_target_loss
from netshrink.errors import ConfigError, DataError, MissingInputError
from netshrink.hf.tasks import Task, check_task
from netshrink.hf.tokens import masked_inputs, next_token_targets, token_inputs

LOSSES: dict[Task, tuple[str, ...]] = {
    "embedding": ("cosine", "mse"),
    "classification": ("ce", "kl", "mse"),
    "causal-lm": ("lm", "kl", "mse"),
    "masked-lm": ("lm", "kl", "mse"),
}
"""The losses each task accepts."""
TEACHER_LOSSES = ("cosine", "mse", "kl")


def _labels(batch: Batch, name: str) -> torch.Tensor:
    targets = batch[1]
    if targets is None:
        raise DataError(
            f"loss '{name}' needs labels but the batch has none; use a distillation "
            f"loss ({', '.join(TEACHER_LOSSES)}) with a teacher for unlabeled text"
        )
    return targets


def _ce(model: nn.Module, batch: Batch) -> torch.Tensor:
    return F.cross_entropy(run(model, batch[0]), _labels(batch, "ce"))


def _causal_lm(model: nn.Module, batch: Batch) -> torch.Tensor:
    ids, attention = token_inputs(batch[0])
    logits, labels = next_token_targets(run(model, batch[0]), ids, attention)
    return F.cross_entropy(logits, labels)


def _masked_lm(model: nn.Module, batch: Batch) -> torch.Tensor:
    # The global RNG draws the masks: the training loop seeds it before every step.
    mask_id = getattr(getattr(model, "module", model), "mask_token_id", None)  # DDP wraps it
    masked, positions = masked_inputs(batch[0], mask_id, None)
    ids, _ = token_inputs(batch[0])
    return F.cross_entropy(run(model, masked)[positions], ids[positions])


def teacher_loss(
    name: str, temperature: float = 1.0
) -> Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]:
    """``compare(out, target, inputs) -> scalar``: the distillation loss ``name`` (``mse``,
    ``cosine`` over the last dimension, or ``kl`` at ``temperature``) between a model's outputs
    and its teacher's on ``inputs``; token outputs ``(batch, tokens, ...)`` of keyword inputs
    with an ``attention_mask`` are compared at the real tokens only (padding predicts nothing).
    """
    compare: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = {
        "mse": F.mse_loss,
        "cosine": lambda s, t: (1 - F.cosine_similarity(s, t, dim=-1)).mean(),
        "kl": lambda s, t: soft_target_loss(s, t, temperature),
    }[name]

    def loss(out: torch.Tensor, target: torch.Tensor, inputs: Any) -> torch.Tensor:
        if out.ndim == 3 and isinstance(inputs, Mapping) and "attention_mask" in inputs:
            real = inputs["attention_mask"].bool()
            out, target = out[real], target[real]
        return compare(out, target)

    return loss


def _distil(name: str, teacher: nn.Module, temperature: float) -> LossFn:
    compare = teacher_loss(name, temperature)

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            was_training = teacher.training
            teacher.eval()
            target = run(teacher, batch[0])
            teacher.train(was_training)
        return compare(run(model, batch[0]), target, batch[0])

    return loss


def _ce_or_kl(kl: LossFn) -> LossFn:
    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        return _ce(model, batch) if batch[1] is not None else kl(model, batch)

    return loss


def loss_for(
    task: str,
    name: str | None = None,
    teacher: nn.Module | None = None,
    temperature: float = 1.0,
) -> LossFn:
    """The ``loss_fn(model, batch) -> scalar`` named ``name`` for ``task`` (default: see the module
    docstring). ``teacher`` (the uncompressed model) is required by ``cosine``, ``mse`` and
    ``kl``; ``temperature`` softens ``kl``.

    Raises :class:`ConfigError` for a name the task does not accept and
    :class:`MissingInputError` when the loss needs a teacher and none is given.
    """
    task_ = check_task(task)
    if name is not None and name not in LOSSES[task_]:
        raise ConfigError(
            f"loss {name!r} does not fit task {task_}; use one of {', '.join(LOSSES[task_])}",
            key="loss",
        )
    if temperature <= 0:
        raise ConfigError(f"temperature must be > 0, got {temperature}", key="temperature")
    if name is None and task_ == "classification":
        return _ce if teacher is None else _ce_or_kl(_distil("kl", teacher, temperature))
    chosen = name or {"embedding": "cosine"}.get(task_, "kl")
    if chosen == "ce":
        return _ce
    if chosen == "lm":
        return _causal_lm if task_ == "causal-lm" else _masked_lm
    if teacher is None:
        raise MissingInputError(
            f"loss {chosen!r} for task {task_} distils from the uncompressed model; pass "
            "teacher=<that model>, or a loss that needs no teacher ('ce' with labels, 'lm')"
        )
    return _distil(chosen, teacher, temperature)
