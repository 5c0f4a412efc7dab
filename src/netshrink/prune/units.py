"""Score and remove the units of transformer blocks: attention heads and FFN neurons.

``prune.heads`` and ``prune.ffn`` share this: each turns the blocks :mod:`netshrink.hf.blocks`
finds into :class:`UnitBlock` s, scores every unit by a criterion, chooses the lowest-scored
ones per block or across blocks, and cuts them out with a recorded structural edit (``hf.heads``,
``hf.ffn``) so that an artifact replays the cut on a fresh model.

Criteria (a unit's weights are its slots' rows and columns; see :mod:`netshrink.hf.blocks`):

- ``l2``: the norm of all the unit's weights (Li et al. 2017, "Pruning Filters for Efficient
  ConvNets", sec. 3.1).
- ``activation``: the size of the unit's contribution to the output projection on calibration
  data, ``sum over its inputs j of rms(x_j) * ||W[:, j]||`` — the per-weight score of Wanda (Sun
  et al. 2024, "A Simple and Effective Pruning Approach for LLMs", sec. 3.1) summed over a unit.
- ``taylor``: ``(sum over the unit's weights of w * dL/dw)^2`` summed over batches, the
  first-order estimate of the loss change when the unit is removed (Molchanov et al. 2019,
  "Importance Estimation for Neural Network Pruning", sec. 3).
- ``mask`` (heads): ``sum over batches of |dL/dxi_h|`` for a gate ``xi_h = 1`` multiplying head
  h's output (Michel et al. 2019, "Are Sixteen Heads Really Better than One?", sec. 4.1).
- ``obs``: the squared output error of the block's output projection, on calibration tokens,
  after removing the unit and re-solving the projection's remaining weights by least squares,
  units removed greedily one at a time (structured Optimal Brain Surgeon,
  :mod:`netshrink.prune.obs`). The same error ``refit`` then minimises, so the two belong
  together; its scores are errors in one unit, so ``scope: global`` compares them unscaled.

``L`` is the cross-entropy when a batch has labels. Without labels (a sentence encoder distilled
later) it is ``<f(x), r>`` for a seeded Gaussian ``r`` of the output's shape: its gradient is a
random projection of the output's Jacobian, so ``E|dL/dxi|`` and ``E(w * dL/dw)^2`` measure how
much the unit moves the output, with no task loss — which would have zero gradient at the
uncompressed model anyway.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from netshrink.batches import run
from netshrink.calibrate import Gram, collect, first_tensor, real_tokens, token_mask
from netshrink.config import TechniqueConfig
from netshrink.context import Batch, Context
from netshrink.errors import UnsupportedModuleError
from netshrink.hf.blocks import Slot, slot_positions, slot_weight
from netshrink.hf.shrink import PrunedMultiheadAttention
from netshrink.layers.edits import apply_edit
from netshrink.prune.obs import greedy_order
from netshrink.prune.refit import refit_projections

Scores = dict[str, torch.Tensor]
"""Each block's unit scores by block path (higher = more important)."""


@dataclass(frozen=True)
class UnitBlock:
    """The prunable units of one block: unit ``u`` covers, in each slot ``(slot, repeat)``,
    the slot's units ``u * repeat .. (u + 1) * repeat - 1`` (a K/V group's query heads)."""

    path: str
    units: int
    slots: tuple[tuple[Slot, int], ...]
    consumer: tuple[Slot, int]
    """The output (down) projection: its inputs carry the units, contiguous and in order."""
    floor: int
    """Fewest units kept."""
    step: int = 1
    """Kept units are a multiple of this (or all of them)."""
    tie: str | None = None
    """Blocks with the same tie keep the same units."""

    def positions(self, slot: Slot, repeat: int, units: torch.Tensor) -> torch.Tensor:
        """Positions of ``units`` along ``slot``'s unit axis."""
        return slot_positions(slot, (units[:, None] * repeat + torch.arange(repeat)).flatten())


def _output(value: Any) -> torch.Tensor:
    """The first tensor of a model's output (a tensor, tuple, or Hugging Face ModelOutput)."""
    if hasattr(value, "to_tuple"):
        value = value.to_tuple()
    return first_tensor(value, "the model's output")


def probe_loss(model: nn.Module, batch: Batch, gen: torch.Generator) -> torch.Tensor:
    """The loss the data-aware criteria differentiate (see the module docstring)."""
    inputs, targets = batch
    out = _output(run(model, inputs))
    labels = torch.is_tensor(targets) and not targets.is_floating_point()
    if labels and out.dim() == 2:
        return F.cross_entropy(out, targets)
    r = torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)
    return (out * r).sum()


def _unit_weights(model: nn.Module, block: UnitBlock, grad: bool = False) -> torch.Tensor:
    """``(units, n)``: every weight (or gradient) of each unit, over all the block's slots."""
    units = torch.arange(block.units)
    rows = [
        slot_weight(model, slot, grad)[block.positions(slot, repeat, units)].reshape(
            block.units, -1
        )
        for slot, repeat in (*block.slots, block.consumer)
    ]
    return torch.cat(rows, 1)


def _consumer_input(block: UnitBlock) -> tuple[str, int]:
    """The consumer module's name and how many input features each unit holds there."""
    slot, repeat = block.consumer
    return slot.module, slot.width * repeat


def _l2(model: nn.Module, blocks: list[UnitBlock], _data: list[Batch], _seed: int) -> Scores:
    with torch.no_grad():
        return {b.path: _unit_weights(model, b).pow(2).sum(1).sqrt() for b in blocks}


def _taylor(model: nn.Module, blocks: list[UnitBlock], data: list[Batch], seed: int) -> Scores:
    gen = torch.Generator().manual_seed(seed)
    scores = {b.path: torch.zeros(b.units) for b in blocks}
    for batch in data:
        model.zero_grad(set_to_none=True)
        probe_loss(model, batch, gen).backward()
        with torch.no_grad():
            for b in blocks:
                w, g = _unit_weights(model, b), _unit_weights(model, b, grad=True)
                scores[b.path] += (w * g).sum(1).pow(2)
    model.zero_grad(set_to_none=True)
    return scores


def _hooked(
    model: nn.Module, blocks: list[UnitBlock], hook: Callable[[UnitBlock, torch.Tensor], Any]
) -> list[Any]:
    """Forward pre-hooks calling ``hook(block, input)`` on every block's consumer; the handles."""
    handles = []
    for b in blocks:
        name, _ = _consumer_input(b)

        def pre(_m: nn.Module, args: tuple[Any, ...], b: UnitBlock = b) -> Any:
            out = hook(b, args[0])
            return None if out is None else (out, *args[1:])

        handles.append(model.get_submodule(name).register_forward_pre_hook(pre))
    return handles


def _check_called(calls: dict[str, int], criterion: str) -> None:
    silent = [path for path, n in calls.items() if n == 0]
    if silent:
        raise UnsupportedModuleError(
            f"criterion {criterion!r} reads the inputs of the output projections, but the ones of "
            f"{', '.join(silent)} were never called on calib_data; use criterion l2 or taylor"
        )


def _activation(model: nn.Module, blocks: list[UnitBlock], data: list[Batch], _seed: int) -> Scores:
    sq = {b.path: torch.zeros(b.units * _consumer_input(b)[1]) for b in blocks}
    calls = dict.fromkeys(sq, 0)
    mask: list[torch.Tensor | None] = [None]  # the running batch's real tokens

    def record(b: UnitBlock, x: torch.Tensor) -> None:
        # padding positions would pull every unit's mean square towards what pads produce
        flat = real_tokens(x.detach(), mask[0]).reshape(-1, x.shape[-1]).float()
        sq[b.path] += flat.pow(2).mean(0)
        calls[b.path] += 1

    handles = _hooked(model, blocks, record)
    try:
        with torch.no_grad():
            for inputs, _ in data:
                mask[0] = token_mask(inputs)
                run(model, inputs)
    finally:
        for h in handles:
            h.remove()
    _check_called(calls, "activation")
    scores = {}
    for b in blocks:
        slot, _ = b.consumer
        rms = (sq[b.path] / calls[b.path]).sqrt()
        with torch.no_grad():
            cols = slot_weight(model, slot)[: rms.numel()].norm(dim=1)
        scores[b.path] = (rms * cols).reshape(b.units, -1).sum(1)
    return scores


def _mask(model: nn.Module, blocks: list[UnitBlock], data: list[Batch], seed: int) -> Scores:
    gen = torch.Generator().manual_seed(seed)
    gates = {b.path: torch.ones(b.units, requires_grad=True) for b in blocks}
    scores = {b.path: torch.zeros(b.units) for b in blocks}
    calls = dict.fromkeys(gates, 0)

    def gate(b: UnitBlock, x: torch.Tensor) -> torch.Tensor:
        calls[b.path] += 1
        width = _consumer_input(b)[1]
        return x * gates[b.path].repeat_interleave(width).to(x.dtype)

    handles = _hooked(model, blocks, gate)
    try:
        for batch in data:
            for g in gates.values():
                g.grad = None
            probe_loss(model, batch, gen).backward()
            for path, g in gates.items():
                if g.grad is not None:
                    scores[path] += g.grad.abs()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    _check_called(calls, "mask")
    return scores


def _obs(model: nn.Module, blocks: list[UnitBlock], data: list[Batch], _seed: int) -> Scores:
    grams = {_consumer_input(b)[0]: [Gram()] for b in blocks}
    collect(model, grams, data, "structured OBS statistics", show=False)
    _check_called({b.path: grams[_consumer_input(b)[0]][0].count for b in blocks}, "obs")
    scores = {}
    for b in blocks:
        name, width = _consumer_input(b)
        with torch.no_grad():
            weight = slot_weight(model, b.consumer[0])[: b.units * width]
        scores[b.path] = greedy_order(weight, grams[name][0].sum, width, b.floor)
    return scores


CRITERIA: dict[str, Callable[[nn.Module, list[UnitBlock], list[Batch], int], Scores]] = {
    "l2": _l2,
    "activation": _activation,
    "taylor": _taylor,
    "mask": _mask,
    "obs": _obs,
}
DATA_CRITERIA = ("activation", "taylor", "mask", "obs")
"""Criteria that run the model on calibration data."""


class UnitPruneConfig(TechniqueConfig):
    """Options ``prune.heads`` and ``prune.ffn`` share (each declares its own ``criterion``)."""

    if TYPE_CHECKING:
        criterion: str

    batches: int = Field(
        8, ge=1, le=10_000, description="calibration batches the data-aware criteria and refit read"
    )
    refit: bool = Field(
        False,
        description="refit each cut block's output projection by least squares so it "
        "reproduces the unpruned output on the calibration batches (no training)",
    )
    calib_split: Literal["calib", "train"] = Field(
        "calib",
        description="where the data-aware criteria and refit read their batches: calib_data, "
        "or train_data (usually more text: a refit on 64 batches overfits less than on 8)",
    )

    def reads_data(self) -> bool:
        """Whether a run reads calibration batches: a data-aware criterion or ``refit``."""
        return self.criterion in DATA_CRITERIA or self.refit

    @model_validator(mode="after")
    def _split_read(self) -> UnitPruneConfig:
        if self.calib_split == "train" and not self.reads_data():
            raise ValueError(
                f"calib_split: train has no effect: criterion: {self.criterion} with refit: false "
                "reads no data; use a data-aware criterion or refit: true, or calib_split: calib"
            )
        return self


def needs_calib(config: UnitPruneConfig) -> tuple[str, ...]:
    """What ``config`` reads, if any: ``calib_data``, or ``train_data`` (``calib_split: train``)."""
    return (f"{config.calib_split}_data",) if config.reads_data() else ()


@contextmanager
def _projections_called(model: nn.Module) -> Iterator[None]:
    """Run every ``nn.MultiheadAttention`` as :class:`PrunedMultiheadAttention` (same result),
    whose forward calls ``out_proj`` — torch's computes with its weight — so the hooks of the
    data-aware criteria see the heads' outputs."""
    swapped = [m for m in model.modules() if type(m) is nn.MultiheadAttention]
    flags = [m._qkv_same_embed_dim for m in swapped]
    for m in swapped:
        m.__class__ = PrunedMultiheadAttention
        m._qkv_same_embed_dim = False  # nn.TransformerEncoderLayer's fast path skips modules
    try:
        yield
    finally:
        for m, flag in zip(swapped, flags, strict=True):
            m.__class__ = nn.MultiheadAttention
            m._qkv_same_embed_dim = flag


def score(
    model: nn.Module, blocks: list[UnitBlock], criterion: str, data: Iterable[Batch], seed: int
) -> Scores:
    """Each block's unit scores (higher = more important), tied blocks summed together."""
    batches = list(data) if criterion in DATA_CRITERIA else []
    was_training = model.training
    model.eval()  # dropout off: the score of a unit must not depend on a random draw
    with _projections_called(model):
        try:
            scores = CRITERIA[criterion](model, blocks, batches, seed)
        finally:
            model.train(was_training)
    tied: dict[str, torch.Tensor] = {}
    for b in blocks:
        if b.tie is not None:
            tied[b.tie] = tied.get(b.tie, 0) + scores[b.path]
    return {b.path: tied[b.tie] if b.tie is not None else scores[b.path] for b in blocks}


def _kept(block: UnitBlock, keep: int) -> int:
    """``keep`` raised to the block's floor and rounded up to its step (at most all units)."""
    keep = max(keep, block.floor)
    return min(block.units, math.ceil(keep / block.step) * block.step)


def choose(
    blocks: list[UnitBlock], scores: Scores, ratio: float, scope: str, scaled: bool = True
) -> dict[str, list[int]]:
    """The units each block keeps: all but the lowest-scored ``ratio`` of each block
    (``layer``), or of all units at once (``global``; with ``scaled``, scores divided by their
    block's mean so blocks of different scale compare, as Michel et al. normalise per layer,
    sec. 4.2; without, as given: ``obs`` costs are all squared output errors already)."""
    leaders = {b.tie or b.path: b for b in blocks}  # one decision per tie
    if scope == "layer":
        counts = {k: _kept(b, b.units - round(ratio * b.units)) for k, b in leaders.items()}
    else:
        ranked = sorted(
            (float(s / ((scores[b.path].mean() or 1.0) if scaled else 1.0)), u, k)
            for k, b in leaders.items()
            for u, s in enumerate(scores[b.path])
        )
        members = {k: sum(1 for b in blocks if (b.tie or b.path) == k) for k in leaders}
        budget = round(ratio * sum(b.units * members[k] for k, b in leaders.items()))
        counts = {k: b.units for k, b in leaders.items()}
        for _, _, k in ranked:
            if budget <= 0:
                break
            if counts[k] > leaders[k].floor:
                counts[k] -= 1
                budget -= members[k]
        counts = {k: _kept(leaders[k], n) for k, n in counts.items()}
    keep = {}
    for k, b in leaders.items():
        order = torch.argsort(scores[b.path], descending=True, stable=True)
        keep[k] = sorted(order[: counts[k]].tolist())
    return {b.path: keep[b.tie or b.path] for b in blocks}


def prune_blocks(
    model: nn.Module, blocks: list[UnitBlock], config: Any, ctx: Context, edit: str, what: str
) -> None:
    """Score, choose and cut the units of ``blocks`` as ``config`` (``ratio``, ``criterion``,
    ``scope``, ``batches``, ``calib_split``, ``refit``) says, with the recorded edit ``edit``
    (``hf.heads`` / ``hf.ffn``); with ``refit``, then refit the cut blocks' output projections
    by least squares on the calibration batches (:mod:`netshrink.prune.refit`).

    Raises when nothing of a non-zero ratio could be removed (every block at its floor); warns
    (the stage's note) when less than half of it was. ``what`` names the units in messages.
    """
    name = "prune.heads" if edit == "hf.heads" else "prune.ffn"
    source = ctx.train_data if config.calib_split == "train" else ctx.calib_data
    data = list(islice(source, config.batches)) if source is not None else []
    scores = score(model, blocks, config.criterion, data, ctx.seed)
    keep = choose(blocks, scores, config.ratio, config.scope, scaled=config.criterion != "obs")
    original = copy.deepcopy(model) if config.refit else None
    removed, total, cut = 0, sum(b.units for b in blocks), []
    for b in blocks:
        if len(keep[b.path]) < b.units:
            apply_edit(model, edit, module=b.path, keep=keep[b.path])
            removed += b.units - len(keep[b.path])
            cut.append(_consumer_input(b)[0])
    if config.ratio > 0 and removed == 0:
        raise UnsupportedModuleError(
            f"{name}: achieved 0% of the requested {config.ratio:.0%} of {total} {what}, because "
            "every block is at its floor (min_heads / round_to); lower it or raise ratio"
        )
    if removed < config.ratio * total / 2:
        warnings.warn(
            f"{name}: achieved {removed / total:.0%} of the requested {config.ratio:.0%} of "
            f"{what}, because of the per-block floor (min_heads / round_to)",
            stacklevel=3,
        )
    if original is not None and cut:
        with _projections_called(original), _projections_called(model):
            refit_projections(model, original, cut, data)
