"""``lowrank.svd``: replace Linear and Conv2d layers by two thinner ones from a truncated SVD."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from netshrink.batches import materialize
from netshrink.context import Batch, Context
from netshrink.errors import ConfigError, DataError
from netshrink.layers import (
    WEIGHT_READERS,
    as_linear,
    children_of,
    layer_types,
    linear_types,
    replace_module,
    untied,
)
from netshrink.lowrank import ranks
from netshrink.lowrank.caller import warn
from netshrink.lowrank.decompose import Spectrum, spectrum, variants
from netshrink.lowrank.inputs import LayerInputs, layer_inputs
from netshrink.lowrank.jacobian import output_grams
from netshrink.lowrank.joint import candidate_groups, joint_spectrum, same_input
from netshrink.lowrank.layers import (
    LowRankConv2d,
    LowRankLinear,
    conv_from_factors,
    linear_from_factors,
    spatial_from_factors,
)
from netshrink.lowrank.options import SvdConfig, needs
from netshrink.lowrank.refit import refit
from netshrink.lowrank.sensitivity import output_weights
from netshrink.lowrank.shared import SharedLowRankLinear, group_from_factors
from netshrink.lowrank.summary import REPORT_ATTR, LayerRecord, LowRankReport
from netshrink.registry import Knob, technique

_BUILD: dict[str, Callable[..., nn.Module]] = {
    "linear": linear_from_factors,
    "channel": conv_from_factors,
    "spatial": spatial_from_factors,
}


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _cost(spec: Spectrum, rank: int | None, metric: str, stats: LayerInputs) -> float:
    """Weights (``params``) or multiply-adds (``macs``) of ``spec`` at ``rank`` (None: dense)."""
    if metric == "params":
        return spec.dense_params if rank is None else spec.params(rank)
    out = stats.out_shape
    if spec.variant in ("linear", "joint"):
        positions = second = math.prod(out[:-1])
    else:  # (N, C, H, W): the output grid; spatial's first conv keeps the input's width
        positions = second = out[0] * out[2] * out[3]
        if spec.variant == "spatial":
            positions = out[0] * out[2] * stats.in_shape[3]
    if rank is None:
        return second * spec.dense_params
    return rank * (positions * spec.rows + second * spec.cols)


def _unsupported(model: nn.Module, layers: dict[str, nn.Module], aware: bool) -> dict[str, str]:
    """Why each layer that cannot be factorized is left alone."""
    inside_mha = children_of(model, WEIGHT_READERS)
    why = {}
    for name, m in layers.items():
        if name in inside_mha:
            why[name] = "MultiheadAttention reads this layer's weight directly"
        elif isinstance(m, nn.Conv2d) and m.groups > 1:
            why[name] = f"grouped convolution (groups={m.groups}) is not factorized"
        elif not variants(m, aware):
            why[name] = f"{type(m).__name__} is not supported (Linear and Conv2d are)"
    return why


def _spectra(
    layers: dict[str, nn.Module],
    config: SvdConfig,
    stats: dict[str, LayerInputs],
    out_covs: dict[str, torch.Tensor],
) -> dict[str, list[Spectrum]]:
    out = {}
    for name, m in layers.items():
        names = variants(m, config.activation_aware)
        if config.conv_variant != "auto" and config.conv_variant in names:
            names = (config.conv_variant,)
        cov = stats[name].cov if config.activation_aware else None
        if config.activation_aware and cov is None:
            warn(f"lowrank.svd: {name} never ran on calib_data; plain SVD")
        out_cov = out_covs.get(name)
        out[name] = [spectrum(m, v, cov, config.damping, out_cov) for v in names]
    return out


Plan = dict[str, tuple[Spectrum, int] | str]


def _per_layer(spectra: dict[str, list[Spectrum]], config: SvdConfig) -> Plan:
    """Each layer's variant and rank by energy, ratio or rank; or why it stays dense."""
    plan: Plan = {}
    rt = config.round_to
    for name, specs in spectra.items():
        if config.energy is not None:
            chosen = [ranks.by_energy(s, config.energy, rt) for s in specs]
        elif config.ratio is not None:
            chosen = [ranks.by_ratio(s, config.ratio, rt) for s in specs]
        else:
            assert config.rank is not None
            chosen = [ranks.by_rank(s, config.rank, rt) for s in specs]
        spec, k = ranks.pick(specs, chosen, "energy" if config.ratio is not None else "params")
        if ranks.saves(spec, k):
            plan[name] = (spec, k)
        elif k == 0:
            plan[name] = f"ratio {config.ratio} fits no rank that is a multiple of {rt}"
        else:
            plan[name] = (
                f"rank {k} needs {spec.params(k):,} weights, dense {spec.dense_params:,}: "
                "factorizing saves nothing"
            )
    return plan


def _build(module: nn.Module, spec: Spectrum, rank: int) -> nn.Module:
    return _BUILD[spec.variant](module, *spec.factors(rank))


class _Units:
    """What the budget allocates over: the layers, except that each group factorized jointly
    is one unit (``groups``: unit name -> member paths)."""

    def __init__(self, layers: dict[str, nn.Module], groups: dict[str, list[str]]) -> None:
        self.layers, self.groups = layers, groups
        self.unit_of = {path: unit for unit, paths in groups.items() for path in paths}

    def build(self, unit: str, spec: Spectrum, rank: int) -> dict[str, nn.Module]:
        """The unit's factorized layers at ``rank``: path -> module."""
        if unit not in self.groups:
            return {unit: _build(self.layers[unit], spec, rank)}
        paths = self.groups[unit]
        members = [self.layers[p] for p in paths]
        return dict(zip(paths, group_from_factors(members, *spec.factors(rank)), strict=True))


def _error_scales(
    model: nn.Module,
    layers: dict[str, nn.Module],
    spectra: dict[str, list[Spectrum]],
    config: SvdConfig,
    calib: list[Batch],
    show: bool,
    at: Plan | None = None,
    units: _Units | None = None,
) -> dict[str, float]:
    """Per layer, what one unit of its discarded Σσ² costs in the budget's error unit.

    ``relative``: 1 / the layer's Σσ² (the error is the share lost). ``output``: the measured
    factor of :func:`~netshrink.lowrank.sensitivity.output_weights`, each layer probed at the
    rank that keeps the budget's share of its weights (at least ``round_to``), in its first
    variant; with ``at`` (a plan) only its factorized layers, each at its planned rank.
    ``units`` names the groups factorized jointly (``spectra`` then has one entry per group).
    """
    if config.error_measure == "relative":
        return {n: 1.0 / max(float(specs[0].s2.sum()), 1e-300) for n, specs in spectra.items()}
    assert config.budget is not None
    rt = config.round_to
    probes = {}
    if at is not None:
        probes = {name: step for name, step in at.items() if not isinstance(step, str)}
    else:
        for name, specs in spectra.items():
            k = max(ranks.by_ratio(specs[0], config.budget, rt), rt)
            if ranks.saves(specs[0], k):
                probes[name] = (specs[0], k)
    batches = calib[: config.error_batches]
    units = units or _Units(layers, {})
    weights = output_weights(model, probes, units.build, batches, show)
    return {name: weights.get(name, 0.0) for name in (probes if at is not None else spectra)}


def _global(
    spectra: dict[str, list[Spectrum]],
    config: SvdConfig,
    stats: dict[str, LayerInputs],
    scales: dict[str, float],
) -> Plan:
    """Ranks for all layers together: total cost within the budget, least total error.

    A layer's error at rank k is ``scales[layer]`` times its discarded Σσ² (see
    :func:`_error_scales`).
    """
    assert config.budget is not None
    metric, rt = config.budget_metric, config.round_to
    curves = {}
    for name, specs in spectra.items():
        dense = ranks.Point(None, 0, _cost(specs[0], None, metric, stats[name]), 0.0)
        scale = scales[name]
        curves[name] = [dense] + [
            ranks.Point(s, k, _cost(s, k, metric, stats[name]), scale * float(s.s2[k:].sum()))
            for s in specs
            for k in range(rt, s.max_rank + 1, rt)
            if ranks.saves(s, k)
        ]
    total = sum(c[0].cost for c in curves.values())
    chosen = ranks.allocate(curves, config.budget * total)
    if chosen is None:
        least = sum(min(p.cost for p in c) for c in curves.values()) / total
        fix = f"a budget >= {least:.3f} or " if least < 1 else ""
        raise ConfigError(
            f"budget {config.budget} is below what the smallest ranks (multiples of {rt}) need: "
            f"{least:.3f} of the {metric}; give {fix}a smaller round_to",
            stage="lowrank.svd",
            key="budget",
        )
    plan: Plan = {}
    for name, p in chosen.items():
        if p.spec is not None:
            plan[name] = (p.spec, p.rank)
        elif len(curves[name]) == 1:
            plan[name] = f"no rank that is a multiple of {rt} saves weights"
        else:
            plan[name] = "kept dense by the budget allocation"
    return plan


def _apply(
    model: nn.Module,
    layers: dict[str, nn.Module],
    plan: Plan,
    done: dict[str, tuple[nn.Module, Spectrum]],
    units: _Units,
) -> list[LayerRecord]:
    """Replace every planned layer of ``model`` not ``done`` already (name -> the module put in
    and its spectrum); one record per layer of ``layers``. A group factorized jointly is put in
    whole; its shared first factor counts in its first member's weights."""
    records = []
    built: dict[str, dict[str, nn.Module]] = {}
    for name, module in layers.items():
        unit = units.unit_of.get(name, name)
        weight = getattr(module, "weight", None)
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else ()
        before, kind = _params(module), type(module).__name__
        step = plan[unit]
        if isinstance(step, str):
            records.append(LayerRecord(name, kind, shape, before, before, skipped=step))
            continue
        spec, k = step
        if name in done:
            new, spec = done[name]
        else:
            if unit not in built:
                built[unit] = units.build(unit, spec, k)
                for path, layer in built[unit].items():
                    replace_module(model, path, layer)
            new = built[unit][name]
        after = _params(new)
        if isinstance(new, SharedLowRankLinear) and name != units.groups[unit][0]:
            after -= _params(new.first)
        energy = spec.energy(k)
        records.append(
            LayerRecord(name, kind, shape, before, after, spec.variant, k, spec.max_rank, energy)
        )
    return records


def _joined(
    model: nn.Module,
    layers: dict[str, nn.Module],
    config: SvdConfig,
    calib: list[Batch],
    stats: dict[str, LayerInputs],
    out_covs: dict[str, torch.Tensor],
    spectra: dict[str, list[Spectrum]],
    scales: dict[str, float],
) -> _Units:
    """The groups of ``config.joint`` that read one input; in ``spectra`` (changed in place)
    each group's members give way to the group's stacked spectrum, weighted by ``scales``."""
    groups = same_input(model, candidate_groups(layers, config.joint), calib[0]) if calib else {}
    if config.joint and not groups:
        warn(f"lowrank.svd: joint={config.joint} matched no layers that read one input")
    for unit, paths in groups.items():
        cov = stats[paths[0]].cov
        assert cov is not None  # the members ran: same_input saw their input
        members = [layers[p] for p in paths]
        outs = [out_covs.get(p) for p in paths]
        spec = joint_spectrum(members, cov, outs, [scales[p] for p in paths], config.damping)
        for p in paths:
            del spectra[p]
        spectra[unit] = [spec]
    return _Units(layers, groups)


def _probe_plan(spectra: dict[str, list[Spectrum]], units: _Units, config: SvdConfig) -> Plan:
    """Each group at the rank that keeps the budget's share of its weights (at least
    ``round_to``): where its output-error factor is first measured."""
    assert config.budget is not None
    plan: Plan = {}
    for unit in units.groups:
        spec = spectra[unit][0]
        plan[unit] = (
            spec,
            max(ranks.by_ratio(spec, config.budget, config.round_to), config.round_to),
        )
    return plan


def _probe_options(ratio: float, targets: dict[str, Any]) -> dict[str, Any]:
    return {"ratio": ratio, "targets": targets}


@technique(
    "lowrank.svd",
    SvdConfig,
    needs=needs,
    creates=(LowRankLinear, LowRankConv2d),
    knob=Knob("ratio", (0.5, 0.25, 0.1), _probe_options),
)
def svd(model: nn.Module, config: SvdConfig, ctx: Context) -> nn.Module:
    """Factorize Linear and Conv2d layers into two thinner ones by truncated (whitened) SVD.

    The returned model carries a :class:`~netshrink.lowrank.summary.LowRankReport` (read it
    with :func:`~netshrink.lowrank.summary.report_of`): per layer, rank, weights before and
    after, energy kept, or why the layer was left as it was.
    """
    selected = config.targets.select(model, default_types=layer_types())
    # a Hugging Face Conv1D is factorized as the Linear it computes
    layers = {n: as_linear(m) if isinstance(m, linear_types()) else m for n, m in selected.items()}
    layers = {n: layers[n] for n in untied(model, layers, "lowrank.svd")}
    unsupported = _unsupported(model, layers, config.activation_aware)
    if unsupported:
        names = ", ".join(f"{n} ({why})" for n, why in unsupported.items())
        warn(f"lowrank.svd leaves these layers as they are: {names}")
    todo = {n: m for n, m in layers.items() if n not in unsupported}
    stats = {n: LayerInputs() for n in todo}
    calib: list[Batch] = []
    if "calib_data" in needs(config):  # read once: the whitening and the output probes use it
        calib = materialize(ctx.calib_data or [], "calib_data")
    if config.activation_aware:
        stats = layer_inputs(
            model, todo, calib, covariance=True, skip_padding=config.skip_padding,
            show=ctx.progress,
        )  # fmt: skip
    if config.budget is not None and config.budget_metric == "macs":
        example = [(ctx.example_inputs, None)]
        for name, seen in layer_inputs(model, todo, example, covariance=False, show=False).items():
            stats[name].in_shape, stats[name].out_shape = seen.in_shape, seen.out_shape
        idle = [name for name, s in stats.items() if not s.out_shape]
        if idle:
            raise DataError(
                f"budget_metric='macs' counts MACs on example_inputs, but {', '.join(idle)} "
                "never ran on them; exclude them with targets or use budget_metric='params'"
            )
    out_covs = {}
    if config.output_aware:
        out_covs = output_grams(model, todo, calib, config.output_probes, show=ctx.progress)
    spectra = _spectra(todo, config, stats, out_covs)
    units = _Units(todo, {})
    if config.budget is not None:
        scales = _error_scales(model, todo, spectra, config, calib, ctx.progress)
        if config.joint:
            units = _joined(model, todo, config, calib, stats, out_covs, spectra, scales)
            for unit, paths in units.groups.items():
                stats[unit] = stats[paths[0]]
            scales |= _error_scales(
                model,
                todo,
                spectra,
                config,
                calib,
                ctx.progress,
                _probe_plan(spectra, units, config),
                units,
            )
        plan = _global(spectra, config, stats, scales)
        for _ in range(config.budget_rounds - 1):
            # the factor is measured at one rank; re-measured where the allocation went
            scales |= _error_scales(model, todo, spectra, config, calib, ctx.progress, plan, units)
            plan = _global(spectra, config, stats, scales)
    else:
        plan = _per_layer(spectra, config)
    done = {}
    if config.refit:
        steps = {n: step for n, step in plan.items() if not isinstance(step, str)}
        done = refit(model, todo, steps, calib, _build, config.damping, out_covs, ctx.progress)
    records = _apply(model, layers, plan | unsupported, done, units)
    report = LowRankReport(config.selection, config.activation_aware, tuple(records))
    setattr(model, REPORT_ATTR, report)
    return model
