"""The stage runner: ``ns.compress(model, recipe, **context) -> Result(model, report)``.

The recipe is validated in full, and the context checked against every stage's needs, before the
model is touched. Then each stage runs through the registry (``Technique.apply`` works on a copy
and fine-tunes when the stage asks), and the model after it is measured against the baseline:
the model from before the recipe, which is also the default teacher. A stage with a ``guard``
whose metric cost exceeds its limit is undone (``on_fail: rollback``) or undone and the rest
skipped (``on_fail: stop``), and the report says so. A stage whose technique cannot handle the
model (:class:`~netshrink.errors.UnsupportedModuleError`: it would change nothing, break the
forward, or untie weights) is undone the same way, its error in the stage's note; what a
technique achieved short of what was asked is in its note too.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netshrink.batches import check_finite_weights, materialize
from netshrink.context import Batch, Context
from netshrink.errors import ConfigError, MissingInputError, RecipeError, UnsupportedModuleError
from netshrink.progress import track
from netshrink.recipe import builtin
from netshrink.recipe.meter import Meter, layer_info
from netshrink.recipe.result import Result
from netshrink.recipe.schema import GuardConfig, Recipe, Stage, parse
from netshrink.report.record import Report, StageRecord
from netshrink.settings import DEFAULT_TIMING, Timing


def as_recipe(recipe: Recipe | Mapping[str, Any] | str | Path) -> Recipe:
    """Accept a parsed recipe, plain data, a YAML file path or a built-in recipe name."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, Mapping):
        return parse(recipe)
    if isinstance(recipe, str | Path):
        return builtin.load(recipe)
    raise RecipeError(f"a recipe is a file path, a built-in name or a mapping, got {recipe!r}")


def make_context(context: Mapping[str, Any]) -> Context:
    """Build a Context from keyword arguments, rejecting names that are not context items."""
    names = Context.item_names()
    unknown = [k for k in context if k not in names]
    if unknown:
        raise ConfigError(f"unknown context item(s) {unknown}; valid: {', '.join(names)}")
    return Context(**context)


def guard_verdict(
    guard: GuardConfig, before: float, after: float, baseline: float, kept: Sequence[int] = ()
) -> str:
    """Empty when the stage is within ``guard``'s limits, else the reason it is not.

    ``kept`` are the indices of the earlier stages whose models were kept: when they had spent
    part of the ``max_total_drop`` budget, the reason names them and splits the drop.
    """
    if guard.max_drop is not None and before - after > guard.max_drop:
        return f"metric fell {before - after:.4f} in this stage > max_drop {guard.max_drop}"
    if guard.max_total_drop is not None and baseline - after > guard.max_total_drop:
        reason = (
            f"metric fell {baseline - after:.4f} from the baseline > "
            f"max_total_drop {guard.max_total_drop}"
        )
        if kept and baseline - before > 0:
            stages = ", ".join(str(i) for i in kept)
            reason += (
                f": budget used by stage{'s' if len(kept) > 1 else ''} {stages} "
                f"({baseline - before:.4f} before this stage, {before - after:.4f} in it)"
            )
        return reason
    return ""


def metric_name(evaluate: Any) -> str:
    """The name the report gives the metric: its function's name ("metric" for a lambda)."""
    name = getattr(evaluate, "__name__", "")
    return name if name.isidentifier() else "metric"


class _Run:
    """State of one recipe run: the current model and, once a guard needed it, its metric."""

    def __init__(self, baseline: nn.Module, ctx: Context, meter: Meter, guard_data: list[Batch]):
        self.ctx = ctx
        self.meter = meter
        self.guard_data = guard_data
        self.baseline = baseline
        self.model = baseline
        self.model_guard: float | None = None
        self.baseline_guard: float | None = None
        self.stopped = False
        self.kept: list[int] = []

    def guard_metric(self, model: nn.Module) -> float:
        """The metric guards judge on: ``ctx.evaluate`` on the validation data."""
        assert self.ctx.evaluate is not None
        return float(self.ctx.evaluate(model, self.guard_data))

    def stage(self, stage: Stage) -> StageRecord:
        """Run, measure and (if guarded) judge one stage; keep its model unless the guard fails."""
        options = stage.config.model_dump(mode="json")
        if self.stopped:
            note = "skipped: an earlier guard stopped the recipe"
            return StageRecord(stage.index, stage.name, "skipped", None, options=options, note=note)
        torch.manual_seed(self.ctx.seed)
        start = time.perf_counter()
        try:
            applied = stage.technique.run(self.model, stage.config, self.ctx)
        except UnsupportedModuleError as exc:
            # The technique cannot handle this model: the stage is undone, as a guard would.
            self.stopped = stage.guard is not None and stage.guard.on_fail == "stop"
            later = ", later stages skipped" if self.stopped else ""
            note = f"failed: {exc}: stage undone{later}"
            return StageRecord(
                stage.index, stage.name, "rolled back", None, options=options, note=note
            )
        candidate = applied.model.eval()
        seconds = time.perf_counter() - start
        measured, baseline_ms = self.meter.measure(candidate)
        record = StageRecord(
            stage.index,
            stage.name,
            "applied",
            measured,
            baseline_ms,
            options,
            seconds,
            note="; ".join(applied.notes),
            layers=layer_info(candidate),
        )
        after = None
        if stage.guard is not None:
            if self.baseline_guard is None:
                self.baseline_guard = self.guard_metric(self.baseline)
            if self.model_guard is None:
                same = self.model is self.baseline
                self.model_guard = self.baseline_guard if same else self.guard_metric(self.model)
            after = record.guard_metric = self.guard_metric(candidate)
            reason = guard_verdict(
                stage.guard, self.model_guard, after, self.baseline_guard, self.kept
            )
            if reason:
                record.status = "rolled back"
                self.stopped = stage.guard.on_fail == "stop"
                later = ", later stages skipped" if self.stopped else ""
                record.note = "; ".join(
                    filter(None, (f"{reason}: stage undone{later}", record.note))
                )
                return record
        self.model, self.model_guard = candidate, after
        self.kept.append(stage.index)
        return record


def warn_static_transformer(plan: Recipe, model: nn.Module) -> None:
    """Warn when ``plan`` quantizes a transformer's activations statically with no
    ``quantize.smoothquant`` stage before: the usual cause of an int8 transformer that lost
    much of its fidelity, with the built-in recipes that avoid it."""
    from netshrink.hf.depth import is_transformer

    smoothed = False
    for stage in plan.stages:
        smoothed = smoothed or stage.name == "quantize.smoothquant"
        if stage.name == "quantize.static" and not smoothed and is_transformer(model):
            warnings.warn(
                f"{stage.label} quantizes every activation of a transformer to int8 with one "
                "static range and no quantize.smoothquant before it; transformers' activation "
                "outliers make that lossy (all-MiniLM-L6-v2: top-5 neighbour agreement 0.70 "
                "with the percentile observer, 0.92 with minmax, 0.97 with quantize.dynamic; "
                "benchmarks/transformer_int8.py). The built-in recipes transformer-int8 "
                "(dynamic) and transformer-int8-ov (SmoothQuant + static) are made for them",
                stacklevel=3,
            )
            return


def compress(
    model: nn.Module,
    recipe: Recipe | Mapping[str, Any] | str | Path,
    *,
    eval_data: Iterable[Batch] | None = None,
    timing: Timing = DEFAULT_TIMING,
    **context: Any,
) -> Result:
    """Apply ``recipe``'s stages to ``model`` in order, measuring after each; return the result.

    ``context`` holds the items techniques need (``example_inputs``, ``calib_data``,
    ``train_data``, ``val_data``, ``teacher``, ``evaluate``, ``seed``, ...). The teacher defaults
    to ``model`` as given, the metric to top-1 accuracy. The reported metric is measured on
    ``eval_data`` (default ``val_data``); guards judge on ``val_data``. Latency is the median of
    ``timing.runs`` timed forward passes on ``example_inputs`` with ``timing.runtime`` (a name in
    ``netshrink.runtime.RUNTIMES``) and ``timing.threads`` intra-op threads (None: torch's
    current count). The weights of ``model`` are left unchanged (it is put in eval mode).
    """
    from netshrink.runtime import check_runtime

    plan = as_recipe(recipe)
    ctx = make_context(context)
    check_runtime(timing.runtime)
    baseline = model.eval()
    if ctx.teacher is None:
        ctx = ctx.with_(teacher=baseline)
    if ctx.evaluate is None:
        from netshrink.metrics import accuracy

        ctx = ctx.with_(evaluate=accuracy)
    plan.check_needs(ctx, extra=("example_inputs",))
    if eval_data is None and ctx.val_data is None:
        raise MissingInputError(
            "compress needs val_data or eval_data: the batches the metric is measured on"
        )
    data = materialize(eval_data if eval_data is not None else ctx.val_data, "eval_data")
    guard_data = materialize(ctx.val_data, "val_data") if ctx.val_data is not None else data
    check_finite_weights(baseline)
    warn_static_transformer(plan, baseline)
    assert ctx.example_inputs is not None and ctx.evaluate is not None
    meter = Meter(baseline, ctx.example_inputs, ctx.evaluate, data, timing)
    first = meter.measure_baseline()
    run = _Run(baseline, ctx, meter, guard_data)
    stages = track(plan.stages, f"recipe ({len(plan.stages)} stages)", show=ctx.progress)
    records = [run.stage(stage) for stage in stages]
    report = Report(
        baseline=first,
        stages=records,
        recipe=plan.resolved(),
        seed=ctx.seed,
        metric_name=metric_name(ctx.evaluate),
        environment=meter.environment(),
    )
    return Result(run.model, report, baseline)
