"""Train every zoo model from scratch and print its test accuracy and training time.

    PYTHONPATH=src python benchmarks/zoo_accuracy.py [--seeds 0 1] [--threads 2]

The cache is neither read nor written. Training time is wall-clock seconds of the whole
``fit`` run; the 1-minute load average is printed beside it because the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import netshrink.zoo as zoo
from netshrink.zoo import catalog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--models", nargs="+", default=zoo.names(), choices=zoo.names())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs")
    print("| model | params | epochs | seed | train s | load avg | val acc | test acc |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models:
        splits, metric = zoo.data(name), zoo.evaluate(name)
        for seed in args.seeds:
            start = time.perf_counter()
            model = catalog.train_from_scratch(name, seed=seed, progress=False)
            seconds = time.perf_counter() - start
            params = sum(p.numel() for p in model.parameters())
            print(
                f"| {name} | {params:,} | {catalog.MODELS[name].plan.epochs} | {seed} "
                f"| {seconds:.1f} | {os.getloadavg()[0]:.1f} | {metric(model, splits.val):.4f} "
                f"| {metric(model, splits.test):.4f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
