"""Base classes of technique options, and the training options every trained technique shares.

Options are frozen pydantic models: every field has a default, a type, a range and a one-line
``description``; unknown keys are rejected. The registry turns pydantic's validation errors into
:class:`~netshrink.errors.ConfigError` naming the stage and the key.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Options(BaseModel):
    """Frozen, strict option model: unknown keys are an error."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainConfig(Options):
    """How :func:`netshrink.train.fit` trains: the options of fine-tuning, QAT and distillation.

    Declared once here; ``finetune: {...}``, ``quantize.qat`` and ``distill.kd`` take these keys
    because their configs are (derive from) this one.
    """

    epochs: int = Field(1, ge=0, le=10_000, description="passes over the training data")
    lr: float = Field(1e-3, gt=0, le=10, description="peak learning rate of the optimizer")
    weight_decay: float = Field(0.0, ge=0, le=1, description="weight decay (decoupled for adamw)")
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw", description="optimizer")
    momentum: float = Field(
        0.9, ge=0, lt=1, description="momentum of sgd (other optimizers: unused)"
    )
    schedule: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="learning-rate decay over all steps, after warm-up"
    )
    warmup_steps: int = Field(0, ge=0, le=1_000_000, description="steps of linear LR warm-up")
    grad_clip: float | None = Field(
        None, gt=0, description="clip the gradients' global norm to this (None: no clipping)"
    )
    shuffle: bool = Field(True, description="a new seeded batch order every epoch")
    keep_best: bool = Field(
        True,
        description="end with the best validated weights, the starting ones included "
        "(when val_data is given)",
    )
    patience: int | None = Field(
        None, ge=1, le=1000, description="stop after this many epochs without gain (val_data)"
    )
    min_delta: float = Field(
        0.0, ge=0, description="a validation gain at most this large does not count as one"
    )
    checkpoint_dir: str | None = Field(
        None, description="folder for resumable checkpoints; a rerun continues from them"
    )
    checkpoint_every: int = Field(
        0, ge=0, le=10_000_000, description="also checkpoint every this many steps (0: epochs)"
    )


class TechniqueConfig(Options):
    """Options every technique accepts."""

    finetune: TrainConfig | None = Field(
        None, description="fine-tune on train_data after this technique (needs train_data)"
    )
