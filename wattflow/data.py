"""Datasets: every format is an entry of `DATASETS` that turns a `DataConfig` into `Splits` — train, val and
test `torch.utils.data.Dataset`s plus what the model needs to know (sample shape and dtype, classes, the
preprocessing to record with the model, and an identity for lineage). Stages read them through `DataLoader`s
(`loader`), batch by batch.

- `digits` (default): scikit-learn's bundled 8x8 digits (1,797 images, shipped inside the package: nothing is
  downloaded), flat [64] rows in [0, 1];
- `npz`: your own samples in a .npz file (`x`: float [N, features] or [N, C, H, W]; `y`: integer labels [N]);
- `image-folder` (wattflow/datasets/image_folder.py): `root/<class>/<image>` PNG/JPEG, read lazily;
- a factory by import path (wattflow/datasets/factory.py) returning your own Datasets.
Splits are stratified and deterministic for a given seed. A bad file fails with `DataError` (cause and fix)
before training starts.

`augment_factor` > 1 grows the TRAIN split only to factor x its size with deterministic shifted copies
of its 8x8 images (copy 0: the originals; copies 1-8: every image moved one pixel in each of the 8
directions; further copies: each image moved by its own shift of up to 2 pixels, drawn from `seed`).
Vacated pixels are 0 (the digits' blank background); labels are the originals'."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from wattflow.config import DataConfig, PipelineConfig
from wattflow.plugins import Registry


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file, the cause and the fix."""


@dataclass(frozen=True, eq=False)
class Split(Dataset):
    """Samples held in memory (the bundled digits, a .npz): a Dataset like any other."""

    x: np.ndarray  # float32 [N, *sample shape]
    y: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.x[i]), torch.as_tensor(self.y[i])


@dataclass(frozen=True, eq=False)
class Splits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, ...]     # one sample's shape
    input_dtype: str = "float32"
    # Recorded with the model, so that deployment applies the same preprocessing (image size, mode, mean, std).
    preprocessing: dict[str, Any] = field(default_factory=dict)
    # For lineage (MLflow's dataset tracking) and cache keys: name, source, digest (content hash).
    identity: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()      # what was done to the data that its owner should know (conversions)

    @property
    def in_features(self) -> int:
        return math.prod(self.input_shape)


def loader(dataset: Dataset, batch_size: int, *, shuffle: bool = False, seed: int = 0, num_workers: int = 0,
           sampler=None, pin_memory: bool = False) -> DataLoader:
    """The one way stages read data: batches, never the whole split at once. `pin_memory` when the batches go
    to a GPU."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, generator=generator,
                      sampler=sampler, num_workers=num_workers, persistent_workers=False, pin_memory=pin_memory)


def batches(dataset: Dataset, batch_size: int = 256, num_workers: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(x, y) numpy batches in order: what predictors (torch, ONNX Runtime) take."""
    for xb, yb in loader(dataset, batch_size, num_workers=num_workers):
        yield xb.numpy(), yb.numpy()


def first_samples(dataset: Dataset, n: int) -> np.ndarray:
    """The inputs of the first `n` samples (or all, when fewer): calibration and timing batches."""
    parts, have = [], 0
    for xb, _ in batches(dataset, min(n, 256)):
        parts.append(xb[: n - have])
        have += len(parts[-1])
        if have >= n:
            break
    return np.concatenate(parts)


DATASETS: Registry = Registry("dataset format")


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
    if factor == 1:
        return split
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


NPZ_FORMAT = "x: float32 [N, features] or [N, C, H, W]; y: integer labels [N] in 0..classes-1"


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
    if x.ndim not in (2, 4) or x.shape[1] < 1:
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


# Stratified splits made in this process, by content (`split_key`). A launcher saves them for its torchrun ranks
# (`save_split_indices`, named by SPLIT_INDICES_ENV): a rank that finds its split there imports no scikit-learn,
# 1.9 of the 4.5 s a rank spends importing on 2 cores.
_SPLIT_INDICES: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
SPLIT_INDICES_ENV = "WATTFLOW_SPLIT_INDICES"


def split_key(y: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> str:
    return f"{array_digest(y)}:{val_fraction!r}:{test_fraction!r}:{seed}"


def save_split_indices(path: str | os.PathLike) -> None:
    """This process's stratified splits, for the processes it launches (read back by `stratified_indices`)."""
    keys = sorted(_SPLIT_INDICES)
    partial = Path(f"{path}.{os.getpid()}.partial.npz")  # renamed when whole: a reader never sees half a file
    np.savez(partial, keys=np.array(keys, dtype=str),
             **{f"{part}{i}": _SPLIT_INDICES[key][j] for i, key in enumerate(keys)
                for j, part in enumerate(("train", "val", "test"))})
    os.replace(partial, path)


def _launcher_split(key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    path = os.environ.get(SPLIT_INDICES_ENV)
    if not path or not os.path.isfile(path):
        return None
    with np.load(path, allow_pickle=False) as saved:
        keys = list(saved["keys"])
        if key not in keys:
            return None
        i = keys.index(key)
        return saved[f"train{i}"], saved[f"val{i}"], saved[f"test{i}"]


def stratified_indices(y: np.ndarray, val_fraction: float, test_fraction: float, seed: int, where: str
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of the train, val and test samples: stratified by label (scikit-learn's `train_test_split`),
    deterministic for a seed."""
    check_class_counts(y, where)
    key = split_key(y, val_fraction, test_fraction, seed)
    if key not in _SPLIT_INDICES:
        _SPLIT_INDICES[key] = _launcher_split(key) or _stratified_split(y, val_fraction, test_fraction, seed, where)
        while len(_SPLIT_INDICES) > 8:  # a long-lived worker's datasets: keep the latest few
            del _SPLIT_INDICES[next(iter(_SPLIT_INDICES))]
    return _SPLIT_INDICES[key]


def _stratified_split(y: np.ndarray, val_fraction: float, test_fraction: float, seed: int, where: str
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    try:
        rest, test = train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)
        train, val = train_test_split(rest, test_size=val_fraction / (1.0 - test_fraction), stratify=y[rest],
                                      random_state=seed)
    except ValueError as err:  # sklearn: a split too small to hold every class
        raise DataError(f"{where}: cannot split {len(y)} samples of {len(np.unique(y))} classes into "
                        f"val_fraction={val_fraction} and test_fraction={test_fraction} with every class in each "
                        f"split ({err}); add samples or raise the fractions") from None
    return train, val, test


def array_digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str((a.dtype, a.shape)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def in_memory_splits(x: np.ndarray, y: np.ndarray, data: DataConfig, identity: dict[str, str]) -> Splits:
    """Splits of samples held in memory (x [N, *shape], y [N]), the train split optionally augmented."""
    if data.augment_factor > 1 and math.prod(x.shape[1:]) != SIDE * SIDE:
        raise DataError(f"data.augment_factor={data.augment_factor} shifts 8x8 images, but the samples have shape "
                        f"{list(x.shape[1:])}; set augment_factor: 1")
    train, val, test = stratified_indices(y, data.val_fraction, data.test_fraction, data.seed,
                                          data.path or identity["name"])
    return Splits(augment(Split(x[train], y[train]), data.augment_factor, data.seed), Split(x[val], y[val]),
                  Split(x[test], y[test]), num_classes=int(y.max()) + 1, input_shape=tuple(x.shape[1:]),
                  identity=identity)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits as (x float32 [1797, 64] in [0, 1], y int64): scikit-learn's copy, read as its
    `load_digits` reads it, without importing scikit-learn (1.9 s)."""
    package = importlib.util.find_spec("sklearn").submodule_search_locations[0]
    raw = np.loadtxt(Path(package) / "datasets" / "data" / "digits.csv.gz", delimiter=",")
    return (raw[:, :-1] / 16.0).astype(np.float32), raw[:, -1].astype(np.int64)  # intensities are 0..16


@DATASETS.register("digits")
def digits(data: DataConfig) -> Splits:
    x, y = digits_arrays()
    return in_memory_splits(x, y, data, {"name": "digits", "source": "sklearn.datasets.load_digits",
                                         "digest": array_digest(x, y)[:16]})


@DATASETS.register("npz")
def npz(data: DataConfig) -> Splits:
    if data.path is None:
        raise DataError("dataset npz needs data.path: the .npz file with arrays x and y")
    x, y = read_npz(data.path)
    return in_memory_splits(x, y, data, {"name": Path(data.path).stem, "source": str(Path(data.path).resolve()),
                                         "digest": array_digest(x, y)[:16]})


def format_of(data: DataConfig) -> str:
    return data.dataset if isinstance(data.dataset, str) else "factory"


@lru_cache(maxsize=8)
def _cached_splits(data_json: str, file_stamp: tuple | None) -> Splits:
    del file_stamp  # only part of the cache key: a rewritten file is read again
    data = DataConfig.model_validate_json(data_json)
    return DATASETS.get(format_of(data))(data)


def _stamp(path: str | None) -> tuple | None:
    if path is None or not Path(path).exists():
        return None
    st = Path(path).stat()
    return (st.st_size, st.st_mtime_ns)


def splits_for(data: DataConfig) -> Splits:
    """The splits a `DataConfig` describes; cached per configuration (and, for a file, its size and time)."""
    return _cached_splits(data.model_dump_json(), _stamp(data.path))


def load_splits(dataset: str = "digits", val_fraction: float = 0.15, test_fraction: float = 0.2,
                seed: int = 0, augment_factor: int = 1, path: str | None = None) -> Splits:
    """The splits of a built-in format, by its settings (cached)."""
    return splits_for(DataConfig(dataset=dataset, val_fraction=val_fraction, test_fraction=test_fraction,
                                 seed=seed, augment_factor=augment_factor, path=path))


def _uncached(dataset: str = "digits", val_fraction: float = 0.15, test_fraction: float = 0.2, seed: int = 0,
              augment_factor: int = 1, path: str | None = None) -> Splits:
    if not 1 <= augment_factor <= 64:
        raise ValueError(f"augment_factor must be in [1, 64]; got {augment_factor}")
    data = DataConfig.model_construct(dataset=dataset, val_fraction=val_fraction, test_fraction=test_fraction,
                                      seed=seed, augment_factor=augment_factor, path=path, image_size=32,
                                      num_workers=0)
    return DATASETS.get(format_of(data))(data)


load_splits.__wrapped__ = _uncached  # uncached, like functools' wrappers expose


def check_data(cfg: PipelineConfig | DataConfig) -> Splits:
    """Load and split the configured data now, so a missing, empty or malformed file fails with a DataError
    before any training starts (then cached for the stages)."""
    return splits_for(cfg.data if isinstance(cfg, PipelineConfig) else cfg)


from wattflow import datasets  # noqa: E402,F401  (registers image-folder and factory)
