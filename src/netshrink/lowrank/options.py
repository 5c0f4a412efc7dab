"""Options of ``lowrank.svd`` and what they need from the context."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from netshrink.config import TechniqueConfig
from netshrink.targets import Targets

_MODES = ("energy", "ratio", "rank", "budget")


class SvdConfig(TechniqueConfig):
    """Options of ``lowrank.svd``: exactly one of energy, ratio, rank or budget sets the ranks."""

    energy: float | None = Field(
        None, gt=0, le=1, description="per layer: smallest rank keeping this fraction of Σσ²"
    )
    ratio: float | None = Field(
        None, gt=0, lt=1, description="per layer: fraction of its weights the factors may hold"
    )
    rank: int | None = Field(None, ge=1, le=65536, description="the same rank for every layer")
    budget: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="global: fraction of the layers' weights (or MACs) to keep, least total error",
    )
    budget_metric: Literal["params", "macs"] = Field(
        "params", description="what budget counts; macs needs example_inputs"
    )
    budget_error: Literal["relative", "output"] | None = Field(
        None,
        description="budget minimises each layer's share of Σσ² lost, or the model-output error "
        "measured per layer on calib_data (default: output when activation_aware)",
    )
    error_batches: int = Field(
        2, ge=1, le=100000, description="calib_data batches budget_error='output' measures on"
    )
    budget_rounds: int = Field(
        1,
        ge=1,
        le=10,
        description="budget_error='output': allocations in all; each after the first re-measures "
        "every factorized layer at the rank the one before gave it",
    )
    activation_aware: bool = Field(
        False, description="whiten by the layers' input covariance on calib_data (SVD-LLM)"
    )
    damping: float = Field(
        0.01, ge=0, le=1, description="added to the covariance diagonal, relative to its mean"
    )
    output_aware: bool = Field(
        False,
        description="also weigh each layer's output directions by how much the model's output "
        "moves with them (gradient probes on calib_data; needs activation_aware)",
    )
    output_probes: int = Field(
        8,
        ge=1,
        le=1000,
        description="output_aware: random output directions per calib_data batch "
        "(one forward and backward pass each)",
    )
    joint: list[list[str]] = Field(
        default_factory=list,
        description="groups of sibling Linear names, e.g. [['query', 'key']], factorized together "
        "with one shared first factor where they read the same input (needs budget_error='output')",
    )
    refit: bool = Field(
        False,
        description="factorize layer by layer in call order, each fitted by least squares to "
        "the original layer's outputs on the inputs the factorized layers before it produce",
    )
    skip_padding: bool = Field(
        True, description="leave tokens at attention_mask 0 out of the input covariance"
    )
    round_to: int = Field(1, ge=1, le=256, description="ranks are multiples of this, e.g. 8")
    conv_variant: Literal["auto", "channel", "spatial"] = Field(
        "auto",
        description="Conv2d: kxk then 1x1 (channel), kx1 then 1xk (spatial), or the better one",
    )
    targets: Targets = Field(
        default_factory=Targets, description="which Linear / Conv2d layers to factorize"
    )

    @model_validator(mode="after")
    def _one_selection(self) -> SvdConfig:
        chosen = {m: getattr(self, m) for m in _MODES if getattr(self, m) is not None}
        if len(chosen) != 1:
            got = ", ".join(f"{k}={v}" for k, v in chosen.items()) or "none of them"
            raise ValueError(
                f"give exactly one of energy, ratio, rank, budget (got {got}); "
                "e.g. energy=0.9, ratio=0.5, rank=32 or budget=0.5"
            )
        if self.conv_variant == "spatial" and self.activation_aware:
            raise ValueError(
                "conv_variant='spatial' cannot be activation-aware (the input covariance does "
                "not whiten it); use conv_variant='channel' or 'auto'"
            )
        if self.budget_rounds > 1 and (self.budget is None or self.error_measure != "output"):
            raise ValueError(
                f"budget_rounds={self.budget_rounds} re-measures the output-error budget: set "
                "budget and budget_error='output' (or activation_aware), or budget_rounds=1"
            )
        if self.joint:
            self._check_joint()
        for name in ("refit", "output_aware"):
            if getattr(self, name) and not self.activation_aware:
                raise ValueError(
                    f"{name}=True reads calib_data's statistics: set activation_aware=True"
                )
        return self

    def _check_joint(self) -> None:
        for entry in self.joint:
            if len(set(entry)) < 2 or not all(n.isidentifier() or n.isdigit() for n in entry):
                raise ValueError(
                    f"joint entry {entry} must name two or more different child layers of one "
                    "parent (no dots), e.g. ['query', 'key']"
                )
        if self.budget is None or self.error_measure != "output" or self.refit:
            raise ValueError(
                "joint weighs the group's members by their measured output error: set budget "
                "and budget_error='output' (or activation_aware), without refit"
            )

    @property
    def error_measure(self) -> str:
        """What the global budget minimises: ``relative`` or ``output`` (see budget_error)."""
        if self.budget_error is not None:
            return self.budget_error
        return "output" if self.activation_aware else "relative"

    @property
    def selection(self) -> str:
        """The chosen rank rule as ``name=value`` (and what a budget minimises)."""
        mode = next(m for m in _MODES if getattr(self, m) is not None)
        rule = f"{mode}={getattr(self, mode)}"
        return f"{rule}, {self.error_measure} error" if mode == "budget" else rule


def needs(cfg: SvdConfig) -> tuple[str, ...]:
    """What ``lowrank.svd`` with ``cfg`` needs from the context (calib_data, example_inputs)."""
    output_error = cfg.budget is not None and cfg.error_measure == "output"
    needs = ("calib_data",) if cfg.activation_aware or output_error else ()
    if cfg.budget is not None and cfg.budget_metric == "macs":
        needs += ("example_inputs",)
    return needs
