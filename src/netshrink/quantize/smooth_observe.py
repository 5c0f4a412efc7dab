"""The calibration pass of ``quantize.smoothquant`` (and ``quantize.awq``): activation
statistics, and which tensor feeds which Linear.

Which tensor feeds which Linear is found during the calibration pass, without tracing: forward
hooks note every norm's/Linear's output tensor, and a torch function mode sees every operation
that reads it. A producer is smoothed only when every reader of its output is a Linear's matmul
(dropout in eval and ``.to`` return the tensor itself and do not count).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from netshrink.batches import run
from netshrink.calibrate.collect import module_calls
from netshrink.progress import track

NORMS = (nn.LayerNorm, nn.RMSNorm)


@dataclass
class Half:
    """The range and sampled rows of every other calibration call (even or odd ones): one fold
    of the cross-validation ``alpha: auto`` scores with."""

    lo: torch.Tensor | None = None
    """min X_j per channel over these calls."""
    hi: torch.Tensor | None = None
    """max X_j per channel over these calls."""
    rows: list[torch.Tensor] = field(default_factory=list)
    """The sampled rows of these calls."""

    def note(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Widen the range by one call's per-channel minimum and maximum."""
        self.lo = lo if self.lo is None else torch.minimum(self.lo, lo)
        self.hi = hi if self.hi is None else torch.maximum(self.hi, hi)

    @property
    def absmax(self) -> torch.Tensor | None:
        """max |X_j| per channel over these calls."""
        return None if self.lo is None or self.hi is None else self.lo.abs().maximum(self.hi.abs())


@dataclass
class Producer:
    """What one norm's or Linear's output was seen doing over the calibration batches."""

    absmax: torch.Tensor | None = None
    """max |X_j| per channel j of the output (the last dimension)."""
    lo: torch.Tensor | None = None
    """min X_j per channel."""
    hi: torch.Tensor | None = None
    """max X_j per channel."""
    rows: list[torch.Tensor] = field(default_factory=list)
    """A sample of output rows from every call, for the alpha search."""
    readers: set[str] = field(default_factory=set)
    """Linears whose matmul read the output."""
    other: str = ""
    """An operation other than a Linear's matmul that read it (the first seen)."""
    halves: tuple[Half, Half] = field(default_factory=lambda: (Half(), Half()))
    """The statistics of the even and of the odd calls (cross-validation folds)."""
    calls: int = 0
    """Calls seen so far."""


class _Readers(TorchFunctionMode):
    """Notes which operation reads each live producer output (by tensor identity)."""

    def __init__(
        self,
        live: dict[int, str],
        owners: dict[int, str],
        seen: dict[str, Producer],
        fed: dict[str, set[str]],
    ) -> None:
        super().__init__()
        self.live, self.owners, self.seen, self.fed = live, owners, seen, fed
        self.paused = False
        """True while the hooks compute statistics: their own reads are not the model's."""

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.paused:
            return result
        linear = self.owners.get(id(args[1]), "") if func is F.linear and len(args) > 1 else ""
        if linear:  # where this Linear's input came from: a producer, or "" for anything else
            self.fed.setdefault(linear, set()).add(self.live.get(id(args[0]), ""))
        op = getattr(func, "__name__", str(func))
        in_place = op.endswith("_") or op.startswith("__i")  # add_, __iadd__: change the tensor
        for arg in pytree.tree_leaves((args, kwargs)):
            name = self.live.get(id(arg)) if torch.is_tensor(arg) else None
            if name is None or (result is arg and not in_place):
                continue  # not a producer output, or an op returning it unchanged (eval dropout)
            if not any(torch.is_tensor(r) for r in pytree.tree_leaves(result)):
                continue  # .shape, .size(), .dim(): metadata only
            producer = self.seen[name]
            if linear and arg is args[0]:
                producer.readers.add(linear)
            elif not producer.other:
                producer.other = op
        return result


ROW_CALLS = 16
"""The alpha search's rows are spread over this many calls (calibration batches) at least."""


def _note_output(p: Producer, out: torch.Tensor, keep_rows: int) -> None:
    """Fold one output into ``p``: the channel range, and a sample of rows until ``keep_rows``
    are kept: from each call, the rows holding its largest values (they set the int8 range,
    and their error is the one smoothing trades) and rows evenly spaced over the rest."""
    flat = out.detach().reshape(-1, out.shape[-1]).float()
    lo, hi = flat.amin(0), flat.amax(0)
    p.lo = lo if p.lo is None else torch.minimum(p.lo, lo)
    p.hi = hi if p.hi is None else torch.maximum(p.hi, hi)
    p.absmax = torch.maximum(p.lo.abs(), p.hi.abs())
    half = p.halves[p.calls % 2]
    half.note(lo, hi)
    p.calls += 1
    quota = min(keep_rows - sum(len(r) for r in p.rows), max(1, keep_rows // ROW_CALLS))
    if quota <= 0:
        return
    peaks = flat.abs().amax(1).topk(min(len(flat), max(1, quota // 4))).indices
    spaced = torch.linspace(0, len(flat) - 1, quota - len(peaks)).long()
    p.rows.append(flat[torch.cat([peaks, spaced]).unique()].clone())
    half.rows.append(p.rows[-1])


@contextmanager
def _watch(
    model: nn.Module,
    seen: dict[str, Producer],
    inputs: dict[str, Producer],
    fed: dict[str, set[str]],
    keep_rows: int,
) -> Iterator[_Readers]:
    """Hooks on the producers named in ``seen`` and the mode noting who reads their outputs;
    the inputs of the Linears named in ``inputs`` are noted like producer outputs."""
    owners = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    live: dict[int, str] = {}
    held: list[torch.Tensor] = []  # outputs stay alive while noted: their ids stay unique
    mode = _Readers(live, owners, seen, fed)

    def hook(name: str):
        def note(_m: nn.Module, _args: Any, out: Any) -> None:
            if torch.is_tensor(out):
                live[id(out)] = name
                held.append(out)
                mode.paused = True
                _note_output(seen[name], out, keep_rows)
                mode.paused = False

        return note

    def pre_hook(name: str):
        def note(_m: nn.Module, args: Any) -> None:
            if args and torch.is_tensor(args[0]):
                mode.paused = True
                _note_output(inputs[name], args[0], keep_rows)
                mode.paused = False

        return note

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in seen]
    handles += [model.get_submodule(n).register_forward_pre_hook(pre_hook(n)) for n in inputs]
    try:
        with mode:
            yield mode
    finally:
        for h in handles:
            h.remove()


@dataclass
class Observed:
    """What the calibration pass saw."""

    producers: dict[str, Producer]
    """Each norm's and Linear's output: statistics and readers."""
    inputs: dict[str, Producer]
    """Each targeted Linear's input (over every call): statistics."""
    fed: dict[str, set[str]]
    """Each Linear -> the producers whose outputs it read ("" for any other tensor)."""


def observe(
    model: nn.Module, batches: list, targeted: set[str], keep_rows: int, show: bool
) -> Observed:
    """One calibration pass: every producer's statistics and readers, every Linear's sources,
    every targeted Linear's input statistics.

    Producers are the norms with a weight and the Linears. Each batch runs under its own
    hooks, so tensor ids of one batch never alias those of another.
    """
    seen = {
        n: Producer()
        for n, m in model.named_modules()
        if (isinstance(m, NORMS) and m.weight is not None) or isinstance(m, nn.Linear)
    }
    inputs = {n: Producer() for n in sorted(targeted)}
    fed: dict[str, set[str]] = {}
    with module_calls(model):
        for batch, _ in track(batches, "smoothquant: activation ranges", show=show):
            with _watch(model, seen, inputs, fed, keep_rows) as mode:
                for leaf in pytree.tree_leaves(run(model, batch)):
                    name = mode.live.get(id(leaf)) if torch.is_tensor(leaf) else None
                    if name is not None and not seen[name].other:
                        seen[name].other = "the model's outputs"  # returned as it is
    return Observed(seen, inputs, fed)


def _why_not(name: str, p: Producer, fed: dict[str, set[str]], targeted: set[str]) -> str:
    """Why producer ``name`` cannot be smoothed, or "" when it can."""
    if p.other:
        return f"its output also feeds {p.other} (a residual or another op), not only Linears"
    strays = sorted(r for r in p.readers if r not in targeted or fed.get(r) != {name})
    if strays:
        return f"{', '.join(strays)} are not targeted or also read other inputs"
    return ""


def plan(
    seen: dict[str, Producer], fed: dict[str, set[str]], targeted: set[str]
) -> tuple[dict[str, list[str]], list[str]]:
    """Producer -> the targeted Linears reading it, for every producer that can be smoothed;
    and for each that cannot, its readers and why."""
    pairs, refused = {}, []
    for name, p in seen.items():
        readers = sorted(p.readers & targeted)
        if not readers or p.absmax is None:
            continue
        why = _why_not(name, p, fed, targeted)
        if why:
            refused.append(f"{', '.join(readers)} (after {name}: {why})")
        else:
            pairs[name] = readers
    return pairs, refused


def in_layer_groups(obs: Observed, folded: set[str]) -> list[list[str]]:
    """The Linears to smooth in the layer, grouped: those reading one producer's output share a
    group (one s, as Q, K and V after a post-LN norm); any other Linear is a group of its own.

    Left out: Linears already folded and those never called (no input statistics).
    """
    groups: dict[str, list[str]] = {}
    for name, p in obs.inputs.items():
        if name in folded or p.absmax is None:
            continue
        sources = obs.fed.get(name, set())
        key = f"from:{next(iter(sources))}" if len(sources) == 1 and "" not in sources else name
        groups.setdefault(key, []).append(name)
    return list(groups.values())


def merged(stats: list[Producer]) -> Producer:
    """The statistics of one tensor read by several Linears (each saw all of it, call by
    call, so their halves hold the same calls)."""
    lo = torch.stack([p.lo for p in stats]).amin(0)  # type: ignore[misc]
    hi = torch.stack([p.hi for p in stats]).amax(0)  # type: ignore[misc]
    even, odd = (Half(rows=h.rows) for h in stats[0].halves)
    for p in stats:
        for mine, theirs in zip((even, odd), p.halves, strict=True):
            if theirs.lo is not None and theirs.hi is not None:
                mine.note(theirs.lo, theirs.hi)
    absmax = torch.maximum(lo.abs(), hi.abs())
    return Producer(absmax, lo, hi, stats[0].rows, halves=(even, odd), calls=stats[0].calls)
