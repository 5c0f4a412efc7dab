"""What ``netshrink analyze`` and ``netshrink compress --target`` do, as functions.

The target string is parsed before any reference is resolved, so a bad one fails at once.
"""

from __future__ import annotations

from pathlib import Path

from netshrink.recipe.commands import prepare, resolve
from netshrink.search.analysis import Sensitivity, analyze
from netshrink.search.auto import auto
from netshrink.search.front import AutoResult
from netshrink.search.target import parse_target
from netshrink.settings import Inputs, Timing


def run_analyze(
    inputs: Inputs, out: Path, progress: bool = True
) -> tuple[Sensitivity, dict[str, Path]]:
    """Probe every layer on the validation split; write sensitivity.json and .png into ``out``."""
    given = resolve(inputs)
    sens = analyze(
        given.model,
        example_inputs=given.data.example_inputs(),
        data=given.data.val,
        evaluate=given.evaluate,
        calib_data=given.data.calib,
        progress=progress,
        seed=inputs.seed,
    )
    out = Path(out)
    paths = {
        "json": sens.save(out / "sensitivity.json"),
        "plot": sens.plot(out / "sensitivity.png"),
    }
    return sens, paths


def run_auto(
    target: str, inputs: Inputs, out: Path, timing: Timing, progress: bool = True
) -> tuple[AutoResult, dict[str, Path]]:
    """Search a recipe meeting ``target``; save its run, recipe.yaml and the Pareto front."""
    goal = parse_target(target)
    model, kwargs, extra = prepare(inputs, progress)
    found = auto(model, goal, timing=timing, **kwargs)
    return found, found.save(out, {**extra, "target": str(goal)})
