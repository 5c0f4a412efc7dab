"""netshrink pruning vs torch.nn.utils.prune and Torch-Pruning on the zoo models.

    PYTHONPATH=src python benchmarks/prune.py [--epochs 5] [--runs 40] [--batch 64] [--threads 1]

For zoo:digits-cnn and zoo:digits-transformer, every method starts from the same trained model
and gets the same fine-tuning budget (netshrink.train.fit, same epochs, learning rate and seed):

- netshrink ``prune.channels`` (50% of channels / neurons / heads, physically removed), with
  the default L1 criterion and with first-order Taylor scores from training batches,
- Torch-Pruning ``MetaPruner`` with L1 magnitude importance at the same 50% ratio,
- ``torch.nn.utils.prune.global_unstructured`` at 80% (masks, then ``prune.remove``),
- netshrink ``prune.magnitude`` at 80% (sparse layers, CSR where it measured faster).

Then zoo:digits-mlp at 90% unstructured (netshrink vs torch.nn.utils.prune). Reported per
method: parameters (non-zero for the unstructured ones), MACs (torch.utils.flop_counter; masked
zeros still count, as they still run), artifact bytes (``netshrink.save``: every method's
zeros are packed the same way), test accuracy, median latency (eager torch, no_grad, all
methods of a model timed interleaved in this one process) and the speedup against the dense
model. Prints Markdown tables.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.utils.prune as torch_prune
from torch import nn

import netshrink as ns
from netshrink import zoo
from netshrink.artifact import artifact_bytes, save
from netshrink.measure import Latencies, count_macs
from netshrink.metrics import accuracy
from netshrink.prune import sparsity_report
from netshrink.train import fit


def torch_pruning(model: nn.Module, x: tuple[torch.Tensor, ...], ratio: float) -> nn.Module:
    """Torch-Pruning 50% L1 channel pruning; attention heads kept whole via ``num_heads``."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    attns = [m for m in model.modules() if hasattr(m, "num_heads") and hasattr(m, "q")]
    heads = {getattr(a, p): a.num_heads for a in attns for p in ("q", "k", "v")}
    # Like netshrink's default, keep the LayerNorm-normalised residual stream: ignore the
    # layers that write it (Torch-Pruning's own default prunes it and failed on this model).
    stream = [m for m in model.modules() if isinstance(m, nn.LayerNorm | nn.Embedding)]
    if stream:
        stream += [
            model.embed,
            *(b.attn.out for b in model.blocks),
            *(b.mlp[2] for b in model.blocks),
        ]
    pruner = tp.pruner.MetaPruner(
        model,
        x,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=[model.head, *stream],
        num_heads=heads,
        prune_num_heads=bool(heads),
        prune_head_dims=False,
        head_pruning_ratio=ratio,
    )
    pruner.step()
    for a in attns:
        a.num_heads = a.q.out_features // a.head_dim
    return model


def torch_unstructured(model: nn.Module, sparsity: float) -> nn.Module:
    """``torch.nn.utils.prune`` global L1 unstructured over Linear/Conv2d weights."""
    model = copy.deepcopy(model)
    params = [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    torch_prune.global_unstructured(params, torch_prune.L1Unstructured, amount=sparsity)
    return model


def finalize_torch_prune(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if torch_prune.is_pruned(m) and hasattr(m, "weight_orig"):
            torch_prune.remove(m, "weight")
    return model


def time_rotated(fns: list[Callable[[], object]], runs: int) -> list[Latencies]:
    """Interleaved timing whose order rotates every round, so each callable spends as many rounds
    in every position. On this shared machine a fixed order showed the same model alternating
    between ~2 ms and ~10 ms by position alone (preemption phase), which rotation shares out."""
    for _ in range(10):
        for fn in fns:
            fn()
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(runs):
        for i in [(r + k) % len(fns) for k in range(len(fns))]:
            start = time.perf_counter_ns()
            fns[i]()
            samples[i].append((time.perf_counter_ns() - start) / 1e6)
    return [Latencies(tuple(s)) for s in samples]


def nonzero_params(model: nn.Module) -> int:
    return sum(int((p != 0).sum()) for p in model.parameters())


def bench(
    name: str,
    methods: dict[str, Callable[[nn.Module], nn.Module]],
    args: argparse.Namespace,
    tmp: Path,
) -> None:
    base = zoo.load(name)
    splits = zoo.data(name)
    x = zoo.example_inputs(name, args.batch)
    models: dict[str, nn.Module] = {"dense": base.eval()}
    for label, make in methods.items():
        torch.manual_seed(0)
        try:
            models[label] = make(base).eval()
        except Exception as exc:  # a peer that cannot handle the model is reported, not hidden
            print(f"- {label} failed on {name}: {type(exc).__name__}: {str(exc)[:200]}")
    rows = {}
    for label, model in models.items():
        save(model, tmp / f"{name}-{label}")
        rows[label] = {
            "params": nonzero_params(model),
            "macs": count_macs(model, x),
            "bytes": artifact_bytes(tmp / f"{name}-{label}"),
            "acc": accuracy(model, splits.test),
        }
    with torch.no_grad():
        timings = time_rotated([lambda m=m: m(*x) for m in models.values()], args.runs)
    dense = rows["dense"]
    dense_ms = timings[0].median_ms
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\n### zoo:{name} (batch {args.batch}, {torch.get_num_threads()} thread(s), "
          f"load average {load})\n")  # fmt: skip
    print("| method | non-zero params | MACs | artifact bytes | compression | test acc | "
          "drop (pts) | median ms | min ms | speedup (median) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (label, r), t in zip(rows.items(), timings, strict=True):
        print(
            f"| {label} | {r['params']:,} | {r['macs']:,} ({dense['macs'] / r['macs']:.2f}x "
            f"fewer) | {r['bytes']:,} | {dense['bytes'] / r['bytes']:.2f}x | {r['acc']:.4f} | "
            f"{100 * (dense['acc'] - r['acc']):+.2f} | {t.median_ms:.3f} | "
            f"{min(t.samples_ms):.3f} | "
            f"{dense_ms / t.median_ms:.2f}x |"
        )
    for label, model in models.items():
        report = sparsity_report(model)
        if report.layers:
            print(f"\n{label} kernels:\n```\n{report}\n```")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs, every method")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--runs", type=int, default=40, help="timed runs per model (>= 20)")
    parser.add_argument("--batch", type=int, default=64, help="batch size of the timed input")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--models", nargs="+", default=["digits-cnn", "digits-transformer", "digits-mlp"]
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {platform.machine()}, threads {args.threads}, "
          f"fine-tune {args.epochs} epochs lr {args.lr}")  # fmt: skip

    def tuned(fn: Callable[[nn.Module], nn.Module], name: str) -> Callable[[nn.Module], nn.Module]:
        def run(base: nn.Module) -> nn.Module:
            model = fn(base)
            fit(model, zoo.data(name).train, epochs=args.epochs, lr=args.lr, progress=False)
            return finalize_torch_prune(model)

        return run

    with tempfile.TemporaryDirectory() as tmp:
        for name in [n for n in args.models if n != "digits-mlp"]:
            x = zoo.example_inputs(name, args.batch)
            methods = {
                "netshrink channels 50%": tuned(
                    lambda m, x=x: ns.prune.channels(m, ratio=0.5, example_inputs=x), name
                ),
                "netshrink channels 50% taylor": tuned(
                    lambda m, x=x, n=name: ns.prune.channels(
                        m,
                        ratio=0.5,
                        criterion="taylor",
                        example_inputs=x,
                        train_data=zoo.data(n).train,
                    ),
                    name,
                ),
                "Torch-Pruning L1 50%": tuned(lambda m, x=x: torch_pruning(m, x, 0.5), name),
                "torch.nn.utils.prune 80%": tuned(lambda m: torch_unstructured(m, 0.8), name),
                "netshrink magnitude 80%": tuned(
                    lambda m, x=x: ns.prune.magnitude(
                        m, sparsity=0.8, scope="global", example_inputs=x
                    ),
                    name,
                ),
            }
            bench(name, methods, args, Path(tmp))
        if "digits-mlp" in args.models:
            x = zoo.example_inputs("digits-mlp", args.batch)
            methods = {
                "netshrink magnitude 90%": tuned(
                    lambda m: ns.prune.magnitude(m, sparsity=0.9, scope="global", example_inputs=x),
                    "digits-mlp",
                ),
                "torch.nn.utils.prune 90%": tuned(
                    lambda m: torch_unstructured(m, 0.9), "digits-mlp"
                ),
            }
            bench("digits-mlp", methods, args, Path(tmp))


if __name__ == "__main__":
    main()
