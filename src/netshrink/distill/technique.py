"""``distill.kd``: knowledge distillation from a teacher into a (smaller) student.

The teacher is ``ctx.teacher`` when given (a recipe passes the model as it was before the
recipe), else the model handed in. The student is the model handed in, or one derived from it by
``student: {width, depth, layers}``; a transformer student with fewer layers also learns its
teacher's hidden states layer by layer (:func:`~netshrink.distill.student.depth_matches`).
Training runs through :func:`netshrink.train.fit` with the
:class:`~netshrink.distill.objective.Distiller` as the loss and its adapters as extra trainable
parameters, so checkpoints, resume and ``torchrun`` DDP work here as everywhere.
"""

from __future__ import annotations

import copy
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from netshrink.batches import materialize
from netshrink.config import TechniqueConfig, TrainConfig
from netshrink.context import Context
from netshrink.distill.features import FeatureMatch
from netshrink.distill.objective import Distiller, OutputLoss
from netshrink.distill.student import StudentConfig, build_student, depth_matches
from netshrink.metrics import accuracy
from netshrink.registry import technique
from netshrink.train import fit
from netshrink.training.checkpoint import weights_hash


class KDConfig(TechniqueConfig, TrainConfig):
    """Options of ``distill.kd``: the loss's, the student's, and the training options of
    :class:`~netshrink.config.TrainConfig` (``epochs``, ``lr``, ``optimizer``, ``schedule``,
    ``patience``, ``checkpoint_dir``, ...) as keys of the stage itself."""

    temperature: float = Field(
        4.0, gt=0, le=100, description="softmax temperature T of the soft targets (Hinton 2015)"
    )
    alpha: float = Field(
        0.9, ge=0, le=1, description="weight of the teacher (soft) loss; 1 - alpha: hard labels"
    )
    epochs: int = Field(10, ge=0, le=10_000, description="passes over the training data")
    student: StudentConfig = Field(
        default_factory=StudentConfig, description="derive the student: {width, depth} fractions"
    )
    features: tuple[FeatureMatch, ...] = Field(
        (), description="layers to match: names, or {student, teacher, loss, weight}"
    )
    hidden_weight: float = Field(
        1.0,
        ge=0,
        le=1e6,
        description="weight of each depth-student layer's hidden-state loss (0: off)",
    )
    hidden_loss: Literal["cosine", "hint"] = Field(
        "cosine", description="hidden states: cosine (DistilBERT) or hint, MSE (TinyBERT)"
    )
    output_loss: OutputLoss = Field(
        "auto",
        description="kl on softmax outputs, mse or cosine for embeddings; auto: by task/targets",
    )
    cache_teacher: bool = Field(True, description="compute teacher outputs once per batch")

    @field_validator("features", mode="before")
    @classmethod
    def _names_are_pairs(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list | tuple):
            return [{"student": v} if isinstance(v, str) else v for v in value]
        return value


def resume_signature(config: KDConfig, teacher: nn.Module) -> dict[str, Any]:
    """What a distillation checkpoint must match besides fit's own options: this stage's
    options and the teacher's weights (a changed teacher must not hand back the old student)."""
    return {
        "stage": {"distill.kd": config.model_dump(mode="json")},
        "teacher": weights_hash(teacher),
    }


def _needs(config: KDConfig) -> tuple[str, ...]:
    return ("train_data", "val_data") if config.patience else ("train_data",)


@technique(
    "distill.kd", KDConfig, needs=_needs, creates=(nn.Sequential, nn.ModuleList)
)  # depth students
def kd(model: nn.Module, config: KDConfig, ctx: Context) -> nn.Module:
    """Knowledge distillation: train a student on a teacher's soft targets, features, labels."""
    batches = materialize(ctx.train_data or [], "train_data")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(ctx.seed)  # a built student and the adapters start the same every run
        student = build_student(model, config.student, ctx.with_(train_data=batches))
        teacher = ctx.teacher if ctx.teacher is not None else model
        if teacher is student:  # self-distillation: learn from a frozen copy of oneself
            teacher = copy.deepcopy(model)
        teacher.to(next(student.parameters()).device)
        hidden: list[FeatureMatch] = []
        if config.hidden_weight > 0:
            hidden = depth_matches(teacher, student, config.hidden_loss, config.hidden_weight)
        distiller = Distiller(
            teacher,
            student,
            temperature=config.temperature,
            alpha=config.alpha,
            output_loss=config.output_loss,
            features=[*config.features, *hidden],
            cache=config.cache_teacher,
        )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(ctx.seed)
            distiller.prepare(student, batches[0])
        fit(
            student,
            batches,
            config,
            loss_fn=distiller,
            aux=distiller,
            seed=ctx.seed,
            progress=ctx.progress,
            desc="distill.kd",
            val_data=ctx.val_data,
            evaluate=ctx.evaluate or (accuracy if distiller.mode == "kl" else None),
            signature=resume_signature(config, teacher) if config.checkpoint_dir else None,
        )
    finally:
        distiller.close()
    return student
