"""Eager PyTorch runner: the model's own forward under ``torch.inference_mode``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from netshrink.runtime.threads import resolve_threads, torch_threads


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
