"""``quantize.smoothquant``: migrate activation outliers into the weights before static int8.

Xiao et al. 2022, "SmoothQuant", sec. 4: a few input channels of a transformer's Linear layers
carry activations far larger than the rest, so one per-tensor int8 scale wastes its codes on
them. Per input channel j, with s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), the activation is
divided by s and the weight's input column j multiplied by s: X W^T = (X / s)(W s)^T, so the
float model computes the same function while the activation's channels become even and the
weights absorb the difference. The division is folded into the layer that produced X: a
LayerNorm's (or RMSNorm's) weight and bias, or a Linear's output rows. Linears reading one
tensor (Q, K and V after one LayerNorm) share one s. ``alpha: auto`` picks alpha per producer on
the calibration data: the value of the grid 0, 0.05, .., 1 whose simulated int8 output
(per-tensor activations, per-channel weights, as ``quantize.static``) is closest to the float
output.

Which tensor feeds which Linear is found during the calibration pass, without tracing: forward
hooks note every norm's/Linear's output tensor, and a torch function mode sees every operation
that reads it. A producer is smoothed only when every reader of its output is a Linear's matmul
(dropout in eval and ``.to`` return the tensor itself and do not count). Post-LN blocks (BERT,
DistilBERT, ``nn.TransformerEncoderLayer`` without ``norm_first``) also add the norm's output to
a residual, and dividing it there would change the model. Their readers, and every other
targeted Linear whose input comes from elsewhere (attention's output projection, the FFN's second
Linear after GELU), are smoothed inside the layer instead (``in_layer``, the default): each
becomes a :class:`~netshrink.quantize.layers.SmoothedLinear` computing (x / s)(W s)^T with s from
its own input's statistics (Linears reading one tensor share one s), which ``quantize.static``
turns into a quantized Linear that multiplies its input by 1 / s before quantizing it (a Mul
before QuantizeLinear in ONNX). Pre-LN blocks (ViT, GPT-style, ``norm_first``) fold and cost
nothing at run time; post-LN ones (BERT, MiniLM, DistilBERT) pay one elementwise Mul per
smoothed input. The technique keeps the float function; run ``quantize.static`` after it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from netshrink.batches import materialize, run
from netshrink.calibrate.collect import module_calls
from netshrink.config import TechniqueConfig
from netshrink.context import Context
from netshrink.errors import UnsupportedModuleError
from netshrink.layers import replace_module, untied
from netshrink.progress import track
from netshrink.quantize.affine import choose_qparams, dequantize, fake_quantize_weight, quantize
from netshrink.quantize.layers import SmoothedLinear
from netshrink.registry import technique
from netshrink.targets import Targets

log = logging.getLogger(__name__)

ALPHAS = tuple(i / 20 for i in range(21))
"""The grid ``alpha: auto`` searches: 0, 0.05, .., 1."""

NORMS = (nn.LayerNorm, nn.RMSNorm)


class SmoothQuantConfig(TechniqueConfig):
    """Options of ``quantize.smoothquant``."""

    alpha: float | Literal["auto"] = Field(
        0.5,
        description="migration strength in [0, 1] (0: weights keep all, 1: activations even), "
        "or auto: searched per layer on calib_data",
    )
    targets: Targets = Field(default_factory=Targets, description="Linear layers to smooth")
    calib_batches: int = Field(32, ge=1, le=100000, description="calibration batches used at most")
    search_rows: int = Field(
        512, ge=16, le=1000000, description="activation rows kept per producer for alpha: auto"
    )
    in_layer: bool = Field(
        True,
        description="smooth Linears whose input cannot be folded into the op before it (post-LN "
        "residuals, attention outputs) with a per-channel Mul kept in the layer",
    )

    @model_validator(mode="after")
    def _alpha_in_range(self) -> SmoothQuantConfig:
        if self.alpha != "auto" and not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] or 'auto', got {self.alpha}")
        return self


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
    quota = min(keep_rows - sum(len(r) for r in p.rows), max(1, keep_rows // ROW_CALLS))
    if quota <= 0:
        return
    peaks = flat.abs().amax(1).topk(min(len(flat), max(1, quota // 4))).indices
    spaced = torch.linspace(0, len(flat) - 1, quota - len(peaks)).long()
    p.rows.append(flat[torch.cat([peaks, spaced]).unique()].clone())


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


def smoothing_scales(
    absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float
) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) (SmoothQuant eq. 4), over every weight.

    Channels never active, or whose weight columns are all zero, keep s_j = 1.
    """
    wmax = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    s = absmax.pow(alpha) / wmax.pow(1 - alpha)
    ok = (absmax > 0) & (wmax > 0) & torch.isfinite(s)
    return torch.where(ok, s, torch.ones_like(s)).clamp_min(1e-5)


def int8_error(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    s: torch.Tensor,
    span: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """Squared error of the int8 outputs with smoothing ``s`` against the float ``x W^T``.

    As ``quantize.static`` computes: x / s on unsigned per-tensor codes, W s on symmetric
    per-output-channel codes. The activation range is the min-max of x / s over ``x``, or over
    all the calibration data when ``span`` gives its per-channel (min, max): the range the
    static quantizer will really use.
    """
    xs = x / s
    lo, hi = (xs.min(), xs.max()) if span is None else ((span[0] / s).min(), (span[1] / s).max())
    scale, zero = choose_qparams(lo, hi, 8, False)
    xq = dequantize(quantize(xs, scale, zero, 0, 255), scale, zero)
    err = 0.0
    for w in weights:
        wq = fake_quantize_weight(w.detach().float() * s, 8)
        err += float((xq @ wq.T - x @ w.detach().float().T).pow(2).sum())
    return err


def search_alpha(
    x: torch.Tensor,
    absmax: torch.Tensor,
    weights: list[torch.Tensor],
    span: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> float:
    """The alpha of :data:`ALPHAS` whose smoothing gives the least int8 output error on ``x``
    (activation range from ``span``, see :func:`int8_error`)."""
    errors = {a: int8_error(x, weights, smoothing_scales(absmax, weights, a), span) for a in ALPHAS}
    return min(errors, key=lambda a: errors[a])


@torch.no_grad()
def fold(producer: nn.Module, readers: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide ``producer``'s output channels by ``s``; multiply the readers' input columns."""
    if isinstance(producer, nn.Linear):
        producer.weight.div_(s.to(producer.weight.dtype).unsqueeze(1))
    else:
        producer.weight.div_(s.to(producer.weight.dtype))
    if getattr(producer, "bias", None) is not None:
        producer.bias.div_(s.to(producer.bias.dtype))
    for linear in readers:
        linear.weight.mul_(s.to(linear.weight.dtype))


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
    """The statistics of one tensor read by several Linears (each saw all of it)."""
    lo = torch.stack([p.lo for p in stats]).amin(0)  # type: ignore[misc]
    hi = torch.stack([p.hi for p in stats]).amax(0)  # type: ignore[misc]
    return Producer(torch.maximum(lo.abs(), hi.abs()), lo, hi, stats[0].rows)


def choose_scales(
    stats: Producer, weights: list[torch.Tensor], alpha: float | str
) -> tuple[torch.Tensor, float]:
    """The smoothing vector s for Linears sharing one input with ``stats``, and its alpha."""
    assert stats.absmax is not None and stats.lo is not None and stats.hi is not None
    if alpha == "auto":
        alpha = search_alpha(torch.cat(stats.rows), stats.absmax, weights, (stats.lo, stats.hi))
    return smoothing_scales(stats.absmax, weights, float(alpha)), float(alpha)


@technique(
    "quantize.smoothquant", SmoothQuantConfig, needs=("calib_data",), creates=(SmoothedLinear,)
)
def smoothquant(model: nn.Module, config: SmoothQuantConfig, ctx: Context) -> nn.Module:
    """Move activation outliers into the weights of the targeted Linears (SmoothQuant)."""
    batches = materialize(ctx.calib_data or [], "calib_data")[: config.calib_batches]
    targeted = set(
        untied(model, config.targets.select(model, (nn.Linear,)), "quantize.smoothquant")
    )
    obs = observe(model, batches, targeted, config.search_rows, ctx.progress)
    pairs, refused = plan(obs.producers, obs.fed, targeted)
    folded = {r for readers in pairs.values() for r in readers}
    groups = in_layer_groups(obs, folded) if config.in_layer else []
    if not pairs and not groups:
        why = f": {'; '.join(refused)}" if refused else ""
        raise UnsupportedModuleError(
            f"quantize.smoothquant found nothing to smooth in {type(model).__name__}: no "
            "LayerNorm/RMSNorm/Linear output feeds only targeted Linear layers (pre-LN blocks' "
            "norms do; a post-LN block also adds the norm's output to a residual), and "
            f"in_layer is off or no targeted Linear ran on the calibration data{why}"
        )
    if refused and not config.in_layer:
        warnings.warn(f"quantize.smoothquant leaves {'; '.join(refused)}", stacklevel=2)
    for name, readers in pairs.items():
        weights = [model.get_submodule(r).weight for r in readers]
        s, alpha = choose_scales(obs.producers[name], weights, config.alpha)
        fold(model.get_submodule(name), [model.get_submodule(r) for r in readers], s)
        log.info("quantize.smoothquant: %s -> %s, alpha %.2f", name, ", ".join(readers), alpha)
    for group in groups:
        linears = [model.get_submodule(r) for r in group]
        stats = merged([obs.inputs[r] for r in group])
        s, alpha = choose_scales(stats, [m.weight for m in linears], config.alpha)
        for name, linear in zip(group, linears, strict=True):
            replace_module(model, name, SmoothedLinear.from_float(linear, s))
        log.info("quantize.smoothquant: in layer %s, alpha %.2f", ", ".join(group), alpha)
    return model
