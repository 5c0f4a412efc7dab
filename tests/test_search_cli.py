"""``netshrink analyze`` and ``netshrink compress --target`` on the command line."""

import json
import textwrap

import pytest
from typer.testing import CliRunner

from netshrink.cli import app

runner = CliRunner()

MODULE = textwrap.dedent(
    """
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def data():
        g = torch.Generator().manual_seed(0)
        def batch():
            x = torch.randn(16, 8, generator=g)
            return x, x[:, :3].argmax(dim=1)
        return {"train": [batch()], "val": [batch()], "calib": [batch()]}
    """
)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--target", "size=ten"], "not a number"),
        (["--target", "fast=2x"], "key among"),
        (["--target", "max_drop=0.01"], "exactly one of"),
        ([], "either a RECIPE or --target"),
        (["int8", "--target", "size=4x"], "either a RECIPE or --target"),
    ],
)
def test_bad_target_exits_2_with_one_error_line(args, says, tmp_path):
    result = runner.invoke(
        app, ["compress", *args, "--model", "zoo:digits-mlp", "--out", str(tmp_path)]
    )
    assert result.exit_code == 2, result.output
    assert "error:" in result.output and says in result.output


def test_analyze_writes_sensitivity_json_and_plot(tmp_path, monkeypatch):
    (tmp_path / "tinymod.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "cache"))
    args = ["analyze", "--model", "tinymod:model", "--data", "tinymod:data", "--out", "res", "-q"]
    result = runner.invoke(app, [*args, "--samples", "8"])
    assert result.exit_code == 0, result.output
    # 2 layers x 10 default settings; the one 16-example batch is whole, so it runs 16
    assert "20 probes (2 layers) on 16 samples each" in result.output
    data = json.loads((tmp_path / "res" / "sensitivity.json").read_text())
    assert data["version"] == 3 and set(data["layers"]) == {"0", "2"} and data["unread"] == []
    assert (tmp_path / "res" / "sensitivity.png").stat().st_size > 1000
    assert len(list((tmp_path / "cache" / "sensitivity").glob("*.json"))) == 1


def test_compress_target_times_candidates_on_the_threads_asked(tmp_path, monkeypatch):
    import torch

    (tmp_path / "tinymod.py").write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("NETSHRINK_CACHE", str(tmp_path / "cache"))
    # A count unlike torch's current one, so ignoring --threads would record the wrong number.
    threads = 2 if torch.get_num_threads() == 1 else 1
    args = ["compress", "--target", "size=2x", "--model", "tinymod:model"]
    args += ["--data", "tinymod:data", "--out", "res", "--threads", str(threads), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["threads"] == threads
