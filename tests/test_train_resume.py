"""Checkpoint/resume: a run cut short and started again ends bit-identical to an unbroken one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from netshrink.errors import ArtifactError, ConfigError
from netshrink.metrics import accuracy
from netshrink.train import cross_entropy, fit
from netshrink.training.checkpoint import load_checkpoint, save_checkpoint
from netshrink.training.loop import CHECKPOINT_NAME
from test_train import one_thread  # noqa: F401  (autouse fixture)


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(96, 6, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, 96, 16)]


def _model() -> nn.Module:
    torch.manual_seed(0)
    # BatchNorm (buffers) and Dropout (RNG) are what a resume most easily gets wrong.
    return nn.Sequential(
        nn.Linear(6, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.2), nn.Linear(12, 2)
    )


class Crash(RuntimeError):
    pass


def _crashing_after(k: int):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] > k:
            raise Crash(f"injected after step {k}")
        return cross_entropy(model, batch)

    return loss_fn


KW = dict(
    epochs=4, lr=0.05, seed=3, progress=False, val_data=_data()[:2], evaluate=accuracy, patience=3
)


# 6 steps an epoch, a checkpoint every 5 steps and after every epoch.
@pytest.mark.parametrize(("crash_after", "checkpointed"), [(11, 10), (13, 12)])
def test_resume_after_exception_is_bit_identical(
    tmp_path: Path, crash_after: int, checkpointed: int
) -> None:
    data = _data()
    reference = _model()
    ref = fit(reference, data, **KW)

    with pytest.raises(Crash):
        fit(
            _model(),
            data,
            checkpoint_dir=tmp_path,
            checkpoint_every=5,
            loss_fn=_crashing_after(crash_after),
            **KW,
        )
    saved = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert not saved["done"] and saved["result"]["steps"] == checkpointed

    resumed = _model()
    res = fit(resumed, data, checkpoint_dir=tmp_path, checkpoint_every=5, **KW)
    assert res.resumed_from_step == checkpointed
    assert res.step_losses == ref.step_losses
    assert res.val_metrics == ref.val_metrics and res.best_epoch == ref.best_epoch
    resumed_state = resumed.state_dict()
    for name, a in reference.state_dict().items():
        assert torch.equal(a, resumed_state[name]), name

    best = load_file(tmp_path / "best.safetensors")
    assert best.keys() == reference.state_dict().keys()
    # Calling once more finds the finished run and returns its weights without training.
    again = _model()
    assert fit(again, data, checkpoint_dir=tmp_path, checkpoint_every=5, **KW).steps == ref.steps
    pairs = zip(again.parameters(), reference.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_checkpoint_from_another_run_is_refused(tmp_path: Path) -> None:
    fit(_model(), _data(), checkpoint_dir=tmp_path, **{**KW, "epochs": 1})
    with pytest.raises(ConfigError, match=r"different run.*epochs"):
        fit(_model(), _data(), checkpoint_dir=tmp_path, **KW)


def test_checkpoint_round_trip_and_corrupt_file(tmp_path: Path) -> None:
    state = {"a": {0: torch.arange(3), 1: (1.5, "x")}, "b": [None, True, float("inf")]}
    save_checkpoint(tmp_path / "c.safetensors", state)
    back = load_checkpoint(tmp_path / "c.safetensors")
    assert torch.equal(back["a"][0], torch.arange(3)) and back["a"][1] == (1.5, "x")
    assert back["b"] == [None, True, float("inf")]
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]  # no temp file left
    (tmp_path / "c.safetensors").write_bytes(b"\x10\x00 truncated")
    with pytest.raises(ArtifactError, match="not a readable netshrink checkpoint"):
        load_checkpoint(tmp_path / "c.safetensors")


def _sk_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(160, 6, generator=g)
    y = (x[:, 0] > 0).long()
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, 160, 8)]


def _sk_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 2))


SK_KW = dict(epochs=3, lr=0.02, seed=5, progress=False, checkpoint_every=4)

SCRIPT = """
import sys, time
sys.path.insert(0, sys.argv[2])
from netshrink.train import cross_entropy, fit
from test_train_resume import SK_KW, _sk_data, _sk_model

def slow_loss(m, batch):
    time.sleep(0.02)  # slow enough for the parent to kill the run mid-training
    return cross_entropy(m, batch)

fit(_sk_model(), _sk_data(), loss_fn=slow_loss, checkpoint_dir=sys.argv[1], **SK_KW)
"""


def test_sigkill_mid_training_then_restart(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    ckpt = tmp_path / CHECKPOINT_NAME
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), str(Path(__file__).parent)], env=env
    )
    deadline = time.monotonic() + 60
    while not ckpt.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = load_checkpoint(ckpt)
    assert not killed_at["done"] and 0 < killed_at["result"]["steps"] < 60

    # Restart (here, in this process: same code, one thread like the child) and compare.
    (tmp_path / f".{CHECKPOINT_NAME}.x1y2.tmp").write_bytes(b"half a checkpoint")
    resumed = _sk_model()
    res = fit(resumed, _sk_data(), checkpoint_dir=tmp_path, **SK_KW)
    assert res.resumed_from_step == killed_at["result"]["steps"]
    assert not list(tmp_path.glob(".*.tmp"))
    reference = _sk_model()
    fit(reference, _sk_data(), **SK_KW)
    for name, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
