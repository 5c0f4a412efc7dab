"""prune.sparsegpt's refinements: true-sequential stages, asymmetric (GPTAQ) targets, bias
correction and OWL's non-uniform sparsity under an exact global budget."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import netshrink as ns
from netshrink.calibrate.sequential import BlockCall, first_block_calls, piece_rows
from netshrink.calibrate.staged import Paired, asymmetric_target, bias_shift, refit_norms, stages
from netshrink.errors import ConfigError
from netshrink.prune import nm_layout_ok
from netshrink.prune.allocation import exact_counts, owl_fractions
from test_calibrate import tiny_bert
from test_prune_sparsegpt import correlated
from test_prune_wanda import convnet, images, sparse_layers

REFINED = {
    "sequential": True,
    "true_sequential": True,
    "asymmetric": True,
    "bias_correction": True,
    "norm_correction": True,
}


def paired(x: torch.Tensor, reference: torch.Tensor) -> Paired:
    stats = Paired()
    stats.add(x, reference)
    return stats


def test_bert_layers_are_staged_in_call_order_with_q_k_v_together() -> None:
    model, calib = tiny_bert()
    block = model.encoder.layer[0]
    names = [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    call = first_block_calls(model, block, calib)[0]
    assert stages(block, list(reversed(names)), call) == [
        ["attention.self.query", "attention.self.key", "attention.self.value"],
        ["attention.output.dense"],
        ["intermediate.dense"],
        ["output.dense"],
    ]


def test_paired_sums_over_indexed_rows_equal_those_over_their_copy() -> None:
    # the staged engine indexes a padded batch's real tokens instead of copying them
    from netshrink.calibrate.reducers import CHUNK, real_tokens, token_rows

    gen = torch.Generator().manual_seed(2)
    x, ref = (torch.randn(3, CHUNK // 2 + 40, 16, generator=gen) for _ in range(2))
    mask = torch.rand(3, x.shape[1], generator=gen) > 0.3
    rows = token_rows(x, mask)
    assert rows is not None and token_rows(x[0], mask) is None  # only (batch, tokens, dim)
    indexed = Paired()
    indexed.add(x.reshape(-1, 16), ref.reshape(-1, 16), rows)
    copied = paired(real_tokens(x, mask), real_tokens(ref, mask))
    assert indexed.count == copied.count == int(mask.sum())
    for got, want in zip(
        (indexed.gram, indexed.cross, indexed.total, indexed.reference_total),
        (copied.gram, copied.cross, copied.total, copied.reference_total),
        strict=True,
    ):
        assert torch.equal(got, want)


@pytest.mark.parametrize("real", [6, 2])  # of 7 positions: mostly real, mostly padding
def test_a_layers_input_is_kept_padded_unless_mostly_padding(real: int) -> None:
    from netshrink.calibrate.reducers import real_tokens
    from netshrink.calibrate.staged import _layer_inputs

    model, calib = tiny_bert()
    inputs = dict(calib[0][0])
    inputs["attention_mask"] = torch.ones(2, 7, dtype=torch.long)
    inputs["attention_mask"][:, real:] = 0
    block = model.encoder.layer[0]
    call = first_block_calls(model, block, [(inputs, None)])[0]
    grabbed: list[torch.Tensor] = []
    hook = block.output.dense.register_forward_pre_hook(lambda m, a: grabbed.append(a[0]))
    seen = _layer_inputs(block, ["output.dense"], call, stop=True)["output.dense"]
    hook.remove()
    want = real_tokens(grabbed[0], call.tokens)
    torch.testing.assert_close(seen.real(), want, rtol=0, atol=0)
    if 2 * real >= 7:  # the padded input, indexed: no copy
        assert seen.rows is not None and seen.vectors.shape[0] == 14
    else:  # the real rows copied: smaller than the padded input
        assert seen.rows is None and seen.vectors.shape[0] == 2 * real


def test_statistics_gathered_in_pieces_equal_those_of_whole_batches() -> None:
    # rows=7: one sequence a piece; the padded second sequence keeps its attention mask slice
    from netshrink.calibrate.staged import _stage_statistics

    model, calib = tiny_bert()
    block = model.encoder.layer[0]
    dense = copy.deepcopy(block)
    calls = first_block_calls(model, block, calib)
    stage = ["intermediate.dense", "output.dense"]
    with torch.no_grad():
        assert piece_rows(block, calls, rows=7) == 7
        whole = _stage_statistics(block, dense, stage, calls, calls, rows=0)
        cut = _stage_statistics(block, dense, stage, calls, calls, rows=7)
    for name in stage:
        assert cut[name].count == whole[name].count == 11  # real tokens only
        for field in ("gram", "cross", "total"):
            a, b = getattr(cut[name], field), getattr(whole[name], field)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_asymmetric_target_is_the_weight_itself_without_upstream_error() -> None:
    w, x = torch.randn(8, 16), correlated(64, 16, 0)
    # float32 sums and solve on correlated inputs (condition number ~300 after damping)
    assert torch.allclose(asymmetric_target(w, paired(x, x), 0.01), w, atol=1e-4)


def test_asymmetric_target_maps_compressed_inputs_closer_to_the_reference_outputs() -> None:
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(8, 16, dtype=torch.float64, generator=gen), correlated(256, 16, 1).double()
    # upstream compression distorted the inputs linearly: the target can undo it
    mix = torch.eye(16, dtype=torch.float64) + 0.3 * torch.randn(16, 16, generator=gen).double()
    noisy = x @ mix
    target = asymmetric_target(w, paired(noisy, x), 1e-4)
    error, plain = (float((x @ w.T - noisy @ v.T).norm()) for v in (target, w))
    assert error < 0.05 * plain, (error, plain)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**16), shift=st.floats(-2, 2))
def test_bias_shift_zeroes_the_mean_output_error(seed: int, shift: float) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 12, generator=gen, dtype=torch.float64)
    x = torch.randn(40, 12, generator=gen, dtype=torch.float64) + shift
    pruned = w * (torch.rand(6, 12, generator=gen) > 0.5)
    error = (x @ w.T - x @ pruned.T).mean(0)
    corrected = error - bias_shift(w, pruned, paired(x, x))
    assert float(corrected.abs().max()) < 1e-9
    assert float(corrected.norm()) <= float(error.norm())


def test_bias_correction_lowers_the_mean_output_error_of_a_pruned_model() -> None:
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(16, 32), nn.ReLU()), nn.Sequential(nn.Linear(32, 8))]
    model = nn.Sequential(nn.Linear(16, 16), *blocks).eval()  # "0" lies outside the blocks
    x = correlated(256, 16, 3) + 1.0  # inputs with a mean: pruning shifts the outputs
    # OBS leaves a mean shift here; ADMM's whole-matrix fit already removes most of it (0.034)
    options = {"sparsity": 0.6, "kernel": "dense", "sequential": True, "solver": "obs"}
    calib = [(x, None)]
    plain = ns.prune.sparsegpt(model, calib_data=calib, blocks=["1", "2"], **options)
    fixed = ns.prune.sparsegpt(
        model, calib_data=calib, blocks=["1", "2"], bias_correction=True, **options
    )
    with torch.no_grad():
        ref = model(x)
        mean_error = [float((m(x) - ref).mean(0).norm()) for m in (plain, fixed)]
    assert mean_error[1] < 0.5 * mean_error[0], mean_error
    assert torch.equal(plain.get_submodule("0").mask, fixed.get_submodule("0").mask)
    for name in ("0", "1.0", "2.0"):  # inside the blocks and outside: every bias corrected
        assert not torch.equal(plain.get_submodule(name).bias, fixed.get_submodule(name).bias)


@pytest.mark.parametrize("options", [{"sparsity": 0.5}, {"n": 2, "m": 4}])
def test_refined_sequential_bert_keeps_the_pattern_in_every_layer(options: dict) -> None:
    model, calib = tiny_bert()
    pruned = ns.prune.sparsegpt(model, calib_data=calib, kernel="dense", **REFINED, **options)
    layers = sparse_layers(pruned)
    assert len(layers) == 3 * 6 + 1
    for name, layer in layers.items():
        if "n" in options:
            assert nm_layout_ok(layer.weight, 2, 4), name
        else:
            assert int((layer.weight == 0).sum()) == layer.weight.numel() // 2, name
    with torch.no_grad():
        out = pruned(**calib[0][0]).last_hidden_state
    assert out.shape == (2, 7, 16) and bool(torch.isfinite(out).all())


@pytest.mark.parametrize("groups", ["block", "layer"])
def test_owl_spreads_sparsity_but_the_total_is_exact(groups: str) -> None:
    model, calib = tiny_bert()
    options = {"sparsity": 0.5, "allocation": "owl", "owl_groups": groups, "owl_spread": 0.2}
    pruned = ns.prune.sparsegpt(model, calib_data=calib, kernel="dense", sequential=True, **options)
    layers = sparse_layers(pruned).values()
    zeros = sum(int((layer.weight == 0).sum()) for layer in layers)
    assert zeros == round(0.5 * sum(layer.weight.numel() for layer in layers))
    fractions = {round(float((layer.weight == 0).float().mean()), 2) for layer in layers}
    assert len(fractions) > 1 and max(fractions) - min(fractions) <= 2 * 0.2 + 2e-2


@settings(max_examples=30, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 500), min_size=1, max_size=12),
    sparsity=st.floats(0.0, 0.95),
    spread=st.floats(0.0, 0.2),
    seed=st.integers(0, 2**16),
)
def test_exact_counts_add_up_for_any_fractions(
    sizes: list[int], sparsity: float, spread: float, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    names = [str(i) for i in range(len(sizes))]
    ratios = dict(zip(names, torch.rand(len(sizes), generator=gen).tolist(), strict=True))
    size = dict(zip(names, sizes, strict=True))
    try:
        fractions = owl_fractions(ratios, size, sparsity, spread)
    except ConfigError:
        return  # a spread that leaves [0, 1) for this draw is refused, tested below
    counts = exact_counts(fractions, size, sparsity)
    assert sum(counts.values()) == round(sparsity * sum(sizes))
    assert all(0 <= counts[n] <= size[n] for n in names)
    weighted = sum(fractions[n] * size[n] for n in names) / sum(sizes)
    assert abs(weighted - sparsity) < 1e-9


def test_owl_fraction_outside_the_unit_interval_is_refused() -> None:
    with pytest.raises(ConfigError, match="owl_spread"):
        owl_fractions({"a": 0.0, "b": 1.0}, {"a": 10, "b": 10}, 0.05, 0.2)


@pytest.mark.parametrize(
    "options",
    [
        {"true_sequential": True},
        {"asymmetric": True},
        {"bias_correction": True},
        {"allocation": "owl"},  # per block: needs sequential
        {"n": 2, "m": 4, "allocation": "owl", "owl_groups": "layer"},
        {"sequential": True, "norm_correction": True},  # needs asymmetric
    ],
)
def test_refinements_without_what_they_need_are_config_errors(options: dict) -> None:
    model, calib = tiny_bert()
    with pytest.raises(ConfigError):
        ns.prune.sparsegpt(model, calib_data=calib, **options)


def test_refit_norms_brings_layer_norm_outputs_closer_to_the_full_precision_ones() -> None:
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(8, 12), nn.LayerNorm(12)).eval()
    block = copy.deepcopy(dense)
    with torch.no_grad():
        block[0].weight.mul_(torch.rand(12, 8) > 0.5)  # a crude pruning
    calls = [BlockCall((correlated(64, 8, seed),), {}, None) for seed in (0, 1)]
    with torch.no_grad():
        before = [float((block(*c.args) - dense(*c.args)).square().sum()) for c in calls]
        assert refit_norms(block, dense, calls, calls) == ["1"]
        after = [float((block(*c.args) - dense(*c.args)).square().sum()) for c in calls]
    assert sum(after) < 0.9 * sum(before), (before, after)


def test_a_grouped_conv_is_pruned_without_bias_correction_and_says_so() -> None:
    options = {"sparsity": 0.5, "sequential": True, "blocks": ["7"], "bias_correction": True}
    with pytest.warns(UserWarning, match="2 is a grouped conv"):
        pruned = ns.prune.sparsegpt(convnet(), calib_data=images(), kernel="dense", **options)
    layers = sparse_layers(pruned)
    assert torch.equal(layers["2"].bias, convnet()[2].bias)
    assert not torch.equal(layers["0"].bias, convnet()[0].bias)
