"""prune.layers and the hf.drop_layers edit on tiny random-init transformers: layer counts and
config in sync, outputs equal to running the kept layers of the original, save -> load, errors."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

import hf_fixtures as fx
import netshrink as ns
from netshrink.artifact.validate import checksum
from netshrink.errors import (
    ArtifactError,
    ConfigError,
    MissingInputError,
    TargetError,
    UnsupportedModuleError,
)
from netshrink.hf.depth import drop_layers, layer_stacks
from netshrink.layers.edits import apply_edit, recorded_edits
from netshrink.prune.layers import block_influence, most_influential, spread

ATOL = 1e-5
"""Dropping layers moves no weight and changes no op: outputs agree to float32 round-off."""


def encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 4, enable_nested_tensor=False).eval()


def vit() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=8,
        patch_size=4,
        num_channels=1,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
    )
    return transformers.ViTModel(config, add_pooling_layer=False).eval()


def hf(kind: str, layers: int = 3) -> Callable[[], nn.Module]:
    """A tiny hf_fixtures model of ``kind`` with ``layers`` layers per stack."""

    def make() -> nn.Module:
        model = fx.build(kind)
        config = copy.deepcopy(model.config)
        config.num_hidden_layers = layers
        if kind == "t5-encoder":
            config.num_decoder_layers = layers
        torch.manual_seed(0)
        return type(model)(config).eval()

    return make


def ids() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return {
        "input_ids": torch.randint(5, fx.VOCAB_SIZE, (3, 7), generator=g),
        "attention_mask": mask,
    }


def seeded(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


# name: (build, inputs, path of the layer list, config attribute of the count)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], Any], str, str | None]] = {
    "bert": (hf("bert"), ids, "encoder.layer", "num_hidden_layers"),
    "distilbert": (hf("distilbert-mlm"), ids, "distilbert.transformer.layer", "n_layers"),
    "gpt2": (hf("gpt2"), ids, "transformer.h", "n_layer"),
    "t5_encoder": (hf("t5-encoder"), ids, "encoder.block", "num_layers"),
    "vit": (vit, lambda: {"pixel_values": seeded(2, 1, 8, 8)}, "layers", None),
    "torch_encoder": (encoder, lambda: (seeded(2, 5, 16),), "layers", None),
}


def run(model: nn.Module, inputs: Any) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out if torch.is_tensor(out) else out[0]


def only_kept(model: nn.Module, path: str, keep: list[int]) -> nn.Module:
    """The original with its layer list replaced by the kept layers, nothing else changed."""
    ref = copy.deepcopy(model)
    parent, _, name = path.rpartition(".")
    layers = ref.get_submodule(path)
    setattr(ref.get_submodule(parent), name, nn.ModuleList([layers[i] for i in keep]))
    return ref


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(MODELS))
def test_dropping_layers_runs_the_kept_layers_and_keeps_counts_in_sync(name: str, tmp_path: Path):
    build, inputs, path, count = MODELS[name]
    model = build()
    assert path in layer_stacks(model)
    keep = [0, 2] if name != "torch_encoder" else [1, 3]
    ref = only_kept(model, path, keep)
    drop_layers(model, path, keep)
    assert len(model.get_submodule(path)) == 2
    if count is not None:
        assert getattr(model.config, count) == 2 and model.config.num_hidden_layers == 2
    if name == "vit":
        assert model.config.num_hidden_layers == 2
    if name == "torch_encoder":
        assert model.num_layers == 2
    for j, layer in enumerate(model.get_submodule(path)):
        assert all(m.layer_idx == j for m in layer.modules() if hasattr(m, "layer_idx"))
    torch.testing.assert_close(run(model, inputs()), run(ref, inputs()), rtol=0, atol=ATOL)
    assert recorded_edits(model) == [
        {"kind": "hf.drop_layers", "args": {"module": path, "keep": keep}}
    ]
    loaded = ns.load(ns.save(model, tmp_path / "a"), model=build())
    assert len(loaded.get_submodule(path)) == 2
    torch.testing.assert_close(run(loaded, inputs()), run(model, inputs()), rtol=0, atol=0)


@pytest.mark.usefixtures("one_thread")
def test_t5_first_block_dropped_hands_its_position_bias_to_the_new_first_block() -> None:
    model = hf("t5-encoder")()
    table = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight.clone()
    ref = only_kept(model, "encoder.block", [1, 2])
    attention = ref.encoder.block[0].layer[0].SelfAttention
    attention.relative_attention_bias = (
        model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
    )
    attention.has_relative_attention_bias = True
    drop_layers(model, "encoder.block", [1, 2])
    first = model.encoder.block[0].layer[0].SelfAttention
    assert first.has_relative_attention_bias and torch.equal(
        first.relative_attention_bias.weight, table
    )
    assert model.config.num_layers == model.encoder.config.num_layers == 2
    torch.testing.assert_close(run(model, ids()), run(ref, ids()), rtol=0, atol=ATOL)


def test_t5_decoder_count_is_the_outer_configs_num_decoder_layers() -> None:
    model = fx.build("t5")
    drop_layers(model, "decoder.block", [1])
    assert model.config.num_decoder_layers == model.decoder.config.num_layers == 1
    assert model.config.num_layers == model.encoder.config.num_layers == 2


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ({"module": "encoder.layer", "keep": []}, "keep must list"),
        ({"module": "encoder.layer", "keep": [1, 0]}, "ascending"),
        ({"module": "encoder.layer", "keep": [0, 2]}, "ascending"),
        ({"module": "encoder.layer", "keep": [0.0]}, "keep must list"),
        ({"module": "encoder.nowhere", "keep": [0]}, "no module"),
        ({"module": "encoder", "keep": [0]}, "not the nn.ModuleList"),
        ({"module": "encoder.layer", "keep": [0], "extra": 1}, "exactly"),
    ],
)
def test_bad_edit_arguments_are_refused_before_the_model_changes(args: dict, match: str) -> None:
    model = fx.build("bert")
    with pytest.raises(TargetError, match=match):
        apply_edit(model, "hf.drop_layers", **args)
    assert len(model.encoder.layer) == 2 and model.config.num_hidden_layers == 2


def test_an_artifact_whose_edit_does_not_fit_is_an_artifact_error(tmp_path: Path) -> None:
    model = hf("bert")()
    drop_layers(model, "encoder.layer", [0, 2])
    folder = ns.save(model, tmp_path / "a")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["edits"][0]["args"]["keep"] = [0, 5]
    manifest["checksum"] = checksum(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=r"hf\.drop_layers"):
        ns.load(folder, model=hf("bert")())


def test_spread_and_importance_choose_layers() -> None:
    assert spread(6, 3) == [0, 2, 5] and spread(12, 4) == [0, 4, 7, 11] and spread(4, 1) == [3]
    assert most_influential([0.3, 0.1, 0.5, 0.2], 2) == [0, 2]
    assert most_influential([0.1, 0.1, 0.1], 2) == [0, 1]


@pytest.mark.usefixtures("one_thread")
def test_block_influence_is_one_minus_the_cosine_of_input_and_output() -> None:
    model = encoder()
    x = torch.randn(2, 5, 16)
    states = [x]
    with torch.no_grad():
        for layer in model.layers:
            states.append(layer(states[-1]))
    expected = [
        1 - float(torch.cosine_similarity(a, b, dim=-1).mean())
        for a, b in itertools.pairwise(states)
    ]
    got = block_influence(model, ["layers"], [((x,), None)])["layers"]
    assert got == pytest.approx(expected, abs=1e-5)


@pytest.mark.usefixtures("one_thread")
def test_prune_layers_importance_drops_the_least_influential_layer(tmp_path: Path) -> None:
    model = encoder()
    with torch.no_grad():  # layer 2 becomes (almost) the identity: its residual branches vanish
        model.layers[2].linear2.weight.zero_()
        model.layers[2].self_attn.out_proj.weight.mul_(1e-3)
    x = torch.randn(2, 5, 16)
    out = ns.prune.layers(model, count=1, calib_data=[((x,), None)], example_inputs=(x,))
    assert recorded_edits(out)[0]["args"]["keep"] == [0, 1, 3]
    assert out.num_layers == 3 and len(model.layers) == 4  # the caller's model is untouched
    spread_out = ns.prune.layers(model, ratio=0.5, criterion="spread", example_inputs=(x,))
    assert recorded_edits(spread_out)[0]["args"]["keep"] == [0, 3]


@pytest.mark.usefixtures("one_thread")
def test_prune_layers_with_finetune_recovers_on_labels() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(encoder(), nn.Flatten(), nn.Linear(5 * 16, 3))
    data = [((torch.randn(8, 5, 16),), torch.randint(0, 3, (8,))) for _ in range(4)]
    pruned = ns.prune.layers(model, count=2, criterion="spread", progress=False)
    tuned = ns.prune.layers(
        model,
        count=2,
        criterion="spread",
        finetune={"epochs": 3, "lr": 0.01},
        train_data=data,
        progress=False,
    )
    loss = nn.functional.cross_entropy

    def total(m: nn.Module) -> float:
        with torch.no_grad():
            return sum(float(loss(m(*x), y)) for x, y in data)

    assert total(tuned) < total(pruned)
    assert tuned[0].num_layers == 2


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"count": 4, "criterion": "spread"}, ConfigError, "leaves none"),
        ({"ratio": 0.1, "criterion": "spread"}, ConfigError, "rounds to 0"),
        ({"ratio": 0.5, "count": 1}, ConfigError, "not both"),
        ({"criterion": "magnitude"}, ConfigError, "criterion"),
        ({"count": 1}, MissingInputError, "calib_data"),
    ],
)
def test_bad_options_are_clear_errors(options: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        ns.prune.layers(encoder(), **options)


def test_models_without_transformer_layers_are_refused() -> None:
    with pytest.raises(UnsupportedModuleError, match="no transformers model"):
        ns.prune.layers(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), criterion="spread")
