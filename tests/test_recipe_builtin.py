"""Every shipped recipe validates against the registry and runs: on a tiny CNN, or (those made
for transformers' blocks) on a tiny random-init BERT with text."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from torch import nn

import hf_fixtures
from netshrink import hf
from netshrink.context import Context
from netshrink.recipe import DEFAULT, compress, load, names
from netshrink.recipe.runner import warn_static_transformer
from netshrink.settings import Timing

EXPECTED = {"int8", "prune-int8", "distill-prune-int8", "lowrank-int8", "sparse90-int8", "int4-qat"}
EXPECTED |= {"transformer-int8"}  # runs on a CNN too: quantize.dynamic takes its Linear head
TRANSFORMER_ONLY = {"transformer-shrink", "transformer-shrink-ov"}  # depth, heads and FFN
NAMES_FFN_OUTPUTS = {"transformer-int8-ov"}  # names the FFN output projections of transformers


class TinyCNN(nn.Module):
    """Conv-BN-ReLU twice, a residual add, global pooling and a Linear head; input (N, 1, 8, 8).
    64 channels: the demo recipe's half-width student keeps 32, of which `round_to: 8` still
    lets prune.channels remove some (24 kept)."""

    def __init__(self, c: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c))
        self.head = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        return self.head(h.mean(dim=(2, 3)))


def batches(seed: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 1, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen))
        for _ in range(count)
    ]


def test_the_expected_recipes_ship_and_the_demo_default_is_one() -> None:
    assert set(names()) == EXPECTED | TRANSFORMER_ONLY | NAMES_FFN_OUTPUTS and DEFAULT in EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_recipe_validates_and_runs_on_a_tiny_cnn(name: str) -> None:
    recipe = load(name)
    assert recipe.stages and recipe.description
    torch.manual_seed(0)
    model = TinyCNN().eval()
    x = batches(9, 1)[0][0]
    result = compress(
        model,
        recipe,
        example_inputs=(x,),
        calib_data=batches(1, 2),
        train_data=batches(2, 2),
        val_data=batches(3, 1),
        progress=False,
    )
    assert [s.status for s in result.report.stages] == ["applied"] * len(recipe.stages)
    assert result.model(x).shape == (16, 10)
    assert result.report.summary()["compressed_bytes"] > 0


@pytest.mark.parametrize("name", sorted(TRANSFORMER_ONLY))
def test_transformer_recipe_runs_on_a_tiny_bert_and_shrinks_it(name: str, tmp_path) -> None:
    ref = f"hf:{hf_fixtures.model_dir(tmp_path, 'bert-4x4')}"
    model = hf.load_model(ref)
    data = hf.data_for(model, None)
    result = compress(
        model,
        load(name),
        example_inputs=data.example_inputs(),
        calib_data=data.calib[:2],
        train_data=data.train[:4],
        val_data=data.val[:2],
        evaluate=hf.evaluate_for(model, data),
        timing=Timing(warmup=0),
        progress=False,
    )
    assert [s.status for s in result.report.stages] == ["applied"] * len(load(name).stages)
    layers = model.model.encoder.layer
    shrunk = result.model.model.encoder.layer
    assert len(shrunk) == len(layers) // 2
    heads = layers[0].attention.self.num_attention_heads
    assert all(block.attention.self.num_attention_heads < heads for block in shrunk)
    assert 0.0 < result.report.summary()["metric_after"] <= 1.0


def test_transformer_int8_ov_leaves_the_first_ffn_outputs_dynamic_and_int8_attention(
    tmp_path,
) -> None:
    model = hf.load_model(f"hf:{hf_fixtures.model_dir(tmp_path, 'bert-4x4')}")
    ctx = Context(calib_data=hf.data_for(model, None).calib[:2], progress=False)
    smooth, static = load("transformer-int8-ov").stages
    # the recipe's stages as compress runs them (alpha fixed: the search is slow, not tested)
    out = smooth.technique.apply(model, smooth.config.model_copy(update={"alpha": 0.5}), ctx)
    out = static.technique.apply(out, static.config, ctx)
    kinds = {n: type(m).__name__ for n, m in out.named_modules() if n.startswith("model.encoder")}
    kinds = {n: k for n, k in kinds.items() if k in ("DynamicInt8Linear", "QuantLinear")}
    dynamic = {n for n, k in kinds.items() if k == "DynamicInt8Linear"}
    layers = len(model.model.encoder.layer)
    assert dynamic == {f"model.encoder.layer.{i}.output.dense" for i in range(min(3, layers))}
    assert len(kinds) == 6 * layers  # Q, K, V, attention output, FFN in and out
    signed = {n for n, m in out.named_modules() if getattr(m, "signed_output", False)}
    block = "model.encoder.layer.{}.attention.self.{}"
    assert signed == {block.format(i, p) for i in range(layers) for p in ("query", "key")}


@pytest.mark.parametrize(
    ("kind", "ffn_out"),
    [
        ("bert", "encoder.layer.{}.output.dense"),
        ("distilbert-mlm", "distilbert.transformer.layer.{}.ffn.lin2"),
        ("gpt2", "transformer.h.{}.mlp.c_proj"),
        ("t5-encoder", "encoder.block.{}.layer.1.DenseReluDense.wo"),
    ],
)
def test_transformer_int8_ov_names_the_ffn_outputs_of_each_architecture(
    kind: str, ffn_out: str
) -> None:
    model = hf_fixtures.build(kind)
    static = load("transformer-int8-ov").stages[1]
    chosen = static.config.dynamic.select(model, (nn.Linear, transformers.Conv1D))
    assert set(chosen) == {ffn_out.format(i) for i in range(2)}  # the fixtures have 2 layers


def test_static_int8_of_a_transformer_without_smoothquant_warns_and_names_the_recipes(
    tmp_path,
) -> None:
    model = hf.load_model(f"hf:{hf_fixtures.model_dir(tmp_path, 'bert-4x4')}")
    with pytest.warns(UserWarning, match=r"stage 0 \(quantize.static\).*transformer-int8-ov"):
        warn_static_transformer(load("int8"), model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_static_transformer(load("transformer-int8-ov"), model)  # SmoothQuant first
        warn_static_transformer(load("transformer-int8"), model)  # dynamic
        warn_static_transformer(load("int8"), TinyCNN())  # not a transformer
