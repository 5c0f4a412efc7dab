"""The built-in dataset: scikit-learn's handwritten digits (1,797 images of 8x8 pixels).

scikit-learn ships the data inside its wheel, so loading needs no network. Pixel values are
integers 0..16; they are scaled to [0, 1].
"""

from __future__ import annotations

from functools import lru_cache

import torch

from netshrink.data.splits import DataSplits, stratified_indices, subset, to_batches

FRACTIONS = (0.70, 0.15, 0.15)
"""Train / validation / test shares of every class."""


@lru_cache(maxsize=1)
def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All digits: inputs float32 ``(1797, 1, 8, 8)`` in [0, 1], labels int64 ``(1797,)``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    inputs = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return inputs, labels


def digits(batch_size: int = 64, seed: int = 0, calib_size: int = 256) -> DataSplits:
    """The digits split 70/15/15 (stratified by class, seeded), plus a calibration subset.

    ``calib`` holds ``calib_size`` examples drawn from the training split. The same ``seed``
    gives the same split on every machine. Inputs are ``(N, 1, 8, 8)`` float32, targets int64.
    """
    inputs, labels = digits_tensors()
    train, val, test = stratified_indices(labels, FRACTIONS, seed)
    calib = subset(train, calib_size, seed)

    def batches(index: torch.Tensor) -> list:
        return to_batches(inputs[index], labels[index], batch_size)

    return DataSplits(
        train=batches(train), val=batches(val), test=batches(test), calib=batches(calib)
    )
