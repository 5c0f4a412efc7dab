"""Benchmark of the target-driven search (docs/benchmarks/search.md).

1. ``auto`` on zoo:digits-cnn with ``size=20x,max_drop=0.01`` from a cold sensitivity cache:
   wall time, verdict, every measured candidate.
2. The found recipe re-run by ``netshrink compress RECIPE --json`` in a fresh process: bytes and
   metric compared with what the search measured.
3. Mixed vs uniform at the same size: the searched recipe against uniform recipes (the same
   sparsity on every layer, then int8 weights everywhere, same fine-tuning), the uniform
   sparsity picked as the least one whose measured size is no larger than the mixed one's.

Run: PYTHONPATH=src python benchmarks/search.py [--model digits-cnn] [--target ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="digits-cnn")
    parser.add_argument("--target", default="size=20x,max_drop=0.01")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="search-bench-"))
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
