"""The chain benchmark's stage-prefix machinery (benchmarks/chain.py) on a tiny random BERT:
every stage's model is kept, physically smaller than the one before, saved, and reloaded
unchanged by a second run instead of being trained again. No timing is asserted."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import hf_fixtures
from netshrink import hf
from netshrink.hf.blocks import find_attention, find_ffn
from netshrink.recipe.runner import as_recipe, make_context

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import chain  # benchmarks/ is not a package: imported from its folder

RECIPE = {
    "version": 1,
    "stages": [
        {"prune.heads": {"ratio": 0.5, "criterion": "l2"}},
        {"prune.ffn": {"ratio": 0.5, "criterion": "l2", "finetune": {"epochs": 1}}},
    ],
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple:
    folder = hf_fixtures.model_dir(tmp_path_factory.mktemp("bert"), "bert")
    model = hf.load_model(f"hf:{folder}")
    tokenizer = hf.load_tokenizer(f"hf:{folder}")
    data = hf.texts_data(hf.stdlib_corpus(40), None, tokenizer, "stdlib", 32, 8)
    ctx = make_context(
        {
            "train_data": data.train[:2],
            "calib_data": data.calib,
            "example_inputs": data.calib[0][0],
            "teacher": model,
            "progress": False,
        }
    )
    return model, ctx, data.test[0][0]


def widths(model: torch.nn.Module) -> list[tuple[int, int]]:
    """(attention heads, FFN neurons) of every transformer block."""
    ffn = [f.size for f in find_ffn(model)]
    return [(a.heads, n) for a, n in zip(find_attention(model), ffn, strict=True)]


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_each_prefix_is_kept_smaller_than_the_one_before(setup, tmp_path: Path) -> None:
    model, ctx, _ = setup
    prefixes = chain.stage_prefixes(model, RECIPE, ctx, tmp_path, salt="test")
    assert [p.label for p in prefixes] == ["fp32", "+ prune.heads", "+ prune.ffn"]
    assert [p.parent for p in prefixes] == [None, prefixes[0].key, prefixes[1].key]
    assert widths(prefixes[0].model) == [(2, 64), (2, 64)]
    assert widths(prefixes[1].model) == [(1, 64), (1, 64)]
    assert widths(prefixes[2].model) == [(1, 32), (1, 32)]
    sizes = [params(p.model) for p in prefixes]
    assert sizes[0] > sizes[1] > sizes[2]
    assert prefixes[0].model is model  # the baseline itself, untouched
    assert sizes[0] == params(model)
    for p in prefixes[1:]:
        assert (p.folder / "artifact" / "manifest.json").is_file()
        record = json.loads((p.folder / "stage.json").read_text())
        assert record["seconds"] == p.seconds > 0


def test_a_second_run_reloads_the_saved_stages(setup, tmp_path: Path) -> None:
    model, ctx, inputs = setup
    first = chain.stage_prefixes(model, RECIPE, ctx, tmp_path, salt="test")
    again = chain.stage_prefixes(model, RECIPE, ctx, tmp_path, salt="test")
    assert [p.key for p in again] == [p.key for p in first]
    assert [p.seconds for p in again] == [p.seconds for p in first]  # read back, not retrained
    with torch.no_grad():
        for a, b in zip(first[1:], again[1:], strict=True):
            assert a.model is not b.model
            torch.testing.assert_close(b.model(**inputs), a.model(**inputs), rtol=0, atol=1e-6)
    other = chain.stage_prefixes(model, RECIPE, ctx, tmp_path, salt="other data")
    assert {p.key for p in other[1:]}.isdisjoint(p.key for p in first)


def test_recipes_sharing_stages_share_their_keys(setup, tmp_path: Path) -> None:
    model, ctx, _ = setup
    shorter = {"version": 1, "stages": RECIPE["stages"][:1]}
    one = chain.stage_prefixes(model, shorter, ctx, tmp_path)
    two = chain.stage_prefixes(model, RECIPE, ctx, tmp_path)
    assert [p.key for p in one] == [p.key for p in two[:2]]


def test_the_openvino_variant_shares_every_stage_but_the_int8_ending() -> None:
    # the benchmark compares the two endings on one pruned model: the stages before must match
    shrink, ov = (as_recipe(name).resolved()["stages"] for name in chain.RECIPES)
    assert ov[:-2] == shrink[:-1]
    assert [next(iter(s)) for s in ov[-2:]] == ["quantize.smoothquant", "quantize.static"]
    assert next(iter(shrink[-1])) == "quantize.dynamic"


def test_stage_contributions_multiply_to_the_total() -> None:
    model = torch.nn.Linear(2, 2)
    keys = ["fp32", "depth", "int8"]
    prefixes = [
        chain.Prefix(k, k, keys[i - 1] if i else None, model, Path(), stages=i)
        for i, k in enumerate(keys)
    ]
    ms = {"eager": [120.0, 60.0, 30.0], "onnxruntime": [100.0, 40.0, 25.0]}
    ms["openvino"] = [48.0, 24.0, 10.0]
    rows = [
        chain.Row(chain.Variant(p, rt, None, 1), ms[rt][p.stages], 1.0, 1.0)
        for p in prefixes
        for rt in chain.RUNTIMES
    ]
    table = chain.contributions(rows, {"r": prefixes}).splitlines()
    assert table[0] == "| r on | runtime (fp32) | depth | int8 | total vs fp32 eager |"
    assert table[2] == "| eager | 1.00x | 2.00x | 2.00x | **4.00x** |"
    assert table[3] == "| onnxruntime | 1.20x | 2.50x | 1.60x | **4.80x** |"
    assert table[4] == "| openvino | 2.50x | 2.00x | 2.40x | **12.00x** |"
