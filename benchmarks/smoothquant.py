"""SmoothQuant before static int8 on all-MiniLM-L6-v2: what it gives, and why folding cannot.

    cd benchmarks && PYTHONPATH=../src python smoothquant.py [--calib 128] [--sentences 256]

Same model, text and fidelity measures as ``runtimes.py`` (calibration: standard-library
docstrings; fidelity: the Python language reference, cosine and top-5 neighbour agreement with
fp32), evaluated in eager torch, whose simulated int8 is what the QDQ export computes in ONNX
Runtime and OpenVINO. Variants:

- ``quantize.static`` (per-channel int8 weights, uint8 per-tensor activations, int8 embeddings);
- ``quantize.smoothquant`` then static: MiniLM is post-LN, every LayerNorm output also feeds a
  residual, so the technique refuses it (the error is printed);
- an explicit per-channel input scale (experiment, not a technique): every encoder Linear
  computes ``linear(x * (1 / s))`` with its weight columns multiplied by s, s from SmoothQuant's
  formula on its own input (alpha 0.5, or searched), so static quantizes ``x / s``. This is what
  a per-channel scale kept beside the quantizer (NNCF inserts a Multiply) would give.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

import netshrink as ns
from netshrink.calibrate import Reducer, collect
from netshrink.errors import UnsupportedModuleError
from netshrink.layers import replace_module
from netshrink.quantize.smoothquant import search_alpha, smoothing_scales
from runtimes import Setup, fidelity, fidelity_text, setup, tokenize


class ChannelInput(Reducer):
    """max |x_j| per input channel, and the first ``rows`` input rows (for the alpha search)."""

    def __init__(self, rows: int) -> None:
        super().__init__("input")
        self.absmax: torch.Tensor | None = None
        self.rows, self.kept = rows, []

    def update(self, module: nn.Module, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        amax = flat.abs().amax(0)
        self.absmax = amax if self.absmax is None else torch.maximum(self.absmax, amax)
        if sum(len(k) for k in self.kept) < self.rows:
            self.kept.append(flat[: self.rows].clone())


class ScaledInput(nn.Module):
    """``linear(x / s)``: the explicit per-channel activation scale of the experiment."""

    def __init__(self, linear: nn.Linear, s: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("inv_s", 1 / s)
        self.linear = linear
        with torch.no_grad():
            linear.weight.mul_(s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x * self.inv_s)


def explicit_smoothing(s: Setup, alpha: float | str) -> nn.Module:
    """A copy of the fp32 encoder whose encoder Linears divide their input by s (see above)."""
    import copy

    model = copy.deepcopy(s.fp32)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".encoder." in n]
    stats = {n: ChannelInput(512) for n in names}
    collect(model, {n: [r] for n, r in stats.items()}, [(b, None) for b in s.calib], "inputs")
    for name in names:
        linear, r = model.get_submodule(name), stats[name]
        assert r.absmax is not None
        a = search_alpha(torch.cat(r.kept), r.absmax, [linear.weight]) if alpha == "auto" else alpha
        replace_module(
            model, name, ScaledInput(linear, smoothing_scales(r.absmax, [linear.weight], a))
        )
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calib", type=int, default=128, help="calibration sentences")
    parser.add_argument("--sentences", type=int, default=256, help="fidelity sentences")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    s, tok = setup(None, args.threads, args.calib)  # type: ignore[arg-type]
    calib = [(b, None) for b in s.calib]
    batches = tokenize(tok, fidelity_text(args.sentences))
    with torch.inference_mode():
        ref = F.normalize(torch.cat([s.fp32(*b) for b in batches]), dim=-1)

    def static(model: nn.Module) -> nn.Module:
        return ns.quantize.static(model, calib_data=calib, progress=False)

    try:
        ns.quantize.smoothquant(s.fp32, calib_data=calib, progress=False)
        print("quantize.smoothquant applied (unexpected on a post-LN model)")
    except UnsupportedModuleError as exc:
        print(f"quantize.smoothquant on MiniLM: {str(exc)[:400]} ...")
    variants = {
        "static int8": lambda: static(s.fp32),
        "explicit scale, alpha 0.5, + static int8": lambda: static(explicit_smoothing(s, 0.5)),
        "explicit scale, alpha auto, + static int8": lambda: static(explicit_smoothing(s, "auto")),
    }
    print(f"\n{args.calib} calibration sentences, {len(ref)} fidelity sentences, eager\n")
    print("| variant | cos | top-5 | build s |\n|---|---|---|---|")
    for label, make in variants.items():
        start = time.perf_counter()
        model = make()
        took = time.perf_counter() - start
        with torch.inference_mode():
            cos, top5 = fidelity(lambda i, m, model=model: model(i, m), batches, ref)
        print(f"| {label} | {cos:.4f} | {top5:.3f} | {took:.0f} |", flush=True)


if __name__ == "__main__":
    main()
