"""One-shot pruning by weight scores, per output row, without retraining (the large-model way):

- `magnitude`: score |W_ij|;
- `wanda` (Sun, Liu, Bair & Kolter 2023, "A Simple and Effective Pruning Approach for LLMs"): score
  |W_ij| * ||X_j||_2, the weight times the L2 norm of its input feature over the calibration tokens, so a
  small weight on a large activation is kept.

Either removes a share `sparsity` of each row's weights (unstructured), or keeps the `n` best of every `m`
consecutive weights of a row (`n:m` semi-structured, 2:4 is what sparse tensor cores run). Activations are
read once from the dense model (forward pre-hooks over the calibration batches); the paper prunes layer by
layer feeding each the previous pruned layers' outputs, which matters little at these depths.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

SCORES = ("magnitude", "wanda")


def input_norms(model: nn.Module, layers: list[nn.Linear], batches: Iterable[torch.Tensor]
                ) -> dict[nn.Module, torch.Tensor]:
    """||X_j||_2 per input feature j of each layer, over every token of every calibration batch."""
    sums = {m: torch.zeros(m.in_features, dtype=torch.float64) for m in layers}

    def hook(module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        sums[module] += (x * x).sum(dim=0)

    handles = [m.register_forward_pre_hook(hook) for m in layers]
    try:
        with torch.inference_mode():
            for xb in batches:
                model(xb)
    finally:
        for h in handles:
            h.remove()
    return {m: s.sqrt().float() for m, s in sums.items()}


def scores(weight: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
    return weight.abs() if norm is None else weight.abs() * norm[None, :]


def row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask removing the int(sparsity * row width) lowest scores of every row."""
    k = int(score.shape[1] * sparsity)
    mask = torch.ones_like(score, dtype=torch.bool)
    if k:
        lowest = torch.topk(score, k, dim=1, largest=False).indices
        mask.scatter_(1, lowest, False)
    return mask


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask holding the n highest scores of every group of m consecutive weights in a row."""
    rows, width = score.shape
    if width % m:
        raise ValueError(f"width {width} is not a multiple of {m}")
    groups = score.reshape(rows, width // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, torch.topk(groups, n, dim=2).indices, True)
    return keep.reshape(rows, width)


def sparsify(model: nn.Module, layers: dict[str, nn.Linear], method: str, sparsity: float | None,
             pattern: tuple[int, int] | None, calibration: Iterable[torch.Tensor] | None) -> dict[str, float]:
    """Zero weights of `layers` (name -> Linear) in place; returns the zero share per "<layer>.weight"."""
    if method not in SCORES:
        raise ValueError(f"unknown score {method!r}; allowed: {', '.join(SCORES)}")
    if (sparsity is None) == (pattern is None):
        raise ValueError("give either a sparsity or an n:m pattern")
    if pattern is not None:
        narrow = {name: m.in_features for name, m in layers.items() if m.in_features % pattern[1]}
        if narrow:
            raise ValueError(f"{pattern[0]}:{pattern[1]} sparsity needs layer input widths that are multiples of "
                             f"{pattern[1]}; these are not: {narrow}")
    norms = input_norms(model, list(layers.values()), calibration) if method == "wanda" else {}
    zero_share = {}
    with torch.no_grad():
        for name, layer in layers.items():
            score = scores(layer.weight, norms.get(layer))
            mask = nm_mask(score, *pattern) if pattern else row_mask(score, sparsity)
            layer.weight.mul_(mask)
            zero_share[f"{name}.weight"] = float((layer.weight == 0).float().mean())
    return zero_share
