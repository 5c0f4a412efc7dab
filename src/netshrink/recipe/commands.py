"""What the command line's verbs do, as functions (the CLI only parses and prints).

``run`` loads and validates the recipe before anything else, resolves the model and data
references, compresses, and saves artifacts and report into the output folder. ``reopen`` loads a
saved artifact back, rebuilding into a model built from a reference the user gave, or from the
``zoo:`` name its manifest records (never from an import path a file names).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from netshrink.hf.export import HfExport
    from netshrink.measure import Measurement

from netshrink import refs
from netshrink.artifact.validate import check_input_specs
from netshrink.context import Evaluate
from netshrink.data import DataSplits
from netshrink.errors import ArtifactError, ModelReferenceError
from netshrink.outdir import OutputError, RunOutput, check_writable, space_needed
from netshrink.recipe import builtin
from netshrink.recipe.deliver import PROVENANCE_KEY, save_run
from netshrink.recipe.result import Result
from netshrink.recipe.runner import compress
from netshrink.settings import Inputs, Timing
from netshrink.usercode import check_data


@dataclass(frozen=True)
class Resolved:
    """:class:`Inputs` resolved: the model, its data splits and metric, and the references
    (with ``data_ref`` filled in where a zoo model brought its own data)."""

    model: nn.Module
    data: DataSplits
    evaluate: Evaluate
    inputs: Inputs


def resolve(inputs: Inputs) -> Resolved:
    """Resolve the references; with no ``data_ref`` a zoo model brings its own data and an hf
    model the built-in text corpus."""
    if inputs.model_ref is None:
        raise ModelReferenceError(
            "--model is needed: zoo:<name>, hf:<folder> or package.module:factory"
        )
    if refs.is_text(inputs.data_ref) and not refs.is_hf(inputs.model_ref):
        refs.data_from(inputs.data_ref)  # says why, before a zoo model is trained for nothing
    model = refs.model_from(inputs.model_ref, inputs.weights, seed=inputs.seed, task=inputs.task)
    data_ref = inputs.data_ref
    if data_ref is None and not refs.is_hf(inputs.model_ref):
        if refs.zoo_name(inputs.model_ref) is None:
            raise ModelReferenceError(
                f"--model {inputs.model_ref} is not a zoo model, so --data is needed: "
                "package.module:function returning {'train': ..., 'val': ..., 'calib': ...}"
            )
        data_ref = inputs.model_ref
    data = refs.data_from(data_ref, model, seed=inputs.seed)
    evaluate = refs.evaluate_from(inputs.eval_ref, inputs.model_ref, model, data)
    splits = {"train": data.train, "val": data.val, "calib": data.calib, "test": data.test}
    check_data(model, splits, data_ref or "(built-in corpus)")
    return Resolved(model, data, evaluate, dataclasses.replace(inputs, data_ref=data_ref))


def input_specs(inputs: tuple[Any, ...] | dict[str, Any]) -> list[dict[str, Any]]:
    """Shape and dtype of each tensor input (and its keyword ``name`` for keyword inputs), as
    the manifest records them for ``export``."""
    named = inputs.items() if isinstance(inputs, dict) else ((None, t) for t in inputs)
    return [
        {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        | ({} if name is None else {"name": name})
        for name, t in named
        if torch.is_tensor(t)
    ]


def minilm_demo(inputs: Inputs) -> Resolved:
    """:func:`resolve` for ``netshrink demo --model minilm``: the pretrained MiniLM; the built-in
    corpus of standard-library docstrings to calibrate, train and validate on; and every
    paragraph of the held-out corpus (the language reference, another source) as the test split
    the reported fidelity is measured on."""
    from netshrink import hf
    from netshrink.hf.inputs import max_tokens
    from netshrink.hf.minilm import minilm_ref
    from netshrink.hf.text import tokenize

    ref = inputs.model_ref or minilm_ref()
    model = hf.load_model(ref)
    data = hf.data_for(model, None, inputs.seed)
    tokens = max_tokens(model)
    heldout = tokenize(hf.load_tokenizer(ref), hf.heldout_corpus(), None, tokens, batch_size=32)
    data = dataclasses.replace(data, test=heldout)
    evaluate = hf.evaluate_for(model, data)
    return Resolved(model, data, evaluate, dataclasses.replace(inputs, model_ref=ref))


def prepare(
    inputs: Inputs, progress: bool, resolver: Callable[[Inputs], Resolved] = resolve
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Resolve ``inputs`` for a run (with ``resolver``): the model, the keyword arguments
    ``compress`` and ``auto`` both take besides the timing (data splits, metric, seed), and the
    provenance it saves."""
    given = resolver(inputs)
    example = given.data.example_inputs()
    kwargs = {
        "eval_data": given.data.test,
        "example_inputs": example,
        "calib_data": given.data.calib,
        "train_data": given.data.train,
        "val_data": given.data.val,
        "evaluate": given.evaluate,
        "seed": inputs.seed,
        "progress": progress,
    }
    extra = {
        "model": given.inputs.model_ref,
        "weights": None if inputs.weights is None else str(inputs.weights),
        "data": given.inputs.data_ref,
        "eval": inputs.eval_ref,
        "task": inputs.task,
        "inputs": input_specs(example),
    }
    return given.model, kwargs, extra


def run(
    recipe_ref: str | Path,
    inputs: Inputs,
    out: Path,
    timing: Timing,
    progress: bool = True,
    resolver: Callable[[Inputs], Resolved] = resolve,
) -> tuple[Result, dict[str, Path]]:
    """``netshrink compress``: validate the recipe, resolve inputs (with ``resolver``),
    compress, save; return both."""
    recipe = builtin.load(recipe_ref)
    with RunOutput(out) as unit:
        model, kwargs, extra = prepare(inputs, progress, resolver)
        unit.check_space(space_needed(model))
        result = compress(model, recipe, timing=timing, **kwargs)
        paths = save_run(result, unit.staging, extra)
        unit.commit()
    return result, unit.final(paths)


def provenance(manifest: dict[str, Any]) -> dict[str, Any]:
    """The run provenance recorded in an artifact's ``manifest`` (empty when there is none)."""
    extra = manifest.get("extra")
    found = extra.get(PROVENANCE_KEY) if isinstance(extra, dict) else None
    return found if isinstance(found, dict) else {}


def reopen(
    artifact: Path, model_ref: str | None, task: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``artifact``; rebuild into ``model_ref``'s model (an hf one for ``task``), else the
    zoo or hf model its manifest records."""
    from netshrink.artifact import load, read_manifest

    manifest = read_manifest(artifact)
    info = provenance(manifest)
    recorded = info.get("model")
    if model_ref is None and refs.zoo_name(recorded):
        model_ref = recorded
    arch = str(manifest.get("architecture", ""))
    if model_ref is None and not arch.startswith("zoo:") and "hf" not in manifest:
        made_with = f" (the run used --model {recorded})" if recorded else ""
        raise ModelReferenceError(
            f"{artifact} holds a {arch}, not a zoo model: give --model package.module:function "
            f"that builds a fresh one to load it into{made_with}"
        )
    skeleton = None if model_ref is None else refs.build_model(model_ref, trained=False, task=task)
    return load(artifact, model=skeleton).eval(), info


def recorded_inputs(
    info: dict[str, Any],
) -> tuple[torch.Tensor, ...] | dict[str, torch.Tensor] | None:
    """Zero tensors shaped like the example inputs a run recorded (a dict of them for keyword
    inputs), or None."""
    specs = info.get("inputs")
    if not specs:
        return None
    check_input_specs(specs)  # shapes and dtypes well formed, sizes bounded
    tensors = [torch.zeros(s["shape"], dtype=getattr(torch, s["dtype"])) for s in specs]
    if all("name" in s for s in specs):
        return {s["name"]: t for s, t in zip(specs, tensors, strict=True)}
    return tuple(tensors)


def measure_target(target: str, inputs: Inputs, timing: Timing) -> Measurement:
    """``netshrink measure``: a zoo model (trained) or a saved artifact, on its data's test split.

    For an artifact, ``inputs.model_ref`` is the model to rebuild into; one made by a run of a
    zoo or hf model finds its model and data from its manifest (an hf model: the ``text:`` file
    the run used, else the built-in corpus; its metric compares with the pretrained model its
    reference names), any other needs ``--model`` and ``--data``.
    """
    from netshrink.artifact import artifact_bytes
    from netshrink.measure import measure

    if refs.zoo_name(target) is not None:
        given = resolve(dataclasses.replace(inputs, model_ref=target, weights=None))
    else:
        model, info = reopen(Path(target), inputs.model_ref, inputs.task)
        recorded = info.get("data")
        data_ref = inputs.data_ref
        if data_ref is None and (refs.zoo_name(recorded) or refs.is_text(recorded)):
            data_ref = recorded
        baseline = refs.hf_baseline(model)
        if data_ref is None and baseline is None:
            raise ModelReferenceError(
                f"{target} records no zoo data; give --data package.module:function"
            )
        model_ref = inputs.model_ref or info.get("model", "")
        data = refs.data_from(data_ref, baseline, seed=inputs.seed)
        evaluate = refs.evaluate_from(inputs.eval_ref, model_ref, baseline, data)
        given = Resolved(model, data, evaluate, dataclasses.replace(inputs, data_ref=data_ref))
    measured = measure(
        given.model,
        given.data.example_inputs(),
        evaluate=given.evaluate,
        data=given.data.test,
        timing=timing,
    )
    if refs.zoo_name(target) is not None:
        return measured
    # The artifact as it lies on disk (provenance included), not a fresh save of its model.
    return dataclasses.replace(measured, bytes=artifact_bytes(target))


def _model_and_inputs(
    artifact: Path, model_ref: str | None, task: str | None
) -> tuple[nn.Module, tuple | dict]:
    """The artifact's model and the example inputs its run recorded (needed to trace it)."""
    model, info = reopen(artifact, model_ref, task)
    inputs = recorded_inputs(info)
    if inputs is None:
        raise ArtifactError(
            f"{artifact} records no example inputs (it was saved by ns.save, not by a netshrink "
            "run); export it from Python with ns.export_onnx(model, path, example_inputs)"
        )
    return model, inputs


def export_onnx(
    artifact: Path, onnx_path: Path, model_ref: str | None = None, task: str | None = None
) -> Path:
    """``netshrink export``: load ``artifact`` and write it as ONNX, traced on recorded inputs."""
    from netshrink.artifact import export_onnx as export

    if onnx_path.is_dir():
        raise OutputError(f"--onnx {str(onnx_path)!r} is a folder; give the ONNX file to write")
    check_writable(onnx_path, f"--onnx {str(onnx_path)!r}")
    model, inputs = _model_and_inputs(artifact, model_ref, task)
    return export(model, onnx_path, inputs)


def export_hf(
    artifact: Path, out_dir: Path, model_ref: str | None = None, task: str | None = None
) -> HfExport:
    """``netshrink export --hf``: write ``out_dir`` as a folder transformers loads."""
    from netshrink.hf.export import export_hf as export

    model, _ = reopen(artifact, model_ref, task)
    return export(model, out_dir)


def export_openvino(
    artifact: Path, out_dir: Path, model_ref: str | None = None, task: str | None = None
) -> Path:
    """``netshrink export --openvino``: write ``out_dir``/model.xml + .bin (OpenVINO IR)."""
    from netshrink.runtime.openvino import save_ir

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--openvino {str(out_dir)!r} is a file; give the folder to write into")
    check_writable(out_dir / "model.xml", f"--openvino {str(out_dir)!r}")
    model, inputs = _model_and_inputs(artifact, model_ref, task)
    return save_ir(model, Path(out_dir) / "model.xml", inputs)
