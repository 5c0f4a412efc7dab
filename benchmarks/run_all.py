"""Run every benchmark in turn, each in its own process, with its default settings.

`make bench` calls this. Each script prints its own table; copy them into docs/benchmarks/.
Usage: python benchmarks/run_all.py [name ...]   (names: the scripts below, without .py)
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
SCRIPTS = [
    "zoo_accuracy", "quantize", "dynamic_kernels", "prune", "prune_crossover", "lowrank", "distill",
]  # fmt: skip


def main() -> int:
    """Run the named benchmarks (default: all); return non-zero if any failed."""
    names = sys.argv[1:] or SCRIPTS
    unknown = sorted(set(names) - set(SCRIPTS))
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {SCRIPTS}", file=sys.stderr)
        return 2
    failed = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(HERE / f"{name}.py")])
        print(f"=== {name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
