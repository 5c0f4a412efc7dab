"""What a recipe run produced: the compressed model and the :class:`Report` of its stages."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from netshrink.report.record import Report


@dataclass
class Result:
    """What :func:`netshrink.compress` returns: the compressed model, its report, the baseline."""

    model: nn.Module
    report: Report
    baseline: nn.Module | None = None

    def __iter__(self) -> Iterator[Any]:
        """Unpack as ``model, report = ns.compress(...)``."""
        return iter((self.model, self.report))
