"""Pruning with fine-tuning, two ways:

- unstructured: gradual global magnitude (L1) pruning. Sparsity rises over `schedule_steps` rounds on the
  cubic schedule of Zhu & Gupta (2017), each round followed by masked fine-tuning. The masks are made
  permanent (`prune.remove`) before saving, so the checkpoint holds plain `weight` tensors with zeros (no
  `weight_orig`/`weight_mask` pairs that would double the file); the dense file does not shrink.
- structured: whole Linear outputs / Conv channels are removed with torch-pruning (DepGraph, residual
  connections included), so the dense model really shrinks. The new shapes are written into the spec
  (built-ins: their widths; any other model: `wattflow.structure` edits), so the checkpoint still loads with
  `build_model(spec)` and `weights_only=True`.

Layers in `keep` (module names; default: the classifier head, traced) are never pruned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch.nn.utils import prune
from torch.utils.data import Dataset

from wattflow.data import first_samples, loader
from wattflow.models import build_model, load_checkpoint, output_layer, prunable_modules, save_checkpoint
from wattflow.structure import structure_edits
from wattflow.train import lr_factor

LAYER_TYPES: dict[str, tuple[type[nn.Module], ...]] = {"linear": (nn.Linear,),
                                                       "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d)}
METHODS = ("unstructured", "structured")


@dataclass(frozen=True)
class PruneOutput:
    checkpoint: str
    sha256: str
    # unstructured: zero share over the pruned weight tensors; structured: share of all parameters removed
    sparsity: float
    # unstructured: zero share per "<layer>.weight"; structured: share of outputs removed per "<layer>"
    layer_sparsity: dict[str, float]
    method: str = "unstructured"
    params_before: int = 0
    params_after: int = 0       # parameters of the saved dense model (only structured pruning lowers it)
    nonzero_params: int = 0     # nonzero parameters of the saved model
    layer_width: dict[str, tuple[int, int]] = field(default_factory=dict)  # structured: outputs before, after
    spec: dict[str, Any] = field(default_factory=dict)                     # the saved model's spec


def cubic_sparsity(final: float, step: int, steps: int) -> float:
    """Zhu & Gupta's gradual schedule: prune fast while there are many redundant weights, slowly near the end."""
    return final * (1.0 - (1.0 - step / steps) ** 3)


def weight_sparsity(model: nn.Module, layer_types: tuple[str, ...] = tuple(LAYER_TYPES),
                    kept: list[nn.Module] = ()) -> tuple[float, dict[str, float]]:
    """Zero fraction over the weights of the selected Linear/Conv layers (not the kept ones), and per layer."""
    per_layer, zeros, total = {}, 0, 0
    names = {m: n for n, m in model.named_modules()}
    for module, attr in _selected(model, layer_types, kept):
        w = getattr(module, attr)
        z = int((w == 0).sum())
        per_layer[f"{names[module]}.{attr}"] = z / w.numel()
        zeros, total = zeros + z, total + w.numel()
    return zeros / total, per_layer


def fine_tune(model: nn.Module, train: Dataset, epochs: int, lr: float, batch_size: int, seed: int,
              loss_fn=F.cross_entropy) -> None:
    """Plain SGD (Nesterov) with cosine decay; pruning hooks, when present, keep masked weights at zero."""
    if epochs == 0:
        return
    batches = loader(train, batch_size, shuffle=True, seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True)
    total = epochs * len(batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, 1, total))
    model.train()
    for _ in range(epochs):
        for xb, yb in batches:
            loss = loss_fn(model(xb), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()


def prune_checkpoint(ckpt_path: str | Path, out_path: str | Path, sparsity: float, train: Dataset,
                     fine_tune_epochs: int, lr: float, batch_size: int = 32, seed: int = 0,
                     expected_sha256: str | None = None, *, method: str = "unstructured", schedule_steps: int = 1,
                     layer_types: tuple[str, ...] = ("linear", "conv"), keep: tuple[str, ...] | None = None,
                     loss_fn=F.cross_entropy) -> PruneOutput:
    """Prune to `sparsity` (unstructured: share of weights zeroed; structured: share of each eligible layer's
    outputs removed) in `schedule_steps` prune -> fine-tune rounds sharing `fine_tune_epochs`. `train` is any
    Dataset of (input, target); `keep` names modules never pruned (default: the traced classifier head)."""
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; allowed: {', '.join(METHODS)}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1); got {sparsity}")
    if schedule_steps < 1:
        raise ValueError(f"schedule_steps must be >= 1; got {schedule_steps}")
    unknown = set(layer_types) - set(LAYER_TYPES)
    if unknown or not layer_types:
        raise ValueError(f"layer_types must be a non-empty subset of {', '.join(LAYER_TYPES)}; got {layer_types}")

    model, spec, meta = load_checkpoint(ckpt_path, expected_sha256)
    params_before = _count(model)
    epochs = _epochs_per_round(fine_tune_epochs, schedule_steps)
    example = torch.from_numpy(first_samples(train, 2))
    example = example.to(next(model.parameters()).dtype) if example.is_floating_point() else example  # token ids
    kept = _kept_modules(model, keep, example)
    tune = lambda n, s: fine_tune(model, train, n, lr, batch_size, s, loss_fn)  # noqa: E731
    if method == "unstructured":
        _prune_unstructured(model, sparsity, layer_types, epochs, tune, seed, kept)
        achieved, per_layer = weight_sparsity(model, layer_types, kept)
        widths: dict[str, tuple[int, int]] = {}
    else:
        widths = _prune_structured(model, spec, sparsity, layer_types, epochs, tune, seed, kept, example)
        spec = spec_of(model, spec)
        achieved = 1.0 - _count(model) / params_before
        per_layer = {name: 1.0 - after / before for name, (before, after) in widths.items()}

    meta = {**meta, "pruned_sparsity": achieved, "prune_method": method, "params_before_prune": params_before}
    sha = save_checkpoint(out_path, model, spec, meta)
    _check_reload(out_path, sha, model, example)
    return PruneOutput(str(out_path), sha, achieved, per_layer, method, params_before, _count(model),
                       int(sum(int((p != 0).sum()) for p in model.parameters())), widths, dict(spec))


def _kept_modules(model: nn.Module, keep: tuple[str, ...] | None, example: torch.Tensor) -> list[nn.Module]:
    if keep is None:
        head = output_layer(model, example)
        return [head] if head is not None else []
    modules = dict(model.named_modules())
    missing = [n for n in keep if n not in modules]
    if missing:
        raise ValueError(f"layers to keep {missing} are not in the model")
    return [modules[n] for n in keep]


def _prune_unstructured(model: nn.Module, sparsity: float, layer_types: tuple[str, ...], epochs: list[int],
                        tune, seed: int, kept: list[nn.Module]) -> None:
    targets = _selected(model, layer_types, kept)
    total = sum(getattr(m, a).numel() for m, a in targets)
    for step, round_epochs in enumerate(epochs, start=1):
        masked = sum(int((m.get_buffer(f"{a}_mask") == 0).sum()) for m, a in targets if prune.is_pruned(m))
        goal = round(cubic_sparsity(sparsity, step, len(epochs)) * total)
        # A float `amount` would be a share of the weights still unmasked, not of all weights:
        # pass the count still to remove so each round lands exactly on its schedule point.
        prune.global_unstructured(targets, pruning_method=prune.L1Unstructured, amount=max(0, goal - masked))
        tune(round_epochs, seed + step - 1)
    for module, attr in targets:
        prune.remove(module, attr)


def _prune_structured(model: nn.Module, spec: dict[str, Any], sparsity: float, layer_types: tuple[str, ...],
                      epochs: list[int], tune, seed: int, kept: list[nn.Module], example: torch.Tensor
                      ) -> dict[str, tuple[int, int]]:
    """Remove outputs of the eligible layers in place; return their widths (before, after)."""
    layers = [m for m, _ in prunable_modules(model)]
    allowed = _types(layer_types)
    # A model may say what structured pruning must keep and which layers are attention heads (wattflow.zoo.gpt:
    # whole heads and MLP neurons go, the residual width stays).
    hints = model.pruning_hints() if hasattr(model, "pruning_hints") else {}
    fixed = list(hints.get("ignored_layers", ()))
    heads = hints.get("num_heads", {})
    eligible = [m for m in layers if isinstance(m, allowed) and m not in kept and m not in fixed]  # kept: the head
    if not eligible:
        raise ValueError(f"structured pruning of a {spec.get('kind') or spec.get('factory')} with layer_types="
                         f"{layer_types} has no layer whose outputs could be removed")
    names = {m: n for n, m in model.named_modules()}
    before = {names[m]: _out_width(m) for m in eligible}
    # DepGraph traces one forward pass to find every tensor coupled to a removed output (the next layer's
    # inputs, a bias, the flattened conv features), so the pruned model stays consistent. Ignored layers
    # keep their outputs but still lose the inputs their producers lose.
    # torch-pruning keeps int(width * (1 - ratio)) outputs and silently skips a layer it would empty: cap
    # each layer's ratio so that one output survives (the epsilon guards the float product against flooring).
    ratios = {m: max(0.0, min(sparsity, 1.0 - (1.0 + 1e-6) / _out_width(m))) for m in eligible if m not in heads}
    # Attention: whole heads of q, k and v together (torch-pruning's num_heads), never part of a head.
    head_options = dict(num_heads=heads, prune_num_heads=True, prune_head_dims=False,
                        head_pruning_ratio=sparsity) if heads else {}
    pruner = tp.pruner.MetaPruner(
        model, example,
        importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=sparsity, pruning_ratio_dict=ratios,
        ignored_layers=[m for m in layers if m not in eligible] + [m for m in fixed if m not in layers],
        iterative_steps=len(epochs), **head_options,
        iterative_pruning_ratio_scheduler=lambda final, steps: [cubic_sparsity(final, t, steps)
                                                                for t in range(steps + 1)])
    for step, round_epochs in enumerate(epochs, start=1):
        pruner.step()
        tune(round_epochs, seed + step - 1)
    return {names[m]: (before[names[m]], _out_width(m)) for m in eligible}


def spec_of(model: nn.Module, spec: dict[str, Any]) -> dict[str, Any]:
    """The spec of `model` after structured pruning: the built-in MLP and CNN get their new widths; any other
    model gets the shapes and sizes that changed, as `structure` edits against a fresh build."""
    if spec.get("kind") == "mlp":
        linears = [m for m in model.net if isinstance(m, nn.Linear)]
        new = {**spec, "hidden": [m.out_features for m in linears[:-1]]}
    elif spec.get("kind") == "cnn":
        convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
        new = {**spec, "channels": [c.out_channels for c in convs], "hidden": model.head[1].out_features}
    else:
        fresh = build_model({k: v for k, v in spec.items() if k != "structure"})
        new = {**spec, "structure": structure_edits(fresh, model)}
    build_model(new).load_state_dict(model.state_dict())  # strict: fails loudly if a shape was missed
    return new


def _check_reload(path: str | Path, sha: str, model: nn.Module, x: torch.Tensor) -> None:
    """The saved file must rebuild from its spec alone and compute what the pruned model computes."""
    reloaded, _, _ = load_checkpoint(path, sha)
    with torch.inference_mode():
        if not torch.allclose(reloaded(x), model(x), atol=1e-5):
            raise RuntimeError(f"pruned checkpoint {path} does not reproduce the pruned model's outputs")


def _epochs_per_round(total: int, rounds: int) -> list[int]:
    """Spread `total` epochs over the rounds, at least one per round when there is any fine-tuning."""
    if total == 0:
        return [0] * rounds
    return [max(1, total * (r + 1) // rounds - total * r // rounds) for r in range(rounds)]


def _types(layer_types: tuple[str, ...]) -> tuple[type[nn.Module], ...]:
    return tuple(t for name in layer_types for t in LAYER_TYPES[name])


def _selected(model: nn.Module, layer_types: tuple[str, ...], kept: list[nn.Module] = ()
              ) -> list[tuple[nn.Module, str]]:
    targets = [(m, a) for m, a in prunable_modules(model) if isinstance(m, _types(layer_types)) and m not in kept]
    if not targets:
        raise ValueError(f"the model has no layer of the types {layer_types} to prune")
    return targets


def _out_width(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
