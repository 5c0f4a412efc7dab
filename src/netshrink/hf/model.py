"""The wrapper that makes a transformers model a plain ``keyword tensors -> tensor`` module.

transformers models return ``ModelOutput`` objects whose useful tensor depends on the task; the
rest of netshrink (metrics, losses, timing, export) wants one tensor. :class:`TaskModel` picks it:
the pooled sentence embedding for ``embedding``, the logits for every other task.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import nn

from netshrink.hf.pooling import Pooling
from netshrink.hf.tasks import Task


class TaskModel(nn.Module):
    """A transformers model returning one tensor for its task.

    - ``embedding``: ``(batch, dim)``, the folder's pooling over the token states (default mean
      over the attention mask, then unit L2 norm);
    - ``classification``: logits ``(batch, classes)``;
    - ``causal-lm`` / ``masked-lm``: logits ``(batch, tokens, vocab)``.

    ``netshrink_hf`` records the reference and task so an artifact can rebuild the architecture
    (see :func:`netshrink.hf.fresh_model`); ``mask_token_id`` is the tokenizer's mask token,
    which masked-LM metrics and losses need.
    """

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        ref: str,
        pooling: Pooling | None = None,
        mask_token_id: int | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.task = task
        self.pooling = pooling or Pooling()
        self.mask_token_id = mask_token_id
        self.netshrink_hf = {"ref": ref, "task": task}
        # A tokenizer shared across a family (BERT's) emits token types that e.g. DistilBERT has
        # no embedding for; they carry nothing such a model could use, so they are not passed.
        self._takes_token_types = "token_type_ids" in inspect.signature(model.forward).parameters

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The task's tensor for token ids ``(batch, tokens)`` and their mask (1 = real token)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "return_dict": True}
        if token_type_ids is not None and self._takes_token_types:
            kwargs["token_type_ids"] = token_type_ids
        out = self.model(**kwargs)
        if self.task == "embedding":
            return self.pooling(out.last_hidden_state, attention_mask)
        return out.logits

    def netshrink_objective(self, teacher: nn.Module | None) -> tuple[Callable, Callable | None]:
        """The task's default training loss and metric against ``teacher`` (the uncompressed
        model; None: the loss needs labels, and there is no metric): what fine-tuning after a
        technique uses (``netshrink.training.finetune``)."""
        from netshrink.hf.losses import loss_for
        from netshrink.hf.metrics import metric_for

        loss = loss_for(self.task, teacher=teacher)
        return loss, None if teacher is None else metric_for(self.task, teacher)
