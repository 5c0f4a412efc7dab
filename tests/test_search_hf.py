"""The search on a tiny random-init BERT (hidden size 32, 2 layers): what a probe costs, that it
measures what the whole-model technique would, that the model comes back unchanged, and that
``--target`` reports measured numbers and an unmet goal as such."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import hf_fixtures
from netshrink import hf, registry
from netshrink.cli import app
from netshrink.context import Context
from netshrink.search import Sensitivity, analyze, auto
from netshrink.search.auto import TRANSFORMER_LR
from netshrink.search.probe import Prober
from netshrink.search.sensitivity import apply_stage, stage_for, variant
from netshrink.targets import Targets

SETTINGS = {"prune": (0.5,), "quant": (4,), "lowrank": (0.5,)}
LAYERS = ["model.encoder.layer.0.attention.self.query", "model.encoder.layer.1.output.dense"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny BERT's folder, and 120 standard-library paragraphs a line (about 12 val texts)."""
    root = tmp_path_factory.mktemp("search-hf")
    (root / "texts.txt").write_text("\n".join(hf.stdlib_corpus(120)))
    return hf_fixtures.model_dir(root / "bert", "bert"), root / "texts.txt"


@pytest.fixture(scope="module")
def loaded(folders):
    bert, texts = folders
    model = hf.load_model(f"hf:{bert}")
    data = hf.text_data(texts, hf.load_tokenizer(f"hf:{bert}"), max_length=32, batch_size=4)
    return model, data, hf.metric_for("embedding", model, k=2)


def test_each_probe_runs_the_capped_data_once_and_the_model_comes_back_unchanged(loaded) -> None:
    model, data, evaluate = loaded
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls: list[int] = []
    model.register_forward_hook(lambda *_: calls.append(1))
    sens = analyze(
        model,
        example_inputs=data.example_inputs(),
        data=data.val,
        evaluate=evaluate,
        settings=SETTINGS,
        targets=Targets(include=LAYERS),
        samples=8,
        cache=False,
        progress=False,
    )
    probes = len(LAYERS) * 3
    assert len(sens.points) == probes and sens.samples == 8  # two whole batches of 4
    # the baseline's reference, its metric, the MACs pass, the pass finding unread layers
    # (one batch), then one pass per probe: no copy of the model runs a check forward, and the
    # metric's forwards give the output error
    assert len(calls) == (3 + probes) * 2 + 2
    assert all(p["error"] > 0 for p in sens.points)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # quantized after pruning or factorizing: fewer bytes than either alone
    for c in sens.combined:
        alone = next(p for p in sens.curve(c["layer"], c["family"]) if p["value"] == c["value"])
        assert c["bytes"] < alone["bytes"]


@pytest.mark.parametrize(("family", "value"), [("prune", 0.75), ("quant", 4), ("lowrank", 0.25)])
def test_a_layer_probed_alone_equals_the_technique_on_the_whole_model(loaded, family, value):
    model, data, _ = loaded
    stage = stage_for(family, value, [LAYERS[1]])
    ctx = Context(example_inputs=data.example_inputs(), seed=0, progress=False)
    prober = Prober(model, data.val[:2], None)
    whole = prober.probe(apply_stage(model, stage, ctx))
    with variant(model, LAYERS[1], stage, ctx) as (probed, changed):
        swapped = prober.probe(probed)
        assert probed is model and type(changed.get_submodule(LAYERS[1])) is not nn.Linear
    assert type(model.get_submodule(LAYERS[1])) is nn.Linear
    assert swapped.error == pytest.approx(whole.error, rel=1e-5)


def test_an_evaluate_that_copies_its_inputs_still_gets_the_right_output_error() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 3).eval()
    data = [(torch.randn(5, 4), None), (torch.randn(5, 4), None)]

    def copying(m: nn.Module, batches) -> float:
        return float(sum(m(x.clone()).sum() for x, _ in batches))

    noisy = nn.Linear(4, 3).eval()
    exact = Prober(model, data, None).probe(noisy).error
    prober = Prober(model, data, copying)
    found = prober.probe(noisy)
    assert found.error == pytest.approx(exact) and found.error > 0.1
    assert prober.forwards == 3  # reference, the metric's pass, the outputs computed again


def test_tied_parameters_and_data_needs_take_the_whole_model_path() -> None:
    from netshrink.search.sensitivity import detached

    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    ctx = Context(seed=0)
    assert detached(model, "0", stage_for("quant", 8, ["0"]), ctx)
    model[1].weight = model[0].weight
    assert not detached(model, "0", stage_for("quant", 8, ["0"]), ctx)
    aware = {"lowrank.svd": {"ratio": 0.5, "activation_aware": True, "targets": {"include": ["1"]}}}
    assert registry.get("lowrank.svd").needs(
        registry.get("lowrank.svd").make_config(aware["lowrank.svd"], stage="lowrank.svd")
    )
    assert not detached(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), "1", aware, ctx)


def test_an_unreachable_target_on_an_hf_model_is_reported_with_measured_numbers(
    folders, tmp_path: Path
) -> None:
    bert, texts = folders
    result = CliRunner().invoke(
        app,
        ["compress", "--target", "size=400x", "--model", f"hf:{bert}", "--data", f"text:{texts}",
         "--out", str(tmp_path / "out"), "--threads", "1", "--json"],
        env={"NETSHRINK_CACHE": str(tmp_path / "cache")},
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert "NOT met" in result.stderr and "< 400.00x needed" in result.stderr
    assert 1 < summary["compression_rate"] < 400
    pareto = (tmp_path / "out" / "pareto.md").read_text()
    assert "NOT met" in pareto and f"{summary['compression_rate']:.2f}x" in result.stderr
    # the pooler (mean pooling never reads it) is said to be left out, and no stage touches it
    unread = "1 layer left out, the output never reads them: model.pooler.dense"
    assert f"not searched: {unread}" in result.stderr and unread in pareto
    assert "model.pooler.dense" not in (tmp_path / "out" / "recipe.yaml").read_text()


def one_setting(loaded, family: str, value: float, layers: list[str]) -> Sensitivity:
    """The analysis of ``layers`` at one setting of one family, on 4 validation texts."""
    model, data, evaluate = loaded
    return analyze(
        model,
        example_inputs=data.example_inputs(),
        data=data.val,
        evaluate=evaluate,
        families=(family,),
        settings={family: (value,)},
        targets=Targets(include=layers),
        samples=4,
        cache=False,
        progress=False,
    )


def test_candidates_of_a_pretrained_transformer_fine_tune_at_a_transformer_rate(
    loaded, monkeypatch
) -> None:
    import sys
    from types import SimpleNamespace

    model, data, evaluate = loaded
    sens = one_setting(loaded, "prune", 0.5, LAYERS)
    recipes: list[dict] = []

    def run(_model, recipe, **_):
        recipes.append(recipe)
        summary = {"compression_rate": 1.0, "speedup_rate": 1.0, "latency_ms_after": 1.0}
        summary |= {"compressed_bytes": 1, "metric_after": 1.0, "metric_drop": 0.0}
        return SimpleNamespace(report=SimpleNamespace(summary=lambda: summary))

    monkeypatch.setattr(sys.modules["netshrink.search.auto"], "compress", run)
    items = {"example_inputs": data.example_inputs(), "val_data": data.val[:1]}
    items |= {"train_data": data.train[:1], "evaluate": evaluate, "sensitivity": sens}
    auto(model, "size=50x", rounds=1, progress=False, **items)
    auto(model, "size=50x", rounds=1, progress=False, finetune_lr=2e-4, **items)
    tuned = [
        options["finetune"]
        for recipe in recipes
        for stage in recipe["stages"]
        for options in stage.values()
        if "finetune" in options
    ]
    assert tuned == [{"epochs": 2, "lr": TRANSFORMER_LR}, {"epochs": 2, "lr": 2e-4}]
    assert 1e-5 <= TRANSFORMER_LR <= 1e-4


def test_a_layer_the_task_never_reads_is_left_out_of_the_analysis_with_a_note(loaded) -> None:
    pooler = "model.pooler.dense"  # BERT's pooler: mean pooling of the token states skips it
    assert isinstance(loaded[0].get_submodule(pooler), nn.Linear)
    sens = one_setting(loaded, "quant", 8, [pooler, LAYERS[1]])
    assert sens.unread == [pooler]
    assert list(sens.layers) == [LAYERS[1]] and {p["layer"] for p in sens.points} == {LAYERS[1]}
    assert f"left out, the output never reads them: {pooler}" in sens.headline()
