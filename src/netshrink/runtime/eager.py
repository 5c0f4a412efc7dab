"""Eager PyTorch runner: the model's own forward under ``torch.inference_mode``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from netshrink.runtime.base import resolve_threads


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)``, restoring the old count after."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class EagerRunner:
    """Runs ``model`` in eager PyTorch with ``threads`` intra-op threads (None: torch's own)."""

    runtime = "eager"

    def __init__(self, model: nn.Module, threads: int | None = None):
        self.model = model
        self.threads = resolve_threads(threads)

    def describe(self) -> str:
        """The runtime name (nothing else to record)."""
        return self.runtime

    def __call__(self, inputs: tuple[Any, ...]) -> Any:
        """Run one forward pass on ``inputs``; returns the model's output (tensors)."""
        with torch_threads(self.threads):
            return self.bind(inputs)()

    def bind(self, inputs: tuple[Any, ...]) -> Callable[[], Any]:
        """Zero-argument forward on ``inputs``; the caller sets the thread count (see above)."""
        model, args = self.model, tuple(inputs)

        def forward() -> Any:
            with torch.inference_mode():
                return model(*args)

        return forward
