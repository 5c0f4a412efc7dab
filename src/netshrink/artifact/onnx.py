"""Export a model to one self-contained ONNX file, written atomically and checked.

torch 2.13 ships two exporters. ``dynamo`` (its default: ``torch.export`` + onnxscript) is used
first because it turns both quantization idioms into QuantizeLinear/DequantizeLinear (QDQ)
pairs, which ONNX Runtime fuses into integer kernels (QGemm, QLinearConv):

- ``torch.ops.quantized_decomposed`` quantize/dequantize ops: a layer that stores int8 weights
  and dequantizes them in forward exports int8 initializers, so the file holds one byte a weight;
- ``torch.fake_quantize_*`` (QAT): Q/DQ around float weights. torch lacks shape-only ("fake")
  kernels for the per-tensor ``_cachemask`` forms these decompose into, so tracing with a
  dynamic batch fails; :func:`_register_fake_quant_shapes` supplies them.

netshrink's own custom ops (such as ``netshrink::matmul_u8s8``, the GEMM of ``quantize.dynamic``
while exporting) are translated by the functions their layer modules register with
:func:`netshrink.layers.onnx_translation`; this module only looks them up.

``torchscript`` (``dynamo=False``, deprecated by torch) is the fallback for models
``torch.export`` cannot trace (data-dependent Python control flow); it maps ``fake_quantize_*``
but not ``quantized_decomposed`` ops. docs/measure.md has the measurements behind this choice.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import os
import re
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import onnx
import onnxruntime as ort
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from netshrink.batches import example_args
from netshrink.errors import ArtifactError, ConfigError, DataError
from netshrink.layers import onnx_translations

Exporter = Literal["auto", "dynamo", "torchscript"]


def _example_args(example_inputs: Any) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...] | None]:
    """The example tensors in order, and their keyword names when they are keyword inputs."""
    args = example_args(example_inputs)
    if not args or not all(torch.is_tensor(a) for a in args):
        raise DataError(
            "example_inputs must be a non-empty tuple of tensors, e.g. (x,), or a dict of "
            f"keyword tensors; got {type(example_inputs).__name__}"
        )
    return args, tuple(example_inputs) if isinstance(example_inputs, Mapping) else None


_log = logging.getLogger(__name__)

_NOISY_LOGGERS = ("torch.onnx", "onnxscript")
"""Loggers whose records during an export are the exporters' business, not the user's: e.g.
onnxscript's constant folder logs "Evaluation failed" warnings for every node it cannot fold."""


class _AtDebug(logging.Handler):
    """Re-log every record it receives on netshrink's logger at DEBUG level."""

    def emit(self, record: logging.LogRecord) -> None:
        _log.debug("%s: %s", record.name, record.getMessage())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep the terminal clean during an export: the exporters' progress prints go nowhere,
    their log records go to netshrink's logger at DEBUG, warnings (deprecations, torchvision
    notices) are ignored."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    saved = [(logger.handlers, logger.propagate) for logger in loggers]
    for logger in loggers:  # torch's logging puts its own handler on torch.onnx: replace it
        logger.handlers, logger.propagate = [_AtDebug()], False
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, (handlers, propagate) in zip(loggers, saved, strict=True):
            logger.handlers, logger.propagate = handlers, propagate


_FAKE_QUANT_SHAPES: list[str] = []


def _register_fake_quant_shapes() -> None:
    """Give the per-tensor fake-quant ``_cachemask`` ops a shape-only kernel (once).

    Both return ``(output like x, bool mask like x)``. Without it, ``torch.export`` can trace
    them only with static shapes, by running the real kernel on stand-in tensors.
    """
    for name in (
        "fake_quantize_per_tensor_affine_cachemask",
        "_fake_quantize_per_tensor_affine_cachemask_tensor_qparams",
    ):
        op = f"aten::{name}"
        if name in _FAKE_QUANT_SHAPES or torch._C._dispatch_has_kernel_for_dispatch_key(op, "Meta"):
            continue  # done already, or a newer torch has its own
        torch.library.register_fake(op, _cachemask_shapes)
        _FAKE_QUANT_SHAPES.append(name)


def _cachemask_shapes(x: torch.Tensor, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x, dtype=torch.bool)


def _dynamo_options(
    model: nn.Module, args: tuple[torch.Tensor, ...], names: tuple[str, ...] | None, dyn: bool
) -> dict:
    _register_fake_quant_shapes()
    batch = torch.export.Dim("batch")
    shapes: Any = tuple({0: batch} if a.dim() > 0 else {} for a in args) if dyn else None
    if shapes is not None and names is not None:
        # Keyword inputs (token ids and masks) are keyed by name; their second dimension is
        # left to torch.export (Dim.AUTO): symbolic when the model allows it, as a text's
        # token count does, else kept at the traced size.
        shapes = {
            n: {**s, 1: torch.export.Dim.AUTO} if a.dim() > 1 else s
            for n, s, a in zip(names, shapes, args, strict=True)
        }
    return {
        "external_data": False,
        "dynamic_shapes": shapes,
        "verbose": False,
        "custom_translation_table": onnx_translations(),
    }


def _torchscript_options(
    model: nn.Module, args: tuple[torch.Tensor, ...], names: tuple[str, ...] | None, dyn: bool
) -> dict:
    with torch.no_grad():
        n_out = len(
            tree_leaves(model(**dict(zip(names, args, strict=True))) if names else model(*args))
        )
    inputs = _signature_order(model, names) if names else [f"input_{i}" for i in range(len(args))]
    outputs = [f"output_{i}" for i in range(n_out)]
    axes = {name: {0: "batch"} for name in inputs + outputs} if dyn else None
    return {"input_names": inputs, "output_names": outputs, "dynamic_axes": axes}


def _signature_order(model: nn.Module, names: tuple[str, ...]) -> list[str]:
    """Keyword input ``names`` in the order of ``model.forward``'s parameters (any it does not
    list last): the TorchScript exporter lays keyword inputs out in that order, so its
    ``input_names`` must follow it, or a dict ordered otherwise (a tokenizer's ``input_ids,
    token_type_ids, attention_mask``) would name the graph's inputs wrongly."""
    params = list(inspect.signature(model.forward).parameters)
    return sorted(names, key=lambda n: params.index(n) if n in params else len(params))


def _attention_of(config: Any) -> str | dict[str, str] | None:
    """The attention implementation ``config`` sets, in the form ``set_attn_implementation``
    takes back: a name, or for a composite model (CLIP, encoder-decoder) whose sub-configs
    differ, ``{"": top level, sub-config: name, ...}`` (setting the top level's name alone
    would set every sub-config to it)."""
    top = getattr(config, "_attn_implementation", None)
    subs = {
        key: getattr(getattr(config, key, None), "_attn_implementation", None)
        for key in getattr(config, "sub_configs", None) or {}
    }
    subs = {key: name for key, name in subs.items() if name is not None}
    if top is None or all(name == top for name in subs.values()):
        return top
    return {"": top, **subs}


@contextlib.contextmanager
def _eager_attention(model: nn.Module) -> Iterator[None]:
    """Export every Hugging Face model inside ``model`` with its ``eager`` attention, then put
    its own implementation (``sdpa`` by default) back.

    Traced, ``torch.nn.functional.scaled_dot_product_attention`` decomposes into MatMul, Add of
    a -inf mask, Softmax, then IsNaN and Where that zero fully masked rows, and K's transpose
    as a Reshape/Transpose/Reshape: OpenVINO runs those as separate primitives. The eager
    function (matmul, scale, add of a mask holding the dtype's finite minimum, softmax,
    matmul) is the pattern OpenVINO fuses into one attention kernel (its MHA ``Subgraph``), and
    needs no NaN guard since a finite mask gives no NaN. The two agree except on a query row
    whose keys are all masked (SDPA: zeros, eager: the mean of the values), which a padding
    mask with at least one real token per text never has. Models that cannot switch (no
    ``set_attn_implementation``, or attention code outside transformers' interface) export as
    they are.
    """
    switched = []
    for module in model.modules():
        current = _attention_of(getattr(module, "config", None))
        can_set = getattr(module, "_can_set_attn_implementation", None)
        if (
            current in (None, "eager")
            or not callable(getattr(module, "set_attn_implementation", None))
            or not (callable(can_set) and can_set())
        ):
            continue
        module.set_attn_implementation("eager")
        switched.append((module, current))
    try:
        yield
    finally:
        for module, current in reversed(switched):
            module.set_attn_implementation(current)


def _check_dtypes(model: nn.Module) -> None:
    """Refuse a model that computes in bfloat16: ONNX Runtime has no CPU kernels for bfloat16
    Conv, MatMul or Gemm, so the file would not run (``_check_batch`` would fail in ORT)."""
    bf16 = [
        name or type(model).__name__
        for name, module in model.named_modules()
        if any(t.dtype == torch.bfloat16 for t in module.parameters(recurse=False))
        or any(t.dtype == torch.bfloat16 for t in module.buffers(recurse=False))
    ]
    if bf16:
        shown = ", ".join(bf16[:3]) + (f" and {len(bf16) - 3} more" if len(bf16) > 3 else "")
        raise ArtifactError(
            f"{shown} hold bfloat16 weights, which ONNX Runtime cannot run on CPU; for ONNX use "
            "quantize.half with dtype: fp16 (the same size) or quantize.weight_only bits: 8, "
            "or keep bf16 and run the model in torch (--runtime eager)"
        )


def _reason(exc: Exception) -> str:
    """One line saying why an exporter failed (torch.export buries it under a summary head)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    _, found, summary = text.partition("## Exception summary")
    lines = [ln.strip() for ln in (summary if found else text).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


_EXPORTERS = {"dynamo": _dynamo_options, "torchscript": _torchscript_options}
"""Each exporter's ``torch.onnx.export`` keyword arguments (names, dynamic batch axes)."""


def _held_tensors(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """The tensors ``graph`` holds by the name its nodes read them by: its initializers and
    the values of its ``Constant`` nodes."""
    held = {t.name: t for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                held[node.output[0]] = value
    return held


def explicit_zero_points(model: onnx.ModelProto) -> int:
    """Give every per-channel int8 ``DequantizeLinear`` of a weight in ``model``'s main graph
    an explicit zero point, in place; return how many nodes got one.

    Exporters leave out zero points that are all zero, which ONNX allows. ONNX Runtime's
    ``session.x64quantprecision`` rewrite (int8 weights to uint8, for CPUs without VNNI)
    then adds a scalar zero point of 128 to a per-channel node and the session fails while
    running it ("x_zero_point must be null or 1D tensor with size N"). With zeros written
    out (one byte a channel), the rewrite shifts them and the graph runs. Weights may be
    initializers or ``Constant`` nodes; nodes inside subgraphs (If, Loop) are left as they are.
    """
    weights = _held_tensors(model.graph)
    taken = set(weights) | {n for node in model.graph.node for n in (*node.input, *node.output)}
    added = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) != 2:
            continue
        x, scale = (weights.get(name) for name in node.input)
        if x is None or scale is None or x.data_type != onnx.TensorProto.INT8:
            continue
        if len(scale.dims) != 1 or scale.dims[0] < 2:
            continue  # per-tensor: ORT's scalar zero point fits
        # one tensor per node: ORT rewrites each in place, and a shared one fails its rewrite
        # ("Attempt to replace the existing tensor")
        name = f"{node.output[0]}_zero_point"
        while name in taken:
            name += "_"
        taken.add(name)
        channels = scale.dims[0]
        zeros = onnx.helper.make_tensor(
            name, onnx.TensorProto.INT8, [channels], bytes(channels), raw=True
        )
        model.graph.initializer.append(zeros)
        node.input.append(name)
        added += 1
    return added


def _check_batch(path: Path, args: tuple[torch.Tensor, ...], names: tuple[str, ...] | None) -> None:
    """Run the file in ONNX Runtime at the traced batch and one more: a baked-in batch fails.

    Every output whose first dimension was the batch must grow with it. ONNX Runtime is called
    directly (CPU, one thread): ``netshrink.runtime`` builds on this module, not the reverse.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 4  # failures are raised below; stderr stays clean
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own types (InvalidGraph, NotImplemented, ...)
        raise ArtifactError(f"ONNX Runtime cannot load the exported graph: {exc}") from exc
    inputs = [i.name for i in session.get_inputs()]
    n = args[0].shape[0]
    bigger = tuple(torch.cat([a, a[:1]]) if a.dim() > 0 else a for a in args)

    def feeds(batch: tuple[torch.Tensor, ...]) -> dict[str, Any]:
        # keyword inputs by name: the graph may drop one the model does not use
        named = dict(zip(names or inputs, batch, strict=True))
        return {k: named[k].detach().cpu().numpy() for k in inputs}

    try:
        before, after = (session.run(None, feeds(batch)) for batch in (args, bigger))
    except Exception as exc:  # ORT raises its own types (Fail, InvalidArgument, ...)
        raise ArtifactError(
            f"the exported graph fails at batch {n + 1}, so its batch is not dynamic; "
            f"export with dynamic_batch=False or fix the model ({exc})"
        ) from exc
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        if b.ndim and b.shape[0] == n and (a.ndim == 0 or a.shape[0] != n + 1):
            raise ArtifactError(
                f"the exported graph does not keep a dynamic batch: output {i} has shape "
                f"{tuple(a.shape)} at batch {n + 1}; export with dynamic_batch=False"
            )


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_inputs: tuple[Any, ...],
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    exporter: Exporter = "auto",
) -> Path:
    """Export ``model`` (in eval mode) to one ONNX file at ``path``; return the path.

    ``example_inputs`` is the tuple of positional tensors of one forward call, or the dict of
    its keyword tensors (``{"input_ids": ..., "attention_mask": ...}``: the ONNX inputs are
    named after the keys, in their order). With
    ``dynamic_batch`` the first dimension of every input and output is symbolic (verified by
    running the file at another batch size). ``opset`` None takes the exporter's default. The
    file is written to a temporary name in the same folder, checked with ``onnx.checker`` and
    renamed into place, so ``path`` never holds a partial model.
    """
    if exporter not in ("auto", *_EXPORTERS):
        raise ConfigError(f"unknown exporter {exporter!r}; use auto, dynamo or torchscript")
    if opset is not None and not 13 <= opset <= 25:
        raise ConfigError(f"opset must be in 13..25 (per-channel QDQ needs 13), got {opset}")
    args, keywords = _example_args(example_inputs)
    _check_dtypes(model)
    if dynamic_batch and any(a.dim() > 0 and a.shape[0] == 1 for a in args):
        # A batch of one would be specialised to a constant 1 while tracing; trace with two.
        args = tuple(torch.cat([a, a]) if a.dim() > 0 else a for a in args)
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"{path} is a folder; give the ONNX file to write, e.g. {path}/model.onnx"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    names = ["dynamo", "torchscript"] if exporter == "auto" else [exporter]
    was_training = model.training
    model.eval()
    errors: list[str] = []
    try:
        for name in names:
            try:
                with _quiet(), _eager_attention(model):
                    options = _EXPORTERS[name](model, args, keywords, dynamic_batch)
                    options.update(dynamo=name == "dynamo", opset_version=opset)
                    if keywords is None:
                        torch.onnx.export(model, args, str(tmp), **options)
                    else:
                        kwargs = dict(zip(keywords, args, strict=True))
                        torch.onnx.export(model, (), str(tmp), kwargs=kwargs, **options)
                break
            except Exception as exc:  # each exporter fails in its own way; report them all
                errors.append(f"{name}: {_reason(exc)}")
        else:
            raise ArtifactError(
                f"ONNX export of {type(model).__name__} failed; " + " | ".join(errors)
            )
        if errors:
            warnings.warn(f"ONNX export fell back to torchscript ({errors[0]})", stacklevel=2)
        exported = onnx.load(str(tmp))
        if explicit_zero_points(exported):
            onnx.save(exported, str(tmp))
        try:
            onnx.checker.check_model(exported)  # the loaded graph: no second read of the file
        except onnx.checker.ValidationError as exc:
            raise ArtifactError(f"the exported ONNX graph is invalid: {exc}") from exc
        if dynamic_batch:
            _check_batch(tmp, args, keywords)
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        tmp.unlink(missing_ok=True)
    return path
