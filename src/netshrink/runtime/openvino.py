"""OpenVINO runner (CPU plugin, one stream, explicit thread count and compute precision).

A model reaches OpenVINO as an IR ``.xml`` path or through netshrink's own ONNX (see
:func:`~netshrink.runtime.ort.onnx_bytes` for what is accepted: a module, its
``netshrink_onnx`` hook, an ONNX file, bytes or a ModelProto). OpenVINO's ONNX frontend
reads netshrink's QDQ pairs (``quantize.static``; the CPU plugin runs them on u8/i8
convolutions and FullyConnected), ``MatMulInteger`` (``quantize.dynamic``) and int8/int4
weight-only layers; :meth:`OpenVinoRunner.primitives` lists which primitives really ran and in
what precision.

Precision: on CPUs with avx512_bf16 or AMX the CPU plugin computes in bf16 unless told
otherwise (``INFERENCE_PRECISION_HINT``), which costs fp32 fidelity (digits-cnn logits 6e-2
off fp32). ``precision="f32"`` asks for fp32 compute; the runner records what the compiled
model reports in :attr:`OpenVinoRunner.precision` and :meth:`OpenVinoRunner.describe`.
"""

from __future__ import annotations

import collections
import copy
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed ops
from torch import nn

from netshrink.errors import ArtifactError, ConfigError, DataError, MissingExtraError
from netshrink.layers import DequantLinear, replace_module
from netshrink.runtime.ort import OnnxSource, onnx_bytes

Precision = Literal["default", "f32", "bf16", "f16"]
"""Compute precision asked of the CPU plugin; ``default`` keeps OpenVINO's choice."""

PRECISIONS: tuple[str, ...] = ("default", "f32", "bf16", "f16")

_QD = torch.ops.quantized_decomposed


def import_openvino() -> Any:
    """Import and return the ``openvino`` package, or raise naming the extra that installs it."""
    try:
        import openvino
    except ImportError as exc:
        raise MissingExtraError(
            f"runtime 'openvino' needs the openvino package ({exc}); install it with "
            "`pip install netshrink[openvino]`, or use runtime 'eager' or 'onnxruntime'"
        ) from exc
    return openvino


def openvino_form(model: nn.Module) -> nn.Module:
    """``model``, or a copy where every layer offering ``netshrink_openvino()`` is replaced by
    the module it returns (the form OpenVINO runs fastest, e.g. a ``layers.DequantLinear``).
    """
    names = [
        n for n, m in model.named_modules() if callable(getattr(m, "netshrink_openvino", None))
    ]
    if not names:
        return model
    model = copy.deepcopy(model)
    for name in names:
        replace_module(model, name, model.get_submodule(name).netshrink_openvino())
    return model


MIXED_GROUP = 256
"""Input features per run-time quantization group of the dynamic layers of a static model."""
DEFAULT_GROUP = 32
"""OpenVINO's CPU default for ``DYNAMIC_QUANTIZATION_GROUP_SIZE`` (2026.4)."""


def runtime_options(module: nn.Module, model: Any) -> dict[str, str]:
    """OpenVINO compile options the OpenVINO form ``module`` of ``model`` (its OpenVINO
    ``Model``) needs, for its IR's ``runtime_options``: empty, or
    ``DYNAMIC_QUANTIZATION_GROUP_SIZE`` for a static int8 model (FakeQuantize ops) with
    int8 weight-compressed layers (``quantize.static``'s ``dynamic`` layers).

    Those layers' inputs are what one per-tensor range fits badly (GELU outputs); groups of
    ``MIXED_GROUP`` features (or the largest power of two dividing every such layer's inputs)
    keep their fidelity at the static layers' speed. When that is below OpenVINO's own default
    group (``DEFAULT_GROUP``; inputs such as 100 or an odd count), the default is kept: smaller
    groups only cost time. On MiniLM with the six FFN output
    projections dynamic, 256 held-out package docstrings: OpenVINO's default group of 32 cos
    0.99916 but 10% slower; 256: 0.99916; per token: 0.99886. An all-dynamic model keeps the
    default: its Q/K/V inputs need the fine groups (per token: 0.99771, 32: 0.99926).
    """
    inputs = [m.weight_q.shape[1] for m in module.modules() if isinstance(m, DequantLinear)]
    static = any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())
    group = math.gcd(MIXED_GROUP, *inputs)
    if not (inputs and static) or group <= DEFAULT_GROUP:
        return {}
    return {"DYNAMIC_QUANTIZATION_GROUP_SIZE": str(group)}


def read_model(source: OnnxSource, example_inputs: tuple[Any, ...] | None = None) -> Any:
    """OpenVINO ``Model`` of ``source`` (not yet compiled): an IR ``.xml`` path is read as
    is, anything else through netshrink's ONNX of it; a module's :func:`runtime_options` go
    into the model's ``runtime_options`` (kept in its IR; compile options given override them)."""
    ov = import_openvino()
    if isinstance(source, str | Path) and Path(source).suffix == ".xml":
        if not Path(source).is_file():
            raise ArtifactError(f"no OpenVINO IR at {source}; give the path of a model .xml")
        return ov.Core().read_model(str(source))
    if isinstance(source, nn.Module):
        source = openvino_form(source)
    data = onnx_bytes(source, example_inputs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(data)
        model = ov.Core().read_model(str(path))
    if isinstance(source, nn.Module):
        for key, value in runtime_options(source, model).items():
            model.set_rt_info(value, ["runtime_options", key])
    return model


def save_ir(
    source: OnnxSource, path: str | Path, example_inputs: tuple[Any, ...] | None = None
) -> Path:
    """Write ``source`` as OpenVINO IR (``path`` .xml plus its .bin) atomically; return ``path``.

    Weights keep the precision the graph gives them (no fp16 compression), so an int8 layer's
    weights stay int8 in the .bin. Both files are written under temporary names in the same
    folder and renamed into place, the .bin first, so the .xml never names a partial .bin.
    """
    ov = import_openvino()
    path = Path(path)
    if path.suffix != ".xml":
        raise ConfigError(f"an OpenVINO IR path ends in .xml, got {path.name!r}")
    model = read_model(source, example_inputs)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.xml")
    written = (tmp, tmp.with_suffix(".bin"))
    try:
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        os.replace(written[1], path.with_suffix(".bin"))
        os.replace(written[0], path)
    finally:
        for f in written:
            f.unlink(missing_ok=True)
    return path


def _numpy(x: Any) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().cpu().contiguous().numpy()
    return np.asarray(x)


class OpenVinoRunner:
    """Runs a model on OpenVINO's CPU plugin; outputs are torch tensors (one, or a tuple).

    ``threads`` sets ``INFERENCE_NUM_THREADS`` with one stream and the latency hint, so the
    count is the whole budget; CPU pinning is off so the pool does not hold cores other
    runtimes in the process need. ``precision`` is the ``INFERENCE_PRECISION_HINT``
    (``default``: the plugin's own choice, bf16 on CPUs with bf16 instructions).
    """

    def __init__(
        self,
        source: OnnxSource,
        example_inputs: tuple[Any, ...] | None = None,
        threads: int | None = None,
        precision: Precision = "default",
    ):
        from netshrink.runtime.threads import resolve_threads

        if precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {precision!r}; use one of {PRECISIONS}")
        ov = import_openvino()
        self.runtime = "openvino-f32" if precision == "f32" else "openvino"
        self.threads = resolve_threads(threads)
        config: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": self.threads,
            "NUM_STREAMS": 1,
            "PERFORMANCE_HINT": "LATENCY",
            "ENABLE_CPU_PINNING": False,
        }
        if precision != "default":
            config["INFERENCE_PRECISION_HINT"] = precision
        model = read_model(source, example_inputs)
        self.compiled = ov.Core().compile_model(model, "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.input_names = [i.get_any_name() for i in self.compiled.inputs]
        self.precision = str(self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string())

    def describe(self) -> str:
        """The runtime and the compute precision OpenVINO really used, e.g. ``openvino (bf16)``."""
        return f"openvino ({self.precision})"

    def primitives(self) -> dict[str, int]:
        """Count of the CPU plugin's executed primitives by ``layerType/runtimePrecision``.

        E.g. ``{"FullyConnected/u8": 36, "Convolution/i8": 2, ...}``: which kernels ran on
        integers (the ``u8``/``i8`` precisions) and which on floats.
        """
        counts: collections.Counter[str] = collections.Counter()
        for op in self.compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()
            counts[f"{info['layerType'].astype(str)}/{info['runtimePrecision'].astype(str)}"] += 1
        return dict(sorted(counts.items()))

    def feeds(self, inputs: tuple[Any, ...] | Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Map positional ``inputs`` (or a name -> tensor dict) onto the graph's inputs."""
        names = self.input_names
        if isinstance(inputs, Mapping):
            unknown = sorted(set(inputs) - set(names))
            missing = sorted(set(names) - set(inputs))
            if unknown or missing:
                raise DataError(
                    f"the OpenVINO model takes inputs {names}; got unknown {unknown}, "
                    f"missing {missing}"
                )
            return {name: _numpy(inputs[name]) for name in names}
        if len(inputs) != len(names):
            raise DataError(
                f"the OpenVINO model takes {len(names)} inputs ({', '.join(names)}), "
                f"got {len(inputs)}"
            )
        return {name: _numpy(x) for name, x in zip(names, inputs, strict=True)}

    def __call__(self, inputs: tuple[Any, ...] | Mapping[str, Any]) -> Any:
        """Run one forward pass on ``inputs``; torch tensors out."""
        return self.bind(inputs)()

    def bind(self, inputs: tuple[Any, ...] | Mapping[str, Any]) -> Callable[[], Any]:
        """Zero-argument run on ``inputs``, converted to numpy once, outside the timed call."""
        request, feeds = self.request, self.feeds(inputs)

        def run() -> Any:
            result = request.infer(feeds)
            # copies: the request reuses its output buffers on the next call
            out = tuple(torch.from_numpy(np.array(v)) for v in result.values())
            return out[0] if len(out) == 1 else out

        return run
