"""Micro-benchmarks behind two choices in quantize.dynamic (docs/quantize.md).

    PYTHONPATH=src python benchmarks/dynamic_kernels.py [--threads 2] [--runs 30]

1. Per-token range: ``aminmax(dim=1)`` against ``amin`` + ``amax`` on a [4096, 384] activation.
2. A MiniLM FFN-up epilogue + GELU + per-token uint8 quantization ([4096, 1536]) compiled as
   one function (inductor fuses it into one kernel that recomputes the GELU in each loop over
   the row), the same with ``realize_reads_threshold=1``, and split in two compiled functions
   so the GELU output is stored once and read back.
Medians in ms, candidates of each part interleaved in one process.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from timing import interleaved


def epilogue_gelu(acc, z, s, c0, c1):  # type: ignore[no-untyped-def]
    """The compiled path of DynamicInt8Linear's rescale, then a GELU."""
    return F.gelu((acc - z * c0) * s + c1)


def quantize_rows(g):  # type: ignore[no-untyped-def]
    """Per-token uint8 codes of ``g``, as the next DynamicInt8Linear makes them."""
    lo = g.amin(1, keepdim=True).clamp(max=0)
    hi = g.amax(1, keepdim=True).clamp(min=0)
    scale = (hi - lo).clamp_min(1e-12) / 255
    zero = torch.round(-lo / scale)
    return torch.clamp(torch.round(g / scale + zero), 0, 255).to(torch.uint8), scale, zero


def epilogue_gelu_quantize(acc, z, s, c0, c1):  # type: ignore[no-untyped-def]
    return quantize_rows(epilogue_gelu(acc, z, s, c0, c1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(4096, 384)
    ms = interleaved(
        {
            "aminmax(dim=1)": lambda: torch.aminmax(x, dim=1, keepdim=True),
            "amin + amax": lambda: (x.amin(1, keepdim=True), x.amax(1, keepdim=True)),
        },
        args.runs,
    )
    print(f"threads {args.threads}, per-token range of [4096, 384]:", _fmt(ms))
    acc, c0, c1 = torch.randn(4096, 1536), torch.randn(1536), torch.randn(1536)
    z, s = torch.randint(0, 255, (4096, 1)).float(), torch.rand(4096, 1) * 0.01
    default = torch.compile(epilogue_gelu_quantize)
    realize = torch.compile(epilogue_gelu_quantize, options={"realize_reads_threshold": 1})
    first, second = torch.compile(epilogue_gelu), torch.compile(quantize_rows)
    with torch.no_grad():
        ms = interleaved(
            {
                "default options": lambda: default(acc, z, s, c0, c1),
                "realize_reads_threshold=1": lambda: realize(acc, z, s, c0, c1),
                "two functions": lambda: second(first(acc, z, s, c0, c1)),
            },
            args.runs,
        )
    print(f"threads {args.threads}, FFN epilogue + GELU + quantize [4096, 1536]:", _fmt(ms))


def _fmt(ms: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f} ms" for k, v in ms.items())


if __name__ == "__main__":
    main()
