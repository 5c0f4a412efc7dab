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
a residual, and dividing it there would change the model: those producers are left alone with a
warning. Pre-LN blocks (ViT, GPT-style, ``norm_first``) are smoothed. The technique changes float
weights only; run ``quantize.static`` after it.
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
from netshrink.layers import untied
from netshrink.progress import track
from netshrink.quantize.affine import choose_qparams, dequantize, fake_quantize_weight, quantize
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
    rows: list[torch.Tensor] = field(default_factory=list)
    """The first output rows, for the alpha search."""
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


def _note_output(p: Producer, out: torch.Tensor, keep_rows: int) -> None:
    """Fold one output into ``p``: the channel absmax, and rows until ``keep_rows`` are kept."""
    flat = out.detach().reshape(-1, out.shape[-1]).float()
    amax = flat.abs().amax(0)
    p.absmax = amax if p.absmax is None else torch.maximum(p.absmax, amax)
    have = sum(len(r) for r in p.rows)
    if have < keep_rows:
        p.rows.append(flat[: keep_rows - have].clone())


@contextmanager
def _watch(
    model: nn.Module, seen: dict[str, Producer], fed: dict[str, set[str]], keep_rows: int
) -> Iterator[_Readers]:
    """Hooks on the producers named in ``seen`` and the mode noting who reads their outputs."""
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

    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in seen]
    try:
        with mode:
            yield mode
    finally:
        for h in handles:
            h.remove()


def observe(
    model: nn.Module, batches: list, keep_rows: int, show: bool
) -> tuple[dict[str, Producer], dict[str, set[str]]]:
    """One calibration pass: every producer's statistics and readers, every Linear's sources.

    Producers are the norms with a weight and the Linears. Each batch runs under its own
    hooks, so tensor ids of one batch never alias those of another.
    """
    seen = {
        n: Producer()
        for n, m in model.named_modules()
        if (isinstance(m, NORMS) and m.weight is not None) or isinstance(m, nn.Linear)
    }
    fed: dict[str, set[str]] = {}
    with module_calls(model):
        for inputs, _ in track(batches, "smoothquant: activation ranges", show=show):
            with _watch(model, seen, fed, keep_rows) as mode:
                for leaf in pytree.tree_leaves(run(model, inputs)):
                    name = mode.live.get(id(leaf)) if torch.is_tensor(leaf) else None
                    if name is not None and not seen[name].other:
                        seen[name].other = "the model's outputs"  # returned as it is
    return seen, fed


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


def int8_error(x: torch.Tensor, weights: list[torch.Tensor], s: torch.Tensor) -> float:
    """Squared error of the int8 outputs with smoothing ``s`` against the float ``x W^T``.

    As ``quantize.static`` computes: x / s on unsigned per-tensor codes (min-max), W s on
    symmetric per-output-channel codes.
    """
    xs = x / s
    scale, zero = choose_qparams(xs.min(), xs.max(), 8, False)
    xq = dequantize(quantize(xs, scale, zero, 0, 255), scale, zero)
    err = 0.0
    for w in weights:
        wq = fake_quantize_weight(w.detach().float() * s, 8)
        err += float((xq @ wq.T - x @ w.detach().float().T).pow(2).sum())
    return err


def search_alpha(x: torch.Tensor, absmax: torch.Tensor, weights: list[torch.Tensor]) -> float:
    """The alpha of :data:`ALPHAS` whose smoothing gives the least int8 output error on ``x``."""
    errors = {a: int8_error(x, weights, smoothing_scales(absmax, weights, a)) for a in ALPHAS}
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


@technique("quantize.smoothquant", SmoothQuantConfig, needs=("calib_data",), creates=())
def smoothquant(model: nn.Module, config: SmoothQuantConfig, ctx: Context) -> nn.Module:
    """Move activation outliers into the weights of the Linears after norms (SmoothQuant)."""
    batches = materialize(ctx.calib_data or [], "calib_data")[: config.calib_batches]
    targeted = set(
        untied(model, config.targets.select(model, (nn.Linear,)), "quantize.smoothquant")
    )
    seen, fed = observe(model, batches, config.search_rows, ctx.progress)
    pairs, refused = plan(seen, fed, targeted)
    if not pairs:
        why = f": {'; '.join(refused)}" if refused else ""
        raise UnsupportedModuleError(
            f"quantize.smoothquant found nothing to smooth in {type(model).__name__}: no "
            "LayerNorm/RMSNorm/Linear output feeds only targeted Linear layers (pre-LN blocks' "
            f"norms do; a post-LN block also adds the norm's output to a residual){why}"
        )
    if refused:
        warnings.warn(f"quantize.smoothquant leaves {'; '.join(refused)}", stacklevel=2)
    for name, readers in pairs.items():
        p = seen[name]
        assert p.absmax is not None
        weights = [model.get_submodule(r).weight for r in readers]
        if config.alpha == "auto":
            alpha = search_alpha(torch.cat(p.rows), p.absmax, weights)
        else:
            alpha = float(config.alpha)
        s = smoothing_scales(p.absmax, weights, alpha)
        fold(model.get_submodule(name), [model.get_submodule(r) for r in readers], s)
        log.info("quantize.smoothquant: %s -> %s, alpha %.2f", name, ", ".join(readers), alpha)
    return model
