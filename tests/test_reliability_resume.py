"""kill -9 during a distillation stage, then the same command: it resumes, says so, and ends with
the artifact an unbroken run makes; with another teacher it refuses to resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import save_file
from typer.testing import CliRunner

import recipe_fakes
from netshrink import progress
from netshrink.cli import app
from netshrink.training.loop import CHECKPOINT_NAME

TESTS = Path(__file__).parent
RECIPE = """version: 1
stages:
  - distill.kd: {{student: {{width: 0.5}}, epochs: 12, checkpoint_dir: {ckpt},
                 checkpoint_every: 2, cache_teacher: false}}
"""


def compress_args(tmp_path: Path, recipe: Path, out: str, weights: Path) -> list[str]:
    return [
        "compress",
        str(recipe),
        "--model",
        "recipe_fakes:untrained_model",
        "--weights",
        str(weights),
        "--data",
        "recipe_fakes:cli_data",
        "--out",
        str(tmp_path / out),
        "--runs",
        "20",
        "--threads",
        "1",
        "--quiet",
    ]


def test_kill_during_training_then_resume_or_refuse(tmp_path: Path) -> None:
    weights = tmp_path / "teacher.safetensors"
    save_file(recipe_fakes.tiny_model().state_dict(), str(weights))
    ckpt = tmp_path / "ckpt"
    recipe = tmp_path / "kd.yaml"
    recipe.write_text(RECIPE.format(ckpt=ckpt))
    args = compress_args(tmp_path, recipe, "out", weights)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS.parent / "src"), str(TESTS)]),
        "OMP_NUM_THREADS": "1",
    }
    child = subprocess.Popen([sys.executable, "-m", "netshrink", *args], env=env, cwd=TESTS)
    deadline = time.monotonic() + 120
    while not (ckpt / CHECKPOINT_NAME).exists() and time.monotonic() < deadline:
        assert child.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (tmp_path / "out").exists()  # nothing half-written in --out

    runner = CliRunner()
    with recipe_fakes.registered():
        resumed = runner.invoke(app, args)
        assert resumed.exit_code == 0, resumed.output
        assert "resumed from step" in resumed.stderr
        recipe.write_text(RECIPE.format(ckpt=tmp_path / "fresh"))
        fresh = runner.invoke(app, compress_args(tmp_path, recipe, "ref", weights))
        assert fresh.exit_code == 0, fresh.output
        model_file = Path("model") / "model.safetensors"
        assert (tmp_path / "out" / model_file).read_bytes() == (
            tmp_path / "ref" / model_file
        ).read_bytes()

        other = recipe_fakes.tiny_model(seed=5).state_dict()
        save_file(other, str(weights))
        recipe.write_text(RECIPE.format(ckpt=ckpt))
        refused = runner.invoke(app, args)
    progress.set_enabled(True)
    assert refused.exit_code == 2, refused.output
    message = " ".join(refused.stderr.split())
    assert "refusing to resume" in message and "teacher" in message
