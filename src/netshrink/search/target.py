"""Compression targets: ``size=20x,max_drop=0.01`` parsed into a :class:`Goal`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from netshrink.errors import ConfigError

KEYS = ("size", "speedup", "latency_ms", "size_mb", "max_drop")
"""Accepted keys: size and speedup take a rate (``20x`` or ``20``), the rest a plain number."""

EXAMPLE = "size=20x,max_drop=0.01"


@dataclass(frozen=True)
class Goal:
    """What ``auto`` must reach: one of size / speedup / latency_ms / size_mb, and a drop limit.

    size: compression rate (baseline bytes / compressed bytes); speedup: latency rate;
    latency_ms: median latency in milliseconds; size_mb: artifact megabytes (10^6 bytes);
    max_drop: most the metric may fall (0.01 = one point of accuracy), None for no limit.
    """

    size: float | None = None
    speedup: float | None = None
    latency_ms: float | None = None
    size_mb: float | None = None
    max_drop: float | None = None

    @property
    def kind(self) -> str:
        """The one resource goal given: "size", "speedup", "latency_ms" or "size_mb"."""
        return next(k for k in KEYS[:4] if getattr(self, k) is not None)

    @property
    def resource(self) -> str:
        """What the allocator budgets: stored "bytes" for size goals, "macs" for speed goals."""
        return "bytes" if self.kind in ("size", "size_mb") else "macs"

    def __str__(self) -> str:
        parts = [
            f"{k}={getattr(self, k):g}{'x' if k in ('size', 'speedup') else ''}"
            for k in KEYS
            if getattr(self, k) is not None
        ]
        return ",".join(parts)


def _number(key: str, text: str) -> float:
    raw = text.strip()
    if key in ("size", "speedup") and raw.lower().endswith("x"):
        raw = raw[:-1]
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"target {key}={text!r} is not a number; e.g. {EXAMPLE}") from None
    if not math.isfinite(value) or value <= 0 or (key == "max_drop" and value >= 1):
        limit = "in (0, 1)" if key == "max_drop" else "> 0"
        raise ConfigError(f"target {key}={text!r} must be {limit}")
    if key in ("size", "speedup") and value <= 1:
        raise ConfigError(f"target {key}={text!r} must be a rate above 1, e.g. {key}=4x")
    return value


def parse_target(text: str | Goal) -> Goal:
    """Parse ``key=value`` pairs separated by commas; ConfigError on anything else.

    Exactly one of size, speedup, latency_ms, size_mb must be given; max_drop is optional.
    """
    if isinstance(text, Goal):
        return text
    values: dict[str, float] = {}
    for part in (p for p in text.split(",") if p.strip()):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in KEYS:
            raise ConfigError(
                f"target part {part.strip()!r} is not key=value with a key among "
                f"{', '.join(KEYS)}; e.g. {EXAMPLE}"
            )
        if key in values:
            raise ConfigError(f"target key {key!r} is given twice in {text!r}")
        values[key] = _number(key, value)
    goals = [k for k in KEYS[:4] if k in values]
    if len(goals) != 1:
        raise ConfigError(
            f"target {text!r} needs exactly one of size, speedup, latency_ms, size_mb "
            f"(got {goals or 'none'}); e.g. {EXAMPLE}"
        )
    return Goal(**values)
