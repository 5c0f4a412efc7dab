"""Data-parallel training under ``torchrun``: process group, data sharding, metric reduction.

``torchrun --nproc_per_node N script.py`` starts N copies of a script and sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. :func:`process_group`
joins the process group they describe (gloo on CPU, nccl on GPU) for the length of a ``fit``
call, so that it trains one model with DistributedDataParallel, and leaves it again; without
those variables everything here is a no-op.

A group netshrink joined is a group netshrink destroys: a process that exits while its gloo
threads still run dies in ``std::terminate`` ("terminate called without an active exception"),
and one that leaves before the others may strand them in a collective.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Whether this is rank 0, the one process that writes files and draws progress bars."""
        return self.rank == 0


def _env_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def current() -> World:
    """The process group's rank and size, or ``World()`` when not running distributed."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def is_main_process() -> bool:
    """True on rank 0 or when not distributed: write outputs only where this holds.

    Also right after :func:`process_group` has left the group: the rank torchrun assigned
    (``RANK``) is read from the environment then.
    """
    if dist.is_available() and dist.is_initialized():
        return current().main
    return int(os.environ.get("RANK", "0")) == 0


def wanted() -> bool:
    """True when a process group exists or ``torchrun`` asked for more than one process."""
    return (dist.is_available() and dist.is_initialized()) or _env_size() > 1


def local_device() -> torch.device:
    """The device this rank trains on: its own GPU under torchrun when CUDA exists, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


@contextmanager
def process_group(device: torch.device) -> Iterator[World]:
    """Join the process group torchrun describes for the ``with`` block; yield this rank's place.

    The backend follows the device: nccl for CUDA tensors, gloo for CPU ones. A group that
    already exists (the caller's own) is used and left alone. A group joined here is left at the
    end of the block: after a barrier when the block finished (so no rank tears down while
    another still talks to it), at once when it raised (the others' next collective fails
    rather than waits for a rank that is gone).
    """
    if dist.is_initialized() or _env_size() <= 1:
        yield current()
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield current()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def shard(order: Sequence[int], world: World) -> list[int]:
    """This rank's share of ``order``: every ``size``-th item from ``rank``.

    Like ``DistributedSampler`` (drop_last=False), the order is first padded by repeating its
    head so every rank takes the same number of steps; ranks must never wait on each other.
    """
    items = list(order)
    if world.size == 1:
        return items
    padded = items + items[: (-len(items)) % world.size]
    return padded[world.rank :: world.size]


def reduce_sums(values: Sequence[float], device: torch.device) -> list[float]:
    """Sum ``values`` element-wise over all ranks (unchanged when not distributed)."""
    if current().size == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def average_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks (trainable parts outside the DDP model)."""
    size = current().size
    if size == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(size)
