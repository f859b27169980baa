"""Datasets. The default is scikit-learn's bundled 8x8 digits (1,797 images, shipped inside the
package: nothing is downloaded). `dataset: npz` reads your own samples from a .npz file (`x`: float32
[N, features] or [N, 1, side, side]; `y`: integer labels [N]). Splits are stratified and deterministic
for a given seed. A bad file fails with `DataError` (cause and fix) before training starts.

`augment_factor` > 1 grows the TRAIN split only to factor x its size with deterministic shifted copies
of its 8x8 images (copy 0: the originals; copies 1-8: every image moved one pixel in each of the 8
directions; further copies: each image moved by its own shift of up to 2 pixels, drawn from `seed`).
Vacated pixels are 0 (the digits' blank background); labels are the originals'."""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from wattflow.config import DataConfig, PipelineConfig


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file, the cause and the fix."""


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


NPZ_FORMAT = "x: float32 [N, features] or [N, 1, side, side]; y: integer labels [N] in 0..classes-1"


def read_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(x float32 [N, features], y int64 [N]) from a .npz file, or a DataError naming what is wrong."""
    path = Path(path)
    fix = f"write it with numpy.savez(path, x=..., y=...) ({NPZ_FORMAT})"
    if not path.is_file():
        raise DataError(f"data.path {path} does not exist or is not a file; point data.path at your .npz file")
    if path.stat().st_size == 0:
        raise DataError(f"data.path {path} is empty (0 bytes); {fix}")
    try:
        # allow_pickle=False: an .npz holding object arrays could run code when loaded.
        with np.load(path, allow_pickle=False) as npz:
            missing = {"x", "y"} - set(npz.files)
            if missing:
                raise DataError(f"data.path {path} lacks array(s) {sorted(missing)} (it holds {sorted(npz.files)}); "
                                f"{fix}")
            x, y = npz["x"], npz["y"]
        if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):  # numpy hands non-.npy members as bytes
            raise DataError(f"data.path {path} is not a readable .npz file (x or y is not a numpy array); {fix}")
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"data.path {path} is not a readable .npz file ({type(err).__name__}: {err}); {fix}") from None
    return _checked_arrays(path, x, y, fix)


def _checked_arrays(path: Path, x: np.ndarray, y: np.ndarray, fix: str) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim == 4 and x.shape[1] == 1 and x.shape[2] == x.shape[3]:
        x = x.reshape(len(x), -1)  # one-channel square images: the CNN reshapes the flat rows back
    if x.ndim != 2 or x.shape[1] < 1:
        raise DataError(f"data.path {path}: x has shape {list(x.shape)}; {fix}")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(f"data.path {path}: y has shape {list(y.shape)} for {len(x)} samples of x; {fix}")
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"data.path {path}: x has dtype {x.dtype}; {fix}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"data.path {path}: y has dtype {y.dtype}, not integer class labels; {fix}")
    if not np.isfinite(x).all():
        raise DataError(f"data.path {path}: x holds NaN or infinite values; clean or drop those samples")
    if len(y) and y.min() < 0:
        raise DataError(f"data.path {path}: y holds negative labels; number the classes 0..classes-1")
    return x.astype(np.float32), y.astype(np.int64)


def check_class_counts(y: np.ndarray, where: str) -> None:
    """A stratified train/val/test split needs every class at least once in each of the three splits."""
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise DataError(f"{where}: {len(y)} samples of {len(classes)} class(es); a classifier needs at least 2")
    short = {int(c): int(n) for c, n in zip(classes, counts, strict=True) if n < 3}
    if short:
        raise DataError(f"{where}: too few samples per class for a train/val/test split: {short} "
                        "(class: samples); each class needs at least 3 — add samples or drop those classes")


def _raw_samples(dataset: str, path: str | None) -> tuple[np.ndarray, np.ndarray]:
    if dataset == "digits":
        bunch = load_digits()
        return (bunch.data / 16.0).astype(np.float32), bunch.target.astype(np.int64)  # intensities are 0..16
    if dataset == "npz":
        if path is None:
            raise DataError("dataset npz needs data.path: the .npz file with arrays x and y")
        return read_npz(path)
    raise DataError(f"unknown dataset {dataset!r}; allowed: digits, npz")


def _split(x: np.ndarray, y: np.ndarray, val_fraction: float, test_fraction: float, seed: int, where: str):
    check_class_counts(y, where)
    try:
        x_rest, x_test, y_rest, y_test = train_test_split(
            x, y, test_size=test_fraction, stratify=y, random_state=seed)
        x_train, x_val, y_train, y_val = train_test_split(
            x_rest, y_rest, test_size=val_fraction / (1.0 - test_fraction), stratify=y_rest, random_state=seed)
    except ValueError as err:  # sklearn: a split too small to hold every class
        raise DataError(f"{where}: cannot split {len(y)} samples of {len(np.unique(y))} classes into "
                        f"val_fraction={val_fraction} and test_fraction={test_fraction} with every class in each "
                        f"split ({err}); add samples or raise the fractions") from None
    return Split(x_train, y_train), Split(x_val, y_val), Split(x_test, y_test)


@lru_cache(maxsize=8)
def _cached_splits(dataset: str, val_fraction: float, test_fraction: float, seed: int, augment_factor: int,
                   path: str | None, file_stamp: tuple | None) -> Splits:
    del file_stamp  # only part of the cache key: a rewritten file is read again
    return _build_splits(dataset, val_fraction, test_fraction, seed, augment_factor, path)


def _build_splits(dataset: str = "digits", val_fraction: float = 0.15, test_fraction: float = 0.2,
                  seed: int = 0, augment_factor: int = 1, path: str | None = None) -> Splits:
    if not 1 <= augment_factor <= 64:
        raise ValueError(f"augment_factor must be in [1, 64]; got {augment_factor}")
    x, y = _raw_samples(dataset, path)
    if augment_factor > 1 and x.shape[1] != SIDE * SIDE:
        raise DataError(f"data.augment_factor={augment_factor} shifts 8x8 images, but the samples have "
                        f"{x.shape[1]} features; set augment_factor: 1")
    train, val, test = _split(x, y, val_fraction, test_fraction, seed, path or dataset)
    return Splits(augment(train, augment_factor, seed), val, test)


def load_splits(dataset: str = "digits", val_fraction: float = 0.15, test_fraction: float = 0.2,
                seed: int = 0, augment_factor: int = 1, path: str | None = None) -> Splits:
    """Cached per arguments (and, for a file, its size and modification time)."""
    stamp = None
    if path is not None and Path(path).is_file():
        st = Path(path).stat()
        stamp = (st.st_size, st.st_mtime_ns)
    return _cached_splits(dataset, val_fraction, test_fraction, seed, augment_factor, path, stamp)


load_splits.__wrapped__ = _build_splits  # uncached, like functools' wrappers expose


def splits_for(data: DataConfig) -> Splits:
    """The splits a `DataConfig` describes (cached by load_splits)."""
    return load_splits(data.dataset, data.val_fraction, data.test_fraction, data.seed, data.augment_factor,
                       data.path)


def check_data(cfg: PipelineConfig | DataConfig) -> Splits:
    """Load and split the configured data now, so a missing, empty or malformed file fails with a DataError
    before any training starts (then cached for the stages)."""
    return splits_for(cfg.data if isinstance(cfg, PipelineConfig) else cfg)
