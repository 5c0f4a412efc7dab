"""calibrate.memory: during calibration large tensors get their own mapping, returned to the
operating system when freed."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from netshrink.calibrate.memory import _libc

# Run in a fresh interpreter: in a long-lived one the heap may already hold a free chunk large
# enough to serve the tensor, which glibc reuses before it considers a new mapping.
SCENARIO = textwrap.dedent(
    """
    import ctypes
    import torch
    from netshrink.calibrate.memory import _libc, large_tensors_unmapped

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks",
                    "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    lib = _libc()
    lib.mallinfo2.restype = Mallinfo2

    def mapped():
        return int(lib.mallinfo2().hblkhd)

    big = torch.ones(4 << 20)  # a freed 16 MiB mapping: the dynamic threshold rises to 16 MiB
    del big
    before = mapped()
    outside = torch.ones(2 << 20)  # 8 MiB: from the heap
    print(mapped() - before)
    with large_tensors_unmapped():
        before = mapped()
        inside = torch.ones(2 << 20)  # 8 MiB: its own mapping
        print(mapped() - before)
        del inside
        print(mapped() - before)  # unmapped: out of the resident set
    """
)


@pytest.mark.skipif(_libc() is None, reason="glibc's mallopt/malloc_trim only")
def test_inside_large_tensors_are_mapped_and_unmapped_when_freed() -> None:
    run = subprocess.run(
        [sys.executable, "-c", SCENARIO], capture_output=True, text=True, check=True, timeout=120
    )
    outside, inside, freed = (int(line) for line in run.stdout.split())
    assert outside < 1 << 20
    assert inside >= 8 << 20
    assert freed < 1 << 20


class _Recorder:
    """A stand-in C library that records its ``mallopt`` calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1

    def malloc_trim(self, _pad: int) -> int:
        return 1


def test_nested_use_leaves_the_threshold_to_the_outermost(monkeypatch) -> None:
    from netshrink.calibrate import memory

    lib = _Recorder()
    monkeypatch.setattr(memory, "_libc", lambda: lib)
    with memory.large_tensors_unmapped(1 << 20):
        with memory.large_tensors_unmapped(1 << 20):
            assert lib.calls == [(memory.M_MMAP_THRESHOLD, 1 << 20)]
        assert lib.calls == [(memory.M_MMAP_THRESHOLD, 1 << 20)]  # the inner exit left it
    assert lib.calls[-1] == (memory.M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD_MAX)
    assert len(lib.calls) == 2
