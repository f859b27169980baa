"""A small image folder made from data that ships with scikit-learn (the 8x8 digits): nothing is downloaded.
For the bring-your-own example, the tests and the bench.

    python -m wattflow.datasets.sample_images out/ --mode RGB --size 32      # root/<digit>/<n>.png
    write_digit_images("out", mode="L", size=28, fmt="jpeg", copies=10)    # grey JPEGs, 10x the images

RGB images paint each digit in a light colour on a dark background colour, both drawn per image from the seed:
colour carries no class information, so a model must learn the shapes. `copies` > 1 adds shifted copies of every
image (one pixel in each direction, as `data.augment_factor` does), for scale tests.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from wattflow.data import ONE_PIXEL, UP_TO_TWO, digits_arrays, shift_images


def write_digit_images(root: str | Path, *, mode: str = "RGB", size: int = 32, fmt: str = "png",
                       per_class: int | None = None, copies: int = 1, seed: int = 0) -> int:
    """Write the digits as `root/<digit>/<index>.<fmt>` images; return how many were written."""
    if mode not in ("L", "RGB"):
        raise ValueError(f"mode must be L or RGB; got {mode!r}")
    x, y = digits_arrays()
    if per_class is not None:
        keep = np.concatenate([np.flatnonzero(y == c)[:per_class] for c in range(10)])
        x, y = x[keep], y[keep]
    rng = np.random.default_rng(seed)
    shifts = [(0, 0), *ONE_PIXEL, *UP_TO_TWO]
    root = Path(root)
    written = 0
    for copy in range(copies):
        moved = shift_images(x, *shifts[copy % len(shifts)])
        for i, (pixels, label) in enumerate(zip(moved, y, strict=True)):
            ink = Image.fromarray((pixels.reshape(8, 8) * 255).astype(np.uint8), "L")
            ink = ink.resize((size, size), Image.Resampling.BILINEAR)
            if mode == "RGB":
                fg, bg = rng.integers(128, 256, 3), rng.integers(0, 96, 3)  # light ink on a dark ground
                alpha = np.asarray(ink, dtype=np.float32)[..., None] / 255.0
                img = Image.fromarray((bg * (1 - alpha) + fg * alpha).astype(np.uint8), "RGB")
            else:
                img = ink
            path = root / str(label) / f"{copy * len(x) + i:05d}.{'jpg' if fmt == 'jpeg' else fmt}"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path, quality=95) if fmt == "jpeg" else img.save(path)
            written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("--mode", default="RGB", choices=["L", "RGB"])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--format", default="png", choices=["png", "jpeg"])
    parser.add_argument("--per-class", type=int, default=None)
    parser.add_argument("--copies", type=int, default=1)
    args = parser.parse_args(argv)
    n = write_digit_images(args.root, mode=args.mode, size=args.size, fmt=args.format, per_class=args.per_class,
                           copies=args.copies)
    print(f"wrote {n} {args.mode} {args.size}x{args.size} {args.format} images under {args.root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
