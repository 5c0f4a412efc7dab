"""Task losses: each name computes its definition, defaults distil when there are no labels."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from hf_fixtures import TEXTS, build, encode, model_dir, tokenizer
from netshrink.config import TrainConfig
from netshrink.errors import ConfigError, DataError, MissingInputError
from netshrink.hf import LOSSES, load_model, loss_for
from netshrink.train import fit


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {kind: model_dir(root / kind, kind) for kind in ("bert", "bert-cls", "gpt2", "bert-mlm")}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return encode(tokenizer(tmp_path_factory.mktemp("tok")), TEXTS)


def _noisy(model, scale=0.5):
    other = copy.deepcopy(model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * scale * p.std().nan_to_num(0.02))
    return other


def test_embedding_default_is_cosine_distillation(folders, inputs):
    teacher = load_model(f"hf:{folders['bert']}")
    loss = loss_for("embedding", teacher=teacher)
    same = loss(copy.deepcopy(teacher), (inputs, None))
    assert float(same.detach()) == pytest.approx(0.0, abs=1e-6)
    student = _noisy(teacher)
    value = loss(student, (inputs, None))
    with torch.no_grad():
        mse = loss_for("embedding", "mse", teacher=teacher)(student, (inputs, None))
        assert float(mse) == pytest.approx(float(F.mse_loss(student(**inputs), teacher(**inputs))))
        expected = 1 - F.cosine_similarity(student(**inputs), teacher(**inputs)).mean()
    assert float(value.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert float(expected) > 0
    value.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_classification_default_uses_labels_when_present_else_kl(folders, inputs):
    teacher = load_model(f"hf:{folders['bert-cls']}")
    student = _noisy(teacher, 2.0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    loss = loss_for("classification", teacher=teacher, temperature=2.0)
    with torch.no_grad():
        s, t = student(**inputs), teacher(**inputs)
        ce = F.cross_entropy(s, labels)
        kl = (
            F.kl_div(
                (s / 2).log_softmax(-1),
                (t / 2).log_softmax(-1),
                log_target=True,
                reduction="batchmean",
            )
            * 4
        )
        assert float(loss(student, (inputs, labels))) == pytest.approx(float(ce), rel=1e-5)
        assert float(loss(student, (inputs, None))) == pytest.approx(float(kl), rel=1e-5)
        assert float(loss_for("classification")(student, (inputs, labels))) == pytest.approx(
            float(ce)
        )
    with pytest.raises(DataError, match="needs labels"):
        loss_for("classification", "ce")(student, (inputs, None))


@torch.no_grad()
def test_causal_lm_loss_is_next_token_cross_entropy(folders, inputs):
    model = load_model(f"hf:{folders['gpt2']}")
    n = int(inputs["attention_mask"][0].sum())  # GPT-2's own tokenizer gives no token types
    one = {k: inputs[k][:1, :n] for k in ("input_ids", "attention_mask")}
    expected = build("gpt2")(input_ids=one["input_ids"], labels=one["input_ids"]).loss
    value = loss_for("causal-lm", "lm")(model, (one, None))
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    teacher = model
    assert float(loss_for("causal-lm", teacher=teacher)(copy.deepcopy(model), (inputs, None))) == (
        pytest.approx(0.0, abs=1e-6)
    )


@torch.no_grad()
def test_masked_lm_loss_masks_seeded_tokens(folders, inputs):
    model = load_model(f"hf:{folders['bert-mlm']}")
    loss = loss_for("masked-lm", "lm")
    torch.manual_seed(3)
    first = loss(model, (inputs, None))
    torch.manual_seed(3)
    assert torch.equal(first, loss(model, (inputs, None)))  # the training loop seeds each step
    assert 0 < float(first) < 2 * torch.log(torch.tensor(float(model.model.config.vocab_size)))
    model.mask_token_id = None
    with pytest.raises(ConfigError, match="mask token"):
        loss(model, (inputs, None))


def test_fine_tuning_with_a_task_loss_moves_the_student_toward_the_teacher(folders, inputs):
    teacher = load_model(f"hf:{folders['bert']}")
    student = _noisy(teacher, 1.0)
    loss = loss_for("embedding", teacher=teacher)
    batches = [(inputs, None)]
    before = float(loss(student, batches[0]).detach())
    fit(student, batches, TrainConfig(epochs=5, lr=1e-3), loss_fn=loss, progress=False)  # in place
    assert float(loss(student, batches[0]).detach()) < before


@pytest.mark.parametrize(
    ("task", "name", "error", "message"),
    [
        ("embedding", "ce", ConfigError, "does not fit task embedding"),
        ("causal-lm", "cosine", ConfigError, "use one of lm, kl, mse"),
        ("vision", None, ConfigError, "unknown task"),
        ("embedding", None, MissingInputError, "pass teacher="),
        ("masked-lm", "kl", MissingInputError, "pass teacher="),
    ],
)
def test_bad_loss_choices_raise_clear_errors(task, name, error, message):
    with pytest.raises(error, match=message):
        loss_for(task, name)
    assert set(LOSSES) == {"embedding", "classification", "causal-lm", "masked-lm"}
