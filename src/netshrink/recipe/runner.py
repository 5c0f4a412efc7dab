"""The stage runner: ``ns.compress(model, recipe, **context) -> Result(model, report)``.

The recipe is validated in full, and the context checked against every stage's needs, before the
model is touched. Then each stage runs through the registry (``Technique.apply`` works on a copy
and fine-tunes when the stage asks), and the model after it is measured against the baseline:
the model from before the recipe, which is also the default teacher. A stage with a ``guard``
whose metric cost exceeds its limit is undone (``on_fail: rollback``) or undone and the rest
skipped (``on_fail: stop``), and the report says so.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from netshrink.batches import check_finite_weights, materialize
from netshrink.context import Batch, Context
from netshrink.errors import ConfigError, MissingInputError, RecipeError
from netshrink.progress import track
from netshrink.recipe import builtin
from netshrink.recipe.meter import Meter, layer_info
from netshrink.recipe.result import Report, Result, StageRecord
from netshrink.recipe.schema import GuardConfig, Recipe, Stage, parse


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


def guard_verdict(guard: GuardConfig, before: float, after: float, baseline: float) -> str:
    """Empty when the stage is within ``guard``'s limits, else the reason it is not."""
    if guard.max_drop is not None and before - after > guard.max_drop:
        return f"metric fell {before - after:.4f} in this stage > max_drop {guard.max_drop}"
    if guard.max_total_drop is not None and baseline - after > guard.max_total_drop:
        return (
            f"metric fell {baseline - after:.4f} from the baseline > "
            f"max_total_drop {guard.max_total_drop}"
        )
    return ""


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
        candidate = stage.technique.apply(self.model, stage.config, self.ctx).eval()
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
            reason = guard_verdict(stage.guard, self.model_guard, after, self.baseline_guard)
            if reason:
                record.status = "rolled back"
                self.stopped = stage.guard.on_fail == "stop"
                later = ", later stages skipped" if self.stopped else ""
                record.note = f"{reason}: stage undone{later}"
                return record
        self.model, self.model_guard = candidate, after
        return record


def compress(
    model: nn.Module,
    recipe: Recipe | Mapping[str, Any] | str | Path,
    *,
    eval_data: Iterable[Batch] | None = None,
    runtime: str = "eager",
    threads: int | None = None,
    runs: int = 20,
    **context: Any,
) -> Result:
    """Apply ``recipe``'s stages to ``model`` in order, measuring after each; return the result.

    ``context`` holds the items techniques need (``example_inputs``, ``calib_data``,
    ``train_data``, ``val_data``, ``teacher``, ``evaluate``, ``seed``, ...). The teacher defaults
    to ``model`` as given, the metric to top-1 accuracy. The reported metric is measured on
    ``eval_data`` (default ``val_data``); guards judge on ``val_data``. Latency is the median of
    ``runs`` timed forward passes on ``example_inputs`` with ``runtime`` (a name in
    ``netshrink.runtime.RUNTIMES``) and ``threads`` intra-op threads (None: torch's current
    count). The weights of ``model`` are left unchanged (it is put in eval mode).
    """
    from netshrink.measure.latency import check_runs
    from netshrink.runtime import check_runtime

    plan = as_recipe(recipe)
    ctx = make_context(context)
    check_runtime(runtime)
    check_runs(runs, warmup=10)
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
    assert ctx.example_inputs is not None and ctx.evaluate is not None
    meter = Meter(
        baseline,
        ctx.example_inputs,
        ctx.evaluate,
        data,
        runtime=runtime,
        threads=threads,
        runs=runs,
    )
    first = meter.measure_baseline()
    run = _Run(baseline, ctx, meter, guard_data)
    stages = track(plan.stages, f"recipe ({len(plan.stages)} stages)", show=ctx.progress)
    records = [run.stage(stage) for stage in stages]
    report = Report(
        baseline=first,
        stages=records,
        recipe=plan.resolved(),
        seed=ctx.seed,
        metric_name=getattr(ctx.evaluate, "__name__", "metric"),
        environment=meter.environment(),
    )
    return Result(run.model, report, baseline)
