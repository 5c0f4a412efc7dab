"""The user's code behind one guard: every misbehaviour is exit 2, one line naming the function."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import recipe_fakes
from netshrink import progress
from netshrink.cli import app
from netshrink.cliopts import MAX_SEED, MAX_THREADS
from netshrink.errors import DataError, ModelReferenceError
from netshrink.usercode import UserCodeError, check_batch, check_reference, guarded

runner = CliRunner()
DATA = ["--data", "recipe_fakes:cli_data"]
TINY = ["--model", "recipe_fakes:untrained_model"]

CASES = [
    (["--model", "builtins:quit", *DATA], "part of Python itself"),
    (["--model", "os:abort", *DATA], "part of Python itself"),
    (["--model", "sys:exit", *DATA], "part of Python itself"),
    (
        ["--model", "hostile_code:raising_model", *DATA],
        "raising_model() raised ValueError: weights",
    ),
    (["--model", "hostile_code:exiting_model", *DATA], "exiting_model() raised SystemExit: 3"),
    ([*TINY, "--data", "hostile_code:raising_data"], "raising_data() raised KeyError"),
    (["--model", "hostile_code:wide_model", *DATA], "forward raised RuntimeError: mat1 and mat2"),
    ([*TINY, "--data", "hostile_code:labels_out_of_range"], "labels range over [7, 7]"),
    ([*TINY, "--data", "hostile_code:triples"], "a batch is a pair (inputs, targets)"),
    ([*TINY, "--data", "hostile_code:strings_as_inputs"], "inputs hold a str"),
    ([*TINY, "--data", "hostile_code:nan_inputs"], "contain NaN or Inf"),
    ([*TINY, "--data", "hostile_code:failing_generator"], "raised OSError: disk read failed"),
    ([*TINY, "--data", "hostile_code:endless_data"], "yields more than 100000 batches"),
    ([*TINY, *DATA, "--eval", "hostile_code:raising_metric"], "RuntimeError: metric server down"),
    ([*TINY, *DATA, "--eval", "hostile_code:exiting_metric"], "raised SystemExit: bye"),
    ([*TINY, *DATA, "--seed", str(2**70)], f"less than or equal to {MAX_SEED}"),
    ([*TINY, *DATA, "--seed", "-1"], "greater than or equal to 0"),
    ([*TINY, *DATA, "--threads", "100000"], f"less than or equal to {MAX_THREADS}"),
]


@pytest.fixture(scope="module", autouse=True)
def fakes():
    with recipe_fakes.registered():
        yield
    progress.set_enabled(True)


@pytest.mark.parametrize(("args", "fragment"), CASES)
def test_misbehaving_user_code_is_one_clear_line(
    args: list[str], fragment: str, tmp_path: Path
) -> None:
    (tmp_path / "r.yaml").write_text("version: 1\nstages:\n  - prune.fake_zero: {}\n")
    out = tmp_path / "out"
    result = runner.invoke(app, ["compress", str(tmp_path / "r.yaml"), *args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert fragment in " ".join(result.stderr.split())
    assert "Traceback" not in result.output
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


def test_debug_shows_the_users_traceback(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("version: 1\nstages:\n  - prune.fake_zero: {}\n")
    args = ["compress", str(tmp_path / "r.yaml"), "--model", "hostile_code:raising_model"]
    result = runner.invoke(app, ["--debug", *args, *DATA, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and 'raise ValueError("weights server' in result.stderr


def test_guard_keeps_netshrink_errors_and_interrupts() -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    def ours() -> None:
        raise DataError("ours")

    with pytest.raises(KeyboardInterrupt):
        guarded("--data x:y", "y()", interrupted)
    with pytest.raises(DataError, match="ours"):
        guarded("--data x:y", "y()", ours)
    with pytest.raises(UserCodeError, match=r"--data x:y: y\(\) raised SystemExit: \(no message\)"):
        guarded("--data x:y", "y()", sys.exit, "")


def test_references_into_python_itself_are_refused_before_any_call() -> None:
    import os

    for obj in (os.abort, os._exit, print, quit, torch.empty):
        with pytest.raises(ModelReferenceError):
            check_reference(obj, "x:y", "--model")
    check_reference(recipe_fakes.tiny_model, "recipe_fakes:tiny_model", "--model")
    with pytest.raises(ModelReferenceError, match="not callable"):
        check_reference(3, "x:y", "--model")


@pytest.mark.parametrize(
    ("batch", "fragment"),
    [
        (torch.zeros(3), "a batch is a pair"),
        ("ab", "a batch is a pair"),
        ((torch.zeros(2, 4), [1, 0]), "targets are a list"),
        (({"x": torch.zeros(2)}, None), None),
        (((torch.zeros(2), torch.tensor([float("inf")])), None), "NaN or Inf"),
    ],
)
def test_check_batch(batch: object, fragment: str | None) -> None:
    if fragment is None:
        check_batch(batch, "b")
        return
    with pytest.raises(DataError, match=fragment):
        check_batch(batch, "b")


def test_deep_and_empty_batches_are_described_briefly() -> None:
    deep: list = [torch.zeros(1)]
    for _ in range(5000):
        deep = [deep, deep]
    with pytest.raises(DataError, match="a batch is a pair") as info:
        check_batch((deep, None, None), "b")
    assert len(str(info.value)) < 600
    with pytest.raises(DataError, match="empty tensor"):
        check_batch((torch.zeros(0, 4), None), "b")


def test_weights_that_are_a_fifo_are_refused_without_opening(tmp_path: Path) -> None:
    import os

    from netshrink.refs import load_weights

    os.mkfifo(tmp_path / "w.safetensors")
    with pytest.raises(DataError, match="is not a regular file"):
        load_weights(recipe_fakes.untrained_model(), tmp_path / "w.safetensors")
