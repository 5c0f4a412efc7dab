"""True-sequential and asymmetric block calibration for layer-wise reconstruction.

:func:`netshrink.calibrate.run_blocks` calibrates all layers of a block on one pass of the
block's inputs, then compresses them together. :func:`run_stages` refines this in two ways:

- **True-sequential** (SparseGPT, Frantar & Alistarh 2023, sec. 4 "true sequential"; GPTQ's
  reference code): inside a block the layers are compressed in *stages*, in the order the
  block's forward calls them; layers that read the same input tensor (BERT's query, key and
  value) form one stage. Each stage is calibrated on the outputs of the stages before it
  *after* they were compressed: the attention output projection sees the pruned q/k/v's
  attention, the FFN output sees the pruned FFN input.
- **Asymmetric** (GPTAQ, Li et al. 2025, sec. 3): a dense copy of each block runs beside it on
  the full-precision model's own block inputs, so each layer's statistics pair the compressed
  model's input X~ with the input X the full-precision model gives that layer on the same
  tokens. The reconstruction target is then the full-precision output X W^T, not X~ W^T, and
  errors made upstream are corrected downstream.

Each stage's statistics are :class:`Paired` reducers (X~^T X~, X~^T X and the inputs' sums).
Peak memory: the model, one block's inputs and outputs (twice, with the reference stream), one
dense copy of the block, one stage's statistics, and the activations of one forward of each
stream, which the statistics' forwards bound by running each batch in pieces, as
:func:`~netshrink.calibrate.run_blocks` does (:func:`~netshrink.calibrate.sequential.piece_rows`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from netshrink.calibrate.collect import module_calls
from netshrink.calibrate.memory import large_tensors_unmapped, release_freed_memory
from netshrink.calibrate.reducers import Reducer, input_vectors, row_chunks, token_rows
from netshrink.calibrate.sequential import (
    BlockCall,
    SequentialReport,
    StopForward,
    find_blocks,
    first_block_calls,
    next_input,
    piece_rows,
    split_call,
    tensor_bytes,
)
from netshrink.context import Batch
from netshrink.progress import track


class Paired(Reducer):
    """Running sums over the real tokens of one layer's inputs: the matrices in the inputs'
    precision, at least float32, as GPTQ's and SparseGPT's reference code accumulate H (in
    float64 a stage's two (in, in) matrices were 36 MiB at MiniLM's 1536 FFN inputs, the
    largest thing the staged engine held beside the model), each chunk's products summed by
    the GEMM before one addition; the vector sums in float64.

    ``gram`` = sum x~ x~^T over the compressed model's inputs x~, ``total`` = sum x~; with a
    reference stream also ``cross`` = sum x~ x^T and ``reference_total`` = sum x, x the
    full-precision model's input on the same token (None without one: x = x~, and only the
    Gram matrix is held). ``count``: the tokens. As a reducer hooked by
    :func:`netshrink.calibrate.collect` it sees one stream.
    """

    tokens_only = True

    def __init__(self) -> None:
        super().__init__("input")
        self.gram: torch.Tensor | None = None
        self.total: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.reference_total: torch.Tensor | None = None
        self.count = 0

    def update(self, module: nn.Module, x: torch.Tensor) -> None:
        self.add(input_vectors(module, x.detach()))

    def add(
        self,
        x: torch.Tensor,
        reference: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> None:
        """Fold the (vectors, in) inputs ``x`` (compressed) and their ``reference`` (the
        full-precision model's, the same shape; give it on every call or on none), only the
        vectors at indices ``rows`` when given (a padded batch's real tokens, see
        :func:`~netshrink.calibrate.reducers.token_rows`). The vectors are gathered
        :data:`~netshrink.calibrate.reducers.CHUNK` at a time and their products added in
        place: no copy of the batch's real rows and no second (in, in) matrix."""
        if self.gram is None:
            dtype = torch.promote_types(x.dtype, torch.float32)
            self.gram = x.new_zeros(x.shape[1], x.shape[1], dtype=dtype)
            self.total = x.new_zeros(x.shape[1], dtype=torch.float64)
            if reference is not None:
                self.cross = torch.zeros_like(self.gram)
                self.reference_total = torch.zeros_like(self.total)
        assert self.total is not None
        paired = row_chunks(reference, rows) if reference is not None else None
        for chunk in row_chunks(x, rows):
            v = chunk.to(self.gram.dtype)
            self.gram.addmm_(v.T, v)
            self.total += v.sum(0, dtype=torch.float64)
            if paired is not None:
                assert self.cross is not None and self.reference_total is not None
                r = next(paired).to(self.gram.dtype)
                self.cross.addmm_(v.T, r)
                self.reference_total += r.sum(0, dtype=torch.float64)
        self.count += x.shape[0] if rows is None else rows.numel()

    def take_mean(self) -> torch.Tensor | None:
        """The second-moment matrix E[x~ x~^T] of the compressed inputs, computed in the Gram
        sum's storage, or None when nothing was seen; the reducer holds no matrix afterwards
        (as :meth:`netshrink.calibrate.Gram.take_mean`)."""
        if self.gram is None or self.count == 0:
            return None
        mean, self.gram, self.cross = self.gram.div_(self.count), None, None
        return mean

    def means(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean compressed input and mean reference input (in,); raises when nothing was seen."""
        if self.total is None:
            raise ValueError("Paired saw no input")
        reference = self.total if self.reference_total is None else self.reference_total
        return self.total / self.count, reference / self.count


@dataclass
class _Seen:
    """One layer's input on one call: its ``vectors``, the indices of the real-token ``rows``
    among them, and the ``source`` tensor's id. Either every row of the padded batch (a view
    of it for a Linear) with ``rows`` marking the real tokens, or only the real rows (copied,
    or a batch without padding) with ``rows`` None."""

    vectors: torch.Tensor
    rows: torch.Tensor | None
    source: int

    def real(self) -> torch.Tensor:
        """The real-token vectors, copied (only where the whole set is needed at once)."""
        return self.vectors if self.rows is None else self.vectors.index_select(0, self.rows)


def _layer_inputs(
    block: nn.Module, names: Sequence[str], call: BlockCall, stop: bool, keep: bool = True
) -> dict[str, _Seen]:
    """Each named layer's input on ``call``, in call order; with ``stop`` the forward ends once
    every named layer has run; without ``keep`` only the order and sources are recorded (empty
    vectors). The padded input is kept and its real rows indexed rather than copied (with the
    reference stream a copy of both streams' rows was 20 MiB of GPTAQ's peak on MiniLM's FFN
    output), unless it is mostly padding: then the copy of its real rows is the smaller."""
    seen: dict[str, _Seen] = {}

    def hook(name: str) -> Callable[..., None]:
        def grab(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in seen:
                x = args[0].detach()
                if not keep:
                    seen[name] = _Seen(x.new_empty(0), None, id(args[0]))
                else:
                    vectors, rows = input_vectors(module, x), token_rows(x, call.tokens)
                    if rows is not None and 2 * rows.numel() < vectors.shape[0]:
                        vectors, rows = vectors.index_select(0, rows), None
                    seen[name] = _Seen(vectors, rows, id(args[0]))
            if stop and len(seen) == len(names):
                raise StopForward

        return grab

    handles = [block.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        block(*call.args, **call.kwargs)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen


def stages(block: nn.Module, names: Sequence[str], call: BlockCall) -> list[list[str]]:
    """``names`` (relative to ``block``) grouped into stages: in the order the forward calls
    them, consecutive layers reading the same input tensor together; layers that never ran
    on ``call`` form a last stage of their own."""
    order = _layer_inputs(block, names, call, stop=False, keep=False)
    groups: list[list[str]] = []
    last: int | None = None
    for name, seen in order.items():
        if groups and seen.source == last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = seen.source
    idle = [n for n in names if n not in order]
    return groups + ([idle] if idle else [])


def _stage_statistics(
    block: nn.Module,
    dense: nn.Module | None,
    stage: Sequence[str],
    calls: Sequence[BlockCall],
    references: Sequence[BlockCall],
    rows: int,
) -> dict[str, Paired]:
    """:class:`Paired` statistics of the ``stage`` layers over every call, each run in
    :func:`~netshrink.calibrate.sequential.split_call` pieces of at most ``rows`` rows (0:
    whole)."""
    stats = {name: Paired() for name in stage}
    for call, ref in zip(calls, references, strict=True):
        for part, part_ref in zip(split_call(call, rows), split_call(ref, rows), strict=True):
            _add_call(stats, block, dense, part, part_ref)
    return stats


def _add_call(
    stats: dict[str, Paired],
    block: nn.Module,
    dense: nn.Module | None,
    call: BlockCall,
    ref: BlockCall,
) -> None:
    """Fold the inputs of the ``stats`` layers on ``call`` (paired with ``dense``'s on ``ref``)
    into ``stats``.

    A function of its own so that the captured inputs, its locals, are freed on return, before
    the next batch's forwards rather than after them (20 MiB for MiniLM's FFN output)."""
    seen = _layer_inputs(block, list(stats), call, stop=True)
    fp = _layer_inputs(dense, list(stats), ref, stop=True) if dense is not None else seen
    for name, x in seen.items():
        reference = fp[name].vectors if dense is not None else None
        stats[name].add(x.vectors, reference, x.rows)


def run_stages(
    model: nn.Module,
    batches: Sequence[Batch],
    owned: Mapping[str, Sequence[str]],
    compress: Callable[[dict[str, Paired]], None],
    reference: bool,
    split: bool = True,
    norms: bool = False,
    blocks: Sequence[str] = (),
    show: bool = True,
) -> SequentialReport:
    """Compress the layers ``owned`` lists per block (qualified names), block by block and stage
    by stage (see the module docstring); ``compress`` gets each stage's statistics keyed by
    qualified name and changes those layers in place. ``reference``: pair every input with the
    full-precision model's (asymmetric calibration). ``split``: stage by stage (true-sequential);
    otherwise each block's layers form one stage. ``norms`` (needs ``reference``): after each
    block's layers, refit its LayerNorms' affine parameters (:func:`refit_norms`)."""
    names = find_blocks(model, blocks)
    model_bytes = tensor_bytes([*model.parameters(), *model.buffers()])
    with module_calls(model), large_tensors_unmapped():
        calls = first_block_calls(model, model.get_submodule(names[0]), batches)
        refs = list(calls)
        peak = tensor_bytes(calls)
        for i, name in enumerate(names):
            block = model.get_submodule(name)
            dense = copy.deepcopy(block) if reference else None
            layers = [n.removeprefix(f"{name}.") for n in owned.get(name, ())]
            plan = (stages(block, layers, calls[0]) if split else [layers]) if layers else []
            rows = piece_rows(block, calls) if plan else 0
            for stage in track(plan, f"calibrate block {i + 1}/{len(names)}", show=show):
                stats = _stage_statistics(block, dense, stage, calls, refs, rows)
                held = sum(s.nbytes() for s in stats.values())
                peak = max(peak, tensor_bytes([*calls, *refs]) + held)
                release_freed_memory()  # the forwards' activations, before the solver's
                compress({f"{name}.{n}": s for n, s in stats.items()})
                del stats
                release_freed_memory()  # the statistics and the solver's working copies
            if norms and dense is not None and calls:
                refit_norms(block, dense, calls, refs)
            calls = [next_input(c, block(*c.args, **c.kwargs), name) for c in calls]
            if dense is not None:
                refs = [next_input(c, dense(*c.args, **c.kwargs), name) for c in refs]
            else:
                refs = calls
            peak = max(peak, tensor_bytes([*calls, *refs]))
    return SequentialReport(tuple(names), model_bytes, peak)


def asymmetric_target(weight: torch.Tensor, stats: Paired, damp: float) -> torch.Tensor:
    """The dense weight W* (out, in) that best maps the compressed inputs to the full-precision
    outputs, regularised towards W: argmin ||X W^T - X~ W*^T||^2 + lambda ||W* - W||^2
    = W (X^T X~ + lambda I) (X~^T X~ + lambda I)^-1, lambda = ``damp`` x mean diag(X~^T X~) as
    the solvers damp; W* = W when X~ = X. Up to that damping, ||X W^T - X~ W'^T||^2 =
    const + ||X~ (W* - W')^T||^2 for every W' (X~^T (X W^T - X~ W*^T) = 0 at the optimum), so
    pruning W* with Hessian X~^T X~ minimises GPTAQ's asymmetric objective (Li et al. 2025,
    sec. 3).

    Memory: the cross sums are used up here (the target is their only use; ``stats.cross`` is
    None afterwards) and the damping is added to the sums' own diagonals, the Gram sum's
    restored exactly afterwards: besides the Gram sum only the Cholesky factor and the solver's
    copy of it are made, where copies of both sums came on top (18 MiB in float32 at 1536
    inputs)."""
    if stats.gram is None:
        raise ValueError("Paired saw no input")
    h = stats.gram
    c = h if stats.cross is None else stats.cross
    stats.cross = None
    h_diag = h.diagonal().clone()
    curvature = torch.where(h_diag == 0, 1.0, h_diag)  # an input never seen: as the solvers do
    ridge = damp * float(curvature.mean())
    try:
        c.diagonal().add_(ridge)
        rhs = c @ weight.to(c.dtype).T  # (X~^T X + lambda I) W^T, (in, out)
        del c
        h.diagonal().copy_(curvature + ridge)
        factor = torch.linalg.cholesky(h)
    finally:
        h.diagonal().copy_(h_diag)
    return torch.cholesky_solve(rhs, factor).T.to(weight.dtype)


def bias_shift(before: torch.Tensor, after: torch.Tensor, stats: Paired) -> torch.Tensor:
    """The change of bias that makes the compressed layer's mean output over the calibration
    tokens equal the full-precision one's: W mean(x) - W' mean(x~), per output (out,).
    It is the least-squares optimal bias for a fixed W' (the mean residual)."""
    mean, reference_mean = stats.means()
    shift = before.double() @ reference_mean - after.double() @ mean
    return shift.to(before.dtype)


class _AffineFit:
    """Per-channel running sums for the least-squares line y = a n + b (n, y: (tokens, C))."""

    def __init__(self) -> None:
        self.sums: list[torch.Tensor] | None = None  # sum n, sum y, sum n^2, sum n y
        self.count = 0

    def add(self, n: torch.Tensor, y: torch.Tensor) -> None:
        n, y = n.double(), y.double()
        terms = [n.sum(0), y.sum(0), (n * n).sum(0), (n * y).sum(0)]
        old = self.sums or [torch.zeros_like(t) for t in terms]
        self.sums = [s + t for s, t in zip(old, terms, strict=True)]
        self.count += n.shape[0]

    def solve(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Slope and intercept per channel; a channel of constant n keeps slope 0."""
        assert self.sums is not None
        sn, sy, snn, sny = (s / self.count for s in self.sums)
        var = snn - sn * sn
        slope = torch.where(var > 1e-12, (sny - sn * sy) / var.clamp_min(1e-12), 0.0)
        return slope, sy - slope * sn


@torch.no_grad()
def refit_norms(
    block: nn.Module, dense: nn.Module, calls: Sequence[BlockCall], refs: Sequence[BlockCall]
) -> list[str]:
    """Refit the affine weight and bias of ``block``'s LayerNorms (over the last dimension), in
    call order, so that each maps its compressed input to the full-precision LayerNorm's output
    on the same tokens with least squared error (closed form, per channel). Each is fitted on
    the inputs the already refitted ones before it give. Returns the names refitted."""
    norms = [
        name
        for name, m in block.named_modules()
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1 and m.bias is not None
    ]
    order = [n for stage in stages(block, norms, calls[0]) for n in stage] if norms else []
    for name in order:
        norm, reference = block.get_submodule(name), dense.get_submodule(name)
        fit = _AffineFit()
        for call, ref in zip(calls, refs, strict=True):
            seen = _layer_inputs(block, [name], call, stop=True)
            fp = _layer_inputs(dense, [name], ref, stop=True)
            if name in seen:
                shape, eps = norm.normalized_shape, norm.eps
                n = nn.functional.layer_norm(seen[name].real(), shape, None, None, eps)
                y = nn.functional.layer_norm(
                    fp[name].real(), shape, reference.weight, reference.bias, eps
                )
                fit.add(n, y)
        if fit.count:
            slope, intercept = fit.solve()
            norm.weight.copy_(slope)
            norm.bias.copy_(intercept)
    return order
