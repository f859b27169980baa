"""Weight-only quantizers that keep a plain float32 torch model but snap every Linear/Conv2d weight onto a
small grid, and say which grid in the checkpoint meta, so that `wattflow.compress.pack` can store the codes
instead of the floats, losslessly:

    meta = snap_kmeans(model, bits=4)  # {"weight_grid": {"net.0.weight": {"kind": "codebook", ...}}}
    save_checkpoint(path, model, spec, meta)

- `snap_int8`: symmetric int8 per output channel (scale = max|w| / 127), Jacob et al. style.
- `snap_kmeans`: Deep Compression weight sharing (Han et al. 2016): per layer, 1-D k-means over the nonzero
  weights with linearly initialised centroids; zero stays its own exact code, so pruning survives.

Neither fine-tunes the shared values afterwards (the paper does): snapping alone keeps the accuracy of the
small models here, and it keeps this module free of training code. `snap_int8` keeps biases float32;
`snap_kmeans`, the maximum-compression path, rounds them to bfloat16 values (a few hundred floats would
otherwise be ~30% of a packed LeNet-300-100), so the variant that is evaluated is the one that is stored.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from wattflow.models import prunable_modules

INT8_MAX = 127  # symmetric: -127..127, so +-max|w| are both exact and the grid has no bias
KMEANS_ITERATIONS = 20


def _named_weights(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    names = {id(m): n for n, m in model.named_modules()}
    return [(f"{names[id(m)]}.{attr}", getattr(m, attr)) for m, attr in prunable_modules(model)]


def _check_float32(name: str, w: torch.Tensor) -> None:
    # The grids are float32 values; a bf16 weight cannot hold code * scale exactly.
    if w.dtype != torch.float32:
        raise ValueError(f"{name} is {w.dtype}; snap a float32 model (model.float())")


@torch.no_grad()
def snap_int8(model: nn.Module) -> dict:
    """Replace each weight by code * scale (code int8, scale float32 per output channel); zeros stay zero.
    Returns {"weight_grid": {param name: {"kind": "int8", "scales": [...]}}}."""
    grid = {}
    for name, w in _named_weights(model):
        _check_float32(name, w)
        rows = w.reshape(len(w), -1)
        scales = rows.abs().amax(dim=1) / INT8_MAX  # float32, as stored
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row keeps code 0
        codes = torch.round(rows / safe[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
        # int8 -> float turns a pruned -0.0 into +0.0; the float32 product is what the packer recomputes.
        w.copy_((codes.float() * scales[:, None]).reshape(w.shape))
        grid[name] = {"kind": "int8", "scales": scales.tolist()}
    return {"weight_grid": grid}


@torch.no_grad()
def snap_kmeans(model: nn.Module, bits: int = 4) -> dict:
    """Replace each nonzero weight by the nearest of at most 2**bits - 1 per-layer shared values; zero is
    the remaining code. Returns {"weight_grid": {param name: {"kind": "codebook", "centroids": [...]}}}
    with the centroids in use, ascending, as float32-exact Python floats."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    grid = {}
    for name, w in _named_weights(model):
        _check_float32(name, w)
        values = w.detach().cpu().numpy().reshape(-1)
        nonzero = values != 0
        centroids = kmeans_1d(values[nonzero], 2**bits - 1)
        snapped = np.zeros_like(values)
        snapped[nonzero] = centroids[_nearest(values[nonzero], centroids)]
        w.copy_(torch.from_numpy(snapped.reshape(w.shape)))
        used = np.unique(snapped[nonzero])  # empty clusters dropped: a smaller table
        grid[name] = {"kind": "codebook", "centroids": used.tolist()}
    for module, _ in prunable_modules(model):
        if module.bias is not None:  # bf16-representable float32 values: the packer keeps 2 bytes of each
            module.bias.copy_(module.bias.to(torch.bfloat16).float())
    return {"weight_grid": grid, "bias": "rounded to bfloat16 values"}


def kmeans_1d(x: np.ndarray, k: int, iterations: int = KMEANS_ITERATIONS) -> np.ndarray:
    """Lloyd's k-means on a 1-D sample: `k` centroids initialised linearly between min and max (the paper's
    choice: it keeps the rare large weights, which matter most, their own centroids). Deterministic; an
    empty cluster keeps its centroid. Returns float32 centroids, ascending."""
    if x.size == 0:
        return np.zeros(0, np.float32)
    x = x.astype(np.float64)
    centroids = np.linspace(x.min(), x.max(), k)
    for _ in range(iterations):
        assign = _nearest(x, centroids)
        sums = np.bincount(assign, weights=x, minlength=k)
        counts = np.bincount(assign, minlength=k)
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        if np.array_equal(updated, centroids):
            break
        centroids = updated
    return np.sort(centroids.astype(np.float32))


def _nearest(x: np.ndarray, sorted_centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (ascending centroids; ties go to the lower one)."""
    mids = (sorted_centroids[1:] + sorted_centroids[:-1]) / 2
    return np.searchsorted(mids, x, side="left")
