"""``prune.heads`` and ``prune.ffn`` on tiny random-init transformers of every supported family:
exact counts removed, outputs equal to the original's with those units zeroed, artifacts that
reload, and clear errors."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import hf_fixtures
import netshrink as ns
from netshrink import hf
from netshrink.errors import ConfigError, MissingInputError, UnsupportedModuleError
from netshrink.hf import blocks
from netshrink.layers.edits import recorded_edits

torch.set_num_threads(1)
IDS = {"input_ids": torch.randint(5, 60, (2, 7), generator=torch.Generator().manual_seed(0))}


def _vit() -> nn.Module:
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=16, patch_size=8,
    )  # fmt: skip
    return transformers.ViTModel(config)


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return transformers.LlamaModel(config)


def _mha() -> nn.Module:
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)


# name -> (model builder, inputs, query heads per layer, query heads removed per layer at 0.5)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], dict, int, int]] = {
    "bert": (lambda: hf_fixtures.build("bert"), IDS, 2, 1),
    "distilbert": (lambda: hf_fixtures.build("distilbert-mlm"), IDS, 2, 1),
    "gpt2": (lambda: hf_fixtures.build("gpt2"), IDS, 2, 1),
    "t5-encoder": (lambda: hf_fixtures.build("t5-encoder"), IDS, 2, 1),
    "vit": (_vit, {"pixel_values": torch.randn(2, 3, 16, 16)}, 4, 2),
    "llama-gqa": (_llama, IDS, 4, 2),  # 2 K/V groups of 2 query heads: one group goes
    "mha": (_mha, {"src": torch.randn(2, 7, 32)}, 4, 2),
}


def build(name: str) -> tuple[nn.Module, dict]:
    maker, inputs, _, _ = FAMILIES[name]
    torch.manual_seed(0)
    return maker().eval(), inputs


def output(model: nn.Module, inputs: dict) -> torch.Tensor:
    out = model(**inputs)
    return out if torch.is_tensor(out) else out[0]


def edits(model: nn.Module, kind: str) -> dict[str, list[int]]:
    return {
        e["args"]["module"]: e["args"]["keep"] for e in recorded_edits(model) if e["kind"] == kind
    }


def zero_removed(model: nn.Module, kept_heads: dict, kept_neurons: dict) -> nn.Module:
    """A copy of ``model`` whose removed heads' and neurons' outputs are zeroed (their columns
    of the output and down projections), the reference a pruned model must match."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for att in blocks.find_attention(ref):
            gone = torch.tensor(
                [u for u in range(att.units) if u not in kept_heads[att.path]], dtype=torch.long
            )
            heads = (gone[:, None] * att.group + torch.arange(att.group)).flatten()
            blocks.slot_weight(ref, att.out)[blocks.slot_positions(att.out, heads)] = 0
        for ffn in blocks.find_ffn(ref):
            gone = torch.tensor(
                [u for u in range(ffn.size) if u not in kept_neurons[ffn.path]], dtype=torch.long
            )
            blocks.slot_weight(ref, ffn.down)[gone] = 0
    return ref


@pytest.mark.parametrize("name", list(FAMILIES))
def test_pruned_model_equals_original_with_units_zeroed(name: str) -> None:
    model, x = build(name)
    _, _, heads, removed = FAMILIES[name]
    pruned = ns.prune.heads(model, ratio=0.5, example_inputs=x)
    pruned = ns.prune.ffn(pruned, ratio=0.25, round_to=4, example_inputs=x)
    kept_heads, kept_neurons = edits(pruned, "hf.heads"), edits(pruned, "hf.ffn")
    atts = blocks.find_attention(pruned)
    assert len(atts) == 2 and all(a.heads == heads - removed for a in atts)
    ffn_sizes = [f.size for f in blocks.find_ffn(model)]
    assert [f.size for f in blocks.find_ffn(pruned)] == [s - s // 4 for s in ffn_sizes]
    with torch.no_grad():
        expected = output(zero_removed(model, kept_heads, kept_neurons), x)
        torch.testing.assert_close(output(pruned, x), expected, atol=1e-5, rtol=0)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_grouped_query_attention_loses_whole_groups() -> None:
    model, x = build("llama-gqa")
    pruned = ns.prune.heads(model, ratio=0.5, example_inputs=x)
    for layer in pruned.layers:
        att = layer.self_attn
        assert (att.q_proj.out_features, att.k_proj.out_features) == (16, 8)  # 2 heads, 1 group
        assert att.num_key_value_groups == 2
    assert all(len(keep) == 1 for keep in edits(pruned, "hf.heads").values())


def test_t5_keeps_the_same_heads_in_every_block_and_slices_the_bias_table() -> None:
    model, x = build("t5-encoder")
    pruned = ns.prune.heads(model, ratio=0.5, example_inputs=x)
    kept = list(edits(pruned, "hf.heads").values())
    assert len(kept) == 2 and kept[0] == kept[1]
    first = pruned.encoder.block[0].layer[0].SelfAttention
    assert first.relative_attention_bias.weight.shape == (32, 1)
    original = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert torch.equal(first.relative_attention_bias.weight, original[:, kept[0]])
    assert first.n_heads == 1 and first.inner_dim == 16


def test_t5_decoder_self_attention_is_pruned_and_cross_attention_left() -> None:
    model = hf_fixtures.build("t5")
    x = {**IDS, "decoder_input_ids": IDS["input_ids"][:, :5]}
    pruned = ns.prune.heads(model, ratio=0.5, example_inputs=x)
    kept = edits(pruned, "hf.heads")
    assert sorted(kept) == [
        f"{stack}.block.{i}.layer.0.SelfAttention"
        for stack in ("decoder", "encoder")
        for i in (0, 1)
    ]
    assert pruned.decoder.block[1].layer[1].EncDecAttention.q.out_features == 32
    with torch.no_grad():
        expected = zero_removed(
            model, kept, {f.path: range(f.size) for f in blocks.find_ffn(model)}
        )
        torch.testing.assert_close(output(pruned, x), output(expected, x), atol=1e-5, rtol=0)


def test_head_count_attributes_follow() -> None:
    model, x = build("gpt2")
    attn = ns.prune.heads(model, ratio=0.5, example_inputs=x).transformer.h[0].attn
    assert (attn.num_heads, attn.split_size, attn.c_attn.nf, attn.c_proj.nx) == (1, 16, 48, 16)
    bert, _ = build("bert")
    self_att = ns.prune.heads(bert, ratio=0.5, example_inputs=x).encoder.layer[1].attention.self
    assert (self_att.num_attention_heads, self_att.all_head_size) == (1, 16)


def test_uniform_ffn_keeps_the_config_in_sync() -> None:
    model, x = build("bert")
    pruned = ns.prune.ffn(model, ratio=0.5, example_inputs=x)
    assert pruned.config.intermediate_size == 32
    assert model.config.intermediate_size == 64  # the caller's model is untouched


def test_fewer_macs() -> None:
    model, x = build("bert")
    pruned = ns.prune.ffn(ns.prune.heads(model, ratio=0.5, example_inputs=x), ratio=0.5)

    def flops(m: nn.Module) -> int:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            m(**x)
        return counter.get_total_flops()

    assert flops(pruned) < 0.7 * flops(model)


def dead_head_bert() -> nn.Module:
    """BERT whose layer-0 head 1 has all weights zero: every criterion must rank it last."""
    model, _ = build("bert")
    att = model.encoder.layer[0].attention
    with torch.no_grad():
        for lin in (att.self.query, att.self.key, att.self.value):
            lin.weight[16:] = 0
            lin.bias[16:] = 0
        att.output.dense.weight[:, 16:] = 0
    return model


@pytest.mark.parametrize("criterion", ["l2", "activation", "taylor", "mask", "obs"])
def test_every_criterion_removes_a_dead_head(criterion: str) -> None:
    calib = [(IDS, None), ({"input_ids": IDS["input_ids"].flip(0)}, None)]
    pruned = ns.prune.heads(dead_head_bert(), ratio=0.5, criterion=criterion, calib_data=calib)
    assert edits(pruned, "hf.heads")["encoder.layer.0.attention.self"] == [0]


@pytest.mark.parametrize("criterion", ["activation", "taylor"])
def test_data_criteria_on_ffn_and_multihead_attention(criterion: str) -> None:
    model, x = build("mha")
    calib = [(x, None)]
    pruned = ns.prune.heads(model, ratio=0.5, criterion=criterion, calib_data=calib)
    pruned = ns.prune.ffn(pruned, ratio=0.5, criterion=criterion, calib_data=calib)
    assert [len(k) for k in edits(pruned, "hf.heads").values()] == [2, 2]
    assert [len(k) for k in edits(pruned, "hf.ffn").values()] == [32, 32]
    assert output(pruned, x).shape == (2, 7, 32)


def test_global_scope_takes_more_from_the_weaker_layer_and_respects_min_heads() -> None:
    model, x = build("vit")
    att = model.layers[0].attention
    with torch.no_grad():  # layer 0: heads 1-3 much weaker than head 0; layer 1: all alike
        for lin in (att.q_proj, att.k_proj, att.v_proj):
            lin.weight[8:] *= 0.01
        att.o_proj.weight[:, 8:] *= 0.01
    pruned = ns.prune.heads(model, ratio=0.5, scope="global", min_heads=1, example_inputs=x)
    kept = edits(pruned, "hf.heads")
    assert sum(len(k) for k in kept.values()) == 4
    assert len(kept["layers.0.attention"]) == 1  # 3 of 4 gone, the floor of 1 stops it
    assert len(kept.get("layers.1.attention", range(4))) == 3


def test_artifact_reloads_onto_the_hf_reference(tmp_path: Path) -> None:
    folder = hf_fixtures.model_dir(tmp_path / "bert", "bert")
    model = hf.load_model(f"hf:{folder}")
    x = hf_fixtures.encode(hf.load_tokenizer(f"hf:{folder}"))
    pruned = ns.prune.ffn(ns.prune.heads(model, ratio=0.5, scope="global"), ratio=0.3)
    ns.save(pruned, tmp_path / "artifact")
    again = ns.load(tmp_path / "artifact")
    with torch.no_grad():
        assert torch.equal(again(**x), pruned(**x))


@pytest.mark.parametrize("name", ["gpt2", "t5-encoder", "mha"])
def test_artifact_reloads_onto_a_fresh_raw_model(name: str, tmp_path: Path) -> None:
    model, x = build(name)
    pruned = ns.prune.ffn(ns.prune.heads(model, ratio=0.5), ratio=0.5)
    ns.save(pruned, tmp_path / "artifact")
    fresh, _ = build(name)
    with torch.no_grad():
        fresh.apply(lambda m: [p.normal_() for p in m.parameters(recurse=False)])
        again = ns.load(tmp_path / "artifact", model=fresh)
        assert torch.equal(output(again, x), output(pruned, x))


def test_bad_options_are_refused_before_the_model_is_touched() -> None:
    model, _ = build("bert")
    with pytest.raises(ConfigError, match="ratio"):
        ns.prune.heads(model, ratio=1.0)
    with pytest.raises(ConfigError, match="criterion"):
        ns.prune.ffn(model, criterion="mask")
    with pytest.raises(MissingInputError, match="calib_data"):
        ns.prune.heads(model, criterion="mask")
    with pytest.raises(UnsupportedModuleError, match="achieved 0%"):
        ns.prune.heads(model, ratio=0.5, min_heads=2)
    with pytest.raises(UnsupportedModuleError, match="no attention module"):
        ns.prune.heads(nn.Sequential(nn.Linear(4, 4)), ratio=0.5)
    assert all(a.heads == 2 for a in blocks.find_attention(model))


def test_channels_on_a_transformer_points_to_heads_and_ffn() -> None:
    model, x = build("bert")
    with pytest.raises(UnsupportedModuleError, match=r"prune\.heads .* prune\.ffn"):
        ns.prune.channels(model, ratio=0.3, example_inputs=x)


def test_finetune_minimises_the_given_loss_fn() -> None:
    model, x = build("bert")
    calls = []

    def loss_fn(m: nn.Module, batch: tuple) -> torch.Tensor:
        calls.append(batch[1])
        return output(m, batch[0]).pow(2).mean()  # no labels needed: cross-entropy would fail

    tune = {"epochs": 1, "lr": 1e-2, "shuffle": False}
    pruned = ns.prune.ffn(model, ratio=0.5, finetune=tune, train_data=[(x, None)], loss_fn=loss_fn)
    untuned = ns.prune.ffn(model, ratio=0.5)
    assert calls == [None]
    with torch.no_grad():
        assert output(pruned, x).pow(2).mean() < output(untuned, x).pow(2).mean()


def test_activation_scores_ignore_padding_tokens() -> None:
    from netshrink.prune.heads import head_blocks
    from netshrink.prune.units import score

    model, _ = build("bert")
    ids = torch.randint(5, 60, (1, 5), generator=torch.Generator().manual_seed(1))
    plain = {"input_ids": ids, "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    padded = {
        "input_ids": torch.cat([ids, torch.zeros(1, 9, dtype=torch.long)], 1),
        "attention_mask": torch.cat([torch.ones(1, 5), torch.zeros(1, 9)], 1).long(),
    }
    blocks = head_blocks(model, 1)
    ref = score(model, blocks, "activation", [(plain, None)], 0)
    got = score(model, blocks, "activation", [(padded, None)], 0)
    for path, s in ref.items():
        torch.testing.assert_close(got[path], s, rtol=1e-4, atol=1e-6)
