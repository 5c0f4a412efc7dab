"""Which torch ONNX exporter to use for quantized (QDQ) graphs: file size and ORT latency.

The same 4-layer 512-wide MLP, run in ONNX Runtime (2 threads unless --threads): fp32; int8
weights stored as int8 and dequantized with ``quantized_decomposed`` ops (dynamo exporter);
fake-quantized with ``torch.fake_quantize_*`` (the QAT idiom) through each exporter. Prints
the bytes of each .onnx file, the op types ORT runs after its graph optimizations, and the
median latency, timed interleaved in one process.

    python benchmarks/onnx_exporters.py [--threads 2] [--batch 64] [--runs 200]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
import torch.ao.quantization.fx._decomposed  # registers the quantized_decomposed ops
from torch import nn

from netshrink.artifact.onnx import export_onnx
from netshrink.measure import time_interleaved
from netshrink.runtime import OrtRunner

WIDTH, LAYERS, ACT_SCALE = 512, 4, 0.05


def _weight_qparams(layer: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
    scale = layer.weight.detach().abs().amax(1) / 127  # symmetric per output channel
    return scale, (layer.weight.detach() / scale[:, None]).round().clamp(-127, 127)


class DecomposedInt8(nn.Module):
    """int8 weight storage; quantize/dequantize via torch.ops.quantized_decomposed."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        scale, q = _weight_qparams(layer)
        self.register_buffer("qweight", q.to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("zero", torch.zeros(WIDTH, dtype=torch.int64))
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        qd = torch.ops.quantized_decomposed
        x = qd.dequantize_per_tensor(
            qd.quantize_per_tensor(x, ACT_SCALE, 0, -128, 127, torch.int8),
            ACT_SCALE,
            0,
            -128,
            127,
            torch.int8,
        )
        w = qd.dequantize_per_channel(self.qweight, self.scale, self.zero, 0, -128, 127, torch.int8)
        return nn.functional.linear(x, w, self.bias)


class FakeQuant(nn.Module):
    """float weight storage; fake-quantized in forward (QAT style)."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.layer = layer
        self.register_buffer("scale", _weight_qparams(layer)[0])
        self.register_buffer("zero", torch.zeros(WIDTH, dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.fake_quantize_per_tensor_affine(x, ACT_SCALE, 0, -128, 127)
        w = torch.fake_quantize_per_channel_affine(
            self.layer.weight, self.scale, self.zero, 0, -128, 127
        )
        return nn.functional.linear(x, w, self.layer.bias)


def _optimized_ops(path: Path, folder: Path) -> list[str]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(folder / f"{path.stem}.opt.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sorted({n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    torch.manual_seed(0)
    layers = [nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)]
    variants = {
        "fp32 (dynamo)": (nn.Sequential(*layers), "dynamo"),
        "int8 quantized_decomposed (dynamo)": (
            nn.Sequential(*[DecomposedInt8(m) for m in layers]),
            "dynamo",
        ),
        "fake-quant (dynamo)": (nn.Sequential(*[FakeQuant(m) for m in layers]), "dynamo"),
        "fake-quant (torchscript)": (nn.Sequential(*[FakeQuant(m) for m in layers]), "torchscript"),
    }
    x = torch.randn(args.batch, WIDTH)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        paths = {
            name: export_onnx(model, folder / f"v{i}.onnx", (x,), exporter=exporter)
            for i, (name, (model, exporter)) in enumerate(variants.items())
        }
        runners = [OrtRunner(p, threads=args.threads) for p in paths.values()]
        timings = time_interleaved([r.bind((x,)) for r in runners], runs=args.runs, warmup=20)
        print(
            f"ORT {ort.__version__}, torch {torch.__version__}, threads {args.threads}, "
            f"batch {args.batch}, median of {args.runs} interleaved runs"
        )
        print("| variant | .onnx bytes | ops after ORT optimization | median ms | vs fp32 |")
        print("|---|---:|---|---:|---:|")
        base = timings[0].median_ms
        for (name, path), t in zip(paths.items(), timings, strict=True):
            ops = ", ".join(_optimized_ops(path, folder))
            print(
                f"| {name} | {path.stat().st_size:,} | {ops} | {t.median_ms:.3f} | "
                f"{base / t.median_ms:.2f}x |"
            )


if __name__ == "__main__":
    main()
