"""calibrate.memory: during calibration every large tensor is its own mapping, returned to the
operating system when freed."""

from __future__ import annotations

import ctypes

import pytest
import torch

from netshrink.calibrate.memory import _libc, large_tensors_unmapped


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def mapped_bytes() -> int:
    """Bytes glibc holds in chunks served by their own mmap (``mallinfo2().hblkhd``)."""
    lib = _libc()
    lib.mallinfo2.restype = _Mallinfo2
    return int(lib.mallinfo2().hblkhd)


@pytest.mark.skipif(_libc() is None, reason="glibc's mallopt/malloc_trim only")
def test_large_tensors_are_mapped_and_unmapped_inside_and_the_heap_serves_them_after() -> None:
    big = torch.ones(4 << 20)  # a freed 16 MiB mapping: the threshold rises above 8 MiB
    del big
    with large_tensors_unmapped():
        before = mapped_bytes()
        tensor = torch.ones(2 << 20)  # 8 MiB
        assert mapped_bytes() - before >= 8 << 20
        del tensor
        assert mapped_bytes() - before < 1 << 20  # unmapped: out of the resident set
    before = mapped_bytes()
    tensor = torch.ones(2 << 20)  # the threshold is 32 MiB again: from the heap
    assert mapped_bytes() - before < 1 << 20 and tensor.numel() == 2 << 20
