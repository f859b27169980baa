"""Datasets. The default is scikit-learn's bundled 8x8 digits (1,797 images, shipped inside the
package: nothing is downloaded). Splits are stratified and deterministic for a given seed."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # float32 [N, features], scaled to [0, 1]
    y: np.ndarray  # int64 [N]


@dataclass(frozen=True)
class Splits:
    train: Split
    val: Split
    test: Split

    @property
    def in_features(self) -> int:
        return int(self.train.x.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.train.y.max()) + 1


@lru_cache(maxsize=8)
def load_splits(dataset: str = "digits", val_fraction: float = 0.15, test_fraction: float = 0.2,
                seed: int = 0) -> Splits:
    if dataset != "digits":
        raise ValueError(f"unknown dataset {dataset!r}; allowed: digits")
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)  # pixel intensities are 0..16
    y = bunch.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction / (1.0 - test_fraction), stratify=y_rest, random_state=seed)
    return Splits(Split(x_train, y_train), Split(x_val, y_val), Split(x_test, y_test))
