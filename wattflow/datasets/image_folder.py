"""`dataset: image-folder`: `root/<class>/<image>` PNG and JPEG files, grey or colour, any size.

Images are read lazily (Pillow; torchvision does not install beside the pinned torch), converted to one mode
(grey "L" when every image is grey, else "RGB": said in the notes), resized to `data.image_size` squared, scaled
to [0, 1] and normalised per channel with the mean and standard deviation of the TRAIN split (at most STATS_IMAGES of
its images, evenly spaced), computed here
and recorded with the model (`preprocessing`), so that deployment applies the same steps.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset

from wattflow.config import DataConfig
from wattflow.data import DATASETS, DataError, Splits, batches, stratified_indices

SUFFIXES = {".png", ".jpg", ".jpeg"}
GREY_MODES = {"1", "L", "I", "I;16", "F", "LA"}


class ImageFiles(Dataset):
    """(image float32 [C, S, S], label) for each file, read and transformed on access."""

    def __init__(self, files: list[Path], labels: np.ndarray, mode: str, size: int,
                 mean: list[float] | None = None, std: list[float] | None = None):
        self.files, self.labels, self.mode, self.size = files, labels, mode, size
        channels = 1 if mode == "L" else 3
        self.mean = np.asarray(mean or [0.0] * channels, dtype=np.float32).reshape(-1, 1, 1)
        self.std = np.asarray(std or [1.0] * channels, dtype=np.float32).reshape(-1, 1, 1)
        self.targets = labels  # the torchvision name, so generic code can stratify without reading images

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.read(i)), torch.as_tensor(self.labels[i])

    def read(self, i: int) -> np.ndarray:
        with Image.open(self.files[i]) as img:
            img = img.convert(self.mode).resize((self.size, self.size), Image.Resampling.BILINEAR)
            pixels = np.asarray(img, dtype=np.float32) / 255.0
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        return (pixels - self.mean) / self.std


def scan(root: Path) -> tuple[list[str], list[Path], np.ndarray]:
    """(class names, image files, labels) of a class-folder tree, or a DataError naming what is wrong."""
    if not root.is_dir():
        raise DataError(f"data.path {root} is not a folder; point it at a folder holding one sub-folder per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files, labels = [], []
    for label, name in enumerate(classes):
        found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        files += found
        labels += [label] * len(found)
    if not files:
        raise DataError(f"data.path {root} holds no .png/.jpg/.jpeg image in class sub-folders "
                        f"(found sub-folders: {classes or 'none'}); lay it out as {root}/<class>/<image>.png")
    used = sorted({classes[y] for y in labels})
    if len(used) < 2:
        raise DataError(f"data.path {root}: images of only one class ({used[0]!r}); a classifier needs at least "
                        "2 class folders with images")
    return classes, files, np.asarray(labels, dtype=np.int64)


def image_modes(root: Path, files: list[Path]) -> Counter:
    """Each file's mode, read from its header (cheap); an unreadable file is a DataError naming it."""
    modes, bad = Counter(), []
    for path in files:
        try:
            with Image.open(path) as img:
                img.verify()  # checks the file's structure without decoding every pixel
                modes[img.mode] += 1
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            bad.append(f"{path} ({type(err).__name__})")
    if bad:
        shown = "; ".join(bad[:5]) + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(f"data.path {root}: {len(bad)} image file(s) cannot be read: {shown}. Remove or replace them")
    return modes


STATS_IMAGES = 2048  # per-channel statistics from at most this many training images, evenly spaced


def channel_stats(dataset: ImageFiles) -> tuple[list[float], list[float]]:
    """Per-channel mean and standard deviation over every pixel of `dataset` (unnormalised), in one pass; a larger
    split is sampled evenly (STATS_IMAGES), which bounds the cost every rank pays at start-up."""
    if len(dataset) > STATS_IMAGES:
        dataset = Subset(dataset, np.linspace(0, len(dataset) - 1, STATS_IMAGES).round().astype(int).tolist())
    total = total_sq = None
    count = 0
    for xb, _ in batches(dataset, 256):
        flat = xb.astype(np.float64).transpose(1, 0, 2, 3).reshape(xb.shape[1], -1)
        total = flat.sum(1) if total is None else total + flat.sum(1)
        total_sq = (flat ** 2).sum(1) if total_sq is None else total_sq + (flat ** 2).sum(1)
        count += flat.shape[1]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
    return [float(m) for m in mean], [float(max(s, 1e-6)) for s in std]


@DATASETS.register("image-folder")
def image_folder(data: DataConfig) -> Splits:
    root = Path(data.path).resolve()
    classes, files, labels = scan(root)
    modes = image_modes(root, files)
    mode = "L" if set(modes) <= GREY_MODES else "RGB"
    notes = ()
    if set(modes) != {mode}:
        notes = (f"{data.path}: images of modes {dict(modes)} converted to {mode}",)
    train, val, test = stratified_indices(labels, data.val_fraction, data.test_fraction, data.seed, str(root))
    size = data.image_size

    def subset(idx: np.ndarray, mean=None, std=None) -> ImageFiles:
        return ImageFiles([files[i] for i in idx], labels[idx], mode, size, mean, std)

    mean, std = channel_stats(subset(train))
    digest = hashlib.sha256()
    for path in files:  # names, sizes and times: a changed, added or removed image is new data
        st = path.stat()
        digest.update(f"{path.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    channels = 1 if mode == "L" else 3
    return Splits(subset(train, mean, std), subset(val, mean, std), subset(test, mean, std),
                  num_classes=len(classes), input_shape=(channels, size, size),
                  preprocessing={"image_size": size, "mode": mode, "scale": 1 / 255, "mean": mean, "std": std,
                                 "resample": "bilinear", "classes": classes},
                  identity={"name": root.name, "source": str(root), "digest": digest.hexdigest()[:16]},
                  notes=notes)
