"""Datasets. The default is scikit-learn's bundled 8x8 digits (1,797 images, shipped inside the
package: nothing is downloaded). Splits are stratified and deterministic for a given seed.

`augment_factor` > 1 grows the TRAIN split only to factor x its size with deterministic shifted copies
of its 8x8 images (copy 0: the originals; copies 1-8: every image moved one pixel in each of the 8
directions; further copies: each image moved by its own shift of up to 2 pixels, drawn from `seed`).
Vacated pixels are 0 (the digits' blank background); labels are the originals'."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from wattflow.config import DataConfig


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


SIDE = 8  # digits are 8x8
ONE_PIXEL = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
UP_TO_TWO = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3) if (dy, dx) != (0, 0)]


def shift_images(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Move flattened 8x8 images `dy` rows down and `dx` columns right, filling with 0."""
    img = x.reshape(-1, SIDE, SIDE)
    out = np.zeros_like(img)
    out[:, max(dy, 0):SIDE + min(dy, 0), max(dx, 0):SIDE + min(dx, 0)] = \
        img[:, max(-dy, 0):SIDE + min(-dy, 0), max(-dx, 0):SIDE + min(-dx, 0)]
    return out.reshape(x.shape)


def augment(split: Split, factor: int, seed: int) -> Split:
    """`factor` copies of `split` concatenated: the originals first, then shifted copies (see module doc)."""
    copies = [split.x]
    rng = np.random.default_rng(seed)
    for c in range(1, factor):
        if c <= len(ONE_PIXEL):
            copies.append(shift_images(split.x, *ONE_PIXEL[c - 1]))
        else:  # one shift per image, so later copies are new combinations, not repeats
            picks = rng.integers(len(UP_TO_TWO), size=len(split.y))
            moved = np.empty_like(split.x)
            for i, (dy, dx) in enumerate(UP_TO_TWO):
                moved[picks == i] = shift_images(split.x[picks == i], dy, dx)
            copies.append(moved)
    return Split(np.concatenate(copies), np.tile(split.y, factor))


@lru_cache(maxsize=8)
def load_splits(dataset: str = "digits", val_fraction: float = 0.15, test_fraction: float = 0.2,
                seed: int = 0, augment_factor: int = 1) -> Splits:
    if dataset != "digits":
        raise ValueError(f"unknown dataset {dataset!r}; allowed: digits")
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)  # pixel intensities are 0..16
    y = bunch.target.astype(np.int64)
    x_rest, x_test, y_rest, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed)
    x_train, x_val, y_train, y_val = train_test_split(
        x_rest, y_rest, test_size=val_fraction / (1.0 - test_fraction), stratify=y_rest, random_state=seed)
    if not 1 <= augment_factor <= 64:
        raise ValueError(f"augment_factor must be in [1, 64]; got {augment_factor}")
    train = augment(Split(x_train, y_train), augment_factor, seed)
    return Splits(train, Split(x_val, y_val), Split(x_test, y_test))


def splits_for(data: DataConfig) -> Splits:
    """The splits a `DataConfig` describes (cached by load_splits)."""
    return load_splits(data.dataset, data.val_fraction, data.test_fraction, data.seed, data.augment_factor)
