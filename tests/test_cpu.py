"""netshrink.cpu: which CPUs' int8 kernels saturate."""

from __future__ import annotations

import pytest

from netshrink.cpu import saturating_int8

AVX2 = {"avx2": True, "avx512_vnni": False, "avx_vnni": False}


@pytest.mark.parametrize(
    ("machine", "flags", "saturating"),
    [
        ("x86_64", AVX2, True),  # AMD Zen 3, Intel Skylake: vpmaddubsw only
        ("x86_64", {**AVX2, "avx512_vnni": True}, False),  # Cascade Lake, Zen 4, Sapphire Rapids
        ("x86_64", {**AVX2, "avx_vnni": True}, False),  # Alder Lake: VEX-encoded VNNI
        ("AMD64", AVX2, True),  # Windows spells it this way
        ("x86_64", {}, True),  # no flags known: assume the worst
        ("aarch64", {}, False),  # Arm's int8 dot products accumulate in int32
    ],
)
def test_saturating_int8_needs_x86_without_either_vnni(
    machine: str, flags: dict[str, bool], saturating: bool
) -> None:
    assert saturating_int8(machine, flags) is saturating
