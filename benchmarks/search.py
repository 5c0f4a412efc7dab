"""Benchmark of the target-driven search (docs/benchmarks/search.md).

1. ``auto`` on zoo:digits-cnn with ``size=20x,max_drop=0.01`` from a cold sensitivity cache:
   wall time, verdict, every measured candidate.
2. The found recipe re-run by ``netshrink compress RECIPE --json`` in a fresh process: bytes and
   metric compared with what the search measured.
3. Mixed vs uniform at the same size: the searched recipe against uniform recipes (the same
   sparsity on every layer, then int8 weights everywhere, same fine-tuning), the uniform
   sparsity picked as the least one whose measured size is no larger than the mixed one's.

4. ``--minilm``: the command line on the real all-MiniLM-L6-v2 with a text file of the first
   ``--lines`` standard-library docstring paragraphs: ``netshrink analyze``, then
   ``netshrink compress --target`` (cold sensitivity cache each), with wall time, the CPU
   seconds of the command's processes and the load average around each. ``--quick`` runs
   the analysis only.

Run: PYTHONPATH=src python benchmarks/search.py [--model digits-cnn] [--target ...] [--out DIR]
     PYTHONPATH=src python benchmarks/search.py --minilm [--quick] [--target size=2x,max_drop=0.05]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import netshrink.zoo as zoo
from netshrink.recipe import compress
from netshrink.search import auto

UNIFORM_SPARSITIES = (0.9, 0.93, 0.95, 0.97, 0.98)


def uniform(sparsity: float, epochs: int) -> dict:
    """Every Linear/Conv2d at one sparsity, fine-tuned, then int8 weights everywhere."""
    return {
        "version": 1,
        "stages": [
            {"prune.magnitude": {"sparsity": sparsity, "finetune": {"epochs": epochs}}},
            {"quantize.weight_only": {"bits": 8}},
        ],
    }


def timed(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, str]:
    """Run ``cmd``; return it and a Markdown row cell text: wall s, CPU s, load before/after."""
    load = os.getloadavg()[0]
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - used.ru_utime - used.ru_stime
    return done, f"{wall:.0f} | {cpu:.0f} | {load:.1f} -> {os.getloadavg()[0]:.1f}"


def minilm(out: Path, lines: int, target: str, quick: bool) -> None:
    """``netshrink analyze`` and ``compress --target`` on MiniLM from the command line."""
    from netshrink.hf import stdlib_corpus
    from netshrink.hf.minilm import minilm_ref

    texts = out / "texts.txt"
    texts.write_text("\n".join(stdlib_corpus(lines)))
    given = ["--model", minilm_ref(), "--data", f"text:{texts}"]
    netshrink = [sys.executable, "-W", "ignore", "-m", "netshrink"]
    runs = {"analyze": [*netshrink, "analyze", *given, "--out", str(out / "analyze"), "-q"]}
    if not quick:
        runs[f"compress --target {target}"] = [
            *netshrink, "compress", "--target", target, *given, "--out", str(out / "auto"),
            "--json",
        ]  # fmt: skip
    print(f"threads: torch default of each command; {lines} texts")
    print("\n| command | wall s | CPU s | load 1-min before -> after |\n|---|---:|---:|---|")
    printed = []
    for name, cmd in runs.items():
        env = os.environ | {"NETSHRINK_CACHE": str(out / f"cache-{len(printed)}")}
        done, row = timed(cmd, env)
        print(f"| `{name}` | {row} |", flush=True)
        printed.append(f"$ {' '.join(cmd[3:])}\n{done.stdout}{done.stderr[-2000:]}")
        if done.returncode != 0:
            break
    print("\n" + "\n".join(printed))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="digits-cnn")
    parser.add_argument("--target", default=None, help="default: size=20x,max_drop=0.01 "
                        "(digits), size=2x,max_drop=0.05 (--minilm)")  # fmt: skip
    parser.add_argument("--out", default=None)
    parser.add_argument("--minilm", action="store_true", help="the CLI on MiniLM instead")
    parser.add_argument("--lines", type=int, default=400, help="--minilm: texts in the file")
    parser.add_argument("--quick", action="store_true", help="--minilm: analyze only")
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="search-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    if args.minilm:
        minilm(out, args.lines, args.target or "size=2x,max_drop=0.05", args.quick)
        return
    args.target = args.target or "size=20x,max_drop=0.01"
    os.environ["NETSHRINK_CACHE"] = str(out / "cache")  # cold: analysis included in the time
    model, splits = zoo.load(args.model), zoo.data(args.model)
    context = {
        "example_inputs": zoo.example_inputs(args.model, 64),
        "calib_data": splits.calib,
        "train_data": splits.train,
        "evaluate": zoo.evaluate(args.model),
    }
    start = time.perf_counter()
    found = auto(
        model, args.target, val_data=splits.val, eval_data=splits.test, progress=False, **context
    )
    seconds = time.perf_counter() - start
    paths = found.save(out / "auto", {"model": f"zoo:{args.model}"})
    print(f"threads {torch.get_num_threads()}, auto took {seconds:.0f} s")
    print(found.verdict())
    print(found.table())
    print(found.recipe_yaml())

    cmd = [
        sys.executable,
        "-m",
        "netshrink",
        "compress",
        str(paths["recipe"]),
        "--model",
        f"zoo:{args.model}",
        "--out",
        str(out / "rerun"),
        "--json",
    ]
    rerun = json.loads(
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    delivered = found.result.report.summary()
    print("\n| run | compressed bytes | compression | metric |\n|---|---:|---:|---:|")
    for label, s in (("auto (delivered)", delivered), ("netshrink compress re-run", rerun)):
        print(
            f"| {label} | {s['compressed_bytes']} | {s['compression_rate']:.2f}x | "
            f"{s['metric_after']:.4f} |"
        )

    best = found.best
    print("\n| allocation | compression | metric | drop |\n|---|---:|---:|---:|")
    print(
        f"| mixed (searched) | {best.compression_rate:.2f}x | {best.metric:.4f} | "
        f"{best.metric_drop:+.4f} |"
    )
    for s in UNIFORM_SPARSITIES:
        rep = compress(
            model,
            uniform(s, 2),
            val_data=splits.val,
            eval_data=splits.test,
            progress=False,
            **context,
        ).report.summary()
        print(
            f"| uniform s={s} + int8 | {rep['compression_rate']:.2f}x | "
            f"{rep['metric_after']:.4f} | {rep['metric_drop']:+.4f} |"
        )
        if rep["compression_rate"] >= best.compression_rate:
            break


if __name__ == "__main__":
    main()
