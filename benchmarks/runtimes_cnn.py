"""digits-cnn, fp32 and netshrink's static int8, on eager torch, ONNX Runtime and OpenVINO.

    PYTHONPATH=src python benchmarks/runtimes_cnn.py [--quick] [--runs 50] [--write]

Model: the built-in ``zoo:digits-cnn`` (trained on first use, cached), batch 64 digits (the first
test batch). int8: ``quantize.static`` (percentile observer, per-channel weights, the built-in
``int8`` recipe's options) calibrated on the zoo's calibration split; ONNX Runtime and OpenVINO
run netshrink's QDQ export of it. Every variant is timed at 1 thread, interleaved round-robin in
this process (rotating order), median of ``--runs`` after 10 warm-up calls; accuracy is top-1 on
the test split as each runtime computes it. The load average (``os.getloadavg``) is printed
beside the table: on a shared machine the milliseconds move, the ratios less. ``--write``
replaces the "digits-cnn" section at the end of docs/benchmarks/runtimes.md with the table.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import netshrink as ns
from netshrink import zoo
from netshrink.measure.latency import time_interleaved
from netshrink.metrics import accuracy
from netshrink.recipe.meter import machine
from netshrink.runtime import OrtModule, make_runner, torch_threads

PAGE = Path(__file__).resolve().parents[1] / "docs" / "benchmarks" / "runtimes.md"
HEADING = "## digits-cnn: static int8 in ONNX Runtime and OpenVINO"
RUNTIMES = {
    "eager": "eager torch",
    "onnxruntime": "ONNX Runtime",
    "openvino-f32": "OpenVINO (f32 hint)",
    "openvino": "OpenVINO (default hint)",
}
"""Runtime name -> the label the table gives it."""


def variants(fp32: nn.Module, int8: nn.Module, x: torch.Tensor) -> dict[str, object]:
    """Each (model, runtime) pair's runner at 1 thread, labelled for the table."""
    out = {}
    for label, model in (("fp32", fp32), ("static int8", int8)):
        for runtime, where in RUNTIMES.items():
            out[f"{label}, {where}"] = make_runner(model, runtime, 1, (x,))
    return out


def table(runners: dict, runs: int, test: list, x: torch.Tensor) -> list[str]:
    """Markdown rows: median ms, speedup vs fp32 eager, accuracy, what the runtime ran."""
    with torch_threads(1):
        fns: list[Callable[[], object]] = [r.bind((x,)) for r in runners.values()]
        times = time_interleaved(fns, runs=runs, warmup=10)
    base = times[0].median_ms
    rows = [
        "| variant | ran as | ms (median) | vs fp32 eager | top-1 accuracy |",
        "|---|---|---|---|---|",
    ]
    for (label, runner), t in zip(runners.items(), times, strict=True):
        model = runner.model if runner.runtime == "eager" else OrtModule(runner)
        acc = accuracy(model, test)
        rows.append(
            f"| {label} | {runner.describe()} | {t.median_ms:.2f} | {base / t.median_ms:.2f}x "
            f"| {acc:.4f} |"
        )
    return rows


def write_section(body: str) -> None:
    """Replace (or append) the digits-cnn section, which is the last one of the page."""
    text = PAGE.read_text(encoding="utf-8")
    head = text.split(HEADING)[0].rstrip("\n")
    PAGE.write_text(f"{head}\n\n{HEADING}\n\n{body}\n", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50, help="timed runs per variant")
    parser.add_argument("--quick", action="store_true", help="20 timed runs")
    parser.add_argument("--write", action="store_true", help="write the section of the page")
    args = parser.parse_args()
    runs = 20 if args.quick else args.runs
    torch.manual_seed(0)
    data = zoo.data("digits-cnn")
    fp32 = zoo.load("digits-cnn").eval()
    x = data.test[0][0]
    int8 = ns.quantize.static(
        fp32, observer="percentile", per_channel=True, example_inputs=(x,), calib_data=data.calib
    ).eval()
    load = os.getloadavg()
    rows = table(variants(fp32, int8, x), runs, data.test, x)
    load_after = os.getloadavg()
    body = "\n".join(
        [
            "```",
            "PYTHONPATH=src python benchmarks/runtimes_cnn.py --runs 50 --write",
            "```",
            "",
            f"Batch {x.shape[0]} x 1 x 8 x 8, 1 thread, every variant interleaved round-robin in "
            f"one process, median of {runs} timed runs. {machine()}, torch {torch.__version__}. "
            f"Load average (1 min) "
            f"{load[0]:.1f} before and {load_after[0]:.1f} after the timing: "
            + (
                "a loaded machine, the ratios are the usable figures."
                if load[0] > 1.5
                else "quiet."
            ),
            "",
            *rows,
        ]
    )
    print(body)
    if args.write:
        write_section(body)


if __name__ == "__main__":
    main()
