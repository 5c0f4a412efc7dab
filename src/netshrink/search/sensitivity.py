"""Per-layer sensitivity: how much each layer's output cost grows as one family compresses it.

For every Linear/Conv2d layer and every setting of every family (pruning sparsity, weight bits,
low-rank ratio), the registered technique is applied to that one layer (``targets.include`` =
its name) with the rest of the model intact, and the metric and the output fidelity are measured
on the given data. Each point also records the layer's stored bytes after the change, as the
artifact codec would store them (packed when sparse), and its multiply-accumulates. This is the
one-layer-at-a-time probe of AIMET's greedy compression-ratio selection and of HAWQ's
per-layer sensitivity (Dong et al., 2019, §3), measured rather than approximated by Hessians.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from netshrink import registry
from netshrink.batches import run
from netshrink.calibrate import Shape, collect
from netshrink.context import Batch, Context
from netshrink.errors import UnsupportedModuleError
from netshrink.progress import track

PROBED = {"prune": "prune.magnitude", "quant": "quantize.weight_only", "lowrank": "lowrank.svd"}
"""The technique behind each search family; its :class:`~netshrink.registry.Knob` (declared in
the technique's own file) says which settings are tried and how they become options."""

FAMILIES = tuple(PROBED)


def knob(family: str) -> registry.Knob:
    """The knob of ``family``'s technique."""
    found = registry.get(PROBED[family]).knob
    assert found is not None, f"{PROBED[family]} declares no knob"
    return found


def default_settings(family: str) -> tuple[float, ...]:
    """Settings probed by default: sparsity (fraction zero), weight bits, kept-weight ratio."""
    return knob(family).values


def stage_for(family: str, value: float, names: Sequence[str]) -> dict[str, Any]:
    """The recipe stage applying ``family`` at ``value`` to the layers ``names`` only."""
    if family not in PROBED:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    return {PROBED[family]: knob(family).options(value, {"include": list(names)})}


def apply_stage(model: nn.Module, stage: dict[str, Any], ctx: Context) -> nn.Module:
    """Run one recipe stage through the registry (which works on a copy)."""
    ((name, options),) = stage.items()
    tech = registry.get(name)
    with warnings.catch_warnings():
        # A probe tries every setting on every layer: a technique's note about one layer
        # (e.g. a group size that does not divide it) would repeat for each probe.
        warnings.simplefilter("ignore")
        try:
            return tech.apply(model, tech.make_config(options, stage=name), ctx).eval()
        except UnsupportedModuleError:
            # The setting cannot change this layer (e.g. too small to factorize): it stays.
            return model


def layer_bytes(model: nn.Module, name: str) -> int:
    """Bytes the artifact codec stores for the tensors under module ``name`` (packed if sparse)."""
    from netshrink.artifact.codec import encode

    total = 0
    module = model.get_submodule(name)
    for key, tensor in module.state_dict().items():
        parts, _ = encode(key, tensor)
        total += sum(p.numel() * p.element_size() for p in parts.values())
    return total


def layer_macs(model: nn.Module, inputs: tuple[Any, ...], names: Sequence[str]) -> dict[str, int]:
    """Multiply-accumulates per sample of each Linear/Conv2d in ``names``, from one forward pass."""
    shapes = {name: Shape("output") for name in names}
    collect(model, {n: [s] for n, s in shapes.items()}, [(inputs, None)], "layer MACs", show=False)
    macs = {}
    for name, shape in shapes.items():
        m = model.get_submodule(name)
        per_out = m.weight[0].numel() if isinstance(m, nn.Conv2d) else m.in_features
        macs[name] = math.prod(shape.shape) // max(shape.shape[0], 1) * per_out
    return macs


def fidelity(reference: list[torch.Tensor], outputs: list[torch.Tensor]) -> float:
    """Relative output error ||y - y_ref||² / ||y_ref||² over all output tensors (0 = identical).

    Each list holds every floating-point output tensor of every batch, in the same order."""
    num = sum(float(((o - r).double() ** 2).sum()) for o, r in zip(outputs, reference, strict=True))
    den = sum(float((r.double() ** 2).sum()) for r in reference)
    return num / max(den, 1e-12)


@dataclass
class Probe:
    """What one model variant measured: metric (None without labels) and output error."""

    metric: float | None
    error: float


class Prober:
    """Measures model variants against the baseline's outputs on fixed data."""

    def __init__(
        self, baseline: nn.Module, data: list[Batch], evaluate: Callable[..., float] | None
    ) -> None:
        self.data = data
        self.evaluate = evaluate
        self.reference = self.outputs(baseline)

    def outputs(self, model: nn.Module) -> list[torch.Tensor]:
        """The floating-point output tensors of the model on every batch, in order.

        Inputs may be positional or keyword (:func:`netshrink.batches.run`); a structured output
        (a tuple, a dict, a transformers ``ModelOutput``) is flattened to its tensors."""
        with torch.no_grad():
            return [
                t
                for x, _ in self.data
                for t in tree_leaves(run(model, x))
                if torch.is_tensor(t) and t.is_floating_point()
            ]

    def probe(self, model: nn.Module) -> Probe:
        """Metric and relative output error of ``model``."""
        metric = None if self.evaluate is None else float(self.evaluate(model, self.data))
        return Probe(metric, fidelity(self.reference, self.outputs(model)))


def probe_layers(
    model: nn.Module,
    names: Sequence[str],
    settings: dict[str, tuple[float, ...]],
    prober: Prober,
    ctx: Context,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Apply each family setting to each layer alone; return one point dict per probe."""
    jobs = [(n, f, v) for n in names for f, values in settings.items() for v in values]
    points = []
    for name, family, value in track(jobs, f"sensitivity ({len(jobs)} probes)", show=progress):
        variant = apply_stage(model, stage_for(family, value, [name]), ctx)
        found = prober.probe(variant)
        points.append(
            {
                "layer": name,
                "family": family,
                "value": value,
                "metric": found.metric,
                "error": found.error,
                "bytes": layer_bytes(variant, name),
            }
        )
        del variant
    return points


def combined_bytes(
    model: nn.Module, names: Sequence[str], settings: dict[str, tuple[float, ...]], ctx: Context
) -> list[dict[str, Any]]:
    """Stored bytes of each layer pruned or factorized, then quantized (no metric is measured:
    the allocator takes the loss of two changes to one layer as the sum of their losses)."""
    out = []
    for name in names:
        for family in ("prune", "lowrank"):
            for value in settings.get(family, ()):
                first = apply_stage(model, stage_for(family, value, [name]), ctx)
                if family == "lowrank" and layer_bytes(first, name) >= layer_bytes(model, name):
                    continue  # too small to factorize: the technique left it alone
                for bits in settings.get("quant", ()):
                    both = apply_stage(
                        first, stage_for("quant", bits, quant_names(first, name)), ctx
                    )
                    out.append(
                        {
                            "layer": name,
                            "family": family,
                            "value": value,
                            "bits": bits,
                            "bytes": layer_bytes(both, name),
                        }
                    )
    return out


def quant_names(model: nn.Module, name: str) -> list[str]:
    """Target patterns reaching layer ``name``'s weights: itself, or its factors once factorized."""
    module = model.get_submodule(name)
    return [name] if isinstance(module, nn.Linear | nn.Conv2d) else [f"{name}.*"]


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode, so probing never touches the caller's model."""
    return copy.deepcopy(model).eval()
