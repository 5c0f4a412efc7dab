"""Thread counts of a runtime: resolving ``threads=None`` and setting torch's for a block."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from netshrink.errors import ConfigError


def resolve_threads(threads: int | None) -> int:
    """Intra-op thread count to use: ``threads``, or torch's current setting when ``None``."""
    if threads is None:
        return torch.get_num_threads()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive integer or None, got {threads!r}")
    return threads


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``, restoring the old count after."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)
