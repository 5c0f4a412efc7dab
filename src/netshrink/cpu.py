"""What the host CPU's int8 kernels can do, for the layers and runtimes that depend on it."""

from __future__ import annotations

import platform

import torch

SATURATING_INT8: bool = platform.machine().lower() in (
    "x86_64",
    "amd64",
    "i386",
    "i686",
) and not bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())
"""True on x86 CPUs without VNNI. There, int8 GEMM and convolution kernels (oneDNN's, so
``torch._int_mm``'s, and OpenVINO's CPU plugin's) add pairs of uint8 x int8 products in int16
with saturation (``vpmaddubsw``): 255 * 127 * 2 overflows it; 127 * 127 * 2 (7-bit
activations) and 255 * 64 * 2 (7-bit weights) do not."""
