"""Task fidelity metrics: identical models score perfectly, perturbed ones lower, by definition."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_fixtures import TEXTS, build, encode, model_dir, tokenizer
from netshrink.errors import ConfigError, DataError
from netshrink.hf import fidelity, load_model, metric_for, neighbour_agreement

KEYS = ("input_ids", "attention_mask")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: model_dir(root / kind, kind) for kind in ("bert", "bert-cls", "gpt2", "bert-mlm")}


@pytest.fixture(scope="module")
def batches(tmp_path_factory):
    tok = tokenizer(tmp_path_factory.mktemp("tok"))
    return [(encode(tok, TEXTS[:3]), None), (encode(tok, TEXTS[3:]), None)]


def _perturbed(model, scale: float):
    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale * p.std().nan_to_num(0.02))
    return other


def test_embedding_fidelity_is_perfect_for_the_same_model(folders, batches):
    model = load_model(f"hf:{folders['bert']}")
    result = fidelity("embedding", copy.deepcopy(model), model, batches)
    assert result.primary == "topk" and result.examples == 6 and result.k == 5
    assert result.cosine == pytest.approx(1.0, abs=1e-6) and result.topk == 1.0
    assert result.value == 1.0
    noisy = fidelity("embedding", _perturbed(model, 1.0), model, batches, k=2)
    assert noisy.cosine < 0.99 and noisy.cosine_min <= noisy.cosine and noisy.topk < 1.0
    assert "topk" in str(noisy) and "nearest neighbours" in str(noisy)


def test_metric_for_reuses_the_baseline_outputs(folders, batches):
    model = load_model(f"hf:{folders['bert']}")
    noisy = _perturbed(model, 1.0)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    evaluate = metric_for("embedding", model, batches, k=2)
    assert len(calls) == 2  # one baseline forward per batch, here and never again
    assert evaluate(noisy, batches) == fidelity("embedding", noisy, model, batches, k=2).topk
    assert len(calls) == 4  # only fidelity() ran the baseline again


@torch.no_grad()
def test_classification_accuracy_with_labels_agreement_without(folders, batches):
    model = load_model(f"hf:{folders['bert-cls']}")
    logits = model(**batches[0][0]), model(**batches[1][0])
    labelled = [(b[0], out.argmax(-1)) for b, out in zip(batches, logits, strict=True)]
    same = fidelity("classification", copy.deepcopy(model), model, labelled)
    assert same.primary == "accuracy" and same.accuracy == 1.0 == same.baseline_accuracy
    assert same.agreement == 1.0 and same.kl == pytest.approx(0.0, abs=1e-6)
    noisy = _perturbed(model, 3.0)
    unlabelled = fidelity("classification", noisy, model, batches)
    out = torch.cat([noisy(**b[0]) for b in batches])
    base = torch.cat(logits)
    assert unlabelled.primary == "agreement" and unlabelled.accuracy is None
    assert unlabelled.agreement == float((out.argmax(-1) == base.argmax(-1)).float().mean())
    expected_kl = F.kl_div(
        out.log_softmax(-1), base.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    assert unlabelled.kl == pytest.approx(float(expected_kl), rel=1e-5)
    with pytest.raises(DataError, match="some evaluation batches have labels"):
        fidelity("classification", noisy, model, [labelled[0], batches[1]])


@torch.no_grad()
def test_causal_lm_perplexity_matches_transformers(folders, batches):
    model = load_model(f"hf:{folders['gpt2']}")
    unpadded = [  # GPT-2's own tokenizer gives no token types
        ({k: b[0][k][:1, : int(b[0]["attention_mask"][0].sum())] for k in KEYS}, None)
        for b in batches
    ]
    result = fidelity("causal-lm", copy.deepcopy(model), model, unpadded)
    reference = build("gpt2")
    nll = [
        float(reference(input_ids=b[0]["input_ids"], labels=b[0]["input_ids"]).loss)
        * (b[0]["input_ids"].shape[1] - 1)
        for b in unpadded
    ]
    tokens = sum(b[0]["input_ids"].shape[1] - 1 for b in unpadded)
    assert result.perplexity == pytest.approx(math.exp(sum(nll) / tokens), rel=1e-4)
    assert result.perplexity == result.baseline_perplexity and result.agreement == 1.0
    noisy = fidelity("causal-lm", _perturbed(model, 3.0), model, batches)
    assert noisy.agreement < 1.0 and noisy.kl > 0 and noisy.perplexity != noisy.baseline_perplexity


def test_masked_lm_scores_the_same_masked_tokens_for_both_models(folders, batches):
    model = load_model(f"hf:{folders['bert-mlm']}")
    same = fidelity("masked-lm", copy.deepcopy(model), model, batches)
    assert same.primary == "agreement" and same.agreement == 1.0
    assert same.perplexity == same.baseline_perplexity > 1.0
    again = fidelity("masked-lm", model, model, batches)
    assert again.perplexity == same.perplexity  # seeded masks
    model.mask_token_id = None
    with pytest.raises(ConfigError, match="mask token"):
        fidelity("masked-lm", model, model, batches)


def test_bad_task_and_too_few_examples(folders, batches):
    model = load_model(f"hf:{folders['bert']}")
    with pytest.raises(ConfigError, match="unknown task"):
        metric_for("retrieval", model, batches)
    one = [({k: v[:1] for k, v in batches[0][0].items()}, None)]
    with pytest.raises(DataError, match="at least 2 examples"):
        fidelity("embedding", model, model, one)


def test_neighbour_agreement_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    # nearest neighbour of each row: a -> 1, 0, 3, 2; b -> 2, 3, 0, 1: all differ
    assert neighbour_agreement(a, b, k=1) == 0.0
    assert neighbour_agreement(a, a, k=1) == 1.0
    # k is capped at n - 1, where every other row is a neighbour under any embedding
    assert neighbour_agreement(a, b, k=10) == 1.0


@settings(max_examples=30, deadline=None)
@given(st.integers(3, 12), st.integers(1, 6), st.integers(0, 10_000))
def test_neighbour_agreement_properties(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n, 4, generator=g), torch.randn(n, 4, generator=g)
    scale = torch.rand(n, 1, generator=g) + 0.5
    assert neighbour_agreement(a, a * scale, k) == 1.0  # cosine ignores each row's length
    value = neighbour_agreement(a, b, k)
    assert 0.0 <= value <= 1.0
    assert value == pytest.approx(neighbour_agreement(b, a, k))
