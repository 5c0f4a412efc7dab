"""The sequential engine: calibrate and compress a model one block at a time.

One-shot methods that reconstruct each layer from its inputs (GPTQ, Frantar et al. 2022;
SparseGPT, Frantar & Alistarh 2023; Wanda, Sun et al. 2023; SmoothQuant; AWQ) work block by
block: block k is calibrated on the inputs that the *already compressed* blocks 0..k-1 produce,
so each block compensates for what the earlier ones lost (the order GPTQ and SparseGPT
calibrate in). Steps:

1. Find the blocks: the repeated children of a ``ModuleList`` (a transformer's layers), or the
   modules the caller names.
2. Run the model once per calibration batch up to the first block and keep that block's call
   arguments (positional and keyword: attention masks, position ids), then stop the forward;
   keep the batch's padding mask too, so padding stays out of the statistics (see
   :mod:`~netshrink.calibrate.collect`).
3. For each block: run it on the kept inputs with the compressor's statistic points hooked on
   its layers (each batch in pieces of at most :data:`PIECE_ROWS` rows where that reproduces
   the block's output, so the forward's activations stay small beside the statistics), let
   the compressor change the block, run the changed block again and keep its outputs as the
   next block's first positional input (the keyword arguments stay).

Peak memory is the model plus one block's inputs and outputs over the calibration set, plus the
statistics; :class:`SequentialReport` records the activation and statistics bytes measured.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils import _pytree as pytree

from netshrink.batches import run
from netshrink.calibrate.collect import Hooks, Points, first_tensor, module_calls, token_mask
from netshrink.calibrate.memory import large_tensors_unmapped, release_freed_memory
from netshrink.calibrate.reducers import Reducer
from netshrink.context import Batch
from netshrink.errors import DataError, TargetError, UnsupportedModuleError
from netshrink.progress import track


class BlockCompressor(Protocol):
    """What a sequential method does with each block."""

    def statistics(self, name: str, block: nn.Module) -> Points:
        """Statistic points to collect in ``block`` (names relative to it; may be empty)."""
        ...

    def compress(self, name: str, block: nn.Module, points: Points) -> None:
        """Change ``block`` in place, reading the reducers of the points it asked for."""
        ...


class PerLayer:
    """The :class:`BlockCompressor` of methods that compress layer by layer from one reducer
    each (GPTQ's and SparseGPT's XᵀX, Wanda's input norms): in each block, every layer ``owned``
    lists for it (qualified names) gets a fresh ``reducer()``; then ``compress(stats)`` runs with
    those reducers, filled, keyed by qualified name."""

    def __init__(
        self,
        owned: Mapping[str, Sequence[str]],
        reducer: Callable[[], Reducer],
        compress: Callable[[dict[str, Any]], None],
    ) -> None:
        self.owned, self.reducer, self.compress_layers = owned, reducer, compress
        self.stats: dict[str, Any] = {}

    def statistics(self, name: str, block: nn.Module) -> Points:
        self.stats = {n: self.reducer() for n in self.owned.get(name, ())}
        return {n.removeprefix(f"{name}."): [s] for n, s in self.stats.items()}

    def compress(self, name: str, block: nn.Module, points: Points) -> None:
        self.compress_layers(self.stats)


@dataclass(frozen=True)
class SequentialReport:
    """What one sequential run held: bytes are tensor bytes (numel x element size)."""

    blocks: tuple[str, ...]
    model_bytes: int
    peak_activation_bytes: int
    """Most bytes held at once in block inputs/outputs and statistics."""

    @property
    def peak_bytes(self) -> int:
        """Model parameters and buffers plus the peak activation and statistics bytes."""
        return self.model_bytes + self.peak_activation_bytes

    def __str__(self) -> str:
        mib = 2**20
        return (
            f"sequential calibration over {len(self.blocks)} blocks: model "
            f"{self.model_bytes / mib:.1f} MiB + peak activations/statistics "
            f"{self.peak_activation_bytes / mib:.1f} MiB = {self.peak_bytes / mib:.1f} MiB"
        )


def find_blocks(model: nn.Module, names: Sequence[str] = ()) -> list[str]:
    """Qualified names of the blocks, in execution order.

    ``names`` given: checked to exist. Otherwise the children of the ``ModuleList`` holding the
    most parameters among those with at least two children all of one type (BERT's
    ``encoder.layer``, ``nn.TransformerEncoder``'s ``layers``). Raises :class:`TargetError`.
    """
    modules = dict(model.named_modules())
    if names:
        missing = [n for n in names if n not in modules or not n]
        if missing:
            raise TargetError(f"blocks {missing} are not modules of the model; name submodules")
        return list(names)
    best, best_params = "", 0
    for name, module in modules.items():
        kids = list(module.children())
        if not isinstance(module, nn.ModuleList) or len(kids) < 2:
            continue
        if len({type(k) for k in kids}) == 1:
            params = sum(p.numel() for p in module.parameters())
            if params > best_params:
                best, best_params = name, params
    if not best_params:
        raise TargetError(
            f"{type(model).__name__} has no ModuleList of repeated blocks; "
            "name the blocks to calibrate one at a time (e.g. blocks: [encoder.0, encoder.1])"
        )
    prefix = f"{best}." if best else ""
    return [f"{prefix}{child}" for child, _ in modules[best].named_children()]


@dataclass
class BlockCall:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    tokens: torch.Tensor | None
    """The batch's :func:`token_mask`: which positions are real tokens (None: all)."""


class StopForward(Exception):
    """Raised inside the first block's hook: the rest of the forward is not needed."""


def tensor_bytes(values: Iterable[Any]) -> int:
    """Bytes of the distinct tensor storages among ``values`` (nested tuples, lists, dicts)."""
    seen: dict[int, int] = {}

    def visit(v: Any) -> None:
        if torch.is_tensor(v):
            seen[v.untyped_storage().data_ptr()] = v.untyped_storage().nbytes()
        elif isinstance(v, tuple | list):
            for item in v:
                visit(item)
        elif isinstance(v, Mapping):
            for item in v.values():
                visit(item)
        elif isinstance(v, BlockCall):
            visit(v.args)
            visit(v.kwargs)
            visit(v.tokens)

    for v in values:
        visit(v)
    return sum(seen.values())


def first_block_calls(
    model: nn.Module, block: nn.Module, batches: Sequence[Batch]
) -> list[BlockCall]:
    """The arguments ``block`` is called with, once per batch, without running past it.

    Raises :class:`DataError` when the model fails on a batch before reaching the block: it is
    the model as given that does not run on the calibration data (say an encoder-decoder given
    no decoder inputs), not a layer to leave out."""
    calls: list[BlockCall] = []
    tokens: torch.Tensor | None = None

    def grab(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        calls.append(BlockCall(args, dict(kwargs), tokens))
        raise StopForward

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for inputs, _ in batches:
            tokens = token_mask(inputs)
            try:
                run(model, inputs)
            except StopForward:
                continue
            except Exception as exc:
                raise DataError(
                    f"{type(model).__name__} does not run on the calibration batches "
                    f"({type(exc).__name__}: {exc}); give calib_data inputs its forward "
                    "accepts (an encoder-decoder needs its decoder inputs too)"
                ) from exc
            raise UnsupportedModuleError(
                f"the first block never ran on a calibration batch; choose blocks that "
                f"{type(model).__name__}.forward calls"
            )
    finally:
        handle.remove()
    return calls


def next_input(call: BlockCall, output: Any, name: str) -> BlockCall:
    """``call`` with its first positional argument replaced by the block's output tensor."""
    if not call.args:
        raise UnsupportedModuleError(
            f"block {name!r} takes its hidden state as a keyword argument; "
            "the sequential engine needs it as the first positional argument"
        )
    hidden = first_tensor(output, f"block {name!r}'s output")
    return BlockCall((hidden, *call.args[1:]), call.kwargs, call.tokens)


PIECE_ROWS = 1024
"""Most batch x position rows one statistics forward runs at once (MiniLM's FFN: 6 MiB per
activation). A statistics forward's activations come on top of the block's statistics
(GPTQ's float64 Gram sums; the staged engine's two streams and their captured inputs): a whole
16 x 101-token batch was 21 MiB of one stream's."""


def split_call(call: BlockCall, rows: int) -> list[BlockCall]:
    """``call`` cut along its batch dimension (its first argument's first) into calls of at
    most ``rows`` batch x position rows (at least one sequence each); ``[call]`` when it fits
    or ``rows`` is 0."""
    hidden = call.args[0] if call.args and torch.is_tensor(call.args[0]) else None
    if not rows or hidden is None or hidden.dim() < 2:
        return [call]
    batch = hidden.shape[0]
    size = max(1, rows // max(1, hidden[0].numel() // hidden.shape[-1]))
    if size >= batch:
        return [call]

    def cut(part: slice) -> BlockCall:
        # every tensor of two or more dimensions whose first is the batch's is per sequence
        def piece(v: Any) -> Any:
            per_sequence = torch.is_tensor(v) and v.dim() >= 2 and v.shape[0] == batch
            return v[part] if per_sequence else v

        args, kwargs = pytree.tree_map(piece, (call.args, call.kwargs))
        return BlockCall(args, kwargs, None if call.tokens is None else call.tokens[part])

    return [cut(slice(i, i + size)) for i in range(0, batch, size)]


def piece_rows(block: nn.Module, calls: Sequence[BlockCall], rows: int | None = None) -> int:
    """``rows`` (default :data:`PIECE_ROWS`) when running the first of ``calls`` that
    :func:`split_call` cuts on ``block`` in its pieces gives the whole call's output (within
    float rounding: 1e-4 of the output's largest magnitude), or no call needs cutting; else 0
    (every call runs whole). Which of a block's arguments are per-sequence is only known by
    trying: a block that mixes sequences, or takes a batch-sized tensor that is not
    per-sequence, runs whole."""
    rows = PIECE_ROWS if rows is None else rows
    found = next(((c, p) for c in calls if len(p := split_call(c, rows)) > 1), None)
    if found is None:
        return rows
    call, parts = found
    whole = first_tensor(block(*call.args, **call.kwargs), "the block's output")
    try:
        joined = torch.cat(
            [first_tensor(block(*p.args, **p.kwargs), "the block's output") for p in parts]
        )
    except Exception:  # any failure of a piece (a shape check, an assert) means: run whole
        return 0
    tolerance = 1e-4 * float(whole.abs().max())
    same = joined.shape == whole.shape and torch.allclose(joined, whole, rtol=0, atol=tolerance)
    return rows if same else 0


def run_blocks(
    model: nn.Module,
    batches: Sequence[Batch],
    compressor: BlockCompressor,
    blocks: Sequence[str] = (),
    show: bool = True,
) -> SequentialReport:
    """Calibrate and compress ``model`` block by block (see the module docstring).

    ``batches`` are ``(inputs, targets)`` with inputs a tensor, a tuple or a dict of tensors.
    The model runs in eval mode without gradients (see :func:`module_calls`); its mode is
    restored afterwards.
    """
    names = find_blocks(model, blocks)
    model_bytes = tensor_bytes([*model.parameters(), *model.buffers()])
    with module_calls(model), large_tensors_unmapped():
        calls = first_block_calls(model, model.get_submodule(names[0]), batches)
        peak = tensor_bytes(calls)
        for i, name in enumerate(names):
            block = model.get_submodule(name)
            points = compressor.statistics(name, block)
            if points:
                rows = piece_rows(block, calls)
                with Hooks(block, points, role=f"block {name!r}") as hooks:
                    for call in track(calls, f"calibrate block {i + 1}/{len(names)}", show=show):
                        for part in split_call(call, rows):
                            hooks.tokens = part.tokens
                            block(*part.args, **part.kwargs)
            # counted before compressing: a compressor may free statistics as it uses them
            stats_bytes = sum(r.nbytes() for rs in points.values() for r in rs)
            compressor.compress(name, block, points)
            release_freed_memory()  # the statistics and the compressor's working copies
            outputs = []
            for call in track(calls, f"propagate block {i + 1}/{len(names)}", show=show):
                outputs.append(next_input(call, block(*call.args, **call.kwargs), name))
            peak = max(peak, tensor_bytes([*calls, *outputs]) + stats_bytes)
            calls = outputs
            release_freed_memory()  # the block's inputs
    return SequentialReport(tuple(names), model_bytes, peak)
