"""The technique contract, on models nobody here wrote: every registered technique x every
foreign model ends either working (forward runs with the original's output shapes, save -> load
gives identical outputs, the artifact is not bigger, the caller's model untouched) or with a
NetshrinkError raised by ``apply`` before anything is returned; never a raw exception, a model
that crashes later, or a silent no-op."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils import _pytree as pytree

import netshrink as ns
from foreign_models import Foreign
from netshrink import registry
from netshrink.artifact.store import TENSORS_FILE
from netshrink.batches import run
from netshrink.context import Context
from netshrink.errors import NetshrinkError

SMALL: dict[str, dict[str, Any]] = {
    "distill.kd": {"epochs": 1, "student": {"width": 0.5}},
    "quantize.qat": {"epochs": 1},
    "prune.magnitude": {"kernel": "dense"},
    "prune.random": {"kernel": "dense"},
    "prune.nm": {"kernel": "dense"},
    "lowrank.svd": {"ratio": 0.5},
}
"""Options that keep each technique tiny (one epoch of training, no kernel timing)."""

KNOWN_GAPS = {
    (f"hf_gpt2-{name}", "the sparse lm_head saves its own copy of the weight tied to wte")
    for name in ("prune.magnitude", "prune.nm", "prune.random")
}
"""Combinations that run and reload but store more than the original, until the compressed-layer
contract stores tied weights once. Strict: the test fails as soon as they are fixed."""

TECHNIQUES = [t.name for t in registry.all_techniques()]


def snapshot(model: nn.Module) -> tuple[list[Any], dict[str, torch.Tensor]]:
    """The module tree and a copy of every parameter and buffer."""
    tree = [(n, type(m)) for n, m in model.named_modules()]
    return tree, {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_model(model: nn.Module, before: tuple[list[Any], dict[str, torch.Tensor]]):
    tree, state = snapshot(model)
    assert tree == before[0]
    assert list(state) == list(before[1])
    for key, value in state.items():
        assert torch.equal(value, before[1][key]), key


def payload_bytes(artifact: Path) -> int:
    """Bytes of the tensors an artifact stores (without the JSON headers, which on models this
    small outweigh what a technique saves)."""
    tensors = load_file(str(artifact / TENSORS_FILE))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def outputs(model: nn.Module, inputs: Any) -> list[Any]:
    with torch.no_grad():
        leaves, _ = pytree.tree_flatten(run(model.eval(), inputs))
    return leaves


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", TECHNIQUES)
def test_technique_is_safe_on_foreign_model(name: str, foreign: Foreign, tmp_path, request):
    gap = dict(KNOWN_GAPS).get(f"{foreign.name}-{name}")
    if gap:
        request.applymarker(pytest.mark.xfail(reason=gap, strict=True))
    tech = registry.get(name)
    model = foreign.build()
    before = snapshot(model)
    inputs = foreign.example_inputs()
    data = foreign.batches()
    ctx = Context(
        example_inputs=inputs,
        calib_data=data,
        train_data=data,
        teacher=model,
        progress=False,
    )
    config = tech.make_config(SMALL.get(name, {}))
    try:
        out = tech.apply(model, config, ctx)
    except NetshrinkError as exc:
        assert str(exc)
        assert_same_model(model, before)
        return
    assert_same_model(model, before)
    expected = outputs(model, inputs)
    got = outputs(out, inputs)
    assert [getattr(t, "shape", None) for t in got] == [getattr(t, "shape", None) for t in expected]
    ns.save(model, tmp_path / "baseline")
    ns.save(out, tmp_path / "compressed")
    reloaded = ns.load(tmp_path / "compressed", model=foreign.build())
    for a, b in zip(outputs(reloaded, inputs), got, strict=True):
        assert torch.equal(a, b) if torch.is_tensor(a) else type(a) is type(b)
    assert payload_bytes(tmp_path / "compressed") <= payload_bytes(tmp_path / "baseline")
