"""--out as one unit: staged, swapped in whole, locked, never deleting files it did not write."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from netshrink import outdir
from netshrink.artifact import load, save
from netshrink.artifact.validate import TENSORS_FILE
from netshrink.cli import app
from netshrink.outdir import MARKER, OutputError, RunOutput

runner = CliRunner()


def run_writing(out: Path, files: dict[str, str]) -> None:
    with RunOutput(out) as unit:
        for name, text in files.items():
            (unit.staging / name).parent.mkdir(parents=True, exist_ok=True)
            (unit.staging / name).write_text(text)
        unit.commit()


def beside(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def test_a_run_appears_whole_with_its_marker_and_nothing_beside(tmp_path: Path) -> None:
    run_writing(tmp_path / "out", {"report.json": "1", "model/m": "x"})
    assert sorted(os.listdir(tmp_path / "out")) == [MARKER, "model", "report.json"]
    assert beside(tmp_path) == ["out"]


def test_a_previous_run_is_replaced_as_a_whole(tmp_path: Path) -> None:
    run_writing(tmp_path / "out", {"report.json": "old", "plots/a.png": "old"})
    run_writing(tmp_path / "out", {"report.json": "new"})
    assert sorted(os.listdir(tmp_path / "out")) == [MARKER, "report.json"]
    assert (tmp_path / "out" / "report.json").read_text() == "new"
    assert beside(tmp_path) == ["out"]


def test_a_failed_run_keeps_the_previous_one(tmp_path: Path) -> None:
    run_writing(tmp_path / "out", {"report.json": "old"})
    with pytest.raises(RuntimeError), RunOutput(tmp_path / "out") as unit:
        (unit.staging / "report.json").write_text("half")
        raise RuntimeError("training diverged")
    assert (tmp_path / "out" / "report.json").read_text() == "old"
    assert beside(tmp_path) == ["out"]


@pytest.mark.parametrize("foreign", ["notes.txt", "model", "report.json"])
def test_files_netshrink_did_not_write_are_never_replaced(tmp_path: Path, foreign: str) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / foreign).write_text("mine")
    with pytest.raises(OutputError, match=f"did not write \\('{foreign}'\\)"):
        RunOutput(out)
    assert (out / foreign).read_text() == "mine" and beside(tmp_path) == ["out"]


def test_an_empty_folder_is_fine(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    run_writing(tmp_path / "out", {"report.json": "1"})
    assert (tmp_path / "out" / "report.json").exists()


def test_out_that_is_a_file_or_below_one(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("data")
    with pytest.raises(OutputError, match="is not a folder"):
        RunOutput(tmp_path / "f")
    with pytest.raises(OutputError, match="which is a file"):
        RunOutput(tmp_path / "f" / "sub" / "out")
    assert (tmp_path / "f").read_text() == "data"


def test_read_only_parent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # root writes into a chmod 555 folder, so the permission answer is what is faked: the check
    # must ask before any work and say which folder refused
    (tmp_path / "ro").mkdir()
    denied = tmp_path / "ro"
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != denied and real(p, mode))
    with pytest.raises(OutputError, match=f"no permission to create it in {denied}"):
        RunOutput(tmp_path / "ro" / "out")
    assert list(denied.iterdir()) == []


def test_a_concurrent_run_is_refused_and_the_lock_is_released(tmp_path: Path) -> None:
    busy = pytest.raises(OutputError, match="in use by another netshrink run")
    with RunOutput(tmp_path / "out"), busy:
        RunOutput(tmp_path / "out")
    run_writing(tmp_path / "out", {"a": "1"})
    assert beside(tmp_path) == ["out"]


def test_stale_staging_of_a_killed_run_is_cleaned(tmp_path: Path) -> None:
    stale = tmp_path / ".out.netshrink-staging-dead"
    (stale / "model").mkdir(parents=True)
    (tmp_path / ".out.netshrink-lock").write_text("")  # a killed run's lock file, unlocked
    run_writing(tmp_path / "out", {"a": "1"})
    assert beside(tmp_path) == ["out"]


def test_a_run_killed_between_the_fallback_renames_is_put_back(tmp_path: Path) -> None:
    run_writing(tmp_path / "out", {"a": "old"})
    old = tmp_path / ".out.netshrink-old-dead"
    old.mkdir()
    os.rename(tmp_path / "out", old / "previous")
    with RunOutput(tmp_path / "out"):
        assert (tmp_path / "out" / "a").read_text() == "old"


def test_disk_space_is_checked(tmp_path: Path) -> None:
    with RunOutput(tmp_path / "out") as unit, pytest.raises(OutputError, match="MiB free"):
        unit.check_space(2**62)
    assert beside(tmp_path) == []


def test_swap_without_renameat2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(outdir, "_RENAMEAT2", None)
    run_writing(tmp_path / "out", {"a": "old"})
    run_writing(tmp_path / "out", {"a": "new"})
    assert (tmp_path / "out" / "a").read_text() == "new" and beside(tmp_path) == ["out"]


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_files_follow_the_umask(tmp_path: Path, mask: int) -> None:
    previous = os.umask(mask)
    try:
        run_writing(tmp_path / "out", {"report.json": "1"})
        save(nn.Linear(2, 2), tmp_path / "out2" / "model")
    finally:
        os.umask(previous)
    for folder in (tmp_path / "out", tmp_path / "out2" / "model"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~mask
    artifact = tmp_path / "out2" / "model"
    files = (tmp_path / "out" / "report.json", artifact / "manifest.json", artifact / TENSORS_FILE)
    for file in files:  # safetensors alone would write its file 0o600
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~mask, file


def test_an_out_name_the_file_system_refuses_is_an_output_error(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="cannot write there"):
        RunOutput(tmp_path / ("L" * 300))
    assert list(tmp_path.iterdir()) == []


def test_concurrent_saves_to_one_path_leave_one_whole_artifact(tmp_path: Path) -> None:
    models = [nn.Linear(4, 4) for _ in range(6)]
    errors: list[BaseException] = []

    def work(model: nn.Module) -> None:
        try:
            for _ in range(3):
                save(model, tmp_path / "a")
        except BaseException as exc:  # collected: a thread's exception would vanish
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert beside(tmp_path) == ["a"]
    loaded = load(tmp_path / "a", model=nn.Linear(4, 4))
    assert any(torch.equal(loaded.weight, m.weight) for m in models)


@pytest.mark.parametrize(
    ("prepare", "fragment"),
    [
        (lambda out: (out / "model").mkdir(parents=True), "did not write ('model')"),
        (lambda out: out.write_text("x"), "is not a folder"),
    ],
)
def test_cli_refuses_a_bad_out_before_any_work(tmp_path: Path, prepare, fragment: str) -> None:
    out = tmp_path / "out"
    prepare(out)
    (tmp_path / "r.yaml").write_text("version: 1\nstages:\n  - prune.magnitude: {}\n")
    args = ["compress", str(tmp_path / "r.yaml"), "--model", "hostile_code:raising_model"]
    result = runner.invoke(app, [*args, "--data", "x:y", "--out", str(out)])
    assert result.exit_code == 2, result.output
    assert fragment in " ".join(result.stderr.split())  # raising_model was never called


def test_kill_while_writing_leaves_the_previous_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_writing(out, {"report.json": "previous run"})
    (tmp_path / "r.yaml").write_text("version: 1\nstages:\n  - prune.magnitude: {}\n")
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests.parent / "src"), str(tests)])}
    args = ["compress", str(tmp_path / "r.yaml"), "--model", "recipe_fakes:untrained_model"]
    args += ["--data", "recipe_fakes:cli_data", "--out", str(out), "--quiet", "--threads", "1"]
    child = subprocess.Popen([sys.executable, "-m", "netshrink", *args], env=env, cwd=tests)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".out.netshrink-staging-*/baseline")):
        assert child.poll() is None and time.monotonic() < deadline, "no staging was written"
        time.sleep(0.005)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert sorted(os.listdir(out)) == [MARKER, "report.json"]
    assert (out / "report.json").read_text() == "previous run"
    run_writing(out, {"report.json": "next run"})  # the killed run's staging is cleaned
    assert beside(tmp_path) == ["out", "r.yaml"]


def test_ns_save_never_replaces_a_folder_of_yours(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "thesis.tex").write_text("mine")
    with pytest.raises(OutputError, match=r"thesis\.tex"):
        save(nn.Linear(2, 2), tmp_path / "a")
    (tmp_path / "f").write_text("mine")
    with pytest.raises(OutputError, match="is not a folder"):
        save(nn.Linear(2, 2), tmp_path / "f")
    assert (tmp_path / "a" / "thesis.tex").read_text() == "mine"
    assert (tmp_path / "f").read_text() == "mine"


@pytest.mark.parametrize("kind", ["fifo", "not json", "a list"])
def test_a_hostile_marker_makes_the_folder_foreign_without_hanging(
    tmp_path: Path, kind: str
) -> None:
    run_writing(tmp_path / "out", {"report.json": "1"})
    marker = tmp_path / "out" / MARKER
    marker.unlink()
    if kind == "fifo":
        os.mkfifo(marker)
    else:
        marker.write_text("{" if kind == "not json" else '["report.json"]')
    with pytest.raises(OutputError, match="did not write"):
        RunOutput(tmp_path / "out")


def test_export_destinations_are_checked_before_the_artifact_is_read(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("mine")
    cases = [
        ["--onnx", str(tmp_path)],
        ["--onnx", str(blocker / "m.onnx")],
        ["--openvino", str(blocker)],
        ["--openvino", str(blocker / "ir")],
    ]
    said = ["is a folder", "which is a file", "is a file; give the folder", "which is a file"]
    for args, fragment in zip(cases, said, strict=True):
        result = runner.invoke(app, ["export", str(tmp_path / "no-artifact"), *args])
        assert result.exit_code == 2, result.output
        assert fragment in " ".join(result.stderr.split())
    assert blocker.read_text() == "mine" and beside(tmp_path) == ["a-file"]
