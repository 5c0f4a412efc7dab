"""text: data (hash splits, dynamic padding, jsonl labels) and the built-in corpora."""

from __future__ import annotations

import json

import pytest
import torch

from hf_fixtures import model_dir, tokenizer
from netshrink.errors import ConfigError, DataError
from netshrink.hf import heldout_corpus, load_tokenizer, stdlib_corpus, text_data
from netshrink.hf.corpus import (
    _heldout_texts,
    _stdlib_texts,
    is_prose,
    package_training_corpus,
    sentences,
    stdlib_training_corpus,
)
from netshrink.hf.text import split_indices

TEXTS = stdlib_corpus(120)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tokenizer(tmp_path_factory.mktemp("tok"))


def _decoded(tok, batches) -> list[str]:
    return [
        tok.decode(ids, skip_special_tokens=True)
        for inputs, _ in batches
        for ids in inputs["input_ids"]
    ]


def test_splits_are_disjoint_deterministic_and_independent_of_file_order(tmp_path, tok):
    (tmp_path / "a.txt").write_text("\n".join(TEXTS) + "\n\n")
    (tmp_path / "b.txt").write_text("\n".join(reversed(TEXTS)))
    a = text_data(tmp_path / "a.txt", tok, max_length=512, batch_size=16)
    b = text_data(tmp_path / "b.txt", tok, max_length=512, batch_size=16)
    parts = split_indices(TEXTS, seed=0)
    assert sorted(i for p in parts.values() for i in p) == list(range(len(TEXTS)))
    assert all(len(parts[name]) >= 5 for name in ("val", "test"))
    for name in ("train", "val", "test", "calib"):
        for (xa, ta), (xb, tb) in zip(getattr(a, name), getattr(b, name), strict=True):
            assert ta is None and tb is None
            assert xa.keys() == xb.keys() and all(torch.equal(xa[k], xb[k]) for k in xa)
    assert sum(len(x["input_ids"]) for x, _ in a.train) == len(parts["train"])
    train, val, test = (set(_decoded(tok, getattr(a, n))) for n in ("train", "val", "test"))
    assert not (train & val or train & test or val & test)
    assert _decoded(tok, a.calib) == _decoded(tok, a.train)  # calib: the first 256 (all) train
    other_seed = split_indices(TEXTS, seed=1)
    assert other_seed != parts


def test_batches_are_padded_per_batch_and_truncated(tmp_path, tok):
    (tmp_path / "t.txt").write_text("\n".join(TEXTS))
    data = text_data(tmp_path / "t.txt", tok, max_length=12, batch_size=8, calib_size=4)
    widths = set()
    for inputs, _ in data.train:
        assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
        assert inputs["input_ids"].shape[1] <= 12
        assert int(inputs["attention_mask"].sum(1).max()) == inputs["input_ids"].shape[1]
        widths.add(inputs["input_ids"].shape[1])
    full = text_data(tmp_path / "t.txt", tok, max_length=512, batch_size=8)
    assert len({x["input_ids"].shape[1] for x, _ in full.train}) > 1  # dynamic, not global
    assert sum(len(x["input_ids"]) for x, _ in data.calib) == 4
    short = tokenizer(tmp_path / "short")
    short.model_max_length = 10  # a model with 10 positions
    capped = text_data(tmp_path / "t.txt", short, max_length=512, batch_size=8)
    assert max(x["input_ids"].shape[1] for x, _ in capped.train) == 10


def test_jsonl_labels_become_targets(tmp_path, tok):
    records = [{"text": t, "label": i % 3} for i, t in enumerate(TEXTS)]
    (tmp_path / "l.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    data = text_data(tmp_path / "l.jsonl", tok, max_length=512, batch_size=8)
    label_of = {
        tok.decode(tok(r["text"])["input_ids"], skip_special_tokens=True): r["label"]
        for r in records
    }
    for inputs, targets in data.val:
        assert targets.dtype == torch.int64
        texts = _decoded(tok, [(inputs, targets)])
        assert targets.tolist() == [label_of[t] for t in texts]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("e.txt", "\n  \n", "holds no text"),
        ("j.jsonl", '{"text": "a"}\n{oops', "line 2 is not JSON"),
        ("j.jsonl", '{"label": 1}', 'no "text"'),
        ("j.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}', "some lines have a"),
        ("j.jsonl", '{"text": "a", "label": "cat"}', "not an integer class"),
        ("s.txt", "one\ntwo\nthree", "split empty"),
    ],
)
def test_bad_text_files_raise_data_errors(tmp_path, tok, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        text_data(tmp_path / name, tok)


def test_bad_sizes_missing_file_and_tokenizer_without_padding(tmp_path, tok):
    with pytest.raises(DataError, match="cannot read"):
        text_data(tmp_path / "missing.txt", tok)
    with pytest.raises(ConfigError, match="max_length"):
        text_data(tmp_path / "missing.txt", tok, max_length=0)
    folder = model_dir(tmp_path / "nopad", "gpt2")
    saved = tokenizer(folder)
    saved.pad_token = None
    saved.eos_token = "[SEP]"
    saved.save_pretrained(folder)
    assert load_tokenizer(f"hf:{folder}").pad_token == "[SEP]"  # pads with end-of-text
    saved.pad_token = None
    (tmp_path / "t.txt").write_text("\n".join(TEXTS))
    with pytest.raises(ConfigError, match="no padding token"):
        text_data(tmp_path / "t.txt", saved)


def test_corpora_are_stable_prose_and_disjoint():
    docstrings, reference = stdlib_corpus(), heldout_corpus()
    assert len(docstrings) > 1000 and len(reference) > 200
    assert tuple(docstrings) == _stdlib_texts.__wrapped__()  # rebuilt from scratch: same order
    assert tuple(reference) == _heldout_texts.__wrapped__()
    assert len(set(docstrings)) == len(docstrings) and not set(docstrings) & set(reference)
    assert all(is_prose(t) for t in docstrings + reference)
    assert stdlib_corpus(10) == docstrings[:10]
    with pytest.raises(ConfigError, match=r"ask for 1\.\."):
        heldout_corpus(len(reference) + 1)


def test_training_corpus_is_larger_holds_the_docstring_corpus_and_no_heldout_text():
    training = stdlib_training_corpus()
    assert len(training) > 3 * len(stdlib_corpus()) and len(set(training)) == len(training)
    assert set(stdlib_corpus()) <= set(training)
    assert not set(training) & set(heldout_corpus())
    assert stdlib_training_corpus(5) == training[:5]
    with pytest.raises(ConfigError, match=r"ask for 1\.\."):
        stdlib_training_corpus(0)


def test_sentences_split_after_full_stops_and_drop_short_ones():
    text = "The first sentence has six words. Too short. The third one is long enough, e.g. here."
    assert sentences(text) == [
        "The first sentence has six words.",
        "The third one is long enough, e.g. here.",
    ]


def test_package_corpus_reads_installed_docstrings_but_no_tests_heldout_or_stdlib_text(tmp_path):
    new = "The frobnicator turns every widget into a gadget. It never touches any of the sprockets."
    held, known = heldout_corpus(1)[0], stdlib_training_corpus(1)[0]
    held_sentence = sentences(max(heldout_corpus(), key=lambda t: len(sentences(t))))[0]
    for where, doc in [
        ("pkg/__init__.py", new),
        ("pkg/sub/mod.py", f"{held}\n\n{known}\n\n{held_sentence}"),
        ("pkg/tests/test_x.py", "A paragraph in a test folder is never read by the corpus."),
    ]:
        (tmp_path / where).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / where).write_text(f'"""{doc}"""\n')
    texts = package_training_corpus(packages=["pkg", "absent"], root=tmp_path)
    assert sorted(texts) == sorted([new, *sentences(new)])
    assert texts == package_training_corpus(packages=("pkg",), root=tmp_path)  # stable order
    with pytest.raises(ConfigError, match=r"ask for 1\.\.3, not 4"):
        package_training_corpus(4, packages=["pkg"], root=tmp_path)
