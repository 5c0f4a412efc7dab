"""Where CSR beats dense: time SparseLinear with both kernels over sparsity, shape and threads.

    PYTHONPATH=src python benchmarks/prune_crossover.py [--runs 30]

Prints one Markdown table: median milliseconds of the dense and the CSR kernel of the same
layer (interleaved, one process, after warm-up) and their ratio (> 1: CSR faster). This is the
table docs/benchmarks/prune.md keeps; prune.magnitude does not read it, it re-times each layer
on its real input when pruning (``kernel: auto``).
"""

from __future__ import annotations

import argparse
import platform

import torch
from torch import nn

from netshrink.prune.sparse_layers import make_sparse, time_pair

SHAPES = [(512, 512, 1), (512, 512, 64), (512, 64, 64), (2048, 512, 64)]
SPARSITIES = [0.5, 0.7, 0.8, 0.9, 0.95, 0.99]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30, help="timed runs per kernel (>= 20)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}")
    print("| threads | out x in | rows | sparsity | dense ms | csr ms | dense/csr |")
    print("|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for out, inp, rows in SHAPES:
            layer = make_sparse(nn.Linear(inp, out)).eval()
            x = torch.randn(rows, inp, generator=gen)
            for sparsity in SPARSITIES:
                with torch.no_grad():
                    layer.weight.copy_(torch.randn(out, inp, generator=gen))
                    layer.weight[torch.rand(out, inp, generator=gen) < sparsity] = 0

                def run(kind: str, layer: nn.Module = layer, x: torch.Tensor = x) -> None:
                    layer.kernel = kind
                    with torch.no_grad():
                        layer(x)

                dense, csr = time_pair(lambda: run("dense"), lambda: run("csr"), args.runs)
                print(
                    f"| {threads} | {out}x{inp} | {rows} | {sparsity:.2f} | {dense:.3f} | "
                    f"{csr:.3f} | {dense / csr:.2f} |"
                )


if __name__ == "__main__":
    main()
