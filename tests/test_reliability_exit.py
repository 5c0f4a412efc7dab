"""User code that ends the process itself (``os._exit``, a signal) is still one clear error line:
the command runs in a watched child (:mod:`netshrink.supervisor`)."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from netshrink.supervisor import remove_if_killed, supervise, user_call

TESTS = Path(__file__).parent


def _ends_in_user_call(how: str) -> int:
    with user_call("--model pkg:build: build()"):
        if how == "exit":
            os._exit(0)
        if how == "c-exit":  # the C library's exit(): its handlers must not hang the child
            ctypes.CDLL(None).exit(0)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the test runner's handler is inherited
        os.kill(os.getpid(), signal.SIGTERM)
    return 0


@pytest.mark.parametrize(
    ("how", "said"),
    [("exit", "exit status 0"), ("c-exit", "exit status 1"), ("kill", "signal SIGTERM")],
)
def test_user_call_ending_the_process_is_exit_2_naming_it(
    how: str, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert supervise(lambda: _ends_in_user_call(how)) == 2
    line = capsys.readouterr().err
    assert line.startswith("error: --model pkg:build: build() ended netshrink's process")
    assert said in line and line.count("\n") == 1


def test_a_kill_outside_user_code_is_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    def killed() -> int:
        with user_call("--eval m:f: f(model, batches)"):
            pass  # returned: no longer in user code
        os.kill(os.getpid(), signal.SIGKILL)
        return 0

    assert supervise(killed) == 1
    assert "signal SIGKILL) (killed from outside, or out of memory)" in capsys.readouterr().err


def test_the_staging_folder_of_a_child_ended_abruptly_is_removed(tmp_path: Path) -> None:
    staging = tmp_path / ".out.netshrink-staging-1 two  spaces"
    kept = tmp_path / "kept"

    def staged_then_killed() -> int:
        for folder in (staging, kept):
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"half")
        remove_if_killed(staging)
        os._exit(0)

    assert supervise(staged_then_killed) == 1
    assert not staging.exists() and (kept / "model.safetensors").read_bytes() == b"half"


def test_os_exit_in_a_factory_from_the_command_line(tmp_path: Path) -> None:
    (tmp_path / "r.yaml").write_text("version: 1\nstages:\n  - prune.magnitude: {sparsity: 0.5}\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)])}
    args = ["compress", str(tmp_path / "r.yaml"), "--model", "hostile_code:os_exit_model"]
    args += ["--data", "recipe_fakes:cli_data", "--out", str(tmp_path / "out")]
    done = subprocess.run(
        [sys.executable, "-m", "netshrink", *args],
        env=env,
        cwd=TESTS,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "os_exit_model() ended netshrink's process (exit status 0)" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


def test_an_interrupt_is_one_failed_line_and_exit_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from netshrink import progress
    from netshrink.cli import _run_app

    (tmp_path / "r.yaml").write_text("version: 1\nstages:\n  - prune.magnitude: {sparsity: 0.5}\n")
    args = ["compress", str(tmp_path / "r.yaml"), "--model", "hostile_code:interrupted_model"]
    args += ["--data", "recipe_fakes:cli_data", "--out", str(tmp_path / "out"), "--quiet"]
    monkeypatch.setattr(sys, "argv", ["netshrink", *args])
    assert _run_app() == 1
    progress.set_enabled(True)
    assert "failed: interrupted" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]
