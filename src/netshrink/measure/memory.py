"""Peak memory of one eager forward pass, from the tensors torch ops create.

``tracemalloc`` does not see torch's allocator and process RSS moves with the allocator's
caching, so this counts tensors directly: a dispatch mode sees every tensor an aten op returns,
counts its storage once (views share it) and learns, through a finalizer on the storage, when
torch frees it. The figure is the largest sum of bytes alive at once.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from netshrink.batches import as_args


class _LiveBytes(TorchDispatchMode):
    def __init__(self, existing: set[int]):
        super().__init__()
        self.existing = existing
        self.live: dict[int, int] = {}
        self.now = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                self._track(t.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        key = storage.data_ptr()
        if key == 0 or key in self.existing or key in self.live:
            return
        self.live[key] = storage.nbytes()
        self.now += storage.nbytes()
        self.peak = max(self.peak, self.now)
        # Storage Python objects are kept alive with their C++ storage, so this runs on free.
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.now -= self.live.pop(key, 0)


def _storages(tensors: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors if t.layout == torch.strided}


def peak_memory(model: nn.Module, example_inputs: Any) -> int:
    """Peak bytes held at once by tensors that one eager forward on ``example_inputs`` creates.

    Counts activations, temporaries and the output; excludes the weights and inputs (alive
    before the call) and backend scratch space that never becomes a tensor (oneDNN
    workspaces). Runs under ``torch.inference_mode`` after one untracked warm-up call.
    """
    args = as_args(example_inputs)
    existing = _storages([*model.parameters(), *model.buffers()])
    existing |= _storages(a for a in args if torch.is_tensor(a))
    with torch.inference_mode():
        model(*args)
        tracker = _LiveBytes(existing)
        with tracker:
            out = model(*args)
        del out
    return tracker.peak
