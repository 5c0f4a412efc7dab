"""Distillation losses: soft targets, hint (feature) matching and attention transfer."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_target_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened softmaxes, times ``temperature**2``.

    Hinton et al. 2015, sec. 2: softening with T > 1 exposes the teacher's small probabilities
    ("dark knowledge"); the gradients of the soft term scale as 1/T^2, so multiplying by T^2
    keeps its weight against the hard-label term unchanged when T changes. Logits are
    ``(..., classes)``; the loss is the mean over every predicted distribution.
    """
    t = temperature
    s = F.log_softmax(student_logits.flatten(0, -2) / t, dim=-1)
    p = F.log_softmax(teacher_logits.flatten(0, -2) / t, dim=-1)
    return F.kl_div(s, p, log_target=True, reduction="batchmean") * (t * t)


def hard_label_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against integer labels, or MSE against float targets of the same shape."""
    if targets.is_floating_point():
        return F.mse_loss(outputs, targets)
    return F.cross_entropy(outputs.flatten(0, -2), targets.flatten())


def attention_map(features: torch.Tensor) -> torch.Tensor:
    """Spatial attention of ``(N, C, H, W)`` activations: ``(N, H*W)``, unit L2 norm per example.

    Zagoruyko & Komodakis 2017, sec. 3.1: the map is the channel-wise sum of squared activations
    (their F^2_sum; a mean differs by the constant C, which the normalisation removes), so
    student and teacher compare where they look even when their channel counts differ.
    """
    return F.normalize(features.pow(2).mean(dim=1).flatten(1), dim=1)


def attention_transfer_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared distance of normalised attention maps, averaged over examples and positions.

    Zagoruyko & Komodakis 2017, eq. 2 with p = 2; averaging over positions is their beta
    "divided by the number of elements in the attention map and batch size" (sec. 4.1).
    """
    return (attention_map(student) - attention_map(teacher)).pow(2).mean()
