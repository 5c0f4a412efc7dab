"""Sentence embeddings from token states, following sentence-transformers' folder layout.

A sentence-transformers folder lists its modules in ``modules.json``: a ``Transformer`` (the
folder itself), a ``Pooling`` whose ``config.json`` says which token poolings to concatenate, and
optionally a ``Normalize`` (unit L2 norm). Without those files the default is the convention of
Reimers & Gurevych 2019 (Sentence-BERT, sec. 3): mean over the real tokens, then L2 norm.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from netshrink.errors import ConfigError

# sentence-transformers concatenates the enabled poolings in this order.
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len")
_KNOWN_MODULES = ("Transformer", "Pooling", "Normalize")


@dataclass(frozen=True)
class Pooling:
    """Which poolings to concatenate (in :data:`POOLING_MODES` order); whether to L2-normalize."""

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = True

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in POOLING_MODES]
        if unknown or not self.modes:
            raise ConfigError(
                f"pooling modes {list(self.modes)}: use one or more of {', '.join(POOLING_MODES)}"
            )

    def __call__(self, states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embed token ``states`` ``(batch, tokens, hidden)``; ``attention_mask`` is 1 on real
        tokens. Returns ``(batch, hidden * len(modes))``."""
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        count = mask.sum(dim=1).clamp(min=1e-9)
        pooled = {
            "cls": lambda: states[:, 0],
            # padded positions must never win the max, so they are pushed far below any state
            "max": lambda: states.masked_fill(mask == 0, -1e9).amax(dim=1),
            "mean": lambda: (states * mask).sum(dim=1) / count,
            "mean_sqrt_len": lambda: (states * mask).sum(dim=1) / count.sqrt(),
        }
        out = torch.cat([pooled[m]() for m in POOLING_MODES if m in self.modes], dim=-1)
        return F.normalize(out, dim=-1) if self.normalize else out


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not readable JSON: {exc}") from None


def pooling_of(folder: Path | None) -> Pooling:
    """The pooling a model folder declares (``modules.json`` + its Pooling ``config.json``), or
    the default mean + L2 norm when the folder has no ``modules.json``.

    Raises :class:`ConfigError` for a module or pooling mode netshrink does not reproduce
    (a ``Dense`` projection, weighted-mean or last-token pooling): a silently different embedding
    would be worse than none.
    """
    if folder is None or not (folder / "modules.json").is_file():
        return Pooling()
    modules = _read_json(folder / "modules.json")
    if not isinstance(modules, list):
        raise ConfigError(f"{folder / 'modules.json'} is not a list of modules")
    kinds = {str(m.get("type", "")).rpartition(".")[2]: m for m in modules if isinstance(m, dict)}
    unknown = sorted(k for k in kinds if k not in _KNOWN_MODULES)
    if unknown:
        raise ConfigError(
            f"{folder} uses sentence-transformers modules {unknown}; netshrink reproduces only "
            f"{', '.join(_KNOWN_MODULES)}"
        )
    normalize = "Normalize" in kinds
    if "Pooling" not in kinds:
        return Pooling(normalize=normalize)
    config = _read_json(folder / str(kinds["Pooling"].get("path", "")) / "config.json")
    if not isinstance(config, dict):
        raise ConfigError(f"{folder}'s pooling config is not a JSON object")
    enabled = [k for k, v in config.items() if k.startswith("pooling_mode_") and v is True]
    names = [
        k.removeprefix("pooling_mode_").removesuffix("_tokens").removesuffix("_token")
        for k in enabled
    ]
    unsupported = [n for n in names if n not in POOLING_MODES]
    if unsupported:
        raise ConfigError(
            f"{folder}'s pooling uses {unsupported}; netshrink supports {', '.join(POOLING_MODES)}"
        )
    return Pooling(modes=tuple(names), normalize=normalize)
