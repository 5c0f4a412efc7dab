"""The training loop: determinism, optimizers and schedules, evaluation, best weights, stopping."""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from netshrink.config import TrainConfig
from netshrink.context import Context
from netshrink.errors import ConfigError, DataError
from netshrink.metrics import accuracy
from netshrink.train import finetune, fit
from netshrink.training.optim import lr_factor


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: several threads each only wait on each other
    (50x slower under load); other test files of this area import this fixture."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(n: int = 128, batch: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] - x[:, 2] > 0).long()
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))


def test_training_learns_and_is_deterministic() -> None:
    a, b, c = _model(), _model(), _model()
    caller_rng = torch.get_rng_state()
    config = TrainConfig(epochs=6, lr=0.02)
    ra = fit(a, _data(), config, seed=1, progress=False)
    assert torch.equal(torch.get_rng_state(), caller_rng)  # fit leaves the caller's RNG alone
    rb = fit(b, _data(), config, seed=1, progress=False)
    fit(c, _data(), config, seed=2, progress=False)
    assert ra.step_losses == rb.step_losses and len(ra.step_losses) == 48
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))
    assert ra.epoch_losses[-1] < 0.6 * ra.epoch_losses[0]
    assert accuracy(a, _data()) > 0.9 and not a.training


@pytest.mark.parametrize(
    ("optimizer", "schedule"), [("adamw", "cosine"), ("adam", "linear"), ("sgd", "constant")]
)
def test_every_optimizer_and_schedule_trains(optimizer: str, schedule: str) -> None:
    config = TrainConfig(
        epochs=4, lr=0.05, optimizer=optimizer, schedule=schedule, warmup_steps=2, grad_clip=1.0
    )
    res = fit(_model(), _data(64), config, progress=False)
    assert res.epoch_losses[-1] < res.epoch_losses[0]


def test_lr_factor_shapes() -> None:
    cos = lr_factor("cosine", total_steps=10)
    assert cos(0) == 1.0 and math.isclose(cos(5), 0.5) and cos(10) == 0.0
    lin = lr_factor("linear", total_steps=12, warmup_steps=2)
    assert [lin(0), lin(1)] == [1 / 3, 2 / 3] and lin(2) == 1.0 and math.isclose(lin(7), 0.5)
    assert lr_factor("constant", 5)(4) == 1.0


def test_best_weights_are_kept_and_patience_stops() -> None:
    metrics = iter([0.1, 0.2, 0.9, 0.5, 0.4, 0.3, 0.1])  # the starting weights, then each epoch
    snapshots: list[dict[str, torch.Tensor]] = []

    def evaluate(model: nn.Module, batches) -> float:
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
        return next(metrics)

    model = _model()
    config = TrainConfig(epochs=6, patience=2)
    res = fit(model, _data(), config, val_data=_data(32), evaluate=evaluate, progress=False)
    assert res.start_metric == 0.1 and res.val_metrics == [0.2, 0.9, 0.5, 0.4]
    assert res.stopped_early
    assert res.best_epoch == 1 and res.best_metric == 0.9 and len(res.epoch_losses) == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshots[2][k]), k


def test_training_that_only_hurts_ends_with_the_starting_weights() -> None:
    metrics = iter([0.9, 0.5, 0.4, 0.3])
    model = _model()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    config = TrainConfig(epochs=3, lr=0.5)
    res = fit(
        model, _data(), config, val_data=_data(32), evaluate=lambda m, b: next(metrics),
        progress=False,
    )  # fmt: skip
    assert res.val_metrics == [0.5, 0.4, 0.3] and res.steps > 0
    assert res.best_epoch is None and res.best_metric == res.start_metric == 0.9
    for k, v in model.state_dict().items():
        assert torch.equal(v, start[k]), k


def test_default_metric_is_minus_validation_loss() -> None:
    config = TrainConfig(epochs=2, keep_best=False)
    res = fit(_model(), _data(), config, val_data=_data(32), progress=False)
    assert len(res.val_metrics) == 2 and all(-1.0 < m < 0 for m in res.val_metrics)


def test_bad_arguments_are_rejected_before_training() -> None:
    model = _model()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValidationError, match=r"optimizer\n.*'adamw', 'adam' or 'sgd'"):
        TrainConfig(optimizer="lion")
    with pytest.raises(ValidationError, match=r"schedule\n"):
        TrainConfig(schedule="step")
    with pytest.raises(ValidationError, match=r"lr\n.*greater than 0"):
        TrainConfig(lr=-1.0)
    with pytest.raises(ConfigError, match=r"early stopping \(patience=2\) needs val_data"):
        fit(model, _data(), TrainConfig(patience=2), progress=False)
    with pytest.raises(DataError, match="train_data is empty"):
        fit(model, [], TrainConfig(), progress=False)
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters(), strict=True))


def test_finetune_evaluates_on_val_data_and_keeps_the_best() -> None:
    model = _model()
    ctx = Context(train_data=_data(), val_data=_data(32), progress=False)
    out = finetune(model, TrainConfig(epochs=3, lr=0.02), ctx, desc="ft")
    assert out is model and not model.training and accuracy(model, _data(32)) > 0.8


def test_sharding_gives_every_rank_as_many_batches_and_covers_all() -> None:
    from netshrink.training.distributed import World, shard

    parts = [shard(range(5), World(rank, 2)) for rank in range(2)]
    assert parts == [[0, 2, 4], [1, 3, 0]]  # padded by wrapping, like DistributedSampler
    assert shard([3, 1, 2], World()) == [3, 1, 2]
    three = [shard(range(7), World(rank, 3)) for rank in range(3)]
    assert {len(p) for p in three} == {3} and set().union(*three) == set(range(7))


def test_trained_techniques_take_every_training_option_under_its_old_key() -> None:
    import netshrink  # noqa: F401  (registers the techniques)
    from netshrink import registry

    keys = set(TrainConfig.model_fields)
    for name in ("distill.kd", "quantize.qat"):
        assert keys <= set(registry.get(name).config.model_fields), name
    kd = registry.get("distill.kd")
    old_keys = {"epochs": 2, "lr": 0.01, "weight_decay": 0.1, "optimizer": "sgd"}
    old_keys |= {"schedule": "linear", "warmup_steps": 3, "patience": 2}
    config = kd.make_config({**old_keys, "checkpoint_dir": "c", "checkpoint_every": 5})
    assert {k: getattr(config, k) for k in old_keys} == old_keys
    assert kd.make_config({}).epochs == 10  # each technique keeps its own defaults
    assert registry.get("quantize.qat").make_config({}).lr == 3e-4
    magnitude = registry.get("prune.magnitude")
    assert magnitude.make_config({"finetune": {"grad_clip": 1.0}}).finetune.grad_clip == 1.0
    with pytest.raises(ConfigError, match=r"finetune\.epoch.*did you mean 'epochs'"):
        magnitude.make_config({"finetune": {"epoch": 1}})
