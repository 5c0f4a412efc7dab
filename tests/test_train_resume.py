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

from netshrink.config import TrainConfig
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


CONFIG = TrainConfig(epochs=4, lr=0.05, patience=3)
KW = dict(seed=3, progress=False, val_data=_data()[:2], evaluate=accuracy)


def _checkpointed(folder: Path, epochs: int = 4) -> TrainConfig:
    """CONFIG with checkpoints in ``folder`` every 5 steps (and after every epoch)."""
    return CONFIG.model_copy(
        update={"checkpoint_dir": str(folder), "checkpoint_every": 5, "epochs": epochs}
    )


# 6 steps an epoch, a checkpoint every 5 steps and after every epoch.
@pytest.mark.parametrize(("crash_after", "checkpointed"), [(11, 10), (13, 12)])
def test_resume_after_exception_is_bit_identical(
    tmp_path: Path, crash_after: int, checkpointed: int
) -> None:
    data = _data()
    reference = _model()
    ref = fit(reference, data, CONFIG, **KW)

    with pytest.raises(Crash):
        fit(_model(), data, _checkpointed(tmp_path), loss_fn=_crashing_after(crash_after), **KW)
    saved = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert not saved["done"] and saved["result"]["steps"] == checkpointed

    resumed = _model()
    res = fit(resumed, data, _checkpointed(tmp_path), **KW)
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
    assert fit(again, data, _checkpointed(tmp_path), **KW).steps == ref.steps
    pairs = zip(again.parameters(), reference.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_checkpoint_from_another_run_is_refused(tmp_path: Path) -> None:
    fit(_model(), _data(), _checkpointed(tmp_path, epochs=1), **KW)
    with pytest.raises(ConfigError, match=r"different run.*epochs"):
        fit(_model(), _data(), _checkpointed(tmp_path), **KW)


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


SK_CONFIG = TrainConfig(epochs=3, lr=0.02, checkpoint_every=4)
STALL_AFTER = 9
"""The child trains this many steps (checkpoints after steps 4 and 8), then stalls mid-step."""

SCRIPT = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from netshrink.train import cross_entropy, fit
from test_train_resume import SK_CONFIG, STALL_AFTER, _sk_data, _sk_model

out = Path(sys.argv[1])
steps = 0

def stalls(m, batch):
    global steps
    steps += 1
    if steps > STALL_AFTER:
        (out / "stalled").touch()
        time.sleep(600)  # killed here: mid-training, however slowly the machine got here
    return cross_entropy(m, batch)

config = SK_CONFIG.model_copy(update={"checkpoint_dir": str(out)})
fit(_sk_model(), _sk_data(), config, loss_fn=stalls, seed=5, progress=False)
"""


def test_sigkill_mid_training_then_restart(tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    src = str(Path(__file__).parents[1] / "src")
    env = {**os.environ, "PYTHONPATH": src, "OMP_NUM_THREADS": "1"}
    ckpt = tmp_path / CHECKPOINT_NAME
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), str(Path(__file__).parent)],
        env=env,
        stderr=subprocess.PIPE,
    )
    # The child stalls at a known step, so the kill lands mid-training at the same place on an
    # idle or a loaded machine; the deadline only bounds a broken run.
    deadline = time.monotonic() + 300
    while not (tmp_path / "stalled").exists() and proc.poll() is None:
        assert time.monotonic() < deadline, "the training child never reached its stall"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    _, stderr = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, stderr.decode()[-3000:]
    killed_at = load_checkpoint(ckpt)
    assert not killed_at["done"] and killed_at["result"]["steps"] == 8

    # Restart (here, in this process: same code, one thread like the child) and compare.
    (tmp_path / f".{CHECKPOINT_NAME}.x1y2.tmp").write_bytes(b"half a checkpoint")
    resumed = _sk_model()
    config = SK_CONFIG.model_copy(update={"checkpoint_dir": str(tmp_path)})
    res = fit(resumed, _sk_data(), config, seed=5, progress=False)
    assert res.resumed_from_step == 8
    assert not list(tmp_path.glob(".*.tmp"))
    reference = _sk_model()
    fit(reference, _sk_data(), SK_CONFIG, seed=5, progress=False)
    for name, value in reference.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
