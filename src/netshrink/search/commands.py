"""What ``netshrink analyze`` and ``netshrink compress --target`` do, as functions.

The target string is parsed before any reference is resolved, so a bad one fails at once.
"""

from __future__ import annotations

from pathlib import Path

from netshrink.outdir import RunOutput, space_needed
from netshrink.recipe.commands import prepare, resolve
from netshrink.search.analysis import SAMPLES, Sensitivity, analyze
from netshrink.search.auto import auto
from netshrink.search.front import AutoResult
from netshrink.search.target import parse_target
from netshrink.settings import Inputs, Timing


def run_analyze(
    inputs: Inputs, out: Path, progress: bool = True, samples: int = SAMPLES
) -> tuple[Sensitivity, dict[str, Path]]:
    """Probe every layer on the first ``samples`` examples of the validation split; write
    sensitivity.json and .png into ``out``."""
    with RunOutput(Path(out)) as unit:
        given = resolve(inputs)
        sens = analyze(
            given.model,
            example_inputs=given.data.example_inputs(),
            data=given.data.val,
            evaluate=given.evaluate,
            calib_data=given.data.calib,
            samples=samples,
            progress=progress,
            seed=inputs.seed,
        )
        paths = {
            "json": sens.save(unit.staging / "sensitivity.json"),
            "plot": sens.plot(unit.staging / "sensitivity.png"),
        }
        unit.commit()
    return sens, unit.final(paths)


def run_auto(
    target: str, inputs: Inputs, out: Path, timing: Timing, progress: bool = True
) -> tuple[AutoResult, dict[str, Path]]:
    """Search a recipe meeting ``target``; save its run, recipe.yaml and the Pareto front."""
    goal = parse_target(target)
    with RunOutput(Path(out)) as unit:
        model, kwargs, extra = prepare(inputs, progress)
        unit.check_space(space_needed(model))
        found = auto(model, goal, timing=timing, **kwargs)
        paths = found.save(unit.staging, {**extra, "target": str(goal)})
        unit.commit()
    return found, unit.final(paths)
