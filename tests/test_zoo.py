"""The zoo: model shapes, width scaling, SelfAttention, augmentation and the weights cache."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.fx

import netshrink.zoo as zoo
from netshrink import artifact
from netshrink.artifact.modules import build as build_from_spec
from netshrink.artifact.modules import spec_of
from netshrink.errors import ConfigError, ModelReferenceError
from netshrink.metrics import accuracy
from netshrink.zoo import cache, catalog
from netshrink.zoo.layers import SelfAttention
from netshrink.zoo.training import random_shift

NAMES = ["digits-cnn", "digits-mlp", "digits-transformer"]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_names_and_descriptions() -> None:
    assert zoo.names() == NAMES
    assert "transformer" in zoo.describe("digits-transformer")


@pytest.mark.parametrize("name", NAMES)
def test_forward_shape_and_fx_trace(name: str) -> None:
    torch.manual_seed(0)
    model = zoo.build(name).eval()
    (x,) = zoo.example_inputs(name, batch=5)
    assert x.shape == (5, 1, 8, 8)
    out = model(x)
    assert out.shape == (5, 10)
    traced = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(traced(x), out)


@pytest.mark.parametrize("name", NAMES)
def test_width_scales_hidden_widths(name: str) -> None:
    full, half = zoo.build(name), zoo.build(name, width=0.5)
    assert _params(half) < 0.4 * _params(full)
    assert half(torch.zeros(2, 1, 8, 8)).shape == (2, 10)
    widths = [m.out_features for m in half.modules() if isinstance(m, torch.nn.Linear)]
    widths += [m.out_channels for m in half.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths[:-1] if w != 10)


def test_bad_name_and_width_raise() -> None:
    with pytest.raises(ModelReferenceError, match="digits-cnn"):
        zoo.build("digits-cnm")
    with pytest.raises(ConfigError, match="width"):
        zoo.build("digits-mlp", width=0)
    with pytest.raises(ConfigError, match="batch"):
        zoo.example_inputs("digits-mlp", batch=0)


def test_example_inputs_repeat_beyond_test_split() -> None:
    (x,) = zoo.example_inputs("digits-cnn", batch=1000)
    assert x.shape == (1000, 1, 8, 8)
    torch.testing.assert_close(x[:3], zoo.example_inputs("digits-cnn", batch=3)[0])


def _reference_attention(layer: SelfAttention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v per head, written out with einsum."""
    b, t, _ = x.shape
    h, d = layer.num_heads, layer.head_dim
    q, k, v = (proj(x).reshape(b, t, h, d) for proj in (layer.q, layer.k, layer.v))
    weights = torch.softmax(torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(d), dim=-1)
    return layer.out(torch.einsum("bhts,bshd->bthd", weights, v).reshape(b, t, h * d))


def test_self_attention_matches_reference() -> None:
    torch.manual_seed(0)
    layer = SelfAttention(dim=24, num_heads=3, head_dim=8)
    x = torch.randn(4, 8, 24)
    torch.testing.assert_close(layer(x), _reference_attention(layer, x), atol=1e-5, rtol=0)


def test_self_attention_with_a_head_removed() -> None:
    torch.manual_seed(1)
    layer = SelfAttention(dim=16, num_heads=4, head_dim=4)
    keep = torch.cat([torch.arange(0, 4), torch.arange(8, 16)])  # drop head 1
    with torch.no_grad():
        for proj in (layer.q, layer.k, layer.v):
            proj.weight = torch.nn.Parameter(proj.weight[keep])
            proj.bias = torch.nn.Parameter(proj.bias[keep])
        layer.out.weight = torch.nn.Parameter(layer.out.weight[:, keep])
    layer.num_heads = 3
    x = torch.randn(2, 8, 16)
    out = layer(x)
    assert out.shape == (2, 8, 16)
    torch.testing.assert_close(out, _reference_attention(layer, x), atol=1e-5, rtol=0)
    rebuilt = build_from_spec(spec_of(layer))
    rebuilt.load_state_dict(layer.state_dict())
    torch.testing.assert_close(rebuilt(x), out)


def test_head_pruned_student_round_trips_through_an_artifact(tmp_path: Path) -> None:
    torch.manual_seed(2)
    model = zoo.build("digits-transformer", width=0.5).eval()
    attn = model.blocks[0].attn
    keep = torch.arange(attn.head_dim, attn.num_heads * attn.head_dim)  # drop head 0
    for proj in (attn.q, attn.k, attn.v):
        proj.weight = torch.nn.Parameter(proj.weight.detach()[keep])
        proj.bias = torch.nn.Parameter(proj.bias.detach()[keep])
        proj.out_features = len(keep)
    attn.out.weight = torch.nn.Parameter(attn.out.weight.detach()[:, keep])
    attn.out.in_features = len(keep)
    attn.num_heads -= 1
    x = zoo.example_inputs("digits-transformer", batch=4)
    artifact.save(model, tmp_path / "student")
    loaded = artifact.load(tmp_path / "student")  # no model=: rebuilt from "zoo:<name>"
    assert loaded.blocks[0].attn.num_heads == 3
    torch.testing.assert_close(loaded(*x), model(*x), rtol=0, atol=0)


def test_self_attention_rejects_empty_shapes() -> None:
    with pytest.raises(ValueError, match="positive"):
        SelfAttention(dim=8, num_heads=0, head_dim=4)


def test_random_shift_translates_each_image() -> None:
    images = torch.rand(16, 1, 8, 8)
    shifted = random_shift(images, 1, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1))
    crops = [padded[..., dy : dy + 8, dx : dx + 8] for dy in range(3) for dx in range(3)]
    for i in range(16):
        assert any(torch.equal(shifted[i], crop[i]) for crop in crops)
    assert not torch.equal(shifted, images)
    assert random_shift(images, 0, torch.Generator()) is images


@pytest.fixture
def quick_zoo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A tmp cache, and training replaced by a log of the runs (the cache is what is tested)."""
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    runs: list[str] = []
    monkeypatch.setattr(catalog, "train", lambda *args, desc, **kwargs: runs.append(desc))
    return runs


def test_load_trains_once_then_hits_the_cache(quick_zoo: list[str], tmp_path: Path) -> None:
    first = zoo.load("digits-mlp", progress=False)
    assert quick_zoo == ["train zoo:digits-mlp"]
    files = list(tmp_path.glob("digits-mlp-seed0-*-torch*.safetensors"))
    assert len(files) == 1 and not list(tmp_path.glob("*.tmp"))
    second = zoo.load("digits-mlp", progress=False)
    assert len(quick_zoo) == 1
    assert not second.training
    (x,) = zoo.example_inputs("digits-mlp", batch=8)
    torch.testing.assert_close(second(x), first(x), rtol=0, atol=0)
    zoo.load("digits-mlp", seed=1, progress=False)
    assert len(quick_zoo) == 2 and len(list(tmp_path.glob("*.safetensors"))) == 2


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_corrupt_cache_retrains_with_warning(
    quick_zoo: list[str], tmp_path: Path, damage: str
) -> None:
    zoo.load("digits-mlp", progress=False)
    (path,) = tmp_path.glob("*.safetensors")
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-5] ^= 0xFF  # inside the last tensor's data: only the checksum can tell
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw = bytearray(b"not a safetensors file")
    path.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="retraining zoo:digits-mlp"):
        model = zoo.load("digits-mlp", progress=False)
    assert len(quick_zoo) == 2
    assert cache.load(path).keys() == model.state_dict().keys()


def test_unwritable_cache_warns_and_still_returns_the_model(
    quick_zoo: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(cache.CACHE_ENV, str(blocker))
    with pytest.warns(RuntimeWarning, match="could not cache zoo:digits-mlp"):
        model = zoo.load("digits-mlp", progress=False)
    assert model(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    assert quick_zoo == ["train zoo:digits-mlp"]


def test_cache_key_names_model_seed_code_and_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cache.CACHE_ENV, "/somewhere")
    path = cache.cache_path("digits-cnn", 3)
    major_minor = ".".join(torch.__version__.split(".")[:2])
    assert path == Path(
        f"/somewhere/digits-cnn-seed3-{cache.code_hash()}-torch{major_minor}.safetensors"
    )


def test_short_seeded_training_beats_chance_and_repeats(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = catalog.MODELS["digits-mlp"]
    quick = dataclasses.replace(entry, plan=dataclasses.replace(entry.plan, epochs=1))
    monkeypatch.setitem(catalog.MODELS, "digits-mlp", quick)
    a = catalog.train_from_scratch("digits-mlp", seed=0, progress=False)
    b = catalog.train_from_scratch("digits-mlp", seed=0, progress=False)
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name
    assert accuracy(a, zoo.data("digits-mlp").test) > 0.6  # one epoch; chance is 0.1
