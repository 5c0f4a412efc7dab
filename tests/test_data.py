"""The built-in digits data: split sizes, disjointness, stratification, determinism."""

from __future__ import annotations

import pytest
import torch

from netshrink.data import DataSplits, digits
from netshrink.data.splits import stratified_indices, subset, to_batches
from netshrink.errors import ConfigError, DataError


def _cat(batches: list) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def _rows(batches: list) -> set[tuple[bytes, int]]:
    x, y = _cat(batches)
    return {(xi.numpy().tobytes(), int(yi)) for xi, yi in zip(x, y, strict=True)}


@pytest.fixture(scope="module")
def splits() -> DataSplits:
    return digits(batch_size=50)


def test_shapes_dtypes_and_range(splits: DataSplits) -> None:
    for part in (splits.train, splits.val, splits.test, splits.calib):
        x, y = _cat(part)
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8) and len(x) == len(y)
        assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
        assert all(len(b[1]) <= 50 for b in part)
    assert float(_cat(splits.train)[0].max()) == 1.0  # 16/16: the scaling is by 16


def test_sizes_follow_70_15_15_and_calib_256(splits: DataSplits) -> None:
    sizes = [len(_cat(p)[1]) for p in (splits.train, splits.val, splits.test, splits.calib)]
    assert sum(sizes[:3]) == 1797
    assert sizes[0] == pytest.approx(0.70 * 1797, abs=10)
    assert sizes[1] == pytest.approx(0.15 * 1797, abs=10)
    assert sizes[3] == 256


def test_calib_is_drawn_from_train(splits: DataSplits) -> None:
    assert _rows(splits.calib) <= _rows(splits.train)


def test_every_class_in_every_split_in_proportion(splits: DataSplits) -> None:
    for part, share in ((splits.train, 0.70), (splits.test, 0.15)):
        counts = torch.bincount(_cat(part)[1], minlength=10)
        totals = torch.bincount(_cat(splits.train + splits.val + splits.test)[1])
        assert torch.all((counts - share * totals).abs() <= 1)


def test_deterministic_and_seed_dependent(splits: DataSplits) -> None:
    again = digits(batch_size=50)
    for a, b in zip(_cat(splits.test), _cat(again.test), strict=True):
        assert torch.equal(a, b)
    other = digits(batch_size=50, seed=1)
    assert not torch.equal(_cat(splits.test)[0], _cat(other.test)[0])


def test_split_is_pinned_across_machines() -> None:
    # torch.randperm on CPU is stable across machines and versions; a change here means
    # previously published numbers no longer refer to the same test set.
    labels = torch.arange(1797) % 10
    train, val, test = stratified_indices(labels, (0.7, 0.15, 0.15), seed=0)
    assert (len(train), len(val), len(test)) == (1257, 270, 270)
    assert test[:5].tolist() == [4, 6, 10, 37, 44]


def test_stratified_indices_are_disjoint_and_cover() -> None:
    labels = torch.randint(0, 7, (503,), generator=torch.Generator().manual_seed(3))
    parts = stratified_indices(labels, (0.5, 0.3, 0.2), seed=5)
    joined = torch.cat(parts)
    assert len(joined) == 503 and len(torch.unique(joined)) == 503


def test_subset_draws_without_replacement() -> None:
    chosen = subset(torch.arange(100, 200), 30, seed=0)
    assert len(torch.unique(chosen)) == 30 and int(chosen.min()) >= 100
    assert torch.equal(chosen, subset(torch.arange(100, 200), 30, seed=0))


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: digits(batch_size=0), ConfigError),
        (lambda: digits(calib_size=5000), ConfigError),
        (lambda: stratified_indices(torch.zeros(4), (0.5, 0.6), seed=0), ConfigError),
        (lambda: to_batches(torch.zeros(3, 2), torch.zeros(2), 2), DataError),
    ],
)
def test_bad_options_raise(call, error) -> None:
    with pytest.raises(error):
        call()


def test_as_mapping_names_every_split(splits: DataSplits) -> None:
    mapping = splits.as_mapping()
    assert set(mapping) == {"train", "val", "test", "calib"}
    assert mapping["calib"] is splits.calib
