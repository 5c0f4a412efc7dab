"""prune.channels: physically smaller models that compute what the original did on kept channels."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import netshrink as ns
from netshrink.context import Context
from netshrink.errors import ConfigError, MissingInputError, TargetError, UnsupportedModuleError
from netshrink.prune.structured import ChannelsConfig, plan_channels
from test_graph import ConvNet, EmbeddingNet, TinyTransformer, image, one_thread  # noqa: F401


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def macs(model: nn.Module, inputs: tuple) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops() // 2


def trained_like(model: nn.Module) -> nn.Module:
    """Give BatchNorm non-trivial statistics so that removing channels is a real test."""
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model.eval()


def masked(model: nn.Module, plan) -> nn.Module:
    """The original with the input columns of removed units zeroed: what the pruned model is."""
    out = copy.deepcopy(model)
    for slot in plan.graph.slots.values():
        if slot.role == "in":
            weight = out.get_submodule(slot.module).weight
            gone = torch.ones(weight.shape[1], dtype=torch.bool)
            gone[plan.keep(slot)] = False
            weight.data[:, gone] = 0
    return out


def grouped() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1, groups=4), nn.ReLU(), nn.Conv2d(12, 4, 1), nn.Flatten(),
        nn.Linear(4 * 64, 3),
    )  # fmt: skip


CASES = [
    (ConvNet, image),
    (grouped, image),
    (TinyTransformer, image),
    (EmbeddingNet, lambda: (torch.randint(0, 20, (3, 5), generator=torch.Generator()),)),
]


@pytest.mark.parametrize("ratio", [0.25, 0.5])
@pytest.mark.parametrize(
    ("make", "inputs"), CASES, ids=["conv", "grouped", "transformer", "embedding"]
)
def test_pruned_model_equals_original_on_kept_channels(make, inputs, ratio: float) -> None:
    torch.manual_seed(0)
    model, x = trained_like(make()), inputs()
    pruned = copy.deepcopy(model)
    plan = plan_channels(pruned, ChannelsConfig(ratio=ratio), Context(example_inputs=x), ratio)
    plan.apply(pruned)
    with torch.no_grad():
        # Whole model: removing a unit is the same as zeroing every input column it feeds.
        torch.testing.assert_close(pruned(*x), masked(model, plan)(*x), atol=1e-5, rtol=1e-5)
        # Layers: kept output channels are exactly the original's (the first layer reads the
        # unpruned input) or the masked original's (deeper layers read pruned inputs).
        first, deep = {
            "ConvNet": ("stem.0", "pw"),
            "grouped": ("0", "5"),
            "TinyTransformer": ("attn.v", "mlp.0"),
            "EmbeddingNet": ("emb", "proj"),
        }[make.__name__]
        for name, reference in ((first, model), (deep, masked(model, plan))):
            keep = plan.keep(plan.graph.slots[(name, "out", "")])
            dim = 1 if make in (ConvNet, grouped) else -1
            before, after = activation(reference, name, x), activation(pruned, name, x)
            assert 0 < keep.numel() < before.shape[dim] or name == "emb"
            torch.testing.assert_close(after, before.index_select(dim, keep))


def activation(model: nn.Module, name: str, x: tuple) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    hook = model.get_submodule(name).register_forward_hook(lambda _m, _i, out: seen.append(out))
    model(*x)
    hook.remove()
    return seen[0]


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_conv_params_and_macs_fall_as_the_square_of_kept_channels(ratio: float) -> None:
    model, x = trained_like(ConvNet()), image()
    pruned = ns.prune.channels(model, ratio=ratio, example_inputs=x)
    assert pruned(*x).shape == model(*x).shape
    assert pruned.body[0].out_channels == round(16 * (1 - ratio))
    assert pruned.left.out_channels == round(8 * (1 - ratio))
    assert pruned.dw.groups == round(12 * (1 - ratio))
    assert pruned.head.out_features == 10
    kept = (1 - ratio) ** 2  # a conv between two pruned layers keeps (1-r)^2 of its MACs
    assert kept - 0.02 < macs(pruned, x) / macs(model, x) < kept + 0.05
    assert kept - 0.02 < params(pruned) / params(model) < kept + 0.05


def test_transformer_prunes_whole_heads_and_mlp_neurons_not_the_normalised_stream() -> None:
    model, x = TinyTransformer().eval(), image()
    pruned = ns.prune.channels(model, ratio=0.5, example_inputs=x)
    assert pruned.attn.num_heads == 2 and pruned.attn.q.out_features == 2 * 4
    assert pruned.attn.out.in_features == 8 and pruned.mlp[0].out_features == 16
    assert pruned.embed.out_features == 16 and pruned.norm1.normalized_shape == (16,)
    assert pruned(*x).shape == (4, 10)
    assert macs(pruned, x) < 0.6 * macs(model, x)


def test_prune_norm_also_narrows_the_residual_stream() -> None:
    model, x = TinyTransformer().eval(), image()
    pruned = ns.prune.channels(model, ratio=0.5, prune_norm=True, example_inputs=x)
    assert pruned.embed.out_features == 8 and pruned.pos.weight.shape == (8, 8)
    assert pruned.pos.embedding_dim == 8
    assert pruned.norm2.normalized_shape == (8,) and pruned.head.in_features == 8
    assert pruned.attn.spec() == {"dim": 8, "num_heads": 2, "head_dim": 4}
    assert pruned(*x).shape == (4, 10)


def test_criteria_remove_the_least_important_channels() -> None:
    model, x = trained_like(ConvNet()), image()
    with torch.no_grad():
        # Filters 2 and 5 of pw are nearly dead, and so are the fc columns that read them.
        model.pw.weight[[2, 5]] *= 1e-3
        model.pw.bias[[2, 5]] = torch.tensor([1e-4, 2e-4])
        model.fc.weight.view(32, 16, 16)[:, [2, 5]] *= 1e-3
        model.dw_bn.weight[[0, 1]] = 1e-3  # BatchNorm scales ~0 on depthwise group 0
    for criterion in ("l1", "l2"):
        pruned = ns.prune.channels(model, ratio=0.25, criterion=criterion, example_inputs=x)
        assert pruned.pw.out_channels == 12
        assert not torch.isin(pruned.pw.bias, model.pw.bias[[2, 5]]).any()
    pruned = ns.prune.channels(model, ratio=0.25, criterion="bn", example_inputs=x)
    assert pruned.dw_bn.weight.numel() == 18 and (pruned.dw_bn.weight.abs() > 1e-2).all()


def test_taylor_and_random_are_seeded_and_deterministic() -> None:
    model, x = trained_like(ConvNet()), image(16)
    data = [(x[0], torch.arange(16) % 10)]
    runs = [
        ns.prune.channels(model, ratio=0.5, criterion=c, example_inputs=x, train_data=data)
        for c in ("taylor", "taylor", "random", "random")
    ]
    for a, b in (runs[:2], runs[2:]):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(runs[0].pw.weight, runs[2].pw.weight)


def test_round_to_keeps_multiples_and_global_scope_hits_the_ratio() -> None:
    model, x = trained_like(ConvNet()), image()
    pruned = ns.prune.channels(model, ratio=0.3, round_to=8, example_inputs=x)
    assert pruned.body[0].out_channels == 16 and pruned.right.out_channels == 16
    assert pruned.left.out_channels == 8
    glob = ns.prune.channels(model, ratio=0.5, scope="global", example_inputs=x)
    widths = [glob.stem[0].out_channels, glob.body[0].out_channels, glob.left.out_channels,
              glob.right.out_channels, glob.dw.groups, glob.pw.out_channels,
              glob.fc.out_features]  # fmt: skip
    assert sum(widths) == 0.5 * (16 + 16 + 8 + 16 + 12 + 16 + 32)  # every group, half overall
    assert min(widths) >= 1


def test_excluded_layers_keep_their_channels() -> None:
    model, x = trained_like(ConvNet()), image()
    pruned = ns.prune.channels(
        model, ratio=0.5, targets={"exclude": ["pw", "left"]}, example_inputs=x
    )
    assert pruned.pw.out_channels == 16 and pruned.left.out_channels == 8
    assert pruned.right.out_channels == 8


def test_iterative_schedule_fine_tunes_between_steps() -> None:
    model, x = trained_like(ConvNet()), image(16)
    data = [(x[0], torch.arange(16) % 10)]
    sched = {"kind": "iterative", "steps": 2, "epochs": 1}
    pruned = ns.prune.channels(model, ratio=0.5, schedule=sched, example_inputs=x, train_data=data)
    assert pruned.body[0].out_channels == 8 and pruned(*x).shape == (16, 10)


def test_bad_options_and_missing_inputs_fail_before_touching_the_model() -> None:
    model, x = ConvNet(), image()
    with pytest.raises(ConfigError, match="ratio"):
        ns.prune.channels(model, ratio=1.0, example_inputs=x)
    with pytest.raises(ConfigError, match="criterion"):
        ns.prune.channels(model, criterion="l3", example_inputs=x)
    with pytest.raises(MissingInputError, match="example_inputs"):
        ns.prune.channels(model, ratio=0.5)
    with pytest.raises(MissingInputError, match="train_data"):
        ns.prune.channels(model, criterion="taylor", example_inputs=x)
    with pytest.raises(TargetError, match="nope"):
        ns.prune.channels(model, targets={"exclude": ["nope"]}, example_inputs=x)


def test_unhandled_layers_are_named_in_a_warning_and_left_alone() -> None:
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3), nn.ConvTranspose2d(8, 8, 3), nn.Conv2d(8, 4, 1)
    )
    with pytest.warns(UserWarning, match=r"2 \(ConvTranspose2d\) is not understood"):
        pruned = ns.prune.channels(model, ratio=0.5, example_inputs=image())
    assert [m.out_channels for m in pruned] == [4, 8, 8, 4]


def test_pruning_nothing_of_a_requested_ratio_raises_with_the_reason() -> None:
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ConvTranspose2d(8, 8, 3), nn.Conv2d(8, 4, 1))
    reason = r"achieved 0% of the requested 50%.*1 \(ConvTranspose2d\) is not understood"
    with pytest.raises(UnsupportedModuleError, match=reason):
        ns.prune.channels(model, ratio=0.5, example_inputs=image())


def test_channels_after_unstructured_pruning_raise_instead_of_doing_nothing() -> None:
    # Sparse layers are not in the dependency graph's rules: nothing could be removed.
    sparse = ns.prune.magnitude(ConvNet().eval(), sparsity=0.5)
    with pytest.raises(UnsupportedModuleError, match="achieved 0% of the requested 50%"):
        ns.prune.channels(sparse, ratio=0.5, example_inputs=image())


class BareBias(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin, self.bias, self.head = (
            nn.Linear(4, 16),
            nn.Parameter(torch.ones(16)),
            nn.Linear(16, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lin(x) + self.bias)


def test_a_bare_parameter_keeps_its_channels_because_an_artifact_could_not_rebuild_it() -> None:
    # Those were the only removable channels: pruning achieves nothing and says why.
    with pytest.raises(UnsupportedModuleError, match="parameter 'bias' is not in a layer an"):
        ns.prune.channels(BareBias(), ratio=0.5, example_inputs=(torch.randn(2, 4),))


class ClassToken(nn.Module):
    """A class token concatenated along tokens, then nn.MultiheadAttention (not handled)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.cls = nn.Linear(8, 16), nn.Parameter(torch.zeros(1, 1, 16))
        self.mha = nn.MultiheadAttention(16, 4, batch_first=True)
        self.fc, self.fc2, self.head = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.emb(x.flatten(1, 2))
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1)
        t = t + self.mha(t, t, t)[0]
        return self.head((t + self.fc2(torch.relu(self.fc(t))))[:, 0])


def test_class_token_and_multihead_attention_keep_the_stream_and_are_named() -> None:
    model, x = ClassToken().eval(), image()
    with pytest.warns(UserWarning, match=r"mha \(MultiheadAttention\) is not understood"):
        pruned = ns.prune.channels(model, ratio=0.5, example_inputs=x)
    assert pruned.emb.out_features == 16 and pruned.fc.out_features == 16
    with torch.no_grad():
        assert pruned(*x).shape == (4, 3)


def test_grouped_conv_loses_whole_groups_with_their_input_channels() -> None:
    model, x = grouped().eval(), image()
    pruned = ns.prune.channels(model, ratio=0.5, example_inputs=x)
    conv = pruned[3]
    assert (conv.groups, conv.in_channels, conv.out_channels) == (2, 4, 6)
    assert pruned[0].out_channels == 4 and pruned[5].in_channels == 6
    assert pruned(*x).shape == (4, 3)


def test_channel_counts_off_multiples_of_8_are_named_and_round_to_avoids_them() -> None:
    # 22 and 45 channels ran 2.3x slower in ONNX Runtime than 24 and 48 (docs/prune.md)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
    ).eval()  # fmt: skip
    x = (torch.randn(2, 3, 16, 16),)
    with pytest.warns(
        UserWarning, match=r"2 convolution\(s\) keep .* not multiples of 8 \(e.g. 0: 22\)"
    ):
        ns.prune.channels(model, ratio=0.3, example_inputs=x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rounded = ns.prune.channels(model, ratio=0.3, round_to=8, example_inputs=x)
    assert [rounded[0].out_channels, rounded[2].out_channels] == [24, 48]
