"""The text of the MiniLM runtime benchmarks: calibration and fidelity sentences, their
tokenization into batches of 32 x 128 tokens, and the fidelity scores against fp32.

Calibration text: docstrings of Python standard-library modules. Fidelity text: a different
source, sentences of the Python language reference (``pydoc_data.topics``), never seen by any
calibration.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F

BATCH, TOKENS = 32, 128
Embed = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def split_sentences(text: str) -> list[str]:
    """Prose sentences of 40-300 characters, without code-like punctuation."""
    text = re.sub(r"\s+", " ", text)
    out = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        prose = re.match(r"[A-Z][a-z]", s) and not re.search(r"[:=|*_`<>]{2}|http|\(\)|>>>", s)
        if 40 <= len(s) <= 300 and prose:
            out.append(s)
    return list(dict.fromkeys(out))


STDLIB = (
    "argparse", "asyncio", "collections", "csv", "datetime", "email.message", "functools",
    "http.client", "itertools", "json", "logging", "os", "pathlib", "random", "re", "shutil",
    "socket", "sqlite3", "string", "subprocess", "tarfile", "textwrap", "threading", "typing",
    "unittest", "urllib.request", "zipfile",
)  # fmt: skip


def calibration_text(n: int) -> list[str]:
    """``n`` sentences from the docstrings of standard-library modules and their members."""
    import importlib

    found: list[str] = []
    for name in STDLIB:
        module = importlib.import_module(name)
        for obj in (module, *(v for _, v in inspect.getmembers(module))):
            found += split_sentences(inspect.getdoc(obj) or "")
    return list(dict.fromkeys(found))[:n]


def fidelity_text(n: int) -> list[str]:
    """``n`` sentences spread over the Python language reference (a different source)."""
    import pydoc_data.topics

    sentences = split_sentences(" ".join(pydoc_data.topics.topics.values()))
    step = max(1, len(sentences) // n)
    return sentences[::step][:n]


def tokenize(tok, texts: list[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    enc = tok(texts, padding="max_length", truncation=True, max_length=TOKENS, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    return [(ids[i : i + BATCH], mask[i : i + BATCH]) for i in range(0, len(ids), BATCH)]


def fidelity(embed: Embed, batches: list, ref: torch.Tensor) -> tuple[float, float]:
    """(mean cosine to fp32, top-5 neighbour agreement with fp32) over every sentence."""
    emb = F.normalize(torch.cat([embed(*b) for b in batches]).float(), dim=-1)
    cos = float((emb * ref).sum(-1).mean())

    def top5(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.T
        sim.fill_diagonal_(-2)
        return sim.topk(5, dim=-1).indices

    a, b = top5(ref), top5(emb)
    overlap = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).float().sum(-1) / 5
    return cos, float(overlap.mean())
