"""``refit: true`` of ``prune.heads`` / ``prune.ffn``: the output projections refit by least
squares reproduce the unpruned outputs better on the calibration data, change no shapes, and
the artifact reloads with the refit weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import netshrink as ns
from netshrink.errors import ConfigError, MissingInputError, UnsupportedModuleError
from netshrink.prune.refit import refit_projection, refit_projections
from test_prune_heads import build, output

torch.set_num_threads(1)


def calib(x: dict, n: int = 4) -> list[tuple[dict, None]]:
    """``n`` batches shaped like ``x`` with other random values."""
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(n):
        batch = {
            k: torch.randint(5, 60, v.shape, generator=gen)
            if not v.is_floating_point()
            else torch.randn(v.shape, generator=gen)
            for k, v in x.items()
        }
        out.append((batch, None))
    return out


def error(model: nn.Module, original: nn.Module, data: list) -> float:
    """Mean squared difference of the two models' outputs over ``data``."""
    with torch.no_grad():
        return sum(float((output(model, x) - output(original, x)).pow(2).mean()) for x, _ in data)


@pytest.mark.parametrize("name", ["bert", "gpt2", "t5-encoder", "llama-gqa", "mha"])
def test_refit_lowers_the_calibration_output_error(name: str) -> None:
    model, x = build(name)
    data = calib(x)
    opts = {"ratio": 0.5, "criterion": "l2", "calib_data": data}
    plain = ns.prune.ffn(ns.prune.heads(model, **opts), **opts)
    refit = ns.prune.ffn(ns.prune.heads(model, **opts, refit=True), **opts, refit=True)
    assert [p.shape for p in refit.parameters()] == [p.shape for p in plain.parameters()]
    assert error(refit, model, data) < 0.9 * error(plain, model, data)


def _io(model: nn.Module, name: str, data: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The (tokens, features) inputs and outputs of ``model``'s module ``name`` on ``data``."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    hook = model.get_submodule(name).register_forward_hook(
        lambda _m, args, out: seen.append((args[0], out))
    )
    with torch.no_grad():
        for batch, _ in data:
            model(**batch)
    hook.remove()
    x, y = (torch.cat([s[i].reshape(-1, s[i].shape[-1]) for s in seen]) for i in (0, 1))
    return x.double(), y.double()


def test_refit_reaches_the_least_squares_optimum_of_the_first_projection() -> None:
    model, x = build("bert")
    data = calib(x, n=16)
    pruned = ns.prune.ffn(model, ratio=0.5, criterion="l2")
    name = "encoder.layer.0.output.dense"
    _, target = _io(model, name, data)
    inputs, before = _io(pruned, name, data)
    ones = torch.ones(len(inputs), 1, dtype=inputs.dtype)
    best = torch.linalg.lstsq(torch.cat([inputs, ones], 1), target).solution
    optimum = (torch.cat([inputs, ones], 1) @ best - target).pow(2).sum()
    refit_projection(pruned, model, name, data)
    after = (_io(pruned, name, data)[1] - target).pow(2).sum()
    assert after < 0.5 * (before - target).pow(2).sum()
    assert after <= 1.05 * optimum  # the ridge term costs at most a few percent


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), kept=st.integers(2, 5))
def test_refit_recovers_inputs_that_the_kept_ones_determine(seed: int, kept: int) -> None:
    """When the removed inputs of a projection are linear combinations of the kept ones, the
    refit projection reproduces the original output (up to the small ridge term)."""
    gen = torch.Generator().manual_seed(seed)
    original = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 3))
    with torch.no_grad():
        mix = torch.randn(8 - kept, kept, generator=gen)
        original[0].weight.normal_(generator=gen)
        original[0].weight[kept:] = mix @ original[0].weight[:kept]
        original[0].bias[kept:] = mix @ original[0].bias[:kept]
        original[1].weight.normal_(generator=gen)
    pruned = nn.Sequential(nn.Linear(6, kept), nn.Linear(kept, 3))
    with torch.no_grad():
        pruned[0].weight.copy_(original[0].weight[:kept])
        pruned[0].bias.copy_(original[0].bias[:kept])
    data = [(torch.randn(64, 6, generator=gen), None) for _ in range(2)]
    refit_projections(pruned, original, ["1"], data)
    with torch.no_grad():
        for xb, _ in data:
            want = original(xb)
            assert (pruned(xb) - want).norm() <= 0.05 * want.norm()


def test_refit_artifact_reloads_identical(tmp_path: Path) -> None:
    model, x = build("gpt2")
    data = calib(x)
    pruned = ns.prune.ffn(model, ratio=0.5, criterion="activation", calib_data=data, refit=True)
    ns.save(pruned, tmp_path / "artifact")
    fresh, _ = build("gpt2")
    again = ns.load(tmp_path / "artifact", model=fresh)
    with torch.no_grad():
        assert torch.equal(output(again, x), output(pruned, x))


def test_refit_needs_calibration_data() -> None:
    model, _ = build("bert")
    with pytest.raises(MissingInputError, match="calib_data"):
        ns.prune.ffn(model, ratio=0.5, refit=True)
    with pytest.raises(UnsupportedModuleError, match=r"nn\.Linear or Conv1D"):
        conv = nn.Sequential(nn.Conv2d(1, 1, 1))
        refit_projections(conv, conv, ["0"], [(torch.zeros(1, 1, 1, 1), None)])


def test_calib_split_train_reads_the_training_batches() -> None:
    model, x = build("bert")
    data = calib(x)
    opts = {"ratio": 0.5, "criterion": "obs", "refit": True}
    with pytest.raises(MissingInputError, match="train_data"):
        ns.prune.ffn(model, **opts, calib_split="train", calib_data=data)
    from_train = ns.prune.ffn(model, **opts, calib_split="train", train_data=data)
    from_calib = ns.prune.ffn(model, **opts, calib_data=data)
    other = ns.prune.ffn(model, **opts, calib_data=data[:1])
    with torch.no_grad():
        same = output(from_train, x), output(from_calib, x), output(other, x)
    assert torch.equal(same[0], same[1])
    assert not torch.equal(same[0], same[2])


@pytest.mark.parametrize("prune", [ns.prune.heads, ns.prune.ffn])
def test_calib_split_train_that_reads_nothing_is_rejected(prune) -> None:
    model, x = build("bert")
    with pytest.raises(ConfigError, match=r"calib_split: train.*criterion: l2.*refit: false"):
        prune(model, ratio=0.5, calib_split="train", train_data=calib(x))
    prune(model, ratio=0.5, calib_split="train", refit=True, train_data=calib(x, 1))
