"""Freed heap memory handed back to the operating system between calibration steps.

glibc's malloc serves a large request with its own ``mmap`` and unmaps it when freed, but each
such free raises its threshold for doing so to that request's size (up to 32 MiB on 64-bit
Linux, ``mallopt(3)``'s dynamic threshold). From then on the engine's many 1-20 MiB tensors
(Hessians, a batch's activations, decoded weights) come from the heap, where a freed block
stays resident until something reuses it: measured on MiniLM, the sequential GPTQ run's
resident set grew 100-150 MiB beyond what it held. ``malloc_trim(0)`` returns the free pages;
elsewhere (another C library, another OS) :func:`release_freed_memory` does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Any


@functools.cache
def _libc() -> Any:
    """The C library when it has ``malloc_trim`` (glibc), else None."""
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return lib if lib is not None and hasattr(lib, "malloc_trim") else None


def release_freed_memory() -> None:
    """Return the heap's free pages to the operating system (glibc's ``malloc_trim``)."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)
