"""SmoothQuant before static int8 on all-MiniLM-L6-v2: fidelity and artifact size.

    PYTHONPATH=src python benchmarks/smoothquant.py [--calib 128] [--sentences 512] [--quick]

Same model, text and fidelity measures as ``runtimes.py`` (calibration: 128 standard-library
docstring sentences in batches of 8 padded to the longest; fidelity: the Python language
reference, cosine and top-5 neighbour agreement with fp32), evaluated in eager torch, whose
simulated int8 is what the QDQ export computes in ONNX Runtime and OpenVINO. Every variant is
``quantize.static`` (per-channel int8 weights, uint8 per-tensor activations, int8 embedding
rows) after an optional ``quantize.smoothquant``; MiniLM is post-LN, so the smoothing is kept
inside each Linear (``in_layer``: a Mul by 1 / s before its input quantizer). Bytes: the saved
netshrink artifact. ``--quick``: 128 fidelity sentences, alpha auto only.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import netshrink as ns
from netshrink.artifact import artifact_bytes, save
from runtimes import fidelity, fidelity_text, setup, tokenize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=128, help="calibration sentences")
    parser.add_argument("--sentences", type=int, default=512, help="fidelity sentences")
    parser.add_argument("--quick", action="store_true", help="128 sentences, alpha auto only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sentences = 128 if args.quick else args.sentences
    work = Path(tempfile.mkdtemp(prefix="ns-bench-smoothquant-"))
    s, tok = setup(work, 1, args.calib)
    calib = [(b, None) for b in s.calib_longest]
    batches = tokenize(tok, fidelity_text(sentences))
    with torch.inference_mode():
        ref = F.normalize(torch.cat([s.fp32(*b) for b in batches]), dim=-1)

    def static(model: nn.Module) -> nn.Module:
        return ns.quantize.static(model, calib_data=calib, progress=False)

    def smoothed(alpha: float | str) -> nn.Module:
        return static(ns.quantize.smoothquant(s.fp32, alpha=alpha, calib_data=calib))

    variants = {
        "static int8": lambda: static(s.fp32),
        "smoothquant alpha 0.5 + static int8": lambda: smoothed(0.5),
        "smoothquant alpha auto + static int8": lambda: smoothed("auto"),
    }
    if args.quick:
        variants = {k: v for k, v in variants.items() if "auto" in k}
    fp32_bytes = artifact_bytes(save(s.fp32, work / "fp32"))
    print(f"\n{args.calib} calibration sentences, {len(ref)} fidelity sentences, eager\n")
    print("| variant | cos | top-5 | bytes | size vs fp32 | build s |\n|---|---|---|---|---|---|")
    for i, (label, make) in enumerate(variants.items()):
        start = time.perf_counter()
        model = make()
        took = time.perf_counter() - start
        size = artifact_bytes(save(model, work / f"v{i}"))
        with torch.inference_mode():
            cos, top5 = fidelity(lambda ids, m, model=model: model(ids, m), batches, ref)
        row = f"| {label} | {cos:.4f} | {top5:.3f} | {size:,} | {fp32_bytes / size:.2f}x "
        print(row + f"| {took:.0f} |", flush=True)


if __name__ == "__main__":
    main()
