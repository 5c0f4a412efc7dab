"""Task metrics that need no labels: how faithfully a compressed model reproduces its baseline.

- ``embedding``: mean cosine between the two models' sentence embeddings, and top-k neighbour
  agreement: for each sentence, the share of its k nearest neighbours (cosine, among the other
  evaluated sentences) that both models agree on. Retrieval damage hides behind a high mean
  cosine; the neighbour overlap shows it.
- ``classification``: accuracy when every batch has labels; top-1 agreement with the baseline and
  KL(baseline || model) always.
- ``causal-lm`` / ``masked-lm``: perplexity on the text (next tokens, or 15% masked tokens drawn
  with a fixed seed per batch) and top-1 agreement with the baseline at every real position.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from netshrink.batches import materialize, run
from netshrink.context import Batch
from netshrink.errors import DataError
from netshrink.hf.tasks import LM_TASKS, Task, check_task
from netshrink.hf.tokens import masked_inputs, next_token_targets, token_inputs

TOP_K = 5
CACHED_LISTS = 4
"""Lists of batches whose baseline outputs one metric keeps (embeddings or logits)."""

_DEFINITIONS = {
    "cosine": "mean cosine of model vs baseline embeddings",
    "cosine_min": "lowest cosine of one example",
    "topk": "mean share of each example's k nearest neighbours both models agree on",
    "accuracy": "top-1 accuracy against the labels",
    "baseline_accuracy": "the baseline's top-1 accuracy",
    "agreement": "share of predictions whose top-1 equals the baseline's",
    "kl": "mean KL(baseline || model) per prediction, nats",
    "perplexity": "exp(mean cross-entropy of the text's tokens)",
    "baseline_perplexity": "the baseline's perplexity on the same tokens",
}


@dataclass(frozen=True)
class Fidelity:
    """Every fidelity number of one evaluation; fields a task does not define are None.

    ``primary`` names the field :func:`metric_for` returns (higher is better); ``examples``
    counts sentences, ``k`` is the neighbourhood size of ``topk``.
    """

    task: Task
    primary: str
    examples: int
    k: int | None = None
    cosine: float | None = None
    cosine_min: float | None = None
    topk: float | None = None
    accuracy: float | None = None
    baseline_accuracy: float | None = None
    agreement: float | None = None
    kl: float | None = None
    perplexity: float | None = None
    baseline_perplexity: float | None = None

    @property
    def value(self) -> float:
        """The primary number."""
        return float(getattr(self, self.primary))

    def __str__(self) -> str:
        rows = [(f.name, getattr(self, f.name)) for f in fields(self) if f.name in _DEFINITIONS]
        rows = [(n, v) for n, v in rows if v is not None]
        width = max(len(n) for n, _ in rows)
        head = f"fidelity ({self.task}, {self.examples} examples, primary: {self.primary}"
        head += f", k={self.k})" if self.k is not None else ")"
        lines = [head] + [f"  {n:<{width}}  {v:10.4f}  {_DEFINITIONS[n]}" for n, v in rows]
        return "\n".join(lines)


@contextmanager
def _evaluating(*models: nn.Module) -> Iterator[None]:
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in zip(models, modes, strict=True):
            m.train(mode)


def _outputs(model: nn.Module, batches: list[Batch]) -> torch.Tensor:
    """The model's outputs on every batch, concatenated along the first dimension."""
    with _evaluating(model):
        return torch.cat([run(model, inputs) for inputs, _ in batches])


def _labels(batches: list[Batch]) -> torch.Tensor | None:
    """All targets concatenated, or None when no batch has any; a mix is a DataError."""
    targets = [t for _, t in batches]
    if all(t is None for t in targets):
        return None
    if any(t is None for t in targets):
        raise DataError("some evaluation batches have labels and some do not; give all or none")
    return torch.cat(targets)


def neighbour_agreement(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """Mean share of each row's ``k`` nearest rows (cosine, itself excluded) that embeddings
    ``a`` and ``b`` (both ``(n, dim)``, rows the same examples) agree on; ``k`` is capped at
    ``n - 1``."""
    n = len(a)
    if n < 2:
        raise DataError(f"top-k neighbour agreement needs at least 2 examples, got {n}")
    k = min(k, n - 1)

    def neighbours(e: torch.Tensor) -> torch.Tensor:
        e = F.normalize(e.float(), dim=-1)
        sim = (e @ e.T).fill_diagonal_(float("-inf"))
        return sim.topk(k, dim=1).indices

    na, nb = neighbours(a), neighbours(b)
    shared = (na.unsqueeze(2) == nb.unsqueeze(1)).any(dim=2).sum(dim=1)
    return float(shared.float().mean()) / k


def _kl(logits: torch.Tensor, base: torch.Tensor) -> float:
    """Mean KL(baseline || model) over the rows of ``(n, classes)`` logits."""
    model_log = F.log_softmax(logits.float(), dim=-1)
    return float(
        F.kl_div(
            model_log, F.log_softmax(base.float(), dim=-1), log_target=True, reduction="batchmean"
        )
    )


def _embedding(out: torch.Tensor, base: torch.Tensor, k: int) -> Fidelity:
    cos = F.cosine_similarity(out.float(), base.float(), dim=-1)
    return Fidelity(
        task="embedding",
        primary="topk",
        examples=len(out),
        k=min(k, len(out) - 1),
        cosine=float(cos.mean()),
        cosine_min=float(cos.min()),
        topk=neighbour_agreement(out, base, k),
    )


def _classification(out: torch.Tensor, base: torch.Tensor, labels: torch.Tensor | None) -> Fidelity:
    top1 = out.argmax(dim=-1)
    accuracy = baseline_accuracy = None
    if labels is not None:
        accuracy = float((top1 == labels).float().mean())
        baseline_accuracy = float((base.argmax(dim=-1) == labels).float().mean())
    return Fidelity(
        task="classification",
        primary="agreement" if labels is None else "accuracy",
        examples=len(out),
        accuracy=accuracy,
        baseline_accuracy=baseline_accuracy,
        agreement=float((top1 == base.argmax(dim=-1)).float().mean()),
        kl=_kl(out, base),
    )


def _token_nll(
    task: Task, model: nn.Module, inputs: Any, logits: torch.Tensor, index: int, mask_id: int | None
) -> tuple[float, int]:
    """Summed cross-entropy (nats) and count of the tokens an LM is scored on in one batch;
    ``logits`` are the model's on the unmasked ``inputs``. Masked positions are drawn from a
    generator seeded by the batch index, so every model is scored on the same tokens."""
    ids, attention = token_inputs(inputs)
    if task == "causal-lm":
        scored, labels = next_token_targets(logits, ids, attention)
    else:
        masked, positions = masked_inputs(inputs, mask_id, torch.Generator().manual_seed(index))
        scored, labels = run(model, masked)[positions], ids[positions]
    return float(F.cross_entropy(scored.float(), labels, reduction="sum")), len(labels)


def _language_model(
    task: Task, model: nn.Module, baseline: nn.Module, batches: list[Batch]
) -> Fidelity:
    mask_id = getattr(baseline, "mask_token_id", None)
    same = positions = examples = tokens = 0
    kl_sum = model_nll = baseline_nll = 0.0
    with _evaluating(model, baseline):
        for i, (inputs, _) in enumerate(batches):
            real = token_inputs(inputs)[1].bool()
            out, base = run(model, inputs), run(baseline, inputs)
            same += int((out[real].argmax(-1) == base[real].argmax(-1)).sum())
            kl_sum += _kl(out[real], base[real]) * int(real.sum())
            positions += int(real.sum())
            examples += len(real)
            nll, count = _token_nll(task, model, inputs, out, i, mask_id)
            model_nll, tokens = model_nll + nll, tokens + count
            baseline_nll += _token_nll(task, baseline, inputs, base, i, mask_id)[0]
    if tokens == 0:
        raise DataError("perplexity needs at least one scored token; the texts are too short")
    return Fidelity(
        task=task,
        primary="agreement",
        examples=examples,
        agreement=same / positions,
        kl=kl_sum / positions,
        perplexity=math.exp(model_nll / tokens),
        baseline_perplexity=math.exp(baseline_nll / tokens),
    )


def _score(
    task: Task,
    model: nn.Module,
    baseline: nn.Module,
    batches: list[Batch],
    k: int,
    base_outputs: torch.Tensor | None,
) -> Fidelity:
    if task in LM_TASKS:
        return _language_model(task, model, baseline, batches)
    base = base_outputs if base_outputs is not None else _outputs(baseline, batches)
    out = _outputs(model, batches)
    if out.shape != base.shape:
        raise DataError(f"model outputs {tuple(out.shape)} but baseline {tuple(base.shape)}")
    if task == "embedding":
        return _embedding(out, base, k)
    return _classification(out, base, _labels(batches))


def fidelity(
    task: str, model: nn.Module, baseline: nn.Module, batches: Iterable[Batch], k: int = TOP_K
) -> Fidelity:
    """Every fidelity number of ``model`` against ``baseline`` (the uncompressed model) on
    ``batches`` for ``task``; see the module docstring for the definitions."""
    data = materialize(batches, "evaluation data")
    return _score(check_task(task), model, baseline, data, k, None)


def metric_for(
    task: str, baseline: nn.Module, batches: list[Batch] | None = None, k: int = TOP_K
) -> Callable[[nn.Module, Iterable[Batch]], float]:
    """``evaluate(model, batches) -> float`` (higher is better) returning the task's primary
    fidelity number against ``baseline``: top-k neighbour agreement (embedding), accuracy or
    else top-1 agreement (classification), top-1 agreement (language models). The function's
    ``__name__`` is :func:`metric_name`'s, which reports show as the metric's name.

    The baseline's outputs on ``batches`` are computed once here, and on any other list of
    batches the first time ``evaluate`` sees it, and reused whenever ``evaluate`` is called with
    that same list (the last :data:`CACHED_LISTS` lists); other iterables are run through the
    baseline each call.
    """
    task_ = check_task(task)
    cache: dict[int, tuple[list[Batch], torch.Tensor]] = {}
    if isinstance(batches, list) and task_ not in LM_TASKS:
        cache[id(batches)] = (batches, _outputs(baseline, materialize(batches, "evaluation data")))

    def evaluate(model: nn.Module, eval_batches: Iterable[Batch]) -> float:
        hit = cache.get(id(eval_batches))
        if hit is None and isinstance(eval_batches, list) and task_ not in LM_TASKS:
            # another fixed list (a search probes every variant on its validation batches):
            # the baseline runs on it once; the oldest list's outputs are dropped past a few
            while len(cache) >= CACHED_LISTS:
                del cache[next(iter(cache))]
            hit = (eval_batches, _outputs(baseline, materialize(eval_batches, "evaluation data")))
            cache[id(eval_batches)] = hit
        if hit is not None and hit[0] is eval_batches:
            return _score(task_, model, baseline, hit[0], k, hit[1]).value
        return fidelity(task_, model, baseline, eval_batches, k).value

    evaluate.__name__ = metric_name(task_, batches, k)
    return evaluate


def metric_name(task: str, batches: list[Batch] | None = None, k: int = TOP_K) -> str:
    """The name reports give :func:`metric_for`'s number: ``top5_agreement`` (embedding, k=5),
    ``accuracy`` (classification on ``batches`` that all have labels), else ``top1_agreement``."""
    if task == "embedding":
        return f"top{k}_agreement"
    labelled = bool(batches) and all(t is not None for _, t in batches)
    return "accuracy" if task == "classification" and labelled else "top1_agreement"
