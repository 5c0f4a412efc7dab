"""Structural edits no module spec shows: applied, recorded, saved, replayed, refused."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from netshrink.artifact import load, save
from netshrink.artifact.validate import checksum
from netshrink.errors import ArtifactError, TargetError
from netshrink.layers.edits import apply_edit, edit_kind, recorded_edits


@edit_kind("test.keep_first")
def _keep_first(model: nn.Module, args: dict[str, Any]) -> None:
    """Keep the first ``count`` children of the Sequential at ``module``."""
    seq = model.get_submodule(args["module"])
    count = args["count"]
    if not isinstance(seq, nn.Sequential) or not 0 < count <= len(seq):
        raise TargetError(f"cannot keep {count} of {args['module']}")
    for index in range(len(seq) - 1, count - 1, -1):
        del seq[index]


def stack() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)]))


def test_edit_is_applied_recorded_and_not_shared_with_copies() -> None:
    model = stack()
    before = copy.deepcopy(model)
    apply_edit(model, "test.keep_first", module="1", count=1)
    assert len(model[1]) == 1
    edit = {"kind": "test.keep_first", "args": {"module": "1", "count": 1}}
    assert recorded_edits(model) == [edit]
    assert recorded_edits(before) == []


def test_saved_edits_replay_on_a_fresh_model(tmp_path: Path) -> None:
    model = stack()
    apply_edit(model, "test.keep_first", module="1", count=2)
    x = torch.randn(3, 4)
    loaded = load(save(model, tmp_path / "a"), model=stack())
    assert len(loaded[1]) == 2
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    assert recorded_edits(loaded) == recorded_edits(model)  # saving it again keeps the edits


@pytest.mark.parametrize(
    "edits",
    [
        "drop",
        [{"kind": "no.such.edit", "args": {}}],
        [{"kind": "test.keep_first", "args": {"module": "1", "count": 9}}],
        [{"kind": "test.keep_first", "args": {"module": "nowhere", "count": 1}}],
        [{"kind": "test.keep_first"}],
    ],
)
def test_bad_edits_in_a_manifest_are_artifact_errors(tmp_path: Path, edits: object) -> None:
    folder = save(stack(), tmp_path / "a")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["edits"] = edits
    manifest["checksum"] = checksum(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="edit"):
        load(folder, model=stack())


def test_unknown_kind_and_non_json_arguments_are_refused() -> None:
    with pytest.raises(TargetError, match="no structural edit"):
        apply_edit(stack(), "no.such.edit")
    with pytest.raises(TargetError, match="JSON"):
        apply_edit(stack(), "test.keep_first", module="1", count=torch.tensor(1))
