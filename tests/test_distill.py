"""distill.kd: teacher -> student training, features, students built from the teacher, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import netshrink as ns
from netshrink.config import TrainConfig
from netshrink.distill.losses import attention_transfer_loss
from netshrink.distill.student import block_stacks, kept_count
from netshrink.errors import ConfigError, TargetError, UnsupportedModuleError
from netshrink.prune.layers import alternate
from test_train import one_thread  # noqa: F401  (autouse fixture)


class TinyCNN(nn.Module):
    """(N, 1, 6, 6) -> 3 logits; ``c`` channels in both convolutions."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.fc = nn.Linear(c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


class Stack(nn.Module):
    """An input layer, four identical blocks, a head: what depth= shrinks."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.Sequential(*(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(4)))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.inp(x)))


def images(n_batches: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_batches * 16, 1, 6, 6, generator=g)
    y = torch.randint(0, 3, (n_batches * 16,), generator=g)
    return [(x[i : i + 16], y[i : i + 16]) for i in range(0, len(x), 16)]


def built(cls, *args) -> nn.Module:
    torch.manual_seed(1)
    return cls(*args)


@torch.no_grad()
def kl_to(teacher: nn.Module, student: nn.Module, data) -> float:
    return sum(
        float(F.kl_div(F.log_softmax(student(x), 1), F.softmax(teacher(x), 1), reduction="sum"))
        for x, _ in data
    )


def no_hooks(*models: nn.Module) -> bool:
    return all(not m._forward_hooks for model in models for m in model.modules())


def test_student_learns_the_teacher_and_the_teacher_is_left_alone() -> None:
    teacher, student = built(TinyCNN, 8).train(), built(TinyCNN, 4)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    gap = kl_to(teacher, student, images())
    out = ns.distill.kd(
        student,
        teacher=teacher,
        train_data=images(),
        epochs=8,
        lr=0.02,
        alpha=1.0,
        temperature=2.0,
        progress=False,
    )
    assert out is not student and not out.training
    assert kl_to(teacher, out, images()) < 0.3 * gap
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())
    assert teacher.training  # its mode is given back
    assert no_hooks(teacher, student, out)


def test_attention_transfer_pulls_attention_maps_together() -> None:
    teacher, student = built(TinyCNN, 8), built(TinyCNN, 4)

    def at_gap(model: nn.Module) -> float:
        x = torch.cat([b[0] for b in images()])
        with torch.no_grad():
            s = model.conv2(F.relu(model.conv1(x)))
            t = teacher.conv2(F.relu(teacher.conv1(x)))
        return float(attention_transfer_loss(s, t))

    features = [{"student": "conv2", "loss": "attention"}]
    out = ns.distill.kd(
        student,
        teacher=teacher,
        train_data=images(),
        epochs=6,
        lr=0.02,
        alpha=0.0,
        features=features,
        progress=False,
    )
    assert at_gap(out) < 0.5 * at_gap(student)
    assert no_hooks(teacher, out)


def test_adapters_are_1x1_conv_or_linear_and_learn() -> None:
    from netshrink.distill.objective import Distiller
    from netshrink.distill.technique import KDConfig
    from netshrink.train import fit

    teacher, student = built(TinyCNN, 8), built(TinyCNN, 4)
    cfg = KDConfig(features=["conv1", "fc"])
    d = Distiller(
        teacher,
        student,
        temperature=2.0,
        alpha=0.5,
        output_loss="auto",
        features=cfg.features,
        cache=True,
    )
    d.prepare(student, images()[0])
    assert isinstance(d.adapters[0], nn.Conv2d) and d.adapters[0].kernel_size == (1, 1)
    assert d.adapters[0].in_channels == 4 and d.adapters[0].out_channels == 8
    assert isinstance(d.adapters[1], nn.Identity)  # both fc outputs have 3 features
    start = d.adapters[0].weight.clone()
    res = fit(student, images(), TrainConfig(epochs=3, lr=0.02), loss_fn=d, aux=d, progress=False)
    d.close()
    assert not torch.equal(start, d.adapters[0].weight)
    assert res.epoch_losses[-1] < res.epoch_losses[0]


def test_teacher_outputs_are_cached_across_epochs() -> None:
    teacher, student = built(TinyCNN, 8), built(TinyCNN, 4)
    calls = {"n": 0}
    teacher.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    ns.distill.kd(student, teacher=teacher, train_data=images(4), epochs=3, progress=False)
    assert calls["n"] == 1 + 4  # the shape probe, then each batch once
    calls["n"] = 0
    ns.distill.kd(
        student,
        teacher=teacher,
        train_data=images(4),
        epochs=3,
        progress=False,
        cache_teacher=False,
    )
    assert calls["n"] == 1 + 12


def test_embeddings_without_softmax_use_mse_through_a_projection() -> None:
    teacher = built(nn.Linear, 6, 10)  # an "encoder" emitting 10-d embeddings
    student = built(nn.Linear, 6, 4)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 6, generator=g), torch.zeros(16)) for _ in range(4)]
    out = ns.distill.kd(
        student, teacher=teacher, train_data=data, alpha=1.0, epochs=20, lr=0.05, progress=False
    )
    assert out.weight.shape == (4, 6)


def test_depth_keeps_every_other_block_with_teacher_weights() -> None:
    teacher = built(Stack)
    assert list(block_stacks(teacher)) == ["blocks"]
    assert alternate(12, kept_count(12, 0.5, "s")) == [0, 2, 4, 6, 8, 10]
    assert kept_count(4, 0.1, "s") == 1 and kept_count(4, 3, "s") == 3
    data = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(2)]
    student = {"depth": 0.5, "layers": "alternate"}
    out = ns.distill.kd(teacher, student=student, train_data=data, epochs=0, progress=False)
    assert len(out.blocks) == 2
    for kept, source in zip(out.blocks, (teacher.blocks[0], teacher.blocks[2]), strict=True):
        assert torch.equal(kept[0].weight, source[0].weight)
    assert out(torch.randn(5, 4)).shape == (5, 3)
    with pytest.raises(UnsupportedModuleError, match="stack of identical blocks"):
        ns.distill.kd(
            built(TinyCNN, 4), student={"depth": 0.5}, train_data=images(), progress=False
        )


def test_unknown_layer_names_list_the_available_ones() -> None:
    teacher, student = built(TinyCNN, 8), built(TinyCNN, 4)
    with pytest.raises(TargetError, match=r"student has no module named 'conv3'.*conv1, conv2, fc"):
        ns.distill.kd(
            student, teacher=teacher, train_data=images(), features=["conv3"], progress=False
        )
    with pytest.raises(TargetError, match=r"teacher has no module named 'body'.*conv1, conv2"):
        ns.distill.kd(
            student,
            teacher=teacher,
            train_data=images(),
            progress=False,
            features=[{"student": "conv1", "teacher": "body"}],
        )
    assert no_hooks(teacher, student)


def test_shapes_that_cannot_be_matched_are_errors() -> None:
    teacher, student = built(TinyCNN, 8), built(nn.Sequential, nn.Flatten(), nn.Linear(36, 5))
    with pytest.raises(ConfigError, match=r"teacher outputs \(16, 3\), student outputs \(16, 5\)"):
        ns.distill.kd(student, teacher=teacher, train_data=images(), progress=False)
    with pytest.raises(ConfigError, match=r"cannot be matched.*differ outside"):
        ns.distill.kd(
            built(TinyCNN, 4),
            teacher=teacher,
            train_data=images(),
            progress=False,
            features=[{"student": "conv1", "teacher": "fc"}],
        )
    with pytest.raises(ConfigError, match="attention transfer needs"):
        ns.distill.kd(
            built(TinyCNN, 4),
            teacher=teacher,
            train_data=images(),
            progress=False,
            features=[{"student": "fc", "loss": "attention"}],
        )
    with pytest.raises(ConfigError, match=r"alpha=0\.5 < 1 mixes in a hard-label loss"):
        data = [(torch.randn(4, 6), torch.zeros(4, 2))]
        ns.distill.kd(
            built(nn.Linear, 6, 4),
            teacher=built(nn.Linear, 6, 4),
            alpha=0.5,
            train_data=data,
            progress=False,
        )


def test_options_are_validated() -> None:
    with pytest.raises(ConfigError, match="alpha"):
        ns.distill.kd(built(TinyCNN, 4), alpha=1.5, train_data=images())
    with pytest.raises(ConfigError, match="temperture"):
        ns.distill.kd(built(TinyCNN, 4), temperture=2.0, train_data=images())
    with pytest.raises(ns.MissingInputError, match="train_data"):
        ns.distill.kd(built(TinyCNN, 4))


def test_distillation_resumes_bit_identical_with_its_adapters(tmp_path) -> None:
    options = dict(
        train_data=images(),
        epochs=3,
        lr=0.02,
        features=["conv1"],
        progress=False,
        cache_teacher=False,
        checkpoint_every=2,
    )
    teacher = built(TinyCNN, 8)
    reference = ns.distill.kd(built(TinyCNN, 4), teacher=teacher, **options)

    calls = {"n": 0}

    def crash_at_step_7(*_: object) -> None:
        calls["n"] += 1
        if calls["n"] == 1 + 7:  # the shape probe, then one teacher call a step
            raise KeyboardInterrupt

    handle = teacher.register_forward_pre_hook(crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        ns.distill.kd(built(TinyCNN, 4), teacher=teacher, checkpoint_dir=str(tmp_path), **options)
    handle.remove()
    calls["n"] = 0
    teacher.register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    resumed = ns.distill.kd(
        built(TinyCNN, 4), teacher=teacher, checkpoint_dir=str(tmp_path), **options
    )
    assert calls["n"] == 1 + (12 - 6)  # resumed from the checkpoint of step 6 of 12
    for name, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name


def test_width_without_pruning_or_zoo_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from netshrink import registry

    real_get = registry.get

    def no_channels(name: str):
        if name == "prune.channels":
            raise ConfigError("unknown technique 'prune.channels'")
        return real_get(name)

    monkeypatch.setattr(registry, "get", no_channels)
    with pytest.raises(UnsupportedModuleError, match=r"width=0\.5 needs structured pruning"):
        ns.distill.kd(built(TinyCNN, 8), student={"width": 0.5}, train_data=images())


def test_width_rebuilds_a_zoo_model_narrower_that_saves_and_loads(tmp_path) -> None:
    from netshrink import zoo

    teacher = zoo.build("digits-cnn")
    data = zoo.data("digits-cnn").train[:1]
    out = ns.distill.kd(teacher, student={"width": 0.5}, train_data=data, epochs=1, progress=False)
    assert type(out) is type(teacher)
    assert sum(p.numel() for p in out.parameters()) < 0.3 * sum(
        p.numel() for p in teacher.parameters()
    )
    ns.save(out, tmp_path / "student")
    x = data[0][0]
    assert torch.equal(ns.load(tmp_path / "student")(x), out(x))


def test_width_prunes_a_non_zoo_model_keeping_the_teachers_channels() -> None:
    teacher = built(TinyCNN, 8)
    out = ns.distill.kd(
        teacher, student={"width": 0.5}, train_data=images(), epochs=0, progress=False
    )
    assert (out.conv1.out_channels, out.conv2.out_channels, out.fc.out_features) == (4, 4, 3)
    # Before training, every kept filter is one of the teacher's.
    assert all(any(torch.equal(w, t) for t in teacher.conv1.weight) for w in out.conv1.weight)
