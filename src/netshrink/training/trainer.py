"""One run of the training loop: the objects it trains and the counters a checkpoint restores.

:class:`Trainer` holds a :func:`~netshrink.training.loop.fit` call's optimizer, schedule, DDP
wrapper and progress (:class:`FitResult`), and does the work between fit's epochs: one step,
one epoch's pass in its seeded order, validation, best-weights keeping and early stopping, and
saving and restoring the checkpoint that makes a run resumable.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as save_tensors
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from netshrink.config import TrainConfig
from netshrink.context import Batch, Evaluate, LossFn
from netshrink.errors import ConfigError
from netshrink.progress import track
from netshrink.training import distributed as dd
from netshrink.training.checkpoint import load_checkpoint, save_checkpoint, write_atomic
from netshrink.training.optim import make_optimizer, make_schedule

CHECKPOINT_NAME = "checkpoint.safetensors"
BEST_NAME = "best.safetensors"  # the best epoch's model weights, plain safetensors


@dataclass
class FitResult:
    """What a training run did. Losses are means over batches (and ranks); metrics higher-better.

    ``val_metrics`` holds ``evaluate(model, val_data)`` after each epoch, or minus the mean
    validation loss when no ``evaluate`` was given. ``best_epoch`` counts from 0; with
    ``keep_best``, ``start_metric`` is the metric of the weights training started from, and
    ``best_epoch`` stays None when no epoch beat them (those weights are then the ones kept).
    """

    epoch_losses: list[float] = field(default_factory=list)
    step_losses: list[float] = field(default_factory=list)
    val_metrics: list[float] = field(default_factory=list)
    best_epoch: int | None = None
    best_metric: float | None = None
    start_metric: float | None = None
    stopped_early: bool = False
    steps: int = 0
    resumed_from_step: int | None = None


def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    if not shuffle:
        return list(range(n))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


def _num_examples(batch: Batch) -> int:
    targets = batch[1]
    return int(targets.shape[0]) if torch.is_tensor(targets) and targets.ndim else 1


@dataclass
class Trainer:
    """One run of :func:`fit`: the objects it trains and the counters a checkpoint restores."""

    model: nn.Module
    net: nn.Module  # the model, wrapped in DDP when distributed
    aux: nn.Module | None
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    world: dd.World
    device: torch.device
    fingerprint: dict[str, Any]
    path: Path | None
    steps_per_epoch: int
    result: FitResult = field(default_factory=FitResult)
    epoch: int = 0
    epoch_loss_sum: float = 0.0
    bad_epochs: int = 0
    best_state: dict[str, torch.Tensor] | None = None
    done: bool = False

    @classmethod
    def start(
        cls,
        model: nn.Module,
        aux: nn.Module | None,
        params: list[nn.Parameter],
        world: dd.World,
        device: torch.device,
        config: TrainConfig,
        seed: int,
        num_batches: int,
        resume_key: dict[str, Any],
    ) -> Trainer:
        """Optimizer, schedule and DDP wrapper for a run of ``num_batches`` batches an epoch;
        ``resume_key`` joins the options in the fingerprint a checkpoint must match."""
        steps_per_epoch = len(dd.shard(range(num_batches), world))
        opt = make_optimizer(
            params,
            config.optimizer,
            lr=config.lr,
            weight_decay=config.weight_decay,
            momentum=config.momentum,
        )
        sched = make_schedule(
            opt, config.schedule, config.epochs * steps_per_epoch, config.warmup_steps
        )
        net: nn.Module = model
        if world.size > 1:
            ids = [device] if device.type == "cuda" else None
            net = DistributedDataParallel(model, device_ids=ids)
        fingerprint = {
            "epochs": config.epochs,
            "lr": config.lr,
            "seed": seed,
            "optimizer": config.optimizer,
            "schedule": config.schedule,
            "batches": num_batches,
            "world_size": world.size,
            "params": [[n, list(p.shape)] for n, p in model.named_parameters()],
            **resume_key,
        }
        ckpt = config.checkpoint_dir
        path = Path(ckpt) / CHECKPOINT_NAME if ckpt is not None else None
        return cls(model, net, aux, opt, sched, world, device, fingerprint, path, steps_per_epoch)

    def state(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint,
            "model": self.model.state_dict(),
            "aux": self.aux.state_dict() if self.aux is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "result": asdict(self.result),
            "epoch": self.epoch,
            "epoch_loss_sum": self.epoch_loss_sum,
            "bad_epochs": self.bad_epochs,
            "best_state": self.best_state,
            "done": self.done,
        }

    def save(self) -> None:
        """Write the checkpoint (rank 0 only; the others hold identical state)."""
        if self.path is not None and self.world.main:
            save_checkpoint(self.path, self.state())

    def restore(self) -> None:
        """Continue from the checkpoint at ``self.path`` if there is one."""
        if self.path is None:
            return
        if self.world.main:  # temporary files of writes a kill interrupted
            for stale in self.path.parent.glob(".*.safetensors.*.tmp"):
                stale.unlink(missing_ok=True)
        if not self.path.exists():
            return
        state = load_checkpoint(self.path)
        saved = state["fingerprint"]
        if saved != self.fingerprint:
            changed = sorted(
                k for k in {*saved, *self.fingerprint} if saved.get(k) != self.fingerprint.get(k)
            )
            raise ConfigError(
                f"checkpoint {self.path} was written by a different run ({', '.join(changed)} "
                "changed since); refusing to resume: delete it or choose another checkpoint_dir"
            )
        self.model.load_state_dict(state["model"])
        if self.aux is not None:
            self.aux.load_state_dict(state["aux"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.result = FitResult(**state["result"])
        self.result.resumed_from_step = self.result.steps
        if self.world.main:
            print(
                f"netshrink: resumed from step {self.result.steps} ({self.path})", file=sys.stderr
            )
        self.epoch, self.epoch_loss_sum = state["epoch"], state["epoch_loss_sum"]
        self.bad_epochs, self.best_state = state["bad_epochs"], state["best_state"]
        self.done = state["done"]

    def step(
        self, batch: Batch, loss_fn: LossFn, params: list[nn.Parameter], clip: float | None
    ) -> float:
        """One optimizer step on ``batch``; the loss is averaged over ranks for the record."""
        seed = self.fingerprint["seed"]
        torch.manual_seed((seed * 1_000_003 + self.world.rank * 7_919 + self.result.steps) % 2**62)
        loss = loss_fn(self.net, batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.aux is not None:
            dd.average_gradients(list(self.aux.parameters()))
        if clip is not None:
            nn.utils.clip_grad_norm_(params, clip)
        self.optimizer.step()
        self.scheduler.step()
        (total,) = dd.reduce_sums([float(loss.detach())], self.device)
        mean = total / self.world.size
        self.result.steps += 1
        self.result.step_losses.append(mean)
        self.epoch_loss_sum += mean
        return mean

    def epoch_pass(
        self, batches: list[Batch], loss_fn: LossFn, config: TrainConfig, progress: bool, desc: str
    ) -> None:
        """This rank's share of the current epoch, from where a resumed run left off."""
        order = _epoch_order(len(batches), self.fingerprint["seed"], self.epoch, config.shuffle)
        mine = dd.shard(order, self.world)
        done_in_epoch = self.result.steps - self.epoch * self.steps_per_epoch
        title = f"{desc} {self.epoch + 1}/{config.epochs}"
        if self.result.epoch_losses:
            title += f" loss {self.result.epoch_losses[-1]:.4f}"
        if self.result.val_metrics:
            title += f" val {self.result.val_metrics[-1]:.4f}"
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.model.train()
        if self.aux is not None:
            self.aux.train()
        for i in track(mine[done_in_epoch:], title, show=progress):
            self.step(batches[i], loss_fn, params, config.grad_clip)
            if config.checkpoint_every and self.result.steps % config.checkpoint_every == 0:
                self.save()

    @torch.no_grad()
    def validate(self, val: list[Batch], evaluate: Evaluate | None, loss_fn: LossFn) -> float:
        """Metric on this rank's share of ``val``, averaged over ranks weighted by examples."""
        mine = val[self.world.rank :: self.world.size]
        self.model.eval()
        if self.aux is not None:
            self.aux.eval()
        n = sum(_num_examples(b) for b in mine)
        if not mine:
            local = 0.0
        elif evaluate is not None:
            local = float(evaluate(self.model, mine)) * n
        else:
            local = -sum(float(loss_fn(self.model, b)) * _num_examples(b) for b in mine)
        total, count = dd.reduce_sums([local, float(n)], self.device)
        return total / count

    def keep_start(self, metric: float) -> None:
        """Enter the starting weights, validated at ``metric``, as the best so far: fine-tuning a
        pretrained model can only hurt it (e.g. too high a learning rate), and ``keep_best`` must
        not then return weights worse than those it was given."""
        self.result.start_metric = self.result.best_metric = metric
        self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def end_epoch(self, metric: float | None, patience: int | None, delta: float) -> None:
        """Record the epoch's loss and metric; keep the best weights; decide early stopping."""
        self.result.epoch_losses.append(self.epoch_loss_sum / self.steps_per_epoch)
        self.epoch_loss_sum = 0.0
        self.epoch += 1
        if metric is None:
            return
        self.result.val_metrics.append(metric)
        best = self.result.best_metric
        if best is None or metric > best + delta:
            self.result.best_metric, self.result.best_epoch = metric, self.epoch - 1
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.bad_epochs = 0
            if self.path is not None and self.world.main:
                write_atomic(self.path.with_name(BEST_NAME), save_tensors(self.best_state))
        else:
            self.bad_epochs += 1
            if patience is not None and self.bad_epochs >= patience:
                self.result.stopped_early = True
