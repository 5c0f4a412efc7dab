"""Distillation losses against their definitions (Hinton 2015; Zagoruyko & Komodakis 2017)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from netshrink.distill.losses import attention_map, attention_transfer_loss, soft_target_loss
from test_train import one_thread  # noqa: F401  (autouse fixture)

seeds = st.integers(0, 10_000)
temperatures = st.floats(0.5, 20.0)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, t=temperatures, n=st.integers(1, 8), k=st.integers(2, 12))
def test_soft_target_loss_is_scaled_kl_with_the_papers_gradient(
    seed: int, t: float, n: int, k: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(n, k, generator=g, dtype=torch.float64) * 3).requires_grad_()
    z = torch.randn(n, k, generator=g, dtype=torch.float64) * 3
    loss = soft_target_loss(s, z, t)
    p, q = F.softmax(z / t, dim=1), F.softmax(s / t, dim=1)
    kl = (p * (p.log() - q.log())).sum(dim=1).mean()
    torch.testing.assert_close(loss, kl * t * t, rtol=1e-9, atol=1e-12)
    # Hinton et al. 2015, eq. 1 (times T^2, per example): dC/dz_i = T (q_i - p_i) / n.
    (grad,) = torch.autograd.grad(loss, s)
    torch.testing.assert_close(grad, t * (q - p).detach() / n, rtol=1e-7, atol=1e-10)
    assert float(soft_target_loss(z, z, t)) < 1e-12


@settings(max_examples=30, deadline=None)
@given(seed=seeds, scale=st.floats(0.1, 10.0), c1=st.integers(1, 6), c2=st.integers(1, 6))
def test_attention_maps_ignore_scale_and_channel_count(
    seed: int, scale: float, c1: int, c2: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    pattern = torch.rand(3, 1, 4, 5, generator=g, dtype=torch.float64) + 0.1
    a = pattern.expand(3, c1, 4, 5)
    b = pattern.expand(3, c2, 4, 5) * scale
    q = attention_map(a)
    assert q.shape == (3, 20)
    torch.testing.assert_close(q.norm(dim=1), torch.ones(3, dtype=torch.float64))
    assert float(attention_transfer_loss(a, b)) < 1e-20
    other = torch.rand(3, c2, 4, 5, generator=g, dtype=torch.float64)
    expected = (attention_map(a) - attention_map(other)).pow(2).sum() / 60
    torch.testing.assert_close(attention_transfer_loss(a, other), expected)
