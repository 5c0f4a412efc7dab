"""The command line in-process: exit codes, --json output, bad input never shows a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file
from typer.testing import CliRunner

import recipe_fakes
from netshrink import progress
from netshrink.artifact import load
from netshrink.cli import app
from netshrink.report.record import SUMMARY_FIELDS
from netshrink.report.tables import plural
from netshrink.report.terminal import say

runner = CliRunner()
MODEL = ["--model", "recipe_fakes:tiny_model", "--data", "recipe_fakes:cli_data"]
RECIPE = "version: 1\nstages:\n  - prune.fake_zero: {fraction: 0.9}\n  - lowrank.fake_shrink: {}\n"


@pytest.fixture(scope="module", autouse=True)
def fakes():
    with recipe_fakes.registered():
        yield
    progress.set_enabled(True)


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> tuple[Path, dict]:
    """One successful ``compress --json`` run shared by the tests that read its output."""
    folder = tmp_path_factory.mktemp("run")
    (folder / "recipe.yaml").write_text(RECIPE)
    result = invoke(
        "compress", str(folder / "recipe.yaml"), *MODEL, "--out", str(folder / "out"), "--json"
    )
    assert result.exit_code == 0, result.output
    return folder / "out", json.loads(result.stdout.strip().splitlines()[-1])


def invoke(*args: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "200"})


def test_compress_json_has_every_contract_field(done: tuple[Path, dict]) -> None:
    out, summary = done
    assert set(SUMMARY_FIELDS) <= set(summary)
    for key in ("compression_rate", "speedup_rate", "metric_before", "metric_after"):
        assert isinstance(summary[key], float)
    on_disk = sum(f.stat().st_size for f in (out / "model").iterdir())  # what du -b counts
    assert summary["artifact_bytes"] == on_disk  # the headline's bytes exclude the provenance
    assert summary["compressed_bytes"] < on_disk
    assert summary["compression_rate"] == pytest.approx(
        summary["baseline_bytes"] / summary["compressed_bytes"]
    )
    assert summary["artifact"] == str(out / "model")
    assert summary["runtime"] == "eager" and summary["threads"] >= 1
    assert json.loads((out / "report.json").read_text())["summary"]["artifact_bytes"] == on_disk


def test_report_html_is_self_contained(done: tuple[Path, dict]) -> None:
    out, _ = done
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3  # two trade-offs and the sparsity bars
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert " thread" in page and "compression rate" in page  # "1 thread" under OMP_NUM_THREADS=1
    md = (out / "report.md").read_text()
    assert "plots/metric-vs-size.png" in md and (out / "plots" / "metric-vs-size.png").is_file()


def test_list_shows_options_from_the_registry() -> None:
    result = invoke("list")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    for fragment in (
        "prune.fake_zero",
        "fraction",
        "0.5",
        ">= 0, <= 1",
        "finetune.epochs",
        "fraction of weights set to zero",
        "lowrank.fake_shrink",
    ):
        assert fragment in text


def test_list_schema_is_json_and_list_recipes_names_the_built_ins() -> None:
    schema = json.loads(invoke("list", "--schema").stdout)
    assert schema["properties"]["version"] == {"const": 1}
    result = invoke("list", "--recipes")
    assert result.exit_code == 0
    for name in (
        "int8",
        "prune-int8",
        "distill-prune-int8",
        "lowrank-int8",
        "sparse90-int8",
        "int4-qat",
    ):
        assert name in result.stdout


def test_weights_file_is_loaded_into_the_factory_model(tmp_path: Path) -> None:
    save_file(recipe_fakes.tiny_model().state_dict(), str(tmp_path / "w.safetensors"))
    (tmp_path / "r.yaml").write_text(RECIPE)
    args = [
        "compress",
        str(tmp_path / "r.yaml"),
        "--model",
        "recipe_fakes:untrained_model",
        "--data",
        "recipe_fakes:cli_data",
        "--out",
        str(tmp_path / "o"),
        "--quiet",
    ]
    result = invoke(*args, "--weights", str(tmp_path / "w.safetensors"))
    assert result.exit_code == 0, result.output
    assert "compression rate" in result.stdout and "report:" in result.stdout
    wrong = {"0.weight": torch.zeros(3, 3)}
    save_file(wrong, str(tmp_path / "bad.safetensors"))
    result = invoke(*args, "--weights", str(tmp_path / "bad.safetensors"))
    assert result.exit_code == 2 and "does not fit the model" in result.stderr


BAD_INPUT = [
    (["compress", "no-such-recipe", *MODEL, "--out", "o"], "neither a recipe file nor a built-in"),
    (["compress", "{recipe}", "--model", "nosuchmodule_xyz:f", "--out", "o"], "cannot import"),
    (["compress", "{recipe}", "--model", "justaname", "--out", "o"], "is not a reference"),
    (
        ["compress", "{recipe}", "--model", "recipe_fakes:nothing", "--data", "x:y", "--out", "o"],
        "has no attribute 'nothing'",
    ),
    (
        [
            "compress",
            "{recipe}",
            "--model",
            "recipe_fakes:tiny_data",
            "--data",
            "recipe_fakes:cli_data",
            "--out",
            "o",
        ],
        "must return a torch.nn.Module",
    ),
    (
        ["compress", "{recipe}", "--model", "recipe_fakes:tiny_model", "--out", "o"],
        "--data is needed",
    ),
    (
        [
            "compress",
            "{recipe}",
            "--model",
            "recipe_fakes:tiny_model",
            "--data",
            "recipe_fakes:context",
            "--out",
            "o",
        ],
        "gave no train, val, calib",
    ),
    (
        ["compress", "{recipe}", *MODEL, "--eval", "recipe_fakes:bad_metric", "--out", "o"],
        "it must return a float",
    ),
    (
        ["compress", "{recipe}", "--model", "zoo:no-such-model", "--out", "o"],
        "unknown zoo model 'no-such-model'",
    ),
    (["compress", "{bad_recipe}", *MODEL, "--out", "o"], "option 'fracton': unknown option"),
    (["compress", "{recipe}", *MODEL, "--out", "o", "--runtime", "tpu"], "unknown runtime"),
    (["compress", "{recipe}", *MODEL, "--out", "o", "--runs", "5"], "Invalid value"),
    (["compress", "{recipe}", *MODEL], "Missing option"),
    (["measure", "{tmp}"], "not a netshrink artifact"),
    (["export", "{tmp}", "--onnx", "x.onnx"], "not a netshrink artifact"),
]


@pytest.mark.parametrize(("args", "fragment"), BAD_INPUT)
def test_bad_input_exits_2_with_a_message_and_no_traceback(
    args: list[str], fragment: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "r.yaml").write_text(RECIPE)
    (tmp_path / "bad.yaml").write_text(RECIPE.replace("fraction", "fracton"))
    paths = {"recipe": "r.yaml", "bad_recipe": "bad.yaml", "tmp": str(tmp_path)}
    result = invoke(*[a.format(**paths) for a in args])
    assert result.exit_code == 2, result.output
    assert fragment in " ".join(result.stderr.split())
    # The message comes first: netshrink's "error:" line, or click's usage text for flags it
    # rejects itself; nothing is printed before it.
    assert result.stderr.lstrip().startswith(("error:", "Usage:")), result.stderr


def test_terminal_output_fits_80_columns_and_names_the_metric(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text(RECIPE)
    args = [str(tmp_path / "r.yaml"), *MODEL, "--eval", "recipe_fakes:agreement", "--threads", "1"]
    result = runner.invoke(
        app, ["compress", *args, "--out", str(tmp_path / "o")], env={"COLUMNS": "80"}
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, result.stdout
    header = next(line for line in lines if line.startswith("stage "))
    # size, speed and quality first; what does not fit is named, not squeezed
    assert header.split() == ["stage", "bytes", "compression", "speedup", "agreement", "drop"]
    assert "not shown here: latency ms, params, MACs, non-zero, seconds" in result.stdout
    assert "runtime eager, 1 thread, median of 20 timed runs" in " ".join(result.stdout.split())
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["summary"]["metric"] == "agreement"


def test_say_breaks_lines_only_between_phrases() -> None:
    console = Console(record=True, width=80)
    phrases = [
        "netshrink demo: recipe distill-prune-int8 on zoo:digits-cnn",
        "timed on onnxruntime",
    ]
    say(console, *phrases, plural(1, "thread"))
    assert console.export_text() == (
        "netshrink demo: recipe distill-prune-int8 on zoo:digits-cnn,\n"
        "  timed on onnxruntime, 1 thread\n"
    )


def test_a_stage_the_model_does_not_support_is_rolled_back_and_reported(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("version: 1\nstages:\n  - prune.fake_fail: {}\n")
    result = invoke("compress", str(tmp_path / "r.yaml"), *MODEL, "--out", str(tmp_path / "o"))
    assert result.exit_code == 0, result.output
    shown = " ".join(result.stdout.split())
    assert "rolled back" in shown and "failed: fake_fail cannot handle any layer" in shown


def test_export_and_measure_a_saved_artifact(done: tuple[Path, dict], tmp_path: Path) -> None:
    out, summary = done
    result = invoke("export", str(out / "model"), "--onnx", str(tmp_path / "m.onnx"))
    message = " ".join(result.stderr.split())
    assert result.exit_code == 2 and "give --model package.module:function" in message
    assert "the run used --model recipe_fakes:tiny_model" in message  # not a zoo model
    model_ref = ["--model", "recipe_fakes:untrained_model"]
    x = recipe_fakes.tiny_data(11, 1)[0][0]
    for folder in ("model", "baseline"):  # both artifacts of a run record their inputs
        onnx_file = tmp_path / f"{folder}.onnx"
        result = invoke("export", str(out / folder), "--onnx", str(onnx_file), *model_ref)
        assert result.exit_code == 0, result.output
        model = load(out / folder, model=recipe_fakes.untrained_model())
        session = ort.InferenceSession(str(onnx_file))
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        np.testing.assert_allclose(got, model(x).detach().numpy(), atol=1e-4)
    result = invoke(
        "measure", str(out / "model"), *model_ref, "--data", "recipe_fakes:cli_data", "--json"
    )
    assert result.exit_code == 0, result.output
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["bytes"] == summary["artifact_bytes"]
    assert measured["metric"] == pytest.approx(summary["metric_after"])


def _netshrink(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m netshrink ARGS`` in a real process: what a user's terminal shows."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    return subprocess.run(
        [sys.executable, "-m", "netshrink", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": src, "PATH": ""},
        cwd=cwd,
    )


def test_python_m_netshrink_runs_as_a_subprocess() -> None:
    done = _netshrink("list", "--schema")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["title"] == "netshrink recipe"


def test_bad_input_in_a_real_process_prints_one_error_line(tmp_path: Path) -> None:
    done = _netshrink("compress", "int8", "--model", "zoo:nope", "--out", "o", cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown zoo model 'nope'")


COMPRESS = ("compress", "int8", "--model", "zoo:x", "--out", "o")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("frobnicate",), "error: No such command 'frobnicate'"),
        (
            ("compress", "int8", "--model", "zoo:x", "--out", "o", "--threads", "100000"),
            "--threads",
        ),
        (("compress", "int8", "--model", "zoo:x", "--out", "o", "--seed", str(2**70)), "--seed"),
        (("compress", "int8", "--model", "zoo:x", "--out", "o", "--bogus"), "No such option"),
    ],
)
def test_usage_errors_in_a_real_process_are_one_error_line(
    args: tuple[str, ...], message: str, tmp_path: Path
) -> None:
    done = _netshrink(*args, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], done.stderr
    assert list(tmp_path.iterdir()) == []
