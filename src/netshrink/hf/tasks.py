"""The tasks a Hugging Face model can be compressed for, and how to tell them from a model folder.

A task fixes what the wrapped model returns (a sentence embedding or logits), which metric judges
it and which loss recovers it. The folder tells the task when it can: sentence-transformers files
mean ``embedding``; otherwise the class named first in ``config.json``'s ``architectures``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from netshrink.errors import ConfigError

Task = Literal["embedding", "classification", "causal-lm", "masked-lm"]
TASKS: tuple[Task, ...] = ("embedding", "classification", "causal-lm", "masked-lm")
LM_TASKS: tuple[Task, ...] = ("causal-lm", "masked-lm")

SENTENCE_TRANSFORMERS_FILES = ("modules.json", "config_sentence_transformers.json")

# Architecture class name suffixes, most specific first: "BertForMaskedLM" is a masked LM,
# "GPT2LMHeadModel" a causal LM, and a bare "...Model" (BertModel, T5EncoderModel) an encoder.
_SUFFIXES: tuple[tuple[str, Task], ...] = (
    ("ForSequenceClassification", "classification"),
    ("ForCausalLM", "causal-lm"),
    ("LMHeadModel", "causal-lm"),
    ("ForMaskedLM", "masked-lm"),
    ("Model", "embedding"),
)


def check_task(task: str) -> Task:
    """Return ``task`` if it is one of :data:`TASKS`, else raise :class:`ConfigError`."""
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; use one of {', '.join(TASKS)}", key="task")
    return task  # type: ignore[return-value]


def task_of_architecture(name: str) -> Task | None:
    """The task a transformers class name serves (``BertForMaskedLM`` -> masked-lm), or None."""
    for suffix, task in _SUFFIXES:
        if name.endswith(suffix):
            return task
    return None


def infer_task(folder: Path | None, architectures: list[str] | None, ref: str) -> Task:
    """The task of a model: ``embedding`` when ``folder`` holds sentence-transformers files, else
    the task of ``architectures[0]``. Raises :class:`ConfigError` when neither tells."""
    if folder is not None and any((folder / f).is_file() for f in SENTENCE_TRANSFORMERS_FILES):
        return "embedding"
    task = task_of_architecture(architectures[0]) if architectures else None
    if task is None:
        raise ConfigError(
            f"cannot infer the task of {ref!r} from its config (architectures: {architectures}); "
            f"give it explicitly: one of {', '.join(TASKS)}",
            key="task",
        )
    return task
