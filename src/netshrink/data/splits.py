"""Seeded, stratified splits of a labelled dataset into ``(inputs, targets)`` batches.

Every random choice uses a ``torch.Generator`` seeded by the caller: ``torch.randperm`` on CPU
gives the same permutation on every machine and torch version, so a split is reproducible.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from netshrink.batches import as_args
from netshrink.context import Batch
from netshrink.errors import ConfigError, DataError


@dataclass
class DataSplits:
    """Train, validation, test and calibration data as lists of ``(inputs, targets)`` batches.

    What a run uses: ``test`` is where the reported metric is measured (``--data`` functions
    without one give ``val`` again). In the built-in splits ``calib`` is a subset of
    ``train``. The batches keep a fixed order; the training loop reshuffles ``train`` every
    epoch.
    """

    train: list[Batch]
    val: list[Batch]
    test: list[Batch]
    calib: list[Batch]

    def example_inputs(self) -> tuple[Any, ...] | dict[str, Any]:
        """Inputs of the first validation batch, what latency is timed on: a tuple of positional
        tensors, or the dict of keyword tensors of a batch that has one (text data)."""
        inputs = self.val[0][0]
        return dict(inputs) if isinstance(inputs, Mapping) else as_args(inputs)

    def as_mapping(self) -> dict[str, list[Batch]]:
        """The splits as ``{"train", "val", "test", "calib"}``, the shape ``--data`` returns."""
        return {"train": self.train, "val": self.val, "test": self.test, "calib": self.calib}


def stratified_indices(
    labels: torch.Tensor, fractions: tuple[float, ...], seed: int
) -> list[torch.Tensor]:
    """Split example indices into ``len(fractions)`` disjoint, class-stratified parts.

    Each class's examples are permuted with a generator seeded by ``seed`` and cut by the
    cumulative ``fractions`` (which must sum to 1); the last part takes the rounding remainder.
    Each part comes back sorted, so its order does not depend on class order.
    """
    if any(f <= 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-9:
        raise ConfigError(f"split fractions must be positive and sum to 1, got {fractions}")
    generator = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in fractions]
    for cls in torch.unique(labels).tolist():
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        start, cumulative = 0, 0.0
        for i, fraction in enumerate(fractions):
            cumulative += fraction
            end = len(members) if i == len(fractions) - 1 else round(cumulative * len(members))
            parts[i].append(members[start:end])
            start = end
    return [torch.sort(torch.cat(p)).values for p in parts]


def subset(indices: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """``size`` indices drawn without replacement from ``indices`` (seeded), sorted."""
    if not 0 < size <= len(indices):
        raise ConfigError(f"subset size must be in [1, {len(indices)}], got {size}")
    generator = torch.Generator().manual_seed(seed)
    chosen = indices[torch.randperm(len(indices), generator=generator)[:size]]
    return torch.sort(chosen).values


def to_batches(inputs: torch.Tensor, targets: torch.Tensor, batch_size: int) -> list[Batch]:
    """Cut ``inputs``/``targets`` (first dimension = examples) into batches of ``batch_size``."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size}")
    if len(inputs) != len(targets):
        raise DataError(f"{len(inputs)} inputs but {len(targets)} targets; they must match")
    return list(zip(inputs.split(batch_size), targets.split(batch_size), strict=True))
