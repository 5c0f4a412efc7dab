"""DDP: ``fit`` under ``torchrun --nproc_per_node 2`` (gloo, CPU) follows the one-process run.

Each rank takes every other batch of 8 examples; the single process sees those pairs as one
batch of 16. Averaging the two ranks' gradients equals the gradient of the mean over the 16, so
the loss trajectories agree up to float32 summation order (tolerance 1e-5).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from netshrink.config import TrainConfig
from netshrink.metrics import accuracy
from netshrink.train import fit
from test_train import one_thread  # noqa: F401  (autouse fixture)

SCRIPT = """
import json, os, sys, torch
from safetensors.torch import save_file
from netshrink.config import TrainConfig
from netshrink.metrics import accuracy
from netshrink.train import fit, is_main_process
sys.path.insert(0, sys.argv[2])
from test_train_ddp import CONFIG, data, model

out = sys.argv[1]
m = model()
small = data(8)
config = CONFIG.model_copy(update={"checkpoint_dir": out})
res = fit(m, small, config, seed=0, progress=False, val_data=small[:5], evaluate=accuracy)
if is_main_process():
    save_file(dict(m.state_dict()), f"{out}/weights.safetensors")
    with open(f"{out}/result{os.environ['RANK']}.json", "w") as f:
        json.dump({"steps": res.step_losses, "val": res.val_metrics,
                   "group_left": not torch.distributed.is_initialized()}, f)
"""
CONFIG = TrainConfig(epochs=3, lr=0.05, shuffle=False, keep_best=False)


def data(batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same 96 examples in batches of ``batch``."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(96, 5, generator=g)
    y = (x[:, 0] * x[:, 1] > 0).long()
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, 96, batch)]


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 2))


def _launch(out: Path) -> subprocess.CompletedProcess[str]:
    """Run SCRIPT under torchrun with 2 gloo ranks, writing into ``out``."""
    out.mkdir()
    script = out / "ddp_train.py"
    script.write_text(SCRIPT)
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return subprocess.run(
        [*cmd, str(script), str(out), str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_torchrun_two_gloo_processes_match_one_process(tmp_path: Path) -> None:
    # Gloo's start-up on a loaded 2-core machine now and then fails before any training: a rank
    # aborts in std::terminate, or connectFullMesh is refused (CI, about 1 run in 30). That is
    # the launcher's environment, not fit, so a launch that failed before any rank wrote its
    # result is retried on a fresh rendezvous; a failure after training never is.
    for attempt in range(3):
        out = tmp_path / f"attempt{attempt}"
        done = _launch(out)
        if done.returncode == 0 or list(out.glob("result*.json")):
            break
    assert done.returncode == 0, done.stderr[-3000:]
    assert "terminate called" not in done.stderr
    assert sorted(p.name for p in out.glob("result*.json")) == ["result0.json"]
    ddp = json.loads((out / "result0.json").read_text())
    assert ddp["group_left"]  # fit left the process group it joined

    single = model()
    ref = fit(
        single, data(16), CONFIG, seed=0, progress=False, val_data=data(8)[:5], evaluate=accuracy
    )
    assert len(ddp["steps"]) == len(ref.step_losses) == 18
    torch.testing.assert_close(
        torch.tensor(ddp["steps"]), torch.tensor(ref.step_losses), rtol=1e-5, atol=1e-6
    )
    assert ddp["val"] == ref.val_metrics
    weights = load_file(out / "weights.safetensors")
    for k, v in single.state_dict().items():
        torch.testing.assert_close(weights[k], v, rtol=1e-5, atol=1e-6)
