"""What an ``hf:`` model gets from the command line: its ``text:`` data (or the built-in corpus)
and its default metric, so ``netshrink compress RECIPE --model hf:DIR --out OUT`` needs nothing
else.
"""

from __future__ import annotations

from pathlib import Path

from netshrink.context import Evaluate
from netshrink.data.splits import DataSplits
from netshrink.errors import DataError
from netshrink.hf.corpus import stdlib_corpus
from netshrink.hf.metrics import metric_for
from netshrink.hf.model import TaskModel
from netshrink.hf.reference import load_tokenizer
from netshrink.hf.text import read_texts, texts_data

TEXT = "text:"
MAX_LENGTH = 128
"""Tokens a text is truncated to (fewer when the model has fewer positions)."""
STDLIB_SOURCE = "the built-in corpus of standard-library docstrings"


def max_tokens(model: TaskModel) -> int:
    """Tokens ``model`` takes at most: :data:`MAX_LENGTH`, or its config's position count when
    that is smaller (a tokenizer's ``model_max_length`` does not always say)."""
    config = getattr(model.model, "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    return min(MAX_LENGTH, positions) if isinstance(positions, int) else MAX_LENGTH


def data_for(model: TaskModel, data_ref: str | None, seed: int = 0) -> DataSplits:
    """The splits of ``--data text:<file>`` tokenized with ``model``'s tokenizer, or of the
    built-in standard-library docstring corpus when ``data_ref`` is None; ``seed`` salts the
    split. Raises :class:`DataError` for a reference that is not ``text:``."""
    if data_ref is not None and not data_ref.startswith(TEXT):
        raise DataError(
            f"--data {data_ref!r}: an hf: model takes text:<file> (a text a line, or .jsonl with "
            "text and optional label), or no --data for the built-in corpus"
        )
    tokenizer = load_tokenizer(model.netshrink_hf["ref"])
    if data_ref is None:
        texts, labels, source = stdlib_corpus(), None, STDLIB_SOURCE
    else:
        path = Path(data_ref.removeprefix(TEXT)).expanduser()
        texts, labels = read_texts(path)
        source = data_ref
    return texts_data(texts, labels, tokenizer, source, max_length=max_tokens(model), seed=seed)


def evaluate_for(model: TaskModel, data: DataSplits) -> Evaluate:
    """The default metric of an hf model: its task's primary fidelity number against ``model``
    itself, the uncompressed baseline (:func:`netshrink.hf.metric_for`), on ``data.test``."""
    return metric_for(model.task, model, data.test)
