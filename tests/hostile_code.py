"""User code that misbehaves, for the reliability tests: factories, data and metrics."""

from __future__ import annotations

import os
import signal
import sys

import torch
from torch import nn

import recipe_fakes


def raising_model() -> nn.Module:
    raise ValueError("weights server unreachable")


def exiting_model() -> nn.Module:
    sys.exit(3)


def raising_data() -> dict:
    raise KeyError("no such split file")


def wide_model() -> nn.Module:
    """Takes 5 features where the data has 4: the forward fails on shapes."""
    return nn.Sequential(nn.Linear(5, 2))


def data_with(**override) -> dict:
    data = recipe_fakes.cli_data()
    return {**data, **override}


def labels_out_of_range() -> dict:
    x = torch.randn(8, 4)
    return data_with(val=[(x, torch.full((8,), 7))])


def triples() -> dict:
    x = torch.randn(8, 4)
    return data_with(train=[(x, torch.zeros(8, dtype=torch.long), "extra")])


def strings_as_inputs() -> dict:
    return data_with(calib=[("not a tensor", None)])


def nan_inputs() -> dict:
    return data_with(val=[(torch.full((8, 4), float("nan")), torch.zeros(8, dtype=torch.long))])


def failing_generator() -> dict:
    def batches():
        yield (torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
        raise OSError("disk read failed")

    return data_with(train=batches())


def raising_metric(model: nn.Module, batches) -> float:
    raise RuntimeError("metric server down")


def exiting_metric(model: nn.Module, batches) -> float:
    raise SystemExit("bye")


def os_exit_model() -> nn.Module:
    os._exit(0)


def aborting_model() -> nn.Module:
    os.abort()


def sigterm_model() -> nn.Module:
    os.kill(os.getpid(), signal.SIGTERM)
    return nn.Linear(4, 2)


def sigkill_data() -> dict:
    os.kill(os.getpid(), signal.SIGKILL)
    return {}


def os_exit_metric(model: nn.Module, batches) -> float:
    os._exit(0)


def endless_data() -> dict:
    def batches():
        x, y = torch.randn(8, 4), torch.zeros(8, dtype=torch.long)
        while True:
            yield (x, y)

    return data_with(calib=batches())


def interrupted_model() -> nn.Module:
    raise KeyboardInterrupt
