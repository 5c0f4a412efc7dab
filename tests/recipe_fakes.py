"""Tiny fake techniques, model and data for the recipe, report and CLI tests.

The fakes are registered only inside :func:`registered` and removed from the registry after, so
the runner is tested independently of the real techniques.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from pydantic import Field
from torch import nn

from netshrink import registry
from netshrink.config import TechniqueConfig, TrainConfig
from netshrink.errors import UnsupportedModuleError
from netshrink.train import fit

CALLS: list[str] = []
"""Names of the fake techniques in the order they ran."""
TEACHERS: list[nn.Module] = []
"""The teacher each run of ``distill.fake_teacher`` saw."""


class ZeroConfig(TechniqueConfig):
    fraction: float = Field(0.5, ge=0, le=1, description="fraction of weights set to zero")


class NoiseConfig(TechniqueConfig):
    scale: float = Field(1.0, ge=0, description="std of the noise added to every weight")


class ShrinkConfig(TechniqueConfig):
    hidden: int = Field(8, ge=1, le=1024, description="hidden width to keep")


class EmptyConfig(TechniqueConfig):
    pass


def fake_zero(model: nn.Module, config: ZeroConfig, ctx) -> nn.Module:
    """Zero the smallest-magnitude fraction of every Linear weight."""
    CALLS.append("prune.fake_zero")
    for m in model.modules():
        if isinstance(m, nn.Linear):
            k = int(config.fraction * m.weight.numel())
            if k:
                cut = m.weight.detach().abs().flatten().kthvalue(k).values
                m.weight.data[m.weight.detach().abs() <= cut] = 0
    return model


def fake_noise(model: nn.Module, config: NoiseConfig, ctx) -> nn.Module:
    """Add seeded Gaussian noise to every parameter (ruins the metric on purpose)."""
    CALLS.append("prune.fake_noise")
    gen = torch.Generator().manual_seed(ctx.seed)
    for p in model.parameters():
        p.data += config.scale * torch.randn(p.shape, generator=gen)
    return model


def fake_shrink(model: nn.Module, config: ShrinkConfig, ctx) -> nn.Module:
    """Keep the first ``hidden`` units of the MLP's hidden layer (physically smaller)."""
    CALLS.append("lowrank.fake_shrink")
    first, last = model[0], model[2]
    h = min(config.hidden, first.out_features)
    new_first, new_last = nn.Linear(first.in_features, h), nn.Linear(h, last.out_features)
    new_first.weight.data = first.weight.data[:h].clone()
    new_first.bias.data = first.bias.data[:h].clone()
    new_last.weight.data = last.weight.data[:, :h].clone()
    new_last.bias.data = last.bias.data.clone()
    model[0], model[2] = new_first, new_last
    return model


def fake_calib(model: nn.Module, config: EmptyConfig, ctx) -> nn.Module:
    """Needs calibration data; changes nothing."""
    CALLS.append("quantize.fake_calib")
    return model


def fake_teacher(model: nn.Module, config: EmptyConfig, ctx) -> nn.Module:
    """Needs a teacher; records which one it got."""
    CALLS.append("distill.fake_teacher")
    TEACHERS.append(ctx.teacher)
    return model


def fake_fail(model: nn.Module, config: EmptyConfig, ctx) -> nn.Module:
    """Always fails the way a technique meeting an unknown layer does."""
    raise UnsupportedModuleError("fake_fail cannot handle any layer")


FAKES = (
    ("prune.fake_zero", ZeroConfig, fake_zero, ()),
    ("prune.fake_noise", NoiseConfig, fake_noise, ()),
    ("lowrank.fake_shrink", ShrinkConfig, fake_shrink, ()),
    ("quantize.fake_calib", EmptyConfig, fake_calib, ("calib_data",)),
    ("distill.fake_teacher", EmptyConfig, fake_teacher, ("teacher",)),
    ("prune.fake_fail", EmptyConfig, fake_fail, ()),
)


@contextlib.contextmanager
def registered() -> Iterator[None]:
    """Register the fake techniques for the duration of the block."""
    registry.load_all()
    for name, config, fn, needs in FAKES:
        registry.technique(name, config, needs)(fn)
    try:
        yield
    finally:
        for name, *_ in FAKES:
            registry._REGISTRY.pop(name, None)


def tiny_data(seed: int = 0, batches: int = 4, size: int = 32) -> list[tuple[torch.Tensor, ...]]:
    """Two Gaussian classes in 4-d: label = whether x0 + x1 > 0."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        x = torch.randn(size, 4, generator=gen)
        out.append((x, (x[:, 0] + x[:, 1] > 0).long()))
    return out


def tiny_model(seed: int = 0, trained: bool = True) -> nn.Sequential:
    """A 4-32-2 MLP, trained to near-perfect accuracy on :func:`tiny_data` when ``trained``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 2))
    if trained:
        fit(
            model,
            tiny_data(seed + 1, batches=8),
            TrainConfig(epochs=15, lr=1e-2),
            seed=seed,
            progress=False,
        )
    return model.eval()


def context() -> dict:
    """Every context item the fakes and the runner need."""
    return {
        "example_inputs": (tiny_data(9, 1)[0][0],),
        "calib_data": tiny_data(2, 2),
        "train_data": tiny_data(3, 4),
        "val_data": tiny_data(4, 2),
        "progress": False,
    }


def untrained_model() -> nn.Sequential:
    """The MLP's architecture with its initial weights (a ``--model`` factory for --weights)."""
    return tiny_model(trained=False)


def cli_data() -> dict:
    """A ``--data`` function: the splits of :func:`context` under the names the CLI wants."""
    ctx = context()
    return {"train": ctx["train_data"], "val": ctx["val_data"], "calib": ctx["calib_data"]}


def bad_metric(model: nn.Module, batches) -> str:
    """A ``--eval`` function that breaks the contract: it returns text."""
    return "high"


def agreement(model: nn.Module, batches) -> float:
    """A ``--eval`` function with its own name: top-1 accuracy under another name."""
    from netshrink.metrics import accuracy

    return accuracy(model, batches)
