"""Deterministic augmentation of the train split (DataConfig.augment_factor)."""

import numpy as np
import pytest
from pydantic import ValidationError

from wattflow.config import DataConfig
from wattflow.data import ONE_PIXEL, load_splits


def test_only_train_grows_by_the_factor():
    base, big = load_splits(), load_splits(augment_factor=4)
    assert len(big.train.y) == 4 * len(base.train.y)
    np.testing.assert_array_equal(big.train.x[: len(base.train.y)], base.train.x)
    for name in ("val", "test"):
        np.testing.assert_array_equal(getattr(big, name).x, getattr(base, name).x)
        np.testing.assert_array_equal(getattr(big, name).y, getattr(base, name).y)


def test_deterministic_and_seeded():
    a, b = load_splits(augment_factor=20), load_splits.__wrapped__(augment_factor=20)
    np.testing.assert_array_equal(a.train.x, b.train.x)
    np.testing.assert_array_equal(a.train.y, b.train.y)
    assert len(np.unique(a.train.x, axis=0)) > 10 * len(load_splits().train.y)  # mostly new images


def test_shifted_copies_keep_labels_and_move_pixels():
    base, big = load_splits(), load_splits(augment_factor=9)
    n = len(base.train.y)
    orig = base.train.x.reshape(-1, 8, 8)
    for c, (dy, dx) in enumerate(ONE_PIXEL, start=1):
        np.testing.assert_array_equal(big.train.y[c * n:(c + 1) * n], base.train.y)
        moved = big.train.x[c * n:(c + 1) * n].reshape(-1, 8, 8)
        # pixel (r, k) of the original is at (r + dy, k + dx) in the copy
        np.testing.assert_array_equal(np.roll(moved, (-dy, -dx), axis=(1, 2))[:, 1:7, 1:7], orig[:, 1:7, 1:7])
        edge = moved[:, 0 if dy == 1 else 7, :] if dy else moved[:, :, 0 if dx == 1 else 7]
        assert not edge.any()  # vacated pixels are blank


def test_factor_validated():
    assert DataConfig(augment_factor=64).augment_factor == 64
    for bad in (0, 65):
        with pytest.raises(ValidationError):
            DataConfig(augment_factor=bad)
    with pytest.raises(ValueError):
        load_splits(augment_factor=0)
