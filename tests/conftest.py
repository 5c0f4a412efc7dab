"""Shared fixtures: the foreign models of :mod:`foreign_models`, by name."""

from __future__ import annotations

import pytest
import torch

from foreign_models import FOREIGN, Foreign


@pytest.fixture(params=FOREIGN, ids=lambda f: f.name)
def foreign(request: pytest.FixtureRequest) -> Foreign:
    """Each foreign model in turn (the Hugging Face ones only when transformers is installed)."""
    return request.param


@pytest.fixture
def one_thread():
    """Run the test on one intra-op thread (tiny models; the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
