"""The one training loop: fine-tuning after a technique, distillation and QAT all run through it.

:func:`fit` trains a model on a list of ``(inputs, targets)`` batches. ``loss_fn(model, batch)
-> scalar`` defines the objective (cross-entropy by default; distillation and QAT pass their
own). Around it: a named optimizer and a per-step learning-rate schedule, evaluation after each
epoch with best-weights keeping and early stopping, periodic atomic checkpoints from which the
same call resumes after a crash, and DistributedDataParallel when launched under ``torchrun``.

Determinism: the batch order of an epoch is a function of ``(seed, epoch)`` and the torch RNG is
re-seeded before every step from ``(seed, rank, step)``. A run therefore depends only on its
arguments and its step counter, which is what lets a resumed run reach bit-identical weights
and lets each rank of a distributed run draw its own dropout masks without storing per-rank RNG
states.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.batches import as_args, materialize, run
from netshrink.config import TrainConfig
from netshrink.context import Batch, Context, Evaluate, LossFn
from netshrink.errors import ConfigError
from netshrink.metrics import accuracy
from netshrink.training import distributed as dd
from netshrink.training.checkpoint import data_hash, weights_hash
from netshrink.training.trainer import BEST_NAME, CHECKPOINT_NAME, FitResult, Trainer

__all__ = [
    "BEST_NAME",
    "CHECKPOINT_NAME",
    "FitResult",
    "LossFn",
    "cross_entropy",
    "finetune",
    "fit",
    "objective",
]


def cross_entropy(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Cross-entropy of ``model``'s logits against the batch's integer targets."""
    inputs, targets = batch
    return F.cross_entropy(run(model, inputs), targets)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    def move(x: Any) -> Any:
        return x.to(device) if torch.is_tensor(x) else x

    inputs, targets = batch
    moved = tuple(move(t) for t in as_args(inputs))
    return (moved if isinstance(inputs, tuple | list) else moved[0]), move(targets)


def _validate(config: TrainConfig, val_data: Any) -> None:
    """Checks that need more than one option: early stopping needs validation data."""
    if config.patience is not None and val_data is None:
        raise ConfigError(
            f"early stopping (patience={config.patience}) needs val_data: the batches whose "
            "metric decides when to stop"
        )


def fit(
    model: nn.Module,
    train_data: Iterable[Batch],
    config: TrainConfig,
    *,
    loss_fn: LossFn = cross_entropy,
    val_data: Iterable[Batch] | None = None,
    evaluate: Evaluate | None = None,
    aux: nn.Module | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
    device: str | torch.device | None = None,
    distributed: bool | None = None,
    signature: dict[str, Any] | None = None,
) -> FitResult:
    """Train ``model`` in place for ``config.epochs`` passes over ``train_data``; say what happened.

    ``config`` holds the training options (:class:`~netshrink.config.TrainConfig`: optimizer,
    schedule, warm-up, clipping, best-weights keeping, early stopping, checkpoints); a
    technique's own config that derives from it is passed as is. The rest is what this call
    trains on and where:

    - ``loss_fn(model, batch) -> scalar``: the objective (default cross-entropy of the logits).
    - ``val_data``: evaluated after every epoch with ``evaluate(model, batches)`` (higher is
      better; default minus the mean ``loss_fn``); drives ``keep_best`` and ``patience``.
    - ``aux``: extra trainable module (e.g. distillation adapters) optimized and checkpointed
      with the model. ``device``: where to train (default: the model's device).
    - ``distributed``: train with DistributedDataParallel over the ``torchrun`` processes
      (default: when launched with ``WORLD_SIZE`` > 1); batches are sharded across ranks,
      losses and metrics averaged over them, and only rank 0 writes checkpoints. A process
      group joined here is left again when ``fit`` returns (``distributed.process_group``).
    - ``signature``: what else a checkpoint must have been written for (the recipe stage, the
      teacher's weights hash); with the options, the starting weights' hash and the data's hash
      it decides whether a checkpoint is resumed or refused.

    With ``config.checkpoint_dir``, calling ``fit`` again with the same arguments resumes from
    the last checkpoint and ends with the weights an uninterrupted run would have.
    """
    _validate(config, val_data)
    batches = materialize(train_data, "train_data")
    val = materialize(val_data, "val_data") if val_data is not None else None
    distributed = dd.wanted() if distributed is None else distributed
    if device is not None:
        dev = torch.device(device)
    elif distributed:
        dev = dd.local_device()
    else:
        dev = next(model.parameters(), torch.empty(0)).device
    model.to(dev)
    if aux is not None:
        aux.to(dev)
    params = [p for m in (model, aux) if m is not None for p in m.parameters() if p.requires_grad]
    if config.epochs == 0 or not params:
        return FitResult()
    batches = [_to_device(b, dev) for b in batches]
    val = [_to_device(b, dev) for b in val] if val is not None else None
    resume_key: dict[str, Any] = {}
    if config.checkpoint_dir is not None:  # hashed only where a checkpoint could be resumed
        resume_key = {
            "model": weights_hash(model),
            "data": data_hash(batches),
            "val_data": data_hash(val) if val is not None else None,
            **(signature or {}),
        }
    group = dd.process_group(dev) if distributed else contextlib.nullcontext(dd.current())
    with group as world:
        t = Trainer.start(model, aux, params, world, dev, config, seed, len(batches), resume_key)
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            t.restore()
            if config.keep_best and val is not None and t.result.steps == 0 and t.epoch == 0:
                t.keep_start(t.validate(val, evaluate, loss_fn))
            while not t.done and t.epoch < config.epochs and not t.result.stopped_early:
                t.epoch_pass(batches, loss_fn, config, progress=progress and world.main, desc=desc)
                metric = t.validate(val, evaluate, loss_fn) if val is not None else None
                t.end_epoch(metric, config.patience, config.min_delta)
                t.save()
            if not t.done:
                if config.keep_best and t.best_state is not None:
                    model.load_state_dict(t.best_state)
                t.done = True
                t.save()
    model.eval()
    if aux is not None:
        aux.eval()
    return t.result


def objective(model: nn.Module, ctx: Context) -> tuple[LossFn, Evaluate]:
    """The loss and metric that training ``model`` after a technique uses.

    Loss: ``ctx.loss_fn`` when given; else, for a model with a method
    ``netshrink_objective(teacher) -> (loss_fn, metric)`` (a Hugging Face ``TaskModel``), its
    task's loss, which distils from ``ctx.teacher`` (the uncompressed model) on batches without
    labels; else cross-entropy. Metric: ``ctx.evaluate``, else that model's, else top-1 accuracy.
    """
    loss_fn, metric = ctx.loss_fn or cross_entropy, None
    own = getattr(model, "netshrink_objective", None)
    # Without a teacher a label-free task's loss is a MissingInputError: not the caller's
    # problem when they brought their own loss_fn.
    if callable(own) and (ctx.loss_fn is None or ctx.teacher is not None):
        task_loss, metric = own(ctx.teacher)
        loss_fn = ctx.loss_fn or task_loss
    return loss_fn, ctx.evaluate or metric or accuracy


def finetune(model: nn.Module, config: TrainConfig, ctx: Context, desc: str) -> nn.Module:
    """Fine-tune ``model`` on ``ctx.train_data`` as ``config`` says; return it in eval mode.

    With ``ctx.val_data`` the model is evaluated after every epoch (``ctx.evaluate``, default
    top-1 accuracy) and the best epoch's weights are kept. Loss and metric: see :func:`objective`.
    """
    assert ctx.train_data is not None
    loss_fn, evaluate = objective(model, ctx)
    fit(
        model,
        ctx.train_data,
        config,
        loss_fn=loss_fn,
        seed=ctx.seed,
        progress=ctx.progress,
        desc=desc,
        val_data=ctx.val_data,
        evaluate=evaluate,
        device=ctx.device,
    )
    return model
