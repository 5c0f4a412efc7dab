"""The distillation objective: a ``loss_fn(model, batch)`` for :func:`netshrink.train.fit`.

loss = alpha * soft + (1 - alpha) * hard + sum of weighted feature losses, where ``soft`` is
the temperature-scaled KL divergence to the teacher's softmax (``kl``, Hinton et al. 2015) or,
for models without a softmax head, the MSE (``mse``) or 1 - cosine (``cosine``, what a
sentence embedding is judged by) between student and teacher outputs: the task losses of
:func:`netshrink.hf.losses.teacher_loss`, which compare token outputs at real tokens only. The
teacher runs in eval mode without gradients; its outputs are cached per batch, since ``fit``
feeds the same batch objects every epoch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

from netshrink.batches import as_args, run
from netshrink.calibrate import first_tensor
from netshrink.context import Batch
from netshrink.distill.features import FeatureMatch, Taps, feature_loss, make_adapter
from netshrink.distill.losses import hard_label_loss
from netshrink.errors import ConfigError
from netshrink.hf.losses import teacher_loss

OutputLoss = Literal["auto", "kl", "mse", "cosine"]
_OUTPUT_KEYS = ("logits", "sentence_embedding", "last_hidden_state")


def primary_output(output: Any, who: str) -> torch.Tensor:
    """The tensor to distil from a model's output: itself, a tuple's first item, or a mapping's
    ``logits`` / ``sentence_embedding`` / ``last_hidden_state``."""
    if isinstance(output, Mapping):
        for key in _OUTPUT_KEYS:
            if key in output:
                return output[key]
        raise ConfigError(
            f"the {who} returns a mapping with keys {sorted(output)}; distillation needs one of "
            f"{', '.join(_OUTPUT_KEYS)}"
        )
    return first_tensor(output, f"the {who}'s output")


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def auto_output_loss(student: nn.Module, outputs: torch.Tensor, targets: Any) -> str:
    """``cosine`` for a sentence-embedding model (a :class:`~netshrink.hf.TaskModel` of task
    ``embedding``), ``kl`` for outputs with class labels or for any other task model's logits,
    else ``mse``."""
    task = getattr(student, "netshrink_hf", {}).get("task")
    if task == "embedding":
        return "cosine"
    return "kl" if task is not None or _are_labels(outputs, targets) else "mse"


def _are_labels(outputs: torch.Tensor, targets: Any) -> bool:
    return (
        torch.is_tensor(targets)
        and not targets.is_floating_point()
        and outputs.ndim >= 2
        and targets.shape == outputs.shape[:-1]
    )


class Distiller(nn.Module):
    """The objective, called as ``loss_fn(student, batch)``; its adapters are trainable.

    Give it to ``fit`` as ``loss_fn=distiller, aux=distiller`` so the adapters are optimized
    and checkpointed with the student. Call :meth:`prepare` on one batch first and
    :meth:`close` after training.
    """

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        *,
        temperature: float,
        alpha: float,
        output_loss: OutputLoss,
        features: Sequence[FeatureMatch],
        cache: bool,
    ) -> None:
        super().__init__()
        self._teacher = (teacher,)  # in a tuple: not a submodule, so never trained or saved
        self._teacher_was_training = teacher.training
        self.temperature, self.alpha, self.mode = temperature, alpha, output_loss
        self.features = list(features)
        self.cache = cache
        self._cached: dict[int, tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = {}
        self.student_taps = Taps(student, [m.student for m in self.features], "student")
        self.teacher_taps = Taps(teacher, [m.teacher_name for m in self.features], "teacher")
        self.adapters = nn.ModuleList()
        self.output_adapter: nn.Module = nn.Identity()
        teacher.eval()

    @property
    def teacher(self) -> nn.Module:
        """The model distilled from."""
        return self._teacher[0]

    @torch.no_grad()
    def _run_teacher(self, inputs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = primary_output(run(self.teacher, inputs), "teacher").detach()
        return out, {k: v.detach() for k, v in self.teacher_taps.outputs.items()}

    def teacher_outputs(self, inputs: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher output and features for ``inputs``, from the cache when seen before."""
        if not self.cache:
            return self._run_teacher(inputs)
        key = as_args(inputs)[0]
        hit = self._cached.get(id(key))
        if hit is not None and hit[0] is key:  # the entry holds the tensor, so ids are not reused
            return hit[1], hit[2]
        out, feats = self._run_teacher(inputs)
        self._cached[id(key)] = (key, out, feats)
        return out, feats

    def prepare(self, student: nn.Module, batch: Batch) -> None:
        """Check on one batch that outputs and features can be matched; build the adapters.

        Raises :class:`ConfigError` naming the shapes when they cannot be matched.
        """
        inputs, targets = batch
        t_out, t_feats = self._run_teacher(inputs)
        was_training = student.training
        student.eval()
        with torch.no_grad():
            s_out = primary_output(run(student, inputs), "student")
        student.train(was_training)
        s_feats = dict(self.student_taps.outputs)
        if self.mode == "auto":
            self.mode = auto_output_loss(student, s_out, targets)
        self._check_outputs(s_out, t_out, targets)
        for m in self.features:
            self.adapters.append(make_adapter(m, s_feats[m.student], t_feats[m.teacher_name]))
        self.to(s_out.device)

    def _check_outputs(self, s_out: torch.Tensor, t_out: torch.Tensor, targets: Any) -> None:
        shapes = f"teacher outputs {_shape(t_out)}, student outputs {_shape(s_out)}"
        if self.mode == "kl" and s_out.shape != t_out.shape:
            raise ConfigError(
                f"{shapes}: soft targets need the same shape (same number of classes); "
                "give a student with the teacher's output size, or output_loss='mse'"
            )
        if self.mode in ("mse", "cosine"):
            if s_out.ndim != t_out.ndim or s_out.shape[:-1] != t_out.shape[:-1]:
                raise ConfigError(f"{shapes}: they differ in more than the last dimension")
            if s_out.shape[-1] != t_out.shape[-1]:  # e.g. a narrower sentence embedding
                self.output_adapter = nn.Linear(s_out.shape[-1], t_out.shape[-1], bias=False)
        if targets is None:
            self.alpha = 1.0  # unlabeled data (text): nothing but the teacher to learn from
        float_match = torch.is_tensor(targets) and targets.is_floating_point()
        if self.alpha < 1 and not (
            _are_labels(s_out, targets) or (float_match and targets.shape == s_out.shape)
        ):
            got = f"{_shape(targets)}" if torch.is_tensor(targets) else type(targets).__name__
            raise ConfigError(
                f"alpha={self.alpha} < 1 mixes in a hard-label loss, but targets {got} are "
                f"neither class labels for student outputs {_shape(s_out)} nor values of that "
                "shape; set alpha=1 to learn from the teacher alone"
            )

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The distillation loss of ``model`` (the student, maybe DDP-wrapped) on ``batch``."""
        inputs, targets = batch
        s_out = primary_output(run(model, inputs), "student")
        t_out, t_feats = self.teacher_outputs(inputs)
        compare = teacher_loss(self.mode, self.temperature)
        loss = self.alpha * compare(self.output_adapter(s_out), t_out, inputs)
        if self.alpha < 1:
            loss = loss + (1 - self.alpha) * hard_label_loss(s_out, targets)
        for match, adapter in zip(self.features, self.adapters, strict=True):
            s_feat = self.student_taps.outputs[match.student]
            loss = loss + feature_loss(match, adapter, s_feat, t_feats[match.teacher_name])
        return loss

    def close(self) -> None:
        """Remove the hooks, drop the cache and give the teacher back its train/eval mode."""
        self.student_taps.remove()
        self.teacher_taps.remove()
        self._cached.clear()
        self.teacher.train(self._teacher_was_training)
