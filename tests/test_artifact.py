"""Artifact save/load: round trips, structure replay, packed sparsity, corrupt files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from netshrink.artifact import artifact_bytes, load, read_manifest, save
from netshrink.artifact.codec import decode, encode
from netshrink.artifact.modules import rebuildable
from netshrink.errors import ArtifactError


class Net(nn.Module):
    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.bn = nn.BatchNorm2d(width)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


@rebuildable
class Scaled(nn.Module):
    """A layer of our own: y = x @ w.T * scale, with int8 weights."""

    def __init__(self, n: int, m: int) -> None:
        super().__init__()
        self.register_buffer("w", torch.zeros(m, n, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(()))

    def spec(self) -> dict:
        return {"n": self.w.shape[1], "m": self.w.shape[0]}

    @classmethod
    def from_spec(cls, spec: dict) -> Scaled:
        return cls(spec["n"], spec["m"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.float().T * self.scale


def trained(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
        if hasattr(model, "bn"):
            model.bn.running_mean.uniform_(-1, 1)
            model.bn.running_var.uniform_(0.5, 2)
    return model.eval()


X = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))


def test_round_trip_identical_outputs(tmp_path):
    model = trained(Net())
    save(model, tmp_path / "a")
    loaded = load(tmp_path / "a", model=Net())
    assert torch.equal(loaded(X), model(X))


def test_structure_replay_restores_pruned_shapes(tmp_path):
    model = trained(Net())
    # Shrink conv/bn/fc by hand as structured pruning would: keep 5 of 16 channels.
    keep = torch.tensor([0, 3, 4, 9, 15])
    conv, bn, fc = model.conv, model.bn, model.fc
    model.conv = nn.Conv2d(1, 5, 3, padding=1)
    model.bn = nn.BatchNorm2d(5)
    model.fc = nn.Linear(5, 10)
    with torch.no_grad():
        model.conv.weight.copy_(conv.weight[keep])
        model.conv.bias.copy_(conv.bias[keep])
        for attr in ("weight", "bias", "running_mean", "running_var"):
            getattr(model.bn, attr).copy_(getattr(bn, attr)[keep])
        model.fc.weight.copy_(fc.weight[:, keep])
        model.fc.bias.copy_(fc.bias)
    model.eval()
    save(model, tmp_path / "p")
    loaded = load(tmp_path / "p", model=Net())
    assert loaded.conv.weight.shape == (5, 1, 3, 3)
    assert loaded.fc.in_features == 5
    assert torch.equal(loaded(X), model(X))


def test_own_layer_replaces_linear_and_keeps_int8(tmp_path):
    model = trained(Net())
    q = Scaled(16, 10)
    q.w.copy_(torch.randint(-127, 128, (10, 16), dtype=torch.int8))
    q.scale.fill_(0.01)
    model.fc = q
    save(model, tmp_path / "q")
    manifest = read_manifest(tmp_path / "q")
    assert manifest["modules"]["fc"]["type"] == "netshrink:Scaled"
    assert manifest["tensors"]["fc.w"]["dtype"] == "int8"
    loaded = load(tmp_path / "q", model=Net())
    assert isinstance(loaded.fc, Scaled)
    assert loaded.fc.w.dtype == torch.int8
    assert torch.equal(loaded(X), model(X))


def test_sparse_tensor_is_stored_packed(tmp_path):
    dense, sparse = nn.Linear(512, 512, bias=False), nn.Linear(512, 512, bias=False)
    with torch.no_grad():
        w = torch.randn(512, 512)
        dense.weight.copy_(w)
        cut = w.abs().flatten().kthvalue(int(0.9 * w.numel())).values
        sparse.weight.copy_(torch.where(w.abs() > cut, w, 0.0))
    save(dense, tmp_path / "d")
    save(sparse, tmp_path / "s")
    assert read_manifest(tmp_path / "s")["tensors"]["weight"]["encoding"] == "bitmask"
    ratio = artifact_bytes(tmp_path / "d") / artifact_bytes(tmp_path / "s")
    assert ratio >= 7.0, ratio
    assert torch.equal(
        load(tmp_path / "s", model=nn.Linear(512, 512, bias=False)).weight, sparse.weight
    )


def test_tied_weights_stored_once(tmp_path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(100, 32)
            self.head = nn.Linear(32, 100, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(ids))

    model = trained(Tied())
    save(model, tmp_path / "t")
    assert read_manifest(tmp_path / "t")["aliases"] == {"head.weight": "emb.weight"}
    loaded = load(tmp_path / "t", model=Tied())
    ids = torch.arange(10)[None]
    assert torch.equal(loaded(ids), model(ids))


def test_save_replaces_existing_artifact(tmp_path):
    save(trained(Net(8)), tmp_path / "a")
    model = trained(Net(16))
    save(model, tmp_path / "a")
    assert torch.equal(load(tmp_path / "a", model=Net(16))(X), model(X))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "manifest.json").unlink(), "no manifest.json"),
        (lambda d: (d / "manifest.json").write_text("{not json"), "corrupt or truncated"),
        (lambda d: (d / "manifest.json").write_text('{"format": "other"}'), "not a netshrink"),
        (lambda d: _edit_manifest(d, format_version=99), "upgrade netshrink"),
        (lambda d: _truncate(d / "model.safetensors"), "checksum"),
        (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
    ],
)
def test_damaged_artifacts_raise_clear_errors(tmp_path, damage, message):
    save(trained(Net()), tmp_path / "a")
    damage(tmp_path / "a")
    with pytest.raises(ArtifactError, match=message):
        load(tmp_path / "a", model=Net())


def _edit_manifest(d, **changes):
    manifest = json.loads((d / "manifest.json").read_text())
    manifest.update(changes)
    (d / "manifest.json").write_text(json.dumps(manifest))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_wrong_architecture_and_unknown_module_type(tmp_path):
    save(trained(Net()), tmp_path / "a")
    with pytest.raises(ArtifactError, match="does not fit"):
        load(tmp_path / "a", model=nn.Sequential(nn.Linear(3, 3)))
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    manifest["modules"]["fc"] = {"type": "os.system", "args": {}}
    (tmp_path / "a" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="does not know"):
        load(tmp_path / "a", model=Net())


def test_not_a_directory_and_no_model_for_foreign_architecture(tmp_path):
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        load(tmp_path / "missing")
    save(trained(Net()), tmp_path / "a")
    with pytest.raises(ArtifactError, match="pass model="):
        load(tmp_path / "a")


def test_unserialisable_extra_leaves_nothing_behind(tmp_path):
    with pytest.raises(ArtifactError, match="JSON"):
        save(trained(Net()), tmp_path / "a", manifest_extra={"bad": object()})
    assert list(tmp_path.iterdir()) == []


DTYPES = [torch.float32, torch.float16, torch.int8, torch.uint8, torch.int32]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 40),
    density=st.floats(0.0, 1.0),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**16),
)
def test_codec_round_trip_is_exact(rows, cols, density, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    values = (torch.randn(rows, cols, generator=g) * 50).to(dtype)
    keep = torch.rand(rows, cols, generator=g) < density
    t = torch.where(keep, values, torch.zeros((), dtype=dtype))
    parts, entry = encode("w", t)
    stored = sum(p.numel() * p.element_size() for p in parts.values())
    assert stored <= t.numel() * t.element_size()
    out = decode("w", entry, parts)
    assert out.dtype == t.dtype and torch.equal(out, t)


def test_codec_picks_csr_when_very_sparse():
    t = torch.zeros(256, 256)
    t[np.arange(256), np.arange(256)] = 1.0
    parts, entry = encode("w", t)
    assert entry["encoding"] == "csr"
    assert torch.equal(decode("w", entry, parts), t)


@pytest.mark.parametrize("name", ["digits-cnn", "digits-mlp", "digits-transformer"])
def test_every_zoo_model_round_trips_without_model_argument(tmp_path, name):
    from netshrink import zoo

    torch.manual_seed(0)
    model = zoo.build(name).eval()
    for module in model.modules():  # non-trivial running statistics, as after training
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    save(model, tmp_path / name)
    assert read_manifest(tmp_path / name)["architecture"] == f"zoo:{name}"
    loaded = load(tmp_path / name)
    (x,) = zoo.example_inputs(name, batch=3)
    assert torch.equal(loaded(x), model(x))
