"""Freed heap memory handed back to the operating system during calibration.

glibc's malloc serves a large request with its own ``mmap`` and unmaps it when freed, but each
such free raises its threshold for doing so to that request's size (up to 32 MiB on 64-bit
Linux, ``mallopt(3)``'s dynamic threshold). From then on the engine's many 1-20 MiB tensors
(Hessians and their factors, a batch's activations, decoded weights) come from the heap, where a
freed block stays resident until something reuses it or the heap is trimmed. Measured on MiniLM
(sequential int4 GPTQ, fresh process): the resident set grew 100-150 MiB beyond what it held
with no trimming, and 65-75 MiB still at the peak with ``malloc_trim`` after every layer and
block, because a layer's Hessian pipeline frees 50 MiB between two trims.

:func:`release_freed_memory` returns the heap's free pages (``malloc_trim(0)``);
:func:`large_tensors_unmapped` fixes the mmap threshold at 1 MiB while the calibration runs, so
every tensor of 1 MiB or more is its own mapping and leaves the resident set when freed, and
on exit puts back the threshold that was in force when glibc lets it be known (see there).
Elsewhere (another C library, another OS) both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

M_MMAP_THRESHOLD = -3
"""``mallopt``'s parameter number for the mmap threshold (glibc's malloc.h)."""

MMAP_THRESHOLD_MAX = 32 << 20
"""The highest value glibc's dynamic threshold reaches on 64-bit Linux (4 MiB x sizeof(long))."""

_depth = [0]
"""How many :func:`large_tensors_unmapped` blocks are open (only the outermost sets and resets)."""

_in_force: list[int | None] = []
"""The fixed threshold :func:`large_tensors_unmapped` last set and ``mallopt`` took (empty:
none yet)."""

_IMPORT_ENVIRON = dict(os.environ)
"""The environment as this module was imported, for when the start environment is unreadable."""


@functools.cache
def _start_environment() -> dict[str, str]:
    """The environment the process started with, the one glibc read its malloc settings from
    (later changes to ``os.environ`` never reach it): ``/proc/self/environ``, else the
    environment as this module was imported."""
    try:
        raw = Path("/proc/self/environ").read_bytes()
    except OSError:
        return _IMPORT_ENVIRON
    items = (os.fsdecode(item).partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in items}


def environment_threshold(environ: Mapping[str, str] | None = None) -> int | None:
    """The mmap threshold, bytes, that ``environ`` (default: the environment the process started
    with, which glibc read when it started) fixes: the ``glibc.malloc.mmap_threshold`` tunable of
    ``GLIBC_TUNABLES``, else ``MALLOC_MMAP_THRESHOLD_``, capped at :data:`MMAP_THRESHOLD_MAX`
    (older glibc ignores values above 32 MiB and keeps its dynamic threshold, which rises to at
    most that); None when neither is set (or one is unreadable): glibc then adjusts its
    threshold dynamically, and no interface reads it."""
    environ = _start_environment() if environ is None else environ
    tunables = dict(
        item.split("=", 1) for item in environ.get("GLIBC_TUNABLES", "").split(":") if "=" in item
    )
    value = tunables.get("glibc.malloc.mmap_threshold", environ.get("MALLOC_MMAP_THRESHOLD_"))
    try:
        return None if value is None else min(int(value, 0), MMAP_THRESHOLD_MAX)
    except ValueError:
        return None


@functools.cache
def _libc() -> Any:
    """The C library when it has ``malloc_trim`` and ``mallopt`` (glibc), else None."""
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    has = lib is not None and hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt")
    return lib if has else None


def release_freed_memory() -> None:
    """Return the heap's free pages to the operating system (glibc's ``malloc_trim``)."""
    lib = _libc()
    if lib is not None:
        lib.malloc_trim(0)


@contextmanager
def large_tensors_unmapped(threshold: int = 1 << 20) -> Iterator[None]:
    """Within: allocations of ``threshold`` bytes or more that no free heap chunk can serve get
    their own ``mmap``, so freeing one returns its memory at once (no heap retention between
    trims); it costs a page fault per 4 KiB of each new large tensor (the zeroed pages of a
    fresh mapping). Nested uses keep the outermost setting until the outermost exits.

    On exit the threshold in force before is put back when it was a fixed one: the environment's
    (:func:`environment_threshold`) or the one an earlier use left. glibc's default dynamic
    threshold can be neither read nor switched back on once set (``mallopt(3)``), so when that was
    in force the threshold is fixed at :data:`MMAP_THRESHOLD_MAX`, the ceiling the dynamic one
    rises to. The free heap pages are returned."""
    lib = _libc()
    if lib is None or _depth[0]:
        yield
        return
    before = _in_force[-1] if _in_force else environment_threshold()
    _depth[0] += 1
    _fix_threshold(lib, threshold)
    try:
        yield
    finally:
        _fix_threshold(lib, MMAP_THRESHOLD_MAX if before is None else before)
        _depth[0] -= 1
        release_freed_memory()


def _fix_threshold(lib: Any, value: int) -> None:
    """Fix glibc's mmap threshold at ``value`` bytes, and record it as in force only when
    ``mallopt`` took it (it returns 1; 0 leaves the threshold as it was)."""
    if lib.mallopt(M_MMAP_THRESHOLD, value) == 1:
        _in_force[:] = [value]
