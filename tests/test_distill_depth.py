"""distill.kd depth students of transformers: layers kept from the teacher, hidden states matched,
trained on unlabeled text, and artifacts that ns.load, measure and export rebuild."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import hf_fixtures as fx
import netshrink as ns
from netshrink import hf, progress
from netshrink.cli import app
from netshrink.distill.student import depth_matches
from netshrink.errors import ConfigError, UnsupportedModuleError
from netshrink.layers.edits import recorded_edits
from netshrink.recipe.commands import input_specs
from netshrink.recipe.deliver import PROVENANCE_KEY
from test_distill import Stack
from test_train import one_thread  # noqa: F401  (autouse fixture)


@pytest.fixture(scope="module", autouse=True)
def progress_back():
    yield
    progress.set_enabled(True)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> list[tuple[dict, None]]:
    """Three unlabeled batches of the fixture texts, rotated."""
    tok = fx.tokenizer(tmp_path_factory.mktemp("tok"))
    return [(fx.encode(tok, fx.TEXTS[i:] + fx.TEXTS[:i]), None) for i in range(3)]


class Encoder(nn.Module):
    """nn.TransformerEncoder of ``layers`` layers over (N, 6, 16) features, 3 classes."""

    def __init__(self, layers: int = 4) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


def encoder_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 6, 16, generator=g), torch.randint(0, 3, (8,), generator=g))] * 3


def built(cls: type[nn.Module], *args: int) -> nn.Module:
    torch.manual_seed(0)
    return cls(*args).eval()


def test_raw_hf_student_keeps_teacher_layers_learns_and_reloads(data, tmp_path: Path) -> None:
    teacher = fx.build("bert")
    with torch.no_grad():  # random-init layers barely turn their input: make layer 0 matter
        teacher.encoder.layer[0].output.dense.weight.mul_(10)
    start = ns.distill.kd(teacher, student={"depth": 1}, train_data=data, epochs=0, progress=False)
    out = ns.distill.kd(
        teacher, student={"depth": 1}, train_data=data, epochs=6, lr=3e-3, progress=False
    )
    assert len(out.encoder.layer) == 1 and out.config.num_hidden_layers == 1
    assert recorded_edits(out) == [
        {"kind": "hf.drop_layers", "args": {"module": "encoder.layer", "keep": [1]}}
    ]  # spread keeps the last layer
    assert torch.equal(
        start.encoder.layer[0].output.dense.weight, teacher.encoder.layer[1].output.dense.weight
    )

    def gap(model: nn.Module) -> float:
        with torch.no_grad():
            return sum(
                float(
                    nn.functional.mse_loss(
                        model(**x).last_hidden_state, teacher(**x).last_hidden_state
                    )
                )
                for x, _ in data
            )

    assert gap(out) < 0.5 * gap(start)  # 0.27 measured
    loaded = ns.load(ns.save(out, tmp_path / "s"), model=fx.build("bert"))
    x = data[0][0]
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(**x).last_hidden_state, out(**x).last_hidden_state, rtol=0, atol=0
        )


def test_depth_matches_follow_tinyberts_uniform_map() -> None:
    teacher = built(Encoder, 6)
    student = ns.distill.kd(
        teacher, student={"depth": 3}, train_data=encoder_data(), epochs=0, progress=False
    )
    matches = depth_matches(teacher, student, "cosine", 1.0)
    assert [(m.student, m.teacher) for m in matches] == [
        ("encoder.layers.0", "encoder.layers.1"),
        ("encoder.layers.1", "encoder.layers.3"),
        ("encoder.layers.2", "encoder.layers.5"),
    ]
    assert depth_matches(teacher, teacher, "cosine", 1.0) == []


def test_importance_and_alternate_students_of_a_torch_encoder() -> None:
    teacher = built(Encoder, 4)
    with torch.no_grad():  # layer 1 becomes (almost) the identity: least Block Influence
        teacher.encoder.layers[1].linear2.weight.zero_()
        teacher.encoder.layers[1].self_attn.out_proj.weight.mul_(1e-3)
    data = encoder_data()

    def keep(**student: object) -> list[int]:
        out = ns.distill.kd(teacher, student=student, train_data=data, epochs=1, progress=False)
        assert out.encoder.num_layers == len(out.encoder.layers)
        return recorded_edits(out)[0]["args"]["keep"]

    assert keep(depth=3, layers="importance") == [0, 2, 3]
    assert keep(depth=0.5, layers="alternate") == [0, 2]
    assert keep(depth=0.5, layers="spread") == [0, 3]
    assert keep(depth=0.5) == [1, 3]  # mapped: the layers TinyBERT's map pairs them with


def test_mapped_student_layers_start_as_the_teacher_layers_they_learn() -> None:
    teacher = built(Encoder, 6)
    student = ns.distill.kd(
        teacher, student={"depth": 3}, train_data=encoder_data(), epochs=0, progress=False
    )
    assert recorded_edits(student)[0]["args"]["keep"] == [1, 3, 5]
    for match in depth_matches(teacher, student, "cosine", 1.0):
        s_state = student.get_submodule(match.student).state_dict()
        t_state = teacher.get_submodule(match.teacher_name).state_dict()
        assert all(torch.equal(v, t_state[k]) for k, v in s_state.items())


def test_cached_teacher_targets_train_the_same_student_as_live_ones(data) -> None:
    teacher = fx.build("bert")
    students = [
        ns.distill.kd(
            teacher,
            student={"depth": 1},
            train_data=data,
            epochs=2,
            lr=3e-3,
            cache_teacher=cache,
            progress=False,
        )
        for cache in (True, False)
    ]  # outputs and hidden states both come from the cache in the second epoch
    cached, live = (dict(s.named_parameters()) for s in students)
    assert all(torch.equal(cached[k], live[k]) for k in live)


@pytest.mark.parametrize(
    ("model", "student", "error", "match"),
    [
        (lambda: fx.build("bert"), {"width": 0.5}, UnsupportedModuleError, "prune.heads"),
        (lambda: fx.build("bert"), {"depth": 2}, ConfigError, "not fewer than the 2"),
        (
            lambda: built(Stack),
            {"depth": 0.5, "layers": "importance"},
            ConfigError,
            "no transformer",
        ),
        (lambda: built(Stack), {"depth": 1.5}, ConfigError, "depth"),
        (lambda: built(Stack), {"layers": "first"}, ConfigError, "layers"),
    ],
)
def test_bad_student_options_are_clear_errors(data, model, student, error, match) -> None:
    built_model = model()
    batches = [(torch.randn(4, 4), None)] if isinstance(built_model, Stack) else data
    with pytest.raises(error, match=match):
        ns.distill.kd(built_model, student=student, train_data=batches, epochs=1, progress=False)


runner = CliRunner()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A 1-layer depth student of a 2-layer BERT sentence encoder (``hf:`` reference), saved."""
    root = tmp_path_factory.mktemp("depth")
    folder = fx.model_dir(root / "bert", "bert")
    texts = root / "texts.txt"
    texts.write_text("\n".join(hf.stdlib_corpus(60)))
    teacher = hf.load_model(f"hf:{folder}")
    splits = hf.text_data(texts, hf.load_tokenizer(f"hf:{folder}"), max_length=32)
    student = ns.distill.kd(
        teacher, student={"depth": 0.5}, train_data=splits.train, epochs=1, progress=False
    )
    # what a command-line run records: measure and export read the data and input shapes back
    run = {"data": f"text:{texts}", "inputs": input_specs(splits.train[0][0])}
    path = ns.save(student, root / "model", manifest_extra={PROVENANCE_KEY: run})
    return path, folder, texts


def test_the_cli_artifact_reloads_measures_and_exports(artifact, tmp_path: Path) -> None:
    path, folder, _ = artifact
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["edits"] == [
        {"kind": "hf.drop_layers", "args": {"module": "model.encoder.layer", "keep": [1]}}
    ]
    model = ns.load(path)  # the hf reference rebuilt, the edit replayed
    assert len(model.model.encoder.layer) == 1 and model.model.config.num_hidden_layers == 1
    measured = runner.invoke(app, ["measure", str(path), "--threads", "1", "--json"])
    assert measured.exit_code == 0, measured.output
    assert json.loads(measured.stdout.strip().splitlines()[-1])["metric_name"] == "top5_agreement"
    onnx = tmp_path / "m.onnx"
    exported = runner.invoke(app, ["export", str(path), "--onnx", str(onnx)])
    assert exported.exit_code == 0, exported.output
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    encoded = fx.encode(hf.load_tokenizer(f"hf:{folder}"))
    names = [i.name for i in session.get_inputs()]
    (got,) = session.run(None, {k: encoded[k].numpy() for k in names})
    with torch.no_grad():
        expected = model(**encoded)
    torch.testing.assert_close(torch.from_numpy(got), expected, rtol=0, atol=1e-5)
