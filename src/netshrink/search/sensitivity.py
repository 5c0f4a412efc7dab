"""Per-layer sensitivity: how much each layer's output cost grows as one family compresses it.

For every Linear/Conv2d layer and every setting of every family (pruning sparsity, weight bits,
low-rank ratio), and for every embedding table at every weight bit width (a transformer's word
embeddings can be half of its bytes), the registered technique is applied to that one layer
(``targets.include`` = its name) with the rest of the model intact, and the metric and the
output fidelity are measured on the given data. Each point also records the layer's stored
bytes after the change, as the artifact codec would store them (packed when sparse), and its
multiply-accumulates. This is the one-layer-at-a-time probe of AIMET's greedy
compression-ratio selection and of HAWQ's per-layer sensitivity (Dong et al., 2019, §3),
measured rather than approximated by Hessians.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from netshrink import registry
from netshrink.calibrate import Shape, collect
from netshrink.context import Context
from netshrink.errors import UnsupportedModuleError
from netshrink.progress import track
from netshrink.search.probe import Prober

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


TABLE = "Embedding"
"""Kind of the embedding tables the analysis probes too, with the quant family only (a table is
a lookup: neither pruning nor low rank makes it smaller here, and it costs no MACs)."""


def is_table(module: nn.Module) -> bool:
    """Whether ``module`` is an embedding table ``quantize.weight_only`` stores as codes."""
    return type(module) is nn.Embedding and module.max_norm is None


def families_of(module: nn.Module, families: Sequence[str]) -> list[str]:
    """The ``families`` that can change ``module``: only quant for an embedding table."""
    return [f for f in families if f == "quant" or not is_table(module)]


def stage_for(
    family: str, value: float, names: Sequence[str], tables: bool = False
) -> dict[str, Any]:
    """The recipe stage applying ``family`` at ``value`` to the layers ``names`` only
    (``tables``: they are embedding tables, selected by their type)."""
    if family not in PROBED:
        raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    targets: dict[str, Any] = {"include": list(names)}
    if tables:
        targets["types"] = [TABLE]
    return {PROBED[family]: knob(family).options(value, targets)}


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
    """Multiply-accumulates per sample of each Linear/Conv2d in ``names``, from one forward pass
    (an embedding table's lookups count none)."""
    shapes = {n: Shape("output") for n in names if not is_table(model.get_submodule(n))}
    collect(model, {n: [s] for n, s in shapes.items()}, [(inputs, None)], "layer MACs", show=False)
    macs = {}
    for name, shape in shapes.items():
        m = model.get_submodule(name)
        per_out = m.weight[0].numel() if isinstance(m, nn.Conv2d) else m.in_features
        macs[name] = math.prod(shape.shape) // max(shape.shape[0], 1) * per_out
    return macs


def context_for(stage: dict[str, Any], ctx: Context) -> Context:
    """``ctx`` when ``stage``'s technique needs some of it, else a context without example
    inputs, so the registry runs no check forward (the probe that follows runs the model)."""
    ((name, options),) = stage.items()
    tech = registry.get(name)
    if tech.needs(tech.make_config(options, stage=name)):
        return ctx
    return Context(seed=ctx.seed, progress=False)


def detached(model: nn.Module, name: str, stage: dict[str, Any], ctx: Context) -> bool:
    """Whether ``stage`` on layer ``name`` can run on that layer alone: its technique needs no
    context (no data, no example inputs) and no parameter of the layer is shared with another
    module (a tie the technique must see, and refuse or keep)."""
    if context_for(stage, ctx) is ctx:
        return False
    own = {id(p) for p in model.get_submodule(name).parameters()}
    prefix = f"{name}."
    return not any(
        id(p) in own
        for n, m in model.named_modules()
        if n != name and not n.startswith(prefix)
        for p in m.parameters(recurse=False)
    )


def alone(model: nn.Module, name: str) -> nn.Module:
    """A bare module tree holding only layer ``name`` of ``model``, under the same qualified name
    (so the stage's targets select it). The technique works on its own copy of this tree, so
    applying a stage to it copies one layer and runs no forward of the whole model."""
    root = nn.Module()
    parent = root
    *path, leaf = name.split(".")
    for part in path:
        parent.add_module(part, nn.Module())
        parent = parent.get_submodule(part)
    parent.add_module(leaf, model.get_submodule(name))
    return root


@contextmanager
def variant(
    model: nn.Module, name: str, stage: dict[str, Any], ctx: Context
) -> Iterator[tuple[nn.Module, nn.Module]]:
    """Yield ``model`` with ``stage`` applied to layer ``name``, and what the stage returned.

    When the stage can run on the layer alone (:func:`detached`), it does, and its result is
    swapped into ``model`` in place for the block, then the original layer is put back; else the
    stage runs on a copy of the whole model (the registry's safe path)."""
    if not detached(model, name, stage, ctx):
        changed = apply_stage(model, stage, ctx)
        yield changed, changed
        return
    changed = apply_stage(alone(model, name), stage, context_for(stage, ctx))
    original = model.get_submodule(name)
    model.set_submodule(name, changed.get_submodule(name))
    try:
        yield model, changed
    finally:
        model.set_submodule(name, original)


def probe_layers(
    model: nn.Module,
    names: Sequence[str],
    settings: dict[str, tuple[float, ...]],
    prober: Prober,
    ctx: Context,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Apply each family setting to each layer alone and measure it: one point dict per probe.

    Also returns the stored bytes of each layer pruned or factorized, then quantized (no
    metric is measured for these: the allocator takes the loss of two changes to one layer as
    the sum of their losses). ``model`` is changed only inside each probe and restored."""
    jobs = [
        (n, f, v)
        for n in names
        for f in families_of(model.get_submodule(n), list(settings))
        for v in settings[f]
    ]
    points: list[dict[str, Any]] = []
    combined: list[dict[str, Any]] = []
    desc = f"sensitivity: {len(jobs)} probes, {len(prober.data)} batches each"
    for name, family, value in track(jobs, desc, show=progress):
        stage = stage_for(family, value, [name], is_table(model.get_submodule(name)))
        with variant(model, name, stage, ctx) as (probed, changed):
            found = prober.probe(probed)
            stored = layer_bytes(changed, name)
        points.append(
            {
                "layer": name,
                "family": family,
                "value": value,
                "metric": found.metric,
                "error": found.error,
                "bytes": stored,
            }
        )
        if family == "quant" or (family == "lowrank" and stored >= layer_bytes(model, name)):
            continue  # a layer too small to factorize was left alone: nothing to quantize after
        for bits in settings.get("quant", ()):
            quant = stage_for("quant", bits, quant_names(changed, name))
            both = apply_stage(changed, quant, context_for(quant, ctx))
            combined.append(
                {
                    "layer": name,
                    "family": family,
                    "value": value,
                    "bits": bits,
                    "bytes": layer_bytes(both, name),
                }
            )
    return points, combined


def quant_names(model: nn.Module, name: str) -> list[str]:
    """Target patterns reaching layer ``name``'s weights: itself, or its factors once factorized."""
    module = model.get_submodule(name)
    return [name] if isinstance(module, nn.Linear | nn.Conv2d) else [f"{name}.*"]


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode, so probing never touches the caller's model."""
    return copy.deepcopy(model).eval()
