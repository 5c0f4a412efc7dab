"""Knowledge distillation on zoo:digits-cnn: does the teacher help a small student?

A student with at most 25% of the teacher's parameters (``zoo.build("digits-cnn", width=W)``)
is trained three ways with the same initialisation, data, optimizer, epochs and seed:

- hard labels only: ``distill.kd`` with ``alpha=0`` (the soft term has weight 0, so this is
  plain cross-entropy training through the same loop),
- knowledge distillation: soft targets at temperature T mixed with the labels (Hinton 2015),
- KD + attention transfer on the two stages' outputs (Zagoruyko & Komodakis 2017).

Each is repeated for 3 seeds; the table gives test top-1 accuracy per seed and the mean, next to
the trained teacher's. Run: ``python benchmarks/distill.py`` (about 10 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any

import torch

import netshrink as ns
from netshrink import zoo
from netshrink.metrics import accuracy

MODEL = "digits-cnn"


def params(model: torch.nn.Module) -> int:
    """Number of parameters (weights and biases; BatchNorm statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


def run(args: argparse.Namespace) -> str:
    """Train every variant for every seed; return the Markdown report."""
    torch.set_num_threads(args.threads)
    data = zoo.data(MODEL)
    teacher = zoo.load(MODEL, seed=0)
    teacher_acc = accuracy(teacher, data.test)
    variants: dict[str, dict[str, Any]] = {
        "hard labels only": {"alpha": 0.0},
        f"KD (T={args.temperature}, alpha={args.alpha})": {},
        "KD + attention transfer": {
            "features": [
                {"student": "stage1", "loss": "attention"},
                {"student": "stage2", "loss": "attention"},
            ]
        },
    }
    common = {
        "student": {"width": args.width},
        "epochs": args.epochs,
        "lr": args.lr,
        "temperature": args.temperature,
        "alpha": args.alpha,
        "train_data": data.train,
        "progress": False,
    }
    rows, ratio = [], None
    for name, options in variants.items():
        accs = []
        for seed in range(args.seeds):
            start = time.perf_counter()
            student = ns.distill.kd(teacher, **{**common, **options}, seed=seed)
            accs.append(accuracy(student, data.test))
            ratio = params(student) / params(teacher)
            print(f"{name} seed {seed}: {accs[-1]:.4f} ({time.perf_counter() - start:.0f} s)")
        rows.append((name, accs))
    hard_mean = statistics.mean(rows[0][1])
    lines = [
        f"teacher: zoo:{MODEL} ({params(teacher):,} parameters), test accuracy "
        f"{100 * teacher_acc:.2f}%",
        f"student: width={args.width}, {100 * ratio:.1f}% of the teacher's parameters; "
        f"{args.epochs} epochs, AdamW lr={args.lr}, cosine; seeds 0..{args.seeds - 1}",
        "",
        "| student training | "
        + " | ".join(f"seed {s}" for s in range(args.seeds))
        + " | mean | vs hard labels | vs teacher |",
        "|---|" + "---:|" * (args.seeds + 3),
    ]
    for name, accs in rows:
        mean = statistics.mean(accs)
        lines.append(
            f"| {name} | "
            + " | ".join(f"{100 * a:.2f}" for a in accs)
            + f" | {100 * mean:.2f} | {100 * (mean - hard_mean):+.2f} "
            f"| {100 * (mean - teacher_acc):+.2f} |"
        )
    lines += [
        "",
        f"accuracy in % on the {sum(len(t) for _, t in data.test)} test images; "
        f"torch {torch.__version__}, {args.threads} threads, {platform.machine()}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=0.45, help="student width fraction")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    print(run(parser.parse_args()))


if __name__ == "__main__":
    main()
