"""The stage runner on fake techniques: order, repetition, measurements, teacher, guard, seeds."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import recipe_fakes
from netshrink.artifact import artifact_bytes, read_manifest
from netshrink.layers import CompressedLayer
from netshrink.metrics import accuracy
from netshrink.recipe import compress, loads, save_run
from netshrink.recipe.meter import layer_info
from netshrink.report.record import SUMMARY_FIELDS


@pytest.fixture(scope="module", autouse=True)
def fakes():
    with recipe_fakes.registered():
        yield


@pytest.fixture(scope="module")
def trained() -> nn.Module:
    return recipe_fakes.tiny_model()


def recipe(*lines: str):
    return loads("version: 1\nstages:\n" + "".join(f"  - {line}\n" for line in lines))


def run(model: nn.Module, *lines: str, **extra):
    return compress(model, recipe(*lines), **{**recipe_fakes.context(), **extra})


def test_stages_run_in_order_with_repetition_and_are_measured(trained: nn.Module) -> None:
    before = copy.deepcopy(trained.state_dict())
    recipe_fakes.CALLS.clear()
    result = run(
        trained,
        "prune.fake_zero: {fraction: 0.5}",
        "lowrank.fake_shrink: {hidden: 8}",
        "prune.fake_zero: {fraction: 0.9}",
    )
    assert recipe_fakes.CALLS == ["prune.fake_zero", "lowrank.fake_shrink", "prune.fake_zero"]
    report = result.report
    assert [s.status for s in report.stages] == ["applied"] * 3
    base, zero, shrink, zero2 = (r.measurement for r in (report.baseline, *report.stages))
    # 4-32-2 MLP: 4*32+32 + 32*2+2 parameters, 4*32 + 32*2 MACs per example, batch of 32
    assert (base.params, base.macs) == (226, 32 * (4 * 32 + 32 * 2))
    assert (shrink.params, shrink.macs) == (4 * 8 + 8 + 8 * 2 + 2, 32 * (4 * 8 + 8 * 2))
    assert zero.nonzero_params == 226 - (64 + 32)  # half of each Linear's weights zeroed
    assert base.bytes > shrink.bytes
    assert zero2.nonzero_params < shrink.nonzero_params
    final_weights = [m.weight for m in result.model if isinstance(m, nn.Linear)]
    assert all(float((w == 0).float().mean()) >= 0.9 - 1 / w.numel() for w in final_weights)
    assert all(torch.equal(before[k], v) for k, v in trained.state_dict().items())
    assert base.metric == pytest.approx(accuracy(trained, recipe_fakes.context()["val_data"]))
    layers = {x.name: x for x in report.final.layers}
    assert set(layers) == {"0", "2"} and layers["0"].bits == 32
    assert layers["0"].sparsity == pytest.approx(0.9, abs=1 / 32)


def test_baseline_is_the_default_teacher_and_a_given_teacher_wins(trained: nn.Module) -> None:
    recipe_fakes.TEACHERS.clear()
    run(trained, "prune.fake_zero: {}", "distill.fake_teacher: {}")
    assert recipe_fakes.TEACHERS[-1] is trained
    other = recipe_fakes.tiny_model(seed=5, trained=False)
    run(trained, "distill.fake_teacher: {}", teacher=other)
    assert recipe_fakes.TEACHERS[-1] is other


def test_guard_rolls_back_a_stage_that_costs_too_much(trained: nn.Module) -> None:
    result = run(
        trained,
        "{prune.fake_noise: {scale: 3.0}, guard: {max_drop: 0.01}}",
        "prune.fake_zero: {fraction: 0.25}",
    )
    noisy, zero = result.report.stages
    assert noisy.status == "rolled back" and "> max_drop 0.01: stage undone" in noisy.note
    assert noisy.guard_metric is not None and noisy.measurement is not None
    assert zero.status == "applied"
    expected = recipe_fakes.fake_zero(copy.deepcopy(trained), _zero_config(0.25), None)
    x = recipe_fakes.context()["example_inputs"][0]
    assert torch.equal(result.model(x), expected(x))  # the noise was undone, the zeroing kept
    assert result.report.final is zero


def test_guard_stop_skips_the_remaining_stages(trained: nn.Module) -> None:
    result = run(
        trained,
        "prune.fake_zero: {fraction: 0.1}",
        "{prune.fake_noise: {scale: 3.0}, guard: {max_total_drop: 0.05, on_fail: stop}}",
        "lowrank.fake_shrink: {}",
    )
    statuses = [s.status for s in result.report.stages]
    assert statuses == ["applied", "rolled back", "skipped"]
    assert "later stages skipped" in result.report.stages[1].note
    skipped = result.report.stages[2]
    assert skipped.measurement is None and skipped.baseline_latency_ms is None
    assert skipped.options == {"finetune": None, "hidden": 8}
    assert result.report.final is result.report.stages[0]


def test_a_total_budget_spent_by_an_earlier_stage_is_named(trained: nn.Module) -> None:
    result = run(
        trained,
        "prune.fake_zero: {fraction: 0.9}",  # unguarded, costs well over 0.05
        # a harmless change (a stage that changes nothing is refused before any guard)
        "{prune.fake_noise: {scale: 0.0001}, guard: {max_total_drop: 0.05}}",
    )
    first, cheap = result.report.stages
    assert (first.status, cheap.status) == ("applied", "rolled back")
    val = recipe_fakes.context()["val_data"]
    spent = accuracy(trained, val) - accuracy(result.model, val)  # result.model: stage 0's
    assert spent > 0.05
    assert f"budget used by stage 0 ({spent:.4f} before this stage, " in cheap.note
    assert cheap.note.endswith(" in it): stage undone")


def test_guard_passes_a_cheap_stage(trained: nn.Module) -> None:
    result = run(trained, "{prune.fake_zero: {fraction: 0.05}, guard: {max_drop: 0.05}}")
    assert result.report.stages[0].status == "applied"
    assert result.report.stages[0].guard_metric == pytest.approx(
        accuracy(result.model, recipe_fakes.context()["val_data"])
    )


def test_same_recipe_and_seed_give_the_same_model(trained: nn.Module) -> None:
    lines = ("prune.fake_noise: {scale: 0.1}", "prune.fake_zero: {finetune: {epochs: 1}}")
    a = run(trained, *lines, seed=3).model.state_dict()
    b = run(trained, *lines, seed=3).model.state_dict()
    c = run(trained, *lines, seed=4).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_summary_and_saved_run(trained: nn.Module, tmp_path) -> None:
    result = run(trained, "prune.fake_zero: {fraction: 0.9}", "lowrank.fake_shrink: {}")
    paths = save_run(result, tmp_path / "out", {"model": "test:tiny"})
    summary = result.report.summary()
    assert set(SUMMARY_FIELDS) <= set(summary)
    final = result.report.final
    # The headline's bytes are the stage table's; the delivered artifact adds the provenance.
    baseline_bytes, compressed_bytes = (
        result.report.baseline.measurement.bytes,
        final.measurement.bytes,
    )
    assert (summary["baseline_bytes"], summary["compressed_bytes"]) == (
        baseline_bytes,
        compressed_bytes,
    )
    assert summary["compression_rate"] == pytest.approx(baseline_bytes / compressed_bytes)
    assert (
        summary["artifact_bytes"] == artifact_bytes(tmp_path / "out" / "model") > compressed_bytes
    )
    assert summary["speedup_rate"] == pytest.approx(
        final.baseline_latency_ms / final.measurement.latency_ms
    )
    assert summary["runtime"] == "eager" and summary["threads"] == torch.get_num_threads()
    assert summary["artifact"] == str(tmp_path / "out" / "model")
    manifest = read_manifest(tmp_path / "out" / "model")
    provenance = manifest["extra"]["provenance"]
    assert provenance["recipe"] == result.report.recipe and provenance["seed"] == 0
    assert provenance["model"] == "test:tiny" and manifest["versions"]["torch"]
    rows = [
        dict(zip(provenance["stage_columns"], row, strict=True)) for row in provenance["stages"]
    ]
    assert [r["stage"] for r in rows] == ["baseline", "0 prune.fake_zero", "1 lowrank.fake_shrink"]
    assert rows[2]["bytes"] == final.measurement.bytes and rows[2]["status"] == "applied"
    data = json.loads(paths["json"].read_text())
    assert data["schema_version"] == 1 and data["summary"] == json.loads(json.dumps(summary))


def _zero_config(fraction: float):
    return recipe_fakes.ZeroConfig(fraction=fraction)


class _Int8Layer(CompressedLayer):
    """Stands in for a quantized layer: 4-bit codes, the float weight decoded on access."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("codes", torch.tensor([[0, 3], [0, 0]], dtype=torch.int8))

    @property
    def weight(self) -> torch.Tensor:
        return self.codes.float() * 0.5

    def weight_bits(self) -> int:
        return 4


class _LowRank(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rank = 2
        self.first, self.second = nn.Linear(6, 2, bias=False), nn.Linear(2, 6, bias=False)


def test_layer_info_reads_sparsity_bits_and_rank() -> None:
    dense = nn.Linear(4, 2)
    dense.weight.data[0] = 0
    model = nn.Sequential(dense, _Int8Layer(), _LowRank(), nn.ReLU())
    layers = {x.name: x for x in layer_info(model)}
    assert set(layers) == {"0", "1", "2", "2.first", "2.second"}
    assert (layers["0"].sparsity, layers["0"].bits, layers["0"].rank) == (0.5, 32, None)
    assert (layers["1"].sparsity, layers["1"].bits, layers["1"].kind) == (0.75, 4, "_Int8Layer")
    assert (layers["2"].sparsity, layers["2"].bits, layers["2"].rank) == (None, None, 2)
