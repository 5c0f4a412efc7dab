"""Eager PyTorch runner: the model's own forward under ``torch.inference_mode``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from netshrink.batches import run
from netshrink.runtime.ort import CallInputs
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

    def __call__(self, inputs: CallInputs) -> Any:
        """Run one forward pass on ``inputs`` (positional tensors, or keyword tensors by name);
        returns the model's output (tensors)."""
        with torch_threads(self.threads):
            return self.bind(inputs)()

    def bind(self, inputs: CallInputs) -> Callable[[], Any]:
        """Zero-argument forward on ``inputs``; the caller sets the thread count (see above)."""
        model = self.model
        given = dict(inputs) if isinstance(inputs, Mapping) else tuple(inputs)

        def forward() -> Any:
            with torch.inference_mode():
                return run(model, given)

        return forward
