"""What ``netshrink analyze`` and ``netshrink compress --target`` do, as functions.

The target string is parsed before any reference is resolved, so a bad one fails at once.
"""

from __future__ import annotations

from pathlib import Path

from netshrink.outdir import RunOutput, space_needed
from netshrink.search.analysis import Sensitivity, analyze
from netshrink.search.auto import auto
from netshrink.search.front import AutoResult
from netshrink.search.target import parse_target


def run_analyze(
    model_ref: str,
    out: Path,
    *,
    weights: Path | None = None,
    data_ref: str | None = None,
    eval_ref: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[Sensitivity, dict[str, Path]]:
    """Probe every layer on the validation split; write sensitivity.json and .png into ``out``."""
    from netshrink.recipe.commands import resolve

    with RunOutput(Path(out)) as unit:
        given = resolve(model_ref, weights, data_ref, eval_ref, seed)
        sens = analyze(
            given.model,
            example_inputs=given.data.example_inputs(),
            data=given.data.val,
            evaluate=given.evaluate,
            calib_data=given.data.calib,
            progress=progress,
            seed=seed,
        )
        paths = {
            "json": sens.save(unit.staging / "sensitivity.json"),
            "plot": sens.plot(unit.staging / "sensitivity.png"),
        }
        unit.commit()
    return sens, unit.final(paths)


def run_auto(
    target: str,
    model_ref: str,
    out: Path,
    *,
    weights: Path | None = None,
    data_ref: str | None = None,
    eval_ref: str | None = None,
    seed: int = 0,
    runtime: str = "eager",
    threads: int | None = None,
    runs: int = 20,
    progress: bool = True,
) -> tuple[AutoResult, dict[str, Path]]:
    """Search a recipe meeting ``target``; save its run, recipe.yaml and the Pareto front."""
    from netshrink.recipe.commands import prepare

    goal = parse_target(target)
    with RunOutput(Path(out)) as unit:
        model, kwargs, extra = prepare(
            model_ref,
            weights=weights,
            data_ref=data_ref,
            eval_ref=eval_ref,
            seed=seed,
            runtime=runtime,
            threads=threads,
            runs=runs,
            progress=progress,
        )
        unit.check_space(space_needed(model))
        found = auto(model, goal, **kwargs)
        paths = found.save(unit.staging, {**extra, "target": str(goal)})
        unit.commit()
    return found, unit.final(paths)
