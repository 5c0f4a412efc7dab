"""Matching intermediate layers: forward hooks that record them, adapters that align widths.

A :class:`FeatureMatch` pairs a student module with a teacher module by qualified name. Their
outputs are recorded by forward hooks (:class:`Taps`) and compared by a hint loss (FitNets,
Romero et al. 2015, sec. 2.2: a learned regressor maps the student's narrower feature to the
teacher's width, here a 1x1 convolution or a linear layer), by the cosine between their feature
vectors (DistilBERT's hidden-state loss, Sanh et al. 2019, sec. 3: it aligns directions
whatever the scale of the states), or by attention transfer (Zagoruyko & Komodakis 2017), which
needs no adapter.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from netshrink.calibrate import Hooks, Latest
from netshrink.config import Options
from netshrink.distill.losses import attention_transfer_loss
from netshrink.errors import ConfigError

# Attention transfer's maps are unit vectors: their squared differences are tiny, so the paper
# weighs them by beta / 2 with beta = 1000 (Zagoruyko & Komodakis 2017, eq. 2 and sec. 4.1).
DEFAULT_WEIGHT = {"hint": 1.0, "cosine": 1.0, "attention": 500.0}


class FeatureMatch(Options):
    """One pair of layers to match; a plain string ``"name"`` means the same name on both."""

    student: str = Field(..., min_length=1, description="qualified name of the student module")
    teacher: str | None = Field(None, description="teacher module name (default: the student's)")
    loss: Literal["hint", "cosine", "attention"] = Field(
        "hint",
        description="hint: MSE through an adapter (FitNets); cosine: 1 - cosine of the feature "
        "vectors (DistilBERT); attention: attention maps",
    )
    weight: float | None = Field(
        None,
        ge=0,
        le=1e6,
        description="loss weight (default 1 for hint and cosine, 500 for attention)",
    )

    @property
    def teacher_name(self) -> str:
        """The teacher module's name."""
        return self.teacher or self.student

    @property
    def loss_weight(self) -> float:
        """The weight of this pair's loss."""
        return DEFAULT_WEIGHT[self.loss] if self.weight is None else self.weight


class Taps:
    """Forward hooks recording the latest output of named modules of ``model``."""

    def __init__(self, model: nn.Module, names: Sequence[str], role: str) -> None:
        self._latest = {name: Latest("output") for name in names}
        self._hooks = Hooks(model, {n: [tap] for n, tap in self._latest.items()}, role=role)

    @property
    def outputs(self) -> dict[str, torch.Tensor]:
        """The latest output of each tapped module that has run."""
        return {n: tap.value for n, tap in self._latest.items() if tap.value is not None}

    def remove(self) -> None:
        """Detach the hooks; the model runs as before."""
        self._hooks.remove()


def make_adapter(match: FeatureMatch, student: torch.Tensor, teacher: torch.Tensor) -> nn.Module:
    """The learned map from the student feature to the teacher's shape (identity if equal).

    ``(N, C, H, W)`` features get a 1x1 convolution over channels; others a linear layer over
    the last dimension. Every other dimension must already agree.
    """
    pair = f"feature pair {match.student!r} (student) / {match.teacher_name!r} (teacher)"
    if match.loss == "attention":
        if student.ndim != 4 or teacher.ndim != 4 or student.shape[2:] != teacher.shape[2:]:
            raise ConfigError(
                f"attention transfer needs (N, C, H, W) features of equal H and W; {pair} has "
                f"shapes {tuple(student.shape)} and {tuple(teacher.shape)}"
            )
        return nn.Identity()
    dim = 1 if student.ndim == 4 else student.ndim - 1  # channels, or the last dimension

    def others(t: torch.Tensor) -> list[int]:
        return [n for i, n in enumerate(t.shape) if i != dim]

    if student.ndim != teacher.ndim or student.ndim < 2 or others(student) != others(teacher):
        raise ConfigError(
            f"{pair} cannot be matched: shapes {tuple(student.shape)} and "
            f"{tuple(teacher.shape)} differ outside the channel/feature dimension"
        )
    cin, cout = student.shape[dim], teacher.shape[dim]
    if cin == cout:
        return nn.Identity()
    if student.ndim == 4:
        return nn.Conv2d(cin, cout, kernel_size=1, bias=False)
    return nn.Linear(cin, cout, bias=False)


def feature_loss(
    match: FeatureMatch, adapter: nn.Module, student: torch.Tensor, teacher: torch.Tensor
) -> torch.Tensor:
    """The weighted loss of one feature pair."""
    if match.loss == "attention":
        loss = attention_transfer_loss(student, teacher)
    elif match.loss == "cosine":
        dim = 1 if teacher.ndim == 4 else -1  # channels, or the last dimension, as adapters
        loss = (1 - F.cosine_similarity(adapter(student), teacher, dim=dim)).mean()
    else:
        loss = F.mse_loss(adapter(student), teacher)
    return match.loss_weight * loss
