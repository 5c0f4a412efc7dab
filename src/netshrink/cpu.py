"""What the host CPU's int8 kernels can do, for the layers and runtimes that depend on it."""

from __future__ import annotations

import platform
from collections.abc import Mapping

import torch

_X86 = ("x86_64", "amd64", "i386", "i686")


def saturating_int8(machine: str, capabilities: Mapping[str, bool]) -> bool:
    """Whether an x86 CPU (``machine`` as :func:`platform.machine` names it) lacks both
    AVX512-VNNI and AVX-VNNI (its VEX form, on Alder Lake and later client CPUs), given its
    feature flags as ``torch.cpu.get_capabilities()`` reports them. torch's own
    ``_is_vnni_supported`` checks AVX512-VNNI only; oneDNN, OpenVINO and ONNX Runtime also
    run int8 GEMMs on AVX-VNNI's ``vpdpbusd``, which accumulates in int32 without saturating.
    """
    vnni = capabilities.get("avx512_vnni", False) or capabilities.get("avx_vnni", False)
    return machine.lower() in _X86 and not vnni


def _capabilities() -> Mapping[str, bool]:
    read = getattr(torch.cpu, "get_capabilities", None)
    return read() if callable(read) else {}


SATURATING_INT8: bool = saturating_int8(platform.machine(), _capabilities())
"""True on x86 CPUs without VNNI (:func:`saturating_int8`). There, int8 GEMM and convolution
kernels (oneDNN's, so ``torch._int_mm``'s, and OpenVINO's CPU plugin's) add pairs of uint8 x
int8 products in int16 with saturation (``vpmaddubsw``): 255 * 127 * 2 overflows it; 127 * 127
* 2 (7-bit activations) and 255 * 64 * 2 (7-bit weights) do not."""
