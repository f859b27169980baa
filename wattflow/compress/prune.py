"""Global magnitude (L1) unstructured pruning with masked fine-tuning.

The masks are made permanent (`prune.remove`) before saving, so the checkpoint holds plain `weight`
tensors with zeros: no `weight_orig`/`weight_mask` pairs that would double the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import DataLoader, TensorDataset

from wattflow.data import Split
from wattflow.models import load_checkpoint, prunable_modules, save_checkpoint
from wattflow.train import lr_factor


@dataclass(frozen=True)
class PruneOutput:
    checkpoint: str
    sha256: str
    sparsity: float                    # achieved, over the pruned weight tensors
    layer_sparsity: dict[str, float]   # per pruned tensor


def weight_sparsity(model: nn.Module) -> tuple[float, dict[str, float]]:
    """Zero fraction over all Linear/Conv2d weights, and per layer."""
    per_layer, zeros, total = {}, 0, 0
    names = {m: n for n, m in model.named_modules()}
    for module, attr in prunable_modules(model):
        w = getattr(module, attr)
        z = int((w == 0).sum())
        per_layer[f"{names[module]}.{attr}"] = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
    return zeros / total, per_layer


def fine_tune(model: nn.Module, train: Split, epochs: int, lr: float, batch_size: int, seed: int) -> None:
    """Plain SGD with cosine decay; the pruning hooks keep masked weights at zero throughout."""
    if epochs == 0:
        return
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(TensorDataset(torch.from_numpy(train.x), torch.from_numpy(train.y)),
                        batch_size=batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    total = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 1, total))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            loss = loss_fn(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()


def prune_checkpoint(ckpt_path: str | Path, out_path: str | Path, sparsity: float, train: Split,
                     fine_tune_epochs: int, lr: float, batch_size: int = 32, seed: int = 0,
                     expected_sha256: str | None = None) -> PruneOutput:
    model, spec, meta = load_checkpoint(ckpt_path, expected_sha256)
    targets = prunable_modules(model)
    prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=sparsity)
    fine_tune(model, train, fine_tune_epochs, lr, batch_size, seed)
    for module, attr in targets:
        prune.remove(module, attr)
    achieved, per_layer = weight_sparsity(model)
    sha = save_checkpoint(out_path, model, spec, {**meta, "pruned_sparsity": achieved})
    return PruneOutput(str(out_path), sha, achieved, per_layer)
