"""Base classes of technique options.

Options are frozen pydantic models: every field has a default, a type, a range and a one-line
``description``; unknown keys are rejected. The registry turns pydantic's validation errors into
:class:`~netshrink.errors.ConfigError` naming the stage and the key.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Options(BaseModel):
    """Frozen, strict option model: unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class FinetuneConfig(Options):
    """Training after a technique, to win back the accuracy it cost."""

    epochs: int = Field(1, ge=0, le=1000, description="passes over the training data")
    lr: float = Field(1e-3, gt=0, le=10, description="learning rate of the optimizer")


class TechniqueConfig(Options):
    """Options every technique accepts."""

    finetune: FinetuneConfig | None = Field(
        None, description="fine-tune on train_data after this technique (needs train_data)"
    )
