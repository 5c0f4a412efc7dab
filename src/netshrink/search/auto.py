"""``auto``: the recipe that meets a target with the least loss, found by measurement.

The loop: analyze (cached) -> allocate per-layer settings for a budget -> emit them as a normal
recipe -> run it through the recipe runner, which measures artifact bytes, latency and metric ->
tighten the budget when the size or speed goal was missed, relax it when that goal was beaten by
a wide margin (also when the drop limit failed: the margin buys accuracy) -> stop after
``rounds`` candidates. Every measured candidate is kept for the Pareto front.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable
from typing import Any

from torch import nn

from netshrink.batches import materialize
from netshrink.context import Batch
from netshrink.errors import ConfigError
from netshrink.recipe import Result, compress, parse
from netshrink.recipe.runner import make_context
from netshrink.search.allocate import Option, allocate, predicted
from netshrink.search.analysis import Sensitivity, analyze
from netshrink.search.front import AutoResult, Candidate
from netshrink.search.sensitivity import PROBED, TABLE, stage_for
from netshrink.search.target import Goal, parse_target
from netshrink.settings import DEFAULT_TIMING, Timing

MARGIN = 0.97
"""Aim this far inside a size goal: the delivered artifact also carries the run's provenance."""

TRANSFORMER_LR = 5e-5
"""Fine-tuning rate of the candidates of a pretrained Hugging Face model: the top of BERT's
fine-tuning range (Devlin et al. 2019, appendix A.3: 5e-5, 3e-5, 2e-5). The training default,
1e-3, is a rate for networks trained from scratch; two epochs of it took MiniLM's top-5
agreement from 1.0 to 0.67 (docs/benchmarks/search.md)."""

SPARE = 1.15
"""A candidate beating the size or speed goal by this factor has room to spare: the next round
gets a larger budget (more accuracy), whether or not its drop limit held."""


def to_recipe(
    choice: dict[str, Option],
    finetune_epochs: int = 0,
    tables: Collection[str] = (),
    finetune_lr: float | None = None,
) -> dict[str, Any]:
    """The allocation as a recipe: low-rank, then pruning, then weight quantization stages.

    Layers sharing a setting share a stage (``targets.include`` lists them), with the options
    the sensitivity probe used (the technique's knob); the embedding tables named in ``tables``
    get stages of their own. Fine-tuning runs after the last float stage, before quantization
    freezes the weights, at ``finetune_lr`` (None: the training default). An allocation that
    touches nothing becomes int8 weights everywhere, since a recipe needs a stage.
    """
    groups: dict[tuple[str, float, bool], list[str]] = {}
    for name, o in choice.items():
        for family, value in (("lowrank", o.ratio), ("prune", o.sparsity), ("quant", o.bits)):
            if value is not None:
                # Once factorized, a layer's weights live in its children; the pattern also
                # takes the layer itself, should its low-rank stage be rolled back.
                factors = family == "quant" and o.ratio is not None
                groups.setdefault((family, value, name in tables), []).append(
                    f"re:{re.escape(name)}(\\..+)?" if factors else name
                )
    order = {"lowrank": 0, "prune": 1, "quant": 2}
    stages = [
        stage_for(family, value, names, table)
        for (family, value, table), names in sorted(
            groups.items(), key=lambda g: (order[g[0][0]], g[0][1], g[0][2])
        )
    ]
    floats = [s for s in stages if PROBED["quant"] not in s]
    if finetune_epochs > 0 and floats:
        options = next(iter(floats[-1].values()))
        lr = {} if finetune_lr is None else {"lr": finetune_lr}
        options["finetune"] = {"epochs": finetune_epochs, **lr}
    if not stages:  # the budget needs nothing: the lightest real step keeps the recipe valid
        stages.append(stage_for("quant", 8, [n for n in choice if n not in tables]))
    return {"version": 1, "description": "found by netshrink auto", "stages": stages}


def finetune_rate(model: nn.Module) -> float | None:
    """The candidates' fine-tuning rate for ``model``: :data:`TRANSFORMER_LR` for a pretrained
    Hugging Face model (a ``TaskModel``, which records its ``netshrink_hf`` reference), else
    None (the training default)."""
    return TRANSFORMER_LR if getattr(model, "netshrink_hf", None) else None


def goal_rate(target: Goal, baseline_bytes: int, baseline_ms: float) -> float:
    """The target as a rate: compression rate for size goals, speedup rate for speed goals."""
    if target.size is not None:
        return target.size
    if target.size_mb is not None:
        return baseline_bytes / (target.size_mb * 1e6)
    if target.speedup is not None:
        return target.speedup
    assert target.latency_ms is not None
    return baseline_ms / target.latency_ms


def auto(
    model: nn.Module,
    target: str | Goal,
    *,
    eval_data: Iterable[Batch] | None = None,
    sensitivity: Sensitivity | None = None,
    finetune_epochs: int = 2,
    finetune_lr: float | None = None,
    rounds: int = 4,
    timing: Timing = DEFAULT_TIMING,
    cache: bool | str = True,
    **context: Any,
) -> AutoResult:
    """Find a recipe meeting ``target`` (e.g. ``"size=20x,max_drop=0.01"``) and return it, measured.

    ``context`` holds the same items as :func:`netshrink.compress` (``example_inputs`` and
    ``val_data`` needed; ``calib_data``, ``train_data``, ``evaluate``, ``seed``, ``progress``).
    Sensitivity is probed on ``val_data`` (unless ``sensitivity`` is given); candidates are
    measured on ``eval_data`` (default ``val_data``) by the recipe runner, latency as
    ``timing`` says (``timing.runtime`` one of ``netshrink.runtime.RUNTIMES``); ``train_data``
    turns on ``finetune_epochs`` of fine-tuning in every candidate, at ``finetune_lr`` (None:
    :func:`finetune_rate`). At most ``rounds`` candidates are measured. When none meets the
    target the result says so and holds the closest one.
    """
    from netshrink.measure import measure
    from netshrink.metrics import accuracy

    goal = parse_target(target)
    if rounds < 1:
        raise ConfigError(f"rounds={rounds}: auto needs at least one round (e.g. rounds=4)")
    ctx = make_context(context)
    ctx.require(("example_inputs", "val_data"), "auto")
    assert ctx.example_inputs is not None and ctx.val_data is not None
    ctx = ctx.with_(
        val_data=materialize(ctx.val_data, "val_data"), evaluate=ctx.evaluate or accuracy
    )
    sens = sensitivity or analyze(
        model,
        example_inputs=ctx.example_inputs,
        data=ctx.val_data,
        evaluate=ctx.evaluate,
        calib_data=ctx.calib_data,
        cache=cache,
        progress=ctx.progress,
        seed=ctx.seed,
    )
    base = measure(model.eval(), ctx.example_inputs, timing=timing)
    rate = goal_rate(goal, base.bytes, base.latency_ms)
    layer_total = sum(info[goal.resource] for info in sens.layers.values())
    fixed = base.bytes - sum(info["bytes"] for info in sens.layers.values())
    # Size goals budget the layers' stored bytes (the rest of the artifact is fixed); speed
    # goals budget their MACs, taking latency as proportional to them.
    sized = goal.resource == "bytes"
    budget = base.bytes / rate * MARGIN - fixed if sized else layer_total / rate
    # Candidates run on the same context, without progress bars of their own.
    items = {name: getattr(ctx, name) for name in ctx.item_names()} | {"progress": False}
    epochs = finetune_epochs if ctx.train_data is not None else 0
    lr = finetune_rate(model) if finetune_lr is None else finetune_lr
    tables = [n for n, info in sens.layers.items() if info["kind"] == TABLE]
    candidates: list[Candidate] = []
    results: list[Result] = []
    for round_ in range(rounds):
        choice, fits = allocate(sens, budget, goal.resource)
        recipe = to_recipe(choice, epochs, tables, lr)
        if any(c.recipe == recipe for c in candidates):
            break  # the new budget gives a recipe already measured: nothing new to learn
        parse(recipe)  # a recipe the runner (and netshrink compress) accepts
        result = compress(model, recipe, eval_data=eval_data, timing=timing, **items)
        cand = Candidate.measured(round_, budget, recipe, result.report.summary(), goal, rate)
        spent, cand.predicted_loss = predicted(choice)
        candidates.append(cand)
        results.append(result)
        achieved = cand.rate(goal)
        if cand.meets_resource(goal, rate):
            if achieved < rate * SPARE:
                break  # met tightly: a smaller model would not be more accurate
            # Beaten by a wide margin, the drop limit met or not: spend some on accuracy.
            scale = min(achieved / rate, 1.5)
        elif not fits:
            break  # the allocator found nothing smaller
        else:
            scale = achieved / rate * 0.9
        if sized:
            # What the artifact holds besides the predicted layers, as measured (provenance,
            # the layers no allocation covers): the next budget aims at the goal with it.
            budget = base.bytes / rate * MARGIN - (cand.compressed_bytes - spent)
        else:
            budget *= scale
    best = AutoResult.pick(candidates, goal, rate)
    return AutoResult(goal, rate, candidates, best, results[best.round], sens)
