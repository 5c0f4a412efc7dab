"""Hostile artifacts: every one is an ArtifactError, decided before any large allocation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from netshrink.artifact import load, save
from netshrink.artifact.validate import MAX_INPUT_ELEMENTS, check_input_specs, checksum
from netshrink.errors import ArtifactError


def small() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def sparse() -> nn.Module:
    model = small()
    with torch.no_grad():
        model[0].weight[:, 1:] = 0  # 87.5% zeros: stored as a bitmask
    return model


def edit(folder: Path, change: Callable[[dict], None], reseal: bool = True) -> None:
    """Change the manifest; ``reseal`` recomputes its checksum (a crafted, not a damaged, file)."""
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    if reseal:
        manifest["checksum"] = checksum(manifest)
    path.write_text(json.dumps(manifest))


def set_in(*keys: str, value: object) -> Callable[[dict], None]:
    def change(manifest: dict) -> None:
        node = manifest
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return change


CRAFTED = [
    (
        set_in(
            "modules",
            "0",
            value={
                "type": "torch.nn.Linear",
                "args": {"in_features": 20000, "out_features": 20000},
            },
        ),
        "do not match",
    ),
    (
        set_in(
            "modules",
            "0",
            value={"type": "torch.nn.Linear", "args": {"in_features": -1, "out_features": 3}},
        ),
        "cannot be built",
    ),
    (set_in("tensors", "0.weight", "shape", value=[1_000_000, 1_000_000]), "machine's"),
    (set_in("tensors", "0.weight", "shape", value=[1000, 1000]), "do not match"),
    (set_in("tensors", "0.weight", "dtype", value="float64"), "holds something else"),
    (set_in("tensors", "0.weight", "shape", value=[-8, 16]), "malformed"),
    (set_in("tensors", "0.weight", "shape", value=[8, True]), "malformed"),
    (set_in("tensors", "0.weight", "dtype", value="os.system"), "malformed"),
    (set_in("tensors", "0.weight", "encoding", value="pickle"), "malformed"),
    (set_in("tensors", "0.weight", value=[1, 2]), "malformed"),
    (set_in("tensors", value=[]), "must be (a )?mapping"),
    (set_in("modules", value="x"), "must be (a )?mapping"),
    (set_in("aliases", "2.weight", value="nowhere"), "names no stored tensor"),
    (
        set_in("tensors", "ghost", value={"dtype": "float32", "shape": [4], "encoding": "dense"}),
        "lacks 'ghost'",
    ),
]


@pytest.mark.parametrize(("change", "message"), CRAFTED)
def test_crafted_manifests_are_refused(tmp_path: Path, change, message: str) -> None:
    save(small(), tmp_path / "a")
    edit(tmp_path / "a", change)
    with pytest.raises(ArtifactError, match=message):
        load(tmp_path / "a", model=small())


def test_a_trillion_element_bitmask_is_refused_before_decoding(tmp_path: Path) -> None:
    save(sparse(), tmp_path / "a")
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["tensors"]["0.weight"]["encoding"] == "bitmask"
    edit(tmp_path / "a", set_in("tensors", "0.weight", "shape", value=[1_000_000, 1_000_000]))
    with pytest.raises(ArtifactError, match="more than this machine's"):
        load(tmp_path / "a", model=small())


def test_checksum_covers_the_manifest(tmp_path: Path) -> None:
    save(small(), tmp_path / "a")
    edit(tmp_path / "a", set_in("extra", value={"recipe": "another"}), reseal=False)
    with pytest.raises(ArtifactError, match="does not match its checksum"):
        load(tmp_path / "a", model=small())


def test_a_symlinked_tensor_file_is_refused(tmp_path: Path) -> None:
    save(small(), tmp_path / "a")
    save(small(), tmp_path / "elsewhere")
    (tmp_path / "a" / "model.safetensors").unlink()
    (tmp_path / "a" / "model.safetensors").symlink_to(tmp_path / "elsewhere" / "model.safetensors")
    with pytest.raises(ArtifactError, match="symbolic link"):
        load(tmp_path / "a", model=small())


def test_a_fifo_manifest_is_refused_without_opening_it(tmp_path: Path) -> None:
    save(small(), tmp_path / "a")
    (tmp_path / "a" / "manifest.json").unlink()
    os.mkfifo(tmp_path / "a" / "manifest.json")  # opening it would block forever
    with pytest.raises(ArtifactError, match="not a regular file"):
        load(tmp_path / "a", model=small())


def test_oversized_and_deeply_nested_manifests(tmp_path: Path) -> None:
    save(small(), tmp_path / "a")
    (tmp_path / "a" / "manifest.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ArtifactError, match="corrupt"):
        load(tmp_path / "a", model=small())
    with (tmp_path / "a" / "manifest.json").open("wb") as f:
        f.truncate(64 * 2**20)
    with pytest.raises(ArtifactError, match="a manifest holds at most"):
        load(tmp_path / "a", model=small())


def test_a_corrupt_safetensors_header_is_refused(tmp_path: Path) -> None:
    save(small(), tmp_path / "a")
    path = tmp_path / "a" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[:8] = (2**62).to_bytes(8, "little")  # header length far beyond the file
    path.write_bytes(bytes(data))
    edit(tmp_path / "a", set_in("sha256", value=__import__("hashlib").sha256(data).hexdigest()))
    with pytest.raises(ArtifactError, match="header"):
        load(tmp_path / "a", model=small())


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        ([{"shape": [200_000, 200_000], "dtype": "float32"}], f"more than {MAX_INPUT_ELEMENTS}"),
        ([{"shape": [2, -3], "dtype": "float32"}], "malformed"),
        ([{"shape": [2, 3], "dtype": "Tensor"}], "malformed"),
        ("zeros", "malformed"),
    ],
)
def test_recorded_inputs_are_bounded(specs: object, message: str) -> None:
    with pytest.raises(ArtifactError, match=message):
        check_input_specs(specs)
    check_input_specs([{"shape": [64, 1, 8, 8], "dtype": "float32"}])


HUGE = """
import json, re, sys
import torch
from torch import nn
from netshrink.artifact import load, save
from netshrink.artifact.validate import checksum
from netshrink.errors import ArtifactError
folder = sys.argv[1]
save(nn.Sequential(nn.Linear(8, 16)), folder)
path = folder + "/manifest.json"
m = json.load(open(path))
args = {"in_features": 20000, "out_features": 20000}
m["modules"]["0"] = {"type": "torch.nn.Linear", "args": args}
m["tensors"]["0.weight"]["shape"] = [20000, 20000]
m["checksum"] = checksum(m)
json.dump(m, open(path, "w"))
try:
    load(folder, model=nn.Sequential(nn.Linear(8, 16)))
except ArtifactError as exc:
    print("refused:", exc)
# VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child forked from a big pytest worker
# starts at the worker's size (1025 MB measured under xdist for a 356 MB process)
status = open("/proc/self/status").read()
print("peak_mb", int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) // 1024)
"""


def test_a_declared_20000_square_layer_is_refused_within_a_gigabyte(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    done = subprocess.run(
        [sys.executable, "-c", HUGE, str(tmp_path / "a")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert "refused:" in done.stdout, done.stdout + done.stderr
    peak = int(done.stdout.split("peak_mb")[1])
    assert peak < 1024, done.stdout
