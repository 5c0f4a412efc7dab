"""What the command line's verbs do, as functions (the CLI only parses and prints).

``run`` loads and validates the recipe before anything else, resolves the model and data
references, compresses, and saves artifacts and report into the output folder. ``reopen`` loads a
saved artifact back, rebuilding into a model built from a reference the user gave, or from the
``zoo:`` name its manifest records (never from an import path a file names).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from netshrink.measure import Measurement

from netshrink import refs
from netshrink.context import Evaluate
from netshrink.errors import ArtifactError, ModelReferenceError
from netshrink.recipe import builtin
from netshrink.recipe.deliver import PROVENANCE_KEY, save_run
from netshrink.recipe.result import Result
from netshrink.recipe.runner import compress


@dataclass
class Inputs:
    """A resolved ``--model/--weights/--data/--eval``: the model, its data and metric."""

    model: nn.Module
    data: refs.Data
    evaluate: Evaluate
    model_ref: str
    data_ref: str


def resolve(
    model_ref: str,
    weights: Path | None = None,
    data_ref: str | None = None,
    eval_ref: str | None = None,
    seed: int = 0,
) -> Inputs:
    """Resolve the references; a zoo model brings its own data when ``data_ref`` is None."""
    evaluate = refs.evaluate_from(eval_ref, model_ref)
    model = refs.model_from(model_ref, weights, seed=seed)
    if data_ref is None:
        if refs.zoo_name(model_ref) is None:
            raise ModelReferenceError(
                f"--model {model_ref} is not a zoo model, so --data is needed: "
                "package.module:function returning {'train': ..., 'val': ..., 'calib': ...}"
            )
        data_ref = model_ref
    data = refs.data_from(data_ref)
    return Inputs(model, data, evaluate, model_ref, data_ref)


def input_specs(inputs: tuple[Any, ...]) -> list[dict[str, Any]]:
    """Shape and dtype of each tensor input, as the manifest records them for ``export``."""
    return [
        {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for t in inputs
        if torch.is_tensor(t)
    ]


def prepare(
    model_ref: str,
    *,
    weights: Path | None = None,
    data_ref: str | None = None,
    eval_ref: str | None = None,
    seed: int = 0,
    runtime: str = "eager",
    threads: int | None = None,
    runs: int = 20,
    progress: bool = True,
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Resolve the references for a run: the model, the keyword arguments ``compress`` and
    ``auto`` both take (data splits, metric, timing), and the provenance the run saves."""
    given = resolve(model_ref, weights, data_ref, eval_ref, seed)
    example = given.data.example_inputs()
    kwargs = {
        "eval_data": given.data.test,
        "runtime": runtime,
        "threads": threads,
        "runs": runs,
        "example_inputs": example,
        "calib_data": given.data.calib,
        "train_data": given.data.train,
        "val_data": given.data.val,
        "evaluate": given.evaluate,
        "seed": seed,
        "progress": progress,
    }
    extra = {
        "model": model_ref,
        "weights": None if weights is None else str(weights),
        "data": given.data_ref,
        "eval": eval_ref,
        "inputs": input_specs(example),
    }
    return given.model, kwargs, extra


def run(
    recipe_ref: str | Path,
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
) -> tuple[Result, dict[str, Path]]:
    """``netshrink compress``: validate the recipe, resolve inputs, compress, save; return both."""
    recipe = builtin.load(recipe_ref)
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
    result = compress(model, recipe, **kwargs)
    return result, save_run(result, out, extra)


def provenance(artifact: Path) -> dict[str, Any]:
    """The run provenance recorded in ``artifact``'s manifest (empty when there is none)."""
    from netshrink.artifact import read_manifest

    extra = read_manifest(artifact).get("extra")
    found = extra.get(PROVENANCE_KEY) if isinstance(extra, dict) else None
    return found if isinstance(found, dict) else {}


def reopen(artifact: Path, model_ref: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``artifact``; rebuild into ``model_ref``'s model, else the zoo model it records."""
    from netshrink.artifact import load

    info = provenance(artifact)
    recorded = info.get("model")
    if model_ref is None and refs.zoo_name(recorded):
        model_ref = recorded
    skeleton = None if model_ref is None else refs.build_model(model_ref, trained=False)
    return load(artifact, model=skeleton).eval(), info


def recorded_inputs(info: dict[str, Any]) -> tuple[torch.Tensor, ...] | None:
    """Zero tensors shaped like the example inputs a run recorded, or None."""
    specs = info.get("inputs")
    if not specs:
        return None
    try:
        return tuple(torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"])) for s in specs)
    except (KeyError, TypeError, AttributeError) as exc:
        raise ArtifactError(f"the manifest's recorded inputs {specs!r} are malformed") from exc


def measure_target(
    target: str,
    *,
    model_ref: str | None = None,
    data_ref: str | None = None,
    eval_ref: str | None = None,
    runtime: str = "eager",
    threads: int | None = None,
    runs: int = 20,
) -> Measurement:
    """``netshrink measure``: a zoo model (trained) or a saved artifact, on its data's test split.

    An artifact made by a run of a zoo model finds its model and data from its manifest; any
    other needs ``--model`` (to rebuild into) and ``--data``.
    """
    from netshrink.artifact import artifact_bytes
    from netshrink.measure import measure

    if refs.zoo_name(target) is not None:
        given = resolve(target, None, data_ref, eval_ref)
        model = given.model
    else:
        model, info = reopen(Path(target), model_ref)
        recorded = info.get("data")
        if data_ref is None and refs.zoo_name(recorded):
            data_ref = recorded
        if data_ref is None:
            raise ModelReferenceError(
                f"{target} records no zoo data; give --data package.module:function"
            )
        evaluate = refs.evaluate_from(eval_ref, model_ref or info.get("model", ""))
        given = Inputs(model, refs.data_from(data_ref), evaluate, "", data_ref)
    measured = measure(
        model,
        given.data.example_inputs(),
        evaluate=given.evaluate,
        data=given.data.test,
        runtime=runtime,
        threads=threads,
        runs=runs,
    )
    if refs.zoo_name(target) is not None:
        return measured
    # The artifact as it lies on disk (provenance included), not a fresh save of its model.
    return dataclasses.replace(measured, bytes=artifact_bytes(target))


def _model_and_inputs(artifact: Path, model_ref: str | None) -> tuple[nn.Module, tuple]:
    """The artifact's model and the example inputs its run recorded (needed to trace it)."""
    model, info = reopen(artifact, model_ref)
    inputs = recorded_inputs(info)
    if inputs is None:
        raise ArtifactError(
            f"{artifact} records no example inputs (it was not saved by netshrink compress); "
            "export it from Python with ns.export_onnx(model, path, example_inputs)"
        )
    return model, inputs


def export_onnx(artifact: Path, onnx_path: Path, model_ref: str | None = None) -> Path:
    """``netshrink export``: load ``artifact`` and write it as ONNX, traced on recorded inputs."""
    from netshrink.artifact import export_onnx as export

    model, inputs = _model_and_inputs(artifact, model_ref)
    return export(model, onnx_path, inputs)


def export_openvino(artifact: Path, out_dir: Path, model_ref: str | None = None) -> Path:
    """``netshrink export --openvino``: write ``out_dir``/model.xml + .bin (OpenVINO IR)."""
    from netshrink.runtime.openvino import save_ir

    model, inputs = _model_and_inputs(artifact, model_ref)
    return save_ir(model, Path(out_dir) / "model.xml", inputs)
