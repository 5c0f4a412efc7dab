"""``text:<file>`` data: texts tokenized into keyword-input batches, split by a hash of each text.

A file is one text per line (blank lines skipped), or ``.jsonl`` with a ``text`` field and an
optional integer ``label`` on every line. It is read a line at a time, within caps on the file's
and each line's size (a file of one endless line is refused without being read whole).

Each text goes to train, validation or test by the SHA-256 of ``"<seed>:<text>"``: the split
of a text never depends on the file's order or size, a duplicated text cannot straddle two
splits, and another seed gives another split. Within a split texts are ordered by the same hash.
``calib`` is the first ``calib_size`` training texts.

Batches are ``({"input_ids", "attention_mask"[, "token_type_ids"]}, labels or None)``, padded
to the longest text of the batch (dynamic padding) and truncated to ``max_length`` tokens (at
most the tokenizer's ``model_max_length``).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from netshrink.context import Batch
from netshrink.data.splits import DataSplits
from netshrink.errors import ConfigError, DataError
from netshrink.quote import excerpt

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}
"""Expected shares of the texts in each split."""
MAX_LINE_BYTES = 2**20
"""Longest line read (1 MiB), far beyond any model's positions: a file that is one endless line
is refused without being read whole."""
MAX_FILE_BYTES = 256 * 2**20
"""Largest text file read (256 MiB): its texts are held in memory, then tokenized."""
MAX_LABEL = 2**31 - 1
"""Largest label read: no classification head has more outputs, and larger integers from JSON
would overflow the int64 targets tensor."""


def _lines(file: Path) -> Iterator[tuple[int, str]]:
    """``(number, text)`` of each line of ``file``, read a line at a time.

    Raises :class:`DataError` for a missing or non-regular file (a folder, a FIFO), one over
    :data:`MAX_FILE_BYTES`, a line over :data:`MAX_LINE_BYTES`, a NUL byte (a binary file) or
    bytes that are not UTF-8, naming the line.
    """
    try:
        info = file.stat()
    except OSError as exc:
        raise DataError(f"text:{file}: cannot read it ({exc.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"text:{file} is not a regular file; give a text file, one text a line")
    if info.st_size > MAX_FILE_BYTES:
        raise DataError(
            f"text:{file} holds {info.st_size / 2**20:.0f} MiB; netshrink reads at most "
            f"{MAX_FILE_BYTES // 2**20} MiB of text: give a sample of it"
        )
    try:
        with file.open("rb") as f:
            for number, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
                if len(raw) > MAX_LINE_BYTES:
                    raise DataError(
                        f"text:{file} line {number} is longer than {MAX_LINE_BYTES // 2**20} MiB;"
                        " write one text a line"
                    )
                if b"\0" in raw:
                    raise DataError(f"text:{file} line {number} holds a NUL byte: not a text file")
                try:
                    yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
                except UnicodeDecodeError as exc:
                    raise DataError(
                        f"text:{file} line {number} is not UTF-8 text ({exc.reason} at byte "
                        f"{exc.start}); save the file as UTF-8"
                    ) from None
    except OSError as exc:
        raise DataError(f"text:{file}: cannot read it ({exc.strerror})") from None


def read_texts(path: str | os.PathLike) -> tuple[list[str], list[int] | None]:
    """The texts of a ``.txt`` (one a line) or ``.jsonl`` file and its labels (None if absent).

    Raises :class:`DataError` for a file that cannot be read as UTF-8 text (see :func:`_lines`),
    an empty file, a malformed JSON line, a line without ``text``, a label that is not a class
    index, or labels on some lines only.
    """
    file = Path(path)
    if file.suffix != ".jsonl":
        texts = [s for s in (line.strip() for _, line in _lines(file)) if s]
        if not texts:
            raise DataError(f"text:{file} holds no text; write one text a line")
        return texts, None
    return _read_jsonl(file)


def _read_jsonl(file: Path) -> tuple[list[str], list[int] | None]:
    texts: list[str] = []
    labels: list[int | None] = []
    for number, line in _lines(file):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            said = exc if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
            raise DataError(f"text:{file} line {number} is not JSON: {said}") from None
        text = record.get("text") if isinstance(record, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise DataError(f'text:{file} line {number} has no "text" string')
        label = record.get("label")
        is_int = isinstance(label, int) and not isinstance(label, bool)
        if label is not None and not (is_int and 0 <= label <= MAX_LABEL):
            raise DataError(
                f"text:{file} line {number}: label {excerpt(label, 40)} is not an integer class "
                "index (from 0)"
            )
        texts.append(text.strip())
        labels.append(label)
    if not texts:
        raise DataError(f'text:{file} holds no records; write one {{"text": ...}} object a line')
    if all(label is None for label in labels):
        return texts, None
    if any(label is None for label in labels):
        raise DataError(f'text:{file}: some lines have a "label" and some do not; give all or none')
    return texts, labels  # type: ignore[return-value]


def text_hash(text: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by ``text`` and ``seed`` (SHA-256, first 8 bytes)."""
    digest = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_indices(texts: list[str], seed: int) -> dict[str, list[int]]:
    """Indices of ``texts`` in each of train / val / test (see :data:`FRACTIONS`), each list
    ordered by hash."""
    keys = [text_hash(t, seed) for t in texts]
    parts: dict[str, list[int]] = {name: [] for name in FRACTIONS}
    for i in sorted(range(len(texts)), key=lambda i: keys[i]):
        # the hash orders texts; its value (not its rank) picks the split, so a text's split
        # does not move when others are added
        cumulative = 0.0
        for name, fraction in FRACTIONS.items():
            cumulative += fraction
            if keys[i] < cumulative or name == "test":
                parts[name].append(i)
                break
    return parts


def tokenize(
    tokenizer: Any, texts: list[str], labels: list[int] | None, max_length: int, batch_size: int
) -> list[Batch]:
    """``texts`` in batches of ``batch_size``: keyword tensors padded to each batch's longest
    text and truncated to ``max_length`` tokens; labels as int64 or None."""
    batches: list[Batch] = []
    for start in range(0, len(texts), batch_size):
        encoded = tokenizer(
            texts[start : start + batch_size],
            padding="longest",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        inputs = {k: v for k, v in encoded.items() if torch.is_tensor(v)}
        targets = None if labels is None else torch.tensor(labels[start : start + batch_size])
        batches.append((inputs, targets))
    return batches


def text_data(
    path: str | os.PathLike,
    tokenizer: Any,
    max_length: int = 128,
    batch_size: int = 32,
    seed: int = 0,
    calib_size: int = 256,
) -> DataSplits:
    """The texts of ``path`` split into train / val / test by hash (``seed`` salts it), with
    ``calib`` the first ``calib_size`` training texts, each as tokenized batches.

    ``tokenizer`` is a transformers tokenizer (:func:`netshrink.hf.load_tokenizer`);
    ``max_length`` is capped at its ``model_max_length``. Raises
    :class:`ConfigError` for a bad size and :class:`DataError` for unusable text, or a split that
    would be empty (fewer than about 20 texts).
    """
    sizes = {"max_length": max_length, "batch_size": batch_size, "calib_size": calib_size}
    _check_sizes(tokenizer, sizes)
    texts, labels = read_texts(path)
    return texts_data(texts, labels, tokenizer, f"text:{path}", **sizes, seed=seed)


def _check_sizes(tokenizer: Any, sizes: dict[str, int]) -> None:
    for name, value in sizes.items():
        if value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value}", key=name)
    if getattr(tokenizer, "pad_token", None) is None:
        raise ConfigError(
            "the tokenizer has no padding token; load it with "
            "netshrink.hf.load_tokenizer, which pads with end-of-text"
        )


def texts_data(
    texts: list[str],
    labels: list[int] | None,
    tokenizer: Any,
    source: str,
    max_length: int = 128,
    batch_size: int = 32,
    seed: int = 0,
    calib_size: int = 256,
) -> DataSplits:
    """:func:`text_data` on ``texts`` (and their ``labels``) already in memory, such as
    :func:`netshrink.hf.stdlib_corpus`; ``source`` names them in errors."""
    sizes = {"max_length": max_length, "batch_size": batch_size, "calib_size": calib_size}
    _check_sizes(tokenizer, sizes)
    # never past the positions the model has: the tokenizer records them (BERT: 512)
    max_length = min(max_length, getattr(tokenizer, "model_max_length", max_length))
    splits: dict[str, list[Batch]] = {}
    for name, index in split_indices(texts, seed).items():
        if not index:
            raise DataError(
                f"{source}: {len(texts)} texts leave the {name} split empty; give at least 20 texts"
            )
        chosen = [texts[i] for i in index]
        chosen_labels = None if labels is None else [labels[i] for i in index]
        splits[name] = tokenize(tokenizer, chosen, chosen_labels, max_length, batch_size)
        if name == "train":
            calib_labels = None if chosen_labels is None else chosen_labels[:calib_size]
            splits["calib"] = tokenize(
                tokenizer, chosen[:calib_size], calib_labels, max_length, batch_size
            )
    return DataSplits(**splits)
